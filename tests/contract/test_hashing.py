import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import chisquare

from uembed.contract.hashing import (
    MISSING,
    canonical_bytes,
    hash_canonical,
    hash_value,
    lookup_seed,
    rows_of,
    vocabulary_rows,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, MISSING),
        (float("nan"), MISSING),
        ("", MISSING),
        (196, b"196"),
        (np.int64(196), b"196"),
        (3.0, b"3"),
        (2.5, b"2.5"),
        (True, b"true"),
        ("Zürich", "Zürich".encode()),
        (b"raw", b"raw"),
    ],
)
def test_canonical_bytes(value, expected):
    assert canonical_bytes(value) == expected


def test_canonical_bytes_refuses_containers():
    with pytest.raises(TypeError, match="dict"):
        canonical_bytes({"a": 1})


def test_seeds_differ_by_feature_and_lookup():
    seeds = {lookup_seed("user_id", 0), lookup_seed("user_id", 1), lookup_seed("movie_id", 0)}
    assert len(seeds) == 3


def test_batch_hash_matches_scalar_hash():
    seed = lookup_seed("zip_code")
    values = ["85711", "94043", "", 7]
    batch = hash_canonical([canonical_bytes(v) for v in values], seed)
    assert batch.dtype == np.uint64
    assert [int(k) for k in batch] == [hash_value(v, seed) for v in values]


def test_identical_keys_in_a_fresh_process():
    values = ["196", "242", "", "Comedy", "Zürich"]
    here = [hash_value(v, lookup_seed("f", 2)) for v in values]
    code = (
        "from uembed.contract.hashing import hash_value, lookup_seed;"
        f"print([hash_value(v, lookup_seed('f', 2)) for v in {values!r}])"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == str(here)


def test_buckets_of_a_million_values_are_uniform():
    rows = 1000
    values = (str(i).encode() for i in range(1_000_000))
    buckets = rows_of(hash_canonical(values, lookup_seed("user_id"), count=1_000_000), rows)
    counts = np.bincount(buckets, minlength=rows)
    assert counts.sum() == 1_000_000
    assert chisquare(counts).pvalue > 0.001


def test_two_features_collide_at_about_one_over_rows():
    rows, n = 500, 200_000
    values = [str(i).encode() for i in range(n)]
    a = rows_of(hash_canonical(values, lookup_seed("home_city")), rows)
    b = rows_of(hash_canonical(values, lookup_seed("work_city")), rows)
    rate = float(np.mean(a == b))
    expected = 1 / rows
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_vocabulary_rows_known_unknown_and_missing():
    seed = lookup_seed("gender")
    vocabulary = np.unique(hash_canonical([b"M", b"F"], seed))
    keys = hash_canonical([b"M", b"F", b"X", MISSING], seed)
    rows = vocabulary_rows(keys, vocabulary)
    assert sorted(rows[:2].tolist()) == [1, 2]
    assert rows[2:].tolist() == [0, 0]
    assert vocabulary_rows(keys, np.zeros(0, dtype=np.uint64)).tolist() == [0, 0, 0, 0]


def test_rows_of_refuses_an_empty_table():
    with pytest.raises(ValueError, match="at least one row"):
        rows_of(np.array([1], dtype=np.uint64), 0)
