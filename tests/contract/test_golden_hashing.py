"""The hashing contract, pinned: literal keys and rows written once from uembed-hash-v1 and never regenerated.

Every other hashing test recomputes its expectations with the code it tests, so a change to the
canonical bytes, the seed format or the row reduction would leave them green. These values would
not: if this test fails, bundles already exported score with the wrong rows. Change the contract
only with a new ``SPEC_VERSION`` (and a new table here), never by editing these numbers.
"""

import numpy as np
import pytest
import xxhash

from uembed.contract.hashing import (
    SPEC_VERSION,
    canonical_bytes,
    canonical_column,
    hash_canonical,
    hash_canonical_columns,
    hash_value,
    hash_values,
    lookup_seed,
    rows_of,
)

# (feature namespace, value, lookup, canonical bytes, seed, 64-bit key, row of a 1,000-row table, row of a 1,048,583-row table)
GOLDEN = [
    ("user_id", "196", 0, b"196", 8702580777738281986, 9990733149613652292, 292, 636091),
    ("user_id", 196, 0, b"196", 8702580777738281986, 9990733149613652292, 292, 636091),
    ("user_id", 196.0, 0, b"196", 8702580777738281986, 9990733149613652292, 292, 636091),
    ("movie_id", "242", 1, b"242", 2053935027283184067, 13863878994516258095, 95, 43279),
    ("movie_id", "242", 2, b"242", 6741827927439989462, 11437581055860822578, 578, 678941),
    ("zip_code", "55105", 0, b"55105", 15269921958583946639, 8239320733196258971, 971, 92522),
    ("genres", "Film-Noir", 0, b"Film-Noir", 7762711782933948758, 6842915362828520311, 311, 285226),
    ("city", "São Paulo", 0, b"S\xc3\xa3o Paulo", 12393241746193810508, 8954875639142504610, 610, 160913),
    ("city", "東京", 3, b"\xe6\x9d\xb1\xe4\xba\xac", 9196314737937464760, 15059812755054480769, 769, 400780),
    ("age", 49.5, 0, b"49.5", 15945174260446586579, 8316566240388832815, 815, 48696),
    ("age", -3, 0, b"-3", 15945174260446586579, 14576924476065631879, 879, 940858),
    ("clicked", True, 0, b"true", 7386592717379582296, 7320992906529911202, 202, 254129),
    ("clicked", False, 0, b"false", 7386592717379582296, 11823330668493913755, 755, 292214),
    ("user_id", None, 0, b"", 8702580777738281986, 9044041291625024937, 937, 323244),
    ("user_id", "", 0, b"", 8702580777738281986, 9044041291625024937, 937, 323244),
]


def test_the_spec_version_these_vectors_pin():
    assert SPEC_VERSION == "uembed-hash-v1"


@pytest.mark.parametrize("namespace, value, lookup, canonical, seed, key, row_1000, row_1048583", GOLDEN)
def test_golden_vector(namespace, value, lookup, canonical, seed, key, row_1000, row_1048583):
    assert canonical_bytes(value) == canonical
    assert lookup_seed(namespace, lookup) == seed
    assert hash_value(value, seed) == key
    keys = np.array([key], dtype=np.uint64)
    assert int(rows_of(keys, 1000)[0]) == row_1000
    assert int(rows_of(keys, 1_048_583)[0]) == row_1048583


def test_the_cross_language_recipe_in_the_module_docstring():
    """What uembed/contract/hashing.py tells another language to do, done with nothing but xxhash: same keys."""
    for namespace, _, lookup, canonical, _, key, row_1000, _ in GOLDEN:
        seed = xxhash.xxh3_64_intdigest(f"{namespace}#{lookup}".encode(), seed=0)
        assert xxhash.xxh3_64_intdigest(canonical, seed=seed) == key
        assert key % 1000 == row_1000


def test_golden_vectors_hashed_as_columns(each_hashing_backend):
    """The column functions the service hashes with, on each path (compiled and pure Python): the same bytes and
    keys as the table, every value in one column under its own lookup's seed."""
    values = [value for _, value, *_ in GOLDEN]
    canonicals = [canonical for *_, canonical, _, _, _, _ in GOLDEN]
    seeds = [seed for *_, seed, _, _, _ in GOLDEN]
    keys = [key for *_, key, _, _ in GOLDEN]
    assert canonical_column(values) == canonicals
    assert canonical_column(np.array(values, dtype=object)) == canonicals
    for value, canonical, seed, key in zip(values, canonicals, seeds, keys):
        assert hash_values([value], seed).tolist() == [key]
        assert hash_canonical([canonical], seed, count=1).tolist() == [key]
    assert hash_canonical_columns([[c] for c in canonicals], seeds)[:, 0].tolist() == keys
    seed = seeds[0]
    assert hash_values(values, seed).tolist() == [hash_value(value, seed) for value in values]
