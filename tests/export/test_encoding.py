"""The one encoding path (export/encoding.py): every caller gets the same rows; caches are bounded in bytes."""

import tracemalloc
from pathlib import Path

import numpy as np

from export.encoding import ExampleEncoder, ValueLimits
from export.loader import load_bundle
from export.scorer import ReferenceScorer
from model.known import KnownValues
from service.runtime import ModelRuntime


def test_known_values_hold_every_training_value_and_few_others():
    training = [f"user-{i}".encode() for i in range(5000)]
    known = KnownValues.build(KnownValues.keys("user_id", training))
    assert known.contains(KnownValues.keys("user_id", training)).all()
    fresh = known.contains(KnownValues.keys("user_id", [f"other-{i}".encode() for i in range(50_000)])).mean()
    assert fresh < 0.03  # four hashes, ten bits a value: about 1.2%
    assert not KnownValues.build(KnownValues.keys("item_id", training)).contains(KnownValues.keys("user_id", training)).all()


def test_every_caller_encodes_through_the_one_encoder(bundle_store):
    """The export check, the service and the naive baseline: one class, so one set of rows and messages."""
    import loadtest.naive_app

    bundle = load_bundle(bundle_store / "movielens" / "1")
    runtime = ModelRuntime(bundle)
    reference = ReferenceScorer(bundle)
    assert type(runtime.encoder) is type(reference.encoder) is ExampleEncoder
    assert "ExampleEncoder(" in Path(loadtest.naive_app.__file__).read_text()
    examples = [{"user_id": "196", "genres": ["Comedy", "Drama"]}, {"movie_id": 302, "zip_code": None}]
    for got, want in zip(runtime.hash([runtime.canonicalise(examples)]), reference.encode(examples)):
        np.testing.assert_array_equal(got, want)


def test_value_caches_stay_within_their_bytes(bundle_store):
    """Fresh 256-character values for ever: before, the caches were bounded by entry count (65,536 per feature),
    and ten minutes of such traffic took a worker from 370 MB to 760 MB."""
    bundle = load_bundle(bundle_store / "movielens" / "1")
    budget = 2 * 2**20
    encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, ValueLimits(), cache_bytes=budget)
    tracemalloc.start()
    try:
        for start in range(0, 40_000, 500):
            batch = [{"zip_code": f"{i:0>256}", "user_id": f"{i:x>256}"} for i in range(start, start + 500)]
            encoder.hash([encoder.canonicalise(batch)])
            del batch
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < encoder.cached_bytes() <= budget
    assert held < 2 * budget, f"{held / 2**20:.1f} MiB held for a {budget / 2**20:.0f} MiB budget"
