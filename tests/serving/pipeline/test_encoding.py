"""The one encoding path (uembed/serving/pipeline/encoding.py): every caller gets the same rows; caches are bounded in bytes."""

import importlib.util
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from uembed.bundle.loader import load_bundle
from uembed.contract import hashing
from uembed.contract.errors import ExampleError
from uembed.contract.known import KnownValues
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.encoding import ExampleEncoder
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.pipeline.values import ValueLimits


def test_known_values_hold_every_training_value_and_few_others():
    training = [f"user-{i}".encode() for i in range(5000)]
    known = KnownValues.build(KnownValues.keys("user_id", training))
    assert known.contains(KnownValues.keys("user_id", training)).all()
    fresh = known.contains(KnownValues.keys("user_id", [f"other-{i}".encode() for i in range(50_000)])).mean()
    assert fresh < 0.03  # four hashes, ten bits a value: about 1.2%
    assert not KnownValues.build(KnownValues.keys("item_id", training)).contains(KnownValues.keys("user_id", training)).all()


def test_every_caller_encodes_through_the_one_encoder(synthetic_store):
    """The export check, the service and the naive baseline: one class, so one set of rows and messages."""
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    runtime = ModelRuntime(bundle)
    reference = ReferenceScorer(bundle)
    assert type(runtime.encoder) is type(reference.encoder) is ExampleEncoder
    naive_app = importlib.util.find_spec("uembed.loadtest.naive_app").origin  # its source: importing it would import torch
    assert "ExampleEncoder(" in Path(naive_app).read_text()
    examples = [{"user_id": "196", "genres": ["Comedy", "Drama"]}, {"movie_id": 302, "zip_code": None}]
    for got, want in zip(runtime.hash([runtime.canonicalise(examples)]), reference.encode(examples)):
        np.testing.assert_array_equal(got, want)


def test_value_caches_stay_within_their_bytes(synthetic_store):
    """Fresh 256-character values for ever: before, the caches were bounded by entry count (65,536 per feature),
    and ten minutes of such traffic took a worker from 370 MB to 760 MB."""
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    budget = 2 * 2**20
    # With the training values, as the service runs: with the pure-Python hash, one-value features keep rows and
    # unseen flags per value (the compiled one hashes them every time, and keeps none).
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits(), budget, bundle.known_values)
    before = hashing.hashing_backend()
    hashing.use_backend("python")
    tracemalloc.start()
    try:
        for start in range(0, 40_000, 500):
            batch = [{"zip_code": f"{i:0>256}", "user_id": f"{i:x>256}"} for i in range(start, start + 500)]
            encoder.hash([encoder.canonicalise(batch)])
            del batch
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        hashing.use_backend(before)
    assert 0 < encoder.cached_bytes() <= budget
    assert held < 2 * budget, f"{held / 2**20:.1f} MiB held for a {budget / 2**20:.0f} MiB budget"


USER = ("user_id", "age", "gender", "occupation", "zip_code")


@pytest.mark.parametrize("cache_bytes", [0, 2**20], ids=["no-caches", "caches"])
@pytest.mark.parametrize("shared", [USER, ("user_id", "genres")], ids=["user", "with-multivalent"])
def test_a_context_encodes_as_its_values_copied_into_every_candidate(synthetic_store, movielens_examples, cache_bytes, shared):
    """A ranking request (context + candidates) hashes to the rows and weights of the flat examples, alone and
    in a batch with flat requests; its context is kept once, not once per candidate."""
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits(), cache_bytes, bundle.known_values)
    context = {name: movielens_examples[0][name] for name in shared}
    candidates = [{k: v for k, v in example.items() if k not in shared} for example in movielens_examples[:30]]
    flat = [{**context, **candidate} for candidate in candidates]
    before, after = movielens_examples[100:107], movielens_examples[200:203]

    ranked = encoder.canonicalise(candidates, context)
    shared_slots = sum(encoder.feature_slots[name] for name in shared)
    assert ranked.count == len(candidates) and ranked.ids == len(candidates) * (encoder.slots - shared_slots) + shared_slots
    assert ranked.shared == set(shared) and all(len(ranked.values[name]) == 1 for name in shared)
    for pass_ in ("cold", "warm"):  # warm: the row and value caches answer
        for got, want in zip(encoder.hash([encoder.canonicalise(candidates, context)]), encoder.encode(flat)):
            np.testing.assert_array_equal(got, want, err_msg=pass_)
        mixed = encoder.hash([encoder.canonicalise(before), encoder.canonicalise(candidates, context), encoder.canonicalise(after)])
        for got, want in zip(mixed, encoder.encode(before + flat + after)):
            np.testing.assert_array_equal(got, want, err_msg=pass_)


@pytest.mark.parametrize("cache_bytes", [0, 2**20], ids=["no-caches", "caches"])
def test_a_context_value_counts_once_per_request(synthetic_store, cache_bytes):
    """Unseen values and cut lists in a context are counted once per request, not once per candidate."""
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits(), cache_bytes, bundle.known_values)
    width = encoder.widths["genres"]
    context = {"user_id": "a-user-training-never-saw", "genres": ["Comedy"] * (width + 1)}
    candidates = [{"movie_id": "242"}, {"movie_id": "302"}, {"movie_id": "1"}]
    encoder.take_unseen()
    ranked = encoder.canonicalise(candidates, context)
    encoder.hash([ranked])
    assert ranked.truncated == {"genres": 1}
    assert encoder.take_unseen()["user_id"] == 1
    flat = encoder.canonicalise([{**context, **c} for c in candidates])
    encoder.hash([flat])
    assert flat.truncated == {"genres": 3}
    assert encoder.take_unseen()["user_id"] == 3


@pytest.mark.parametrize("context,candidates,message", [
    ({"user_id": "196"}, [{"movie_id": "1"}, {"movie_id": "2", "user_id": "196"}],
     "candidates[1].user_id: also given in context (a feature goes in the context or in the candidates, not both)"),
    ({"user_idd": "196"}, [{}], "context: unknown feature user_idd; this model takes"),
    ({}, [{}, {"movie": "1"}], "candidates[1]: unknown feature movie;"),
    ({"zip_code": "9" * 300}, [{}], "context.zip_code: a value of 300 characters is longer than the limit of 256"),
    ({"user_id": ["1", "2"]}, [{}], "context.user_id: takes one value, got a list"),
    ({}, [{"movie_id": ["1", "2"]}], "candidates[0].movie_id: takes one value, got a list"),
    ([("user_id", "1")], [{}], "context: an object of feature -> value, got list"),
    ({}, [{}, 3], "candidates[1]: an example is an object of feature -> value, got int"),
])  # fmt: skip
def test_a_ranking_request_s_errors_name_the_context_or_the_candidate(synthetic_store, context, candidates, message):
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits())
    with pytest.raises(ExampleError) as refused:
        encoder.canonicalise(candidates, context)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize("column", [[196, 7, 0, -3], [2**63 - 1, -(2**63), 10**30], [196, "7", "", 0], ["196", "7"], [196, True], [196, 1.0], [196, None]],
                         ids=["ints", "wide-ints", "ints-and-strings", "strings", "with-bool", "with-float", "with-null"])  # fmt: skip
def test_a_column_of_ids_canonicalises_as_each_value_does(synthetic_store, column):
    """The column path (strings and JSON integers, no per-value checks) gives each value's own canonical bytes;
    any other mix takes the checked path, with the same result."""
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits(), 2**20, bundle.known_values)
    spec = bundle.feature_specs["user_id"]
    got = encoder.canonicalise([{"user_id": value} for value in column]).values["user_id"]
    assert got == [spec.canonical_values(value)[0] for value in column]


def test_an_integer_past_str_s_digit_limit_is_refused_by_name(synthetic_store):
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits())
    with pytest.raises(ExampleError, match=r"^examples\[1\]\.user_id: "):
        encoder.canonicalise([{"user_id": 1}, {"user_id": 10**5000}])


def test_a_column_holding_missing_markers_reads_them_as_missing_from_dicts_and_other_mappings(tmp_path):
    """The column path of a one-value categorical feature turns its declared missing markers into the missing value,
    as the checked path does, whether the examples are dicts (read by a C loop) or other mappings."""
    from types import MappingProxyType

    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.contract.features import FeatureSpec
    from uembed.contract.hashing import MISSING

    features = (FeatureSpec("city", missing=("unknown", "")), FeatureSpec("item"))
    bundle = load_bundle(write_synthetic_bundle(tmp_path, "m", features, 1000, progress=False))
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits())
    column = ["paris", "unknown", "", "lyon", "unknown"]
    expected = [b"paris", MISSING, MISSING, b"lyon", MISSING]
    assert encoder.canonicalise([{"city": c, "item": 1} for c in column]).values["city"] == expected
    proxies = [MappingProxyType({"city": c, "item": 1}) for c in column]
    assert encoder.canonicalise(proxies).values["city"] == expected
    assert encoder.canonicalise([{"city": "paris"}, {"city": "lyon"}]).values["city"] == [b"paris", b"lyon"]


@pytest.fixture(scope="module")
def three_kinds(tmp_path_factory):
    """A synthetic bundle with a categorical, a numeric and a multivalent feature."""
    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.contract.features import FeatureSpec

    features = (FeatureSpec("C1", missing=("",)), FeatureSpec("I1", kind="numeric", boundaries=(0.0, 1.0, 10.0)),
                FeatureSpec("tags", kind="multivalent", separator=","))  # fmt: skip
    return load_bundle(write_synthetic_bundle(tmp_path_factory.mktemp("kinds"), "m", features, 1000, progress=False))


@pytest.mark.parametrize("cache_bytes", [0, 2**20], ids=["no-caches", "caches"])
def test_columns_canonicalise_as_the_same_examples_as_rows(three_kinds, cache_bytes):
    """canonicalise_columns (a front that decodes columns) gives what canonicalise gives for the same examples as
    rows, cold and warm, and ExampleColumns reads back as those rows."""
    from uembed.serving.pipeline.canonical import ExampleColumns

    encoder = ExampleEncoder(three_kinds.feature_specs, three_kinds.plan, ValueLimits(64, 8), cache_bytes)
    rows = [{"C1": 196, "I1": 0.5, "tags": ["a", "b"]}, {"C1": "", "I1": None, "tags": []}, {"C1": "x", "I1": "12", "tags": "a,b,c,d,e,f"},
            {"C1": None, "I1": 3, "tags": ["a"] * 8}, {"C1": True, "I1": 1e9, "tags": None}]  # fmt: skip
    columns = ExampleColumns({name: [row[name] for row in rows] for name in rows[0]}, len(rows))
    assert [columns[i] for i in range(len(rows))] == rows and columns[-1] == rows[-1] and columns[1:3] == rows[1:3]
    for pass_ in ("cold", "warm"):
        want = encoder.canonicalise(rows)
        assert encoder.canonicalise_columns(columns.columns, columns.count) == want, pass_
        assert encoder.canonicalise(columns) == want, pass_  # how a shadow version's copy is canonicalised
    # A feature left out of the columns is missing in every example, as in rows without it.
    assert encoder.canonicalise_columns({"C1": ["a", "b"]}, 2) == encoder.canonicalise([{"C1": "a"}, {"C1": "b"}])


@pytest.mark.parametrize("columns,message", [
    ({"C1": ["a", "b", {"x": 1}]}, "examples[2].C1: takes a string, number, boolean or null, got dict"),
    ({"I1": [1.0, float("inf"), 2.0]}, "examples[1].I1: inf is not a finite number"),
    ({"tags": [["a"], ["b"] * 9, []]}, "examples[1].tags: a list of 9 values is longer than the limit of 8"),
    ({"C1": ["a", "b", "c"], "colour": ["r", "g", "b"]}, "examples[0]: unknown feature colour; this model takes C1, I1, tags"),
])  # fmt: skip
def test_columns_are_refused_as_the_same_examples_as_rows(three_kinds, columns, message):
    encoder = ExampleEncoder(three_kinds.feature_specs, three_kinds.plan, ValueLimits(64, 8))
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    for canonicalise in (lambda: encoder.canonicalise_columns(columns, 3), lambda: encoder.canonicalise(rows)):
        with pytest.raises(ExampleError) as refused:
            canonicalise()
        assert str(refused.value).startswith(message)


@pytest.mark.parametrize("backend", hashing.BACKENDS)
def test_one_value_features_encode_and_count_unseen_values_alike_on_every_path(synthetic_store, movielens_examples, backend):
    """With the compiled hash the one-value features with training values are hashed a column at a time and their
    unseen values counted by one pass over their filters, and a list feature's values hashed all at once; with the
    pure one, through caches of each value's rows and flag. Either way, with caches or without, warm or cold: the
    reference's rows, weights and unseen counts (empty lists, "" in a list, lists past the width included)."""
    if backend == "compiled" and not hashing.compiled_available():
        pytest.skip("the compiled hashing extension is not built")
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    lists = [[], [f"new-genre-{i}" for i in range(3)] + ["Drama"] * 9 + ["past-the-width"], ["Comedy", "", "Drama"]]
    fresh = [{**example, "user_id": f"new-user-{i}", "zip_code": None if i % 2 else example["zip_code"],
              "genres": lists[i % 4] if i % 4 < 3 else example["genres"]}
             for i, example in enumerate(movielens_examples[:40])]  # fmt: skip
    requests = [movielens_examples[:64], fresh, movielens_examples[:64] + fresh]
    before = hashing.hashing_backend()
    try:
        hashing.use_backend("python")
        reference = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits(), 0, bundle.known_values)
        want = []
        for examples in requests:
            want.append((reference.encode(examples), reference.take_unseen()))
        assert want[1][1]["user_id"] >= 38 and want[1][1]["zip_code"] == 0 and want[0][1]["user_id"] == 0
        assert want[1][1]["genres"] >= 30 and want[0][1]["genres"] == 0  # three new genres in 10 lists, cut at the width
        hashing.use_backend(backend)
        for cache_bytes in (0, 2**20):
            encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits(), cache_bytes, bundle.known_values)
            for _ in ("cold", "warm"):
                for examples, ((rows, weights), unseen) in zip(requests, want):
                    got_rows, got_weights = encoder.hash([encoder.canonicalise(examples)])
                    np.testing.assert_array_equal(got_rows, rows)
                    np.testing.assert_array_equal(got_weights, weights)
                    assert encoder.take_unseen() == unseen
    finally:
        hashing.use_backend(before)
