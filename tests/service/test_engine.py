"""The engine without HTTP: micro-batching, failure isolation, admission, deadlines."""

import asyncio

import numpy as np
import pytest

from export.loader import load_bundle
from export.scorer import ReferenceScorer
from model.errors import Internal
from service.engine import DeadlineExceeded, NotReady, Overloaded, ScoringEngine
from service.settings import load_settings


def run(coroutine):
    return asyncio.run(coroutine)


def sample_count(engine, name):
    return next(s.value for m in engine.metrics.registry.collect() for s in m.samples if s.name == name)


def test_concurrent_requests_are_merged_into_batches(bundle_store, movielens_examples):
    path = bundle_store / "movielens" / "1"
    expected = ReferenceScorer(load_bundle(path)).score(movielens_examples[:200])

    async def main():
        engine = ScoringEngine(load_settings(max_wait_ms=5))
        engine.load(path)
        await engine.astart()
        chunks = [movielens_examples[i : i + 10] for i in range(0, 200, 10)]
        results = await asyncio.gather(*(engine.score(chunk) for chunk in chunks))
        await engine.astop()
        return engine, np.concatenate([scores for scores, _ in results])

    engine, scores = run(main())
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
    batches = sample_count(engine, "uembed_batch_examples_count")
    assert batches < 20  # 20 requests, fewer dense calls
    assert sample_count(engine, "uembed_batch_examples_sum") == 200


def test_ranking_requests_batch_with_flat_ones_and_score_as_their_flat_examples(bundle_store, movielens_examples):
    """Requests with a context (one per user, its candidates the user's examples) and flat requests, merged
    into batches: each scores as its examples sent flat, and the batch's size is the candidates'."""
    path = bundle_store / "movielens" / "1"
    user = ("user_id", "age", "gender", "occupation", "zip_code")
    requests = []
    for start in range(0, 120, 12):
        chunk = movielens_examples[start : start + 12]
        if start % 24:
            requests.append((None, chunk))
        else:
            context = {name: chunk[0][name] for name in user}
            requests.append((context, [{k: v for k, v in e.items() if k not in user} for e in chunk]))
    flat = [[{**(context or {}), **example} for example in examples] for context, examples in requests]
    expected = ReferenceScorer(load_bundle(path)).score([example for examples in flat for example in examples])

    async def main():
        engine = ScoringEngine(load_settings(max_wait_ms=5))
        engine.load(path)
        await engine.astart()
        results = await asyncio.gather(*(engine.score(examples, context=context) for context, examples in requests))
        await engine.astop()
        return engine, np.concatenate([scores for scores, _ in results])

    engine, scores = run(main())
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
    assert sample_count(engine, "uembed_batch_examples_count") < len(requests)  # merged
    assert sample_count(engine, "uembed_batch_examples_sum") == 120


def test_a_failing_batch_fails_its_requests_and_not_the_loop(bundle_store, movielens_examples):
    async def main():
        engine = ScoringEngine(load_settings())
        runtime = engine.load(bundle_store / "movielens" / "1")
        await engine.astart()
        original = runtime.dense
        runtime.dense = lambda embeddings: (_ for _ in ()).throw(RuntimeError("onnx blew up"))
        with pytest.raises(Internal, match=r"internal error \(RuntimeError\)") as failed:
            await engine.score(movielens_examples[:4])
        runtime.dense = original
        scores, _ = await engine.score(movielens_examples[:4])
        await engine.astop()
        return failed.value, scores

    error, scores = run(main())
    assert (error.status, error.kind, type(error).status) == (500, "internal", 500) and len(scores) == 4


def test_admission_bound_and_deadline(bundle_store, movielens_examples):
    async def main():
        engine = ScoringEngine(load_settings(max_queue_examples=10, request_timeout_ms=50, max_wait_ms=200))
        engine.load(bundle_store / "movielens" / "1")
        await engine.astart()
        first = asyncio.create_task(engine.score(movielens_examples[:8]))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await engine.score(movielens_examples[:8])
        with pytest.raises(DeadlineExceeded):
            await first  # the 200 ms batching window outlasts the 50 ms deadline
        await engine.astop()

    run(main())


def test_torchscript_backend_scores_like_onnx(bundle_store, movielens_examples):
    path = bundle_store / "movielens" / "1"

    async def scores(backend):
        engine = ScoringEngine(load_settings(dense_backend=backend))
        engine.load(path)
        await engine.astart()
        out, runtime = await engine.score(movielens_examples[:256])
        await engine.astop()
        return out, runtime

    onnx, _ = run(scores("onnx"))
    scripted, runtime = run(scores("torchscript"))
    assert runtime.torchscript is not None
    np.testing.assert_allclose(scripted, onnx, atol=1e-5, rtol=0)


def test_torchscript_backend_refuses_a_bundle_without_the_full_model(bundle_store):
    from export.loader import BundleError

    engine = ScoringEngine(load_settings(dense_backend="torchscript"))
    with pytest.raises(BundleError, match="dense_backend=onnx"):
        engine.load(bundle_store / "movielens" / "2")  # float16: no full model


def test_several_models_are_chosen_by_name(bundle_store, movielens_examples, tmp_path):
    import json
    import shutil

    from model.errors import NotFound as ModelNotFound

    other = tmp_path / "other" / "1"
    shutil.copytree(bundle_store / "movielens" / "1", other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest | {"name": "other"}))

    async def main():
        engine = ScoringEngine(load_settings())
        engine.load(bundle_store / "movielens" / "1")
        engine.load(other)
        await engine.astart()
        _, default = await engine.score(movielens_examples[:2])
        _, chosen = await engine.score(movielens_examples[:2], model="other")
        with pytest.raises(ModelNotFound, match="loaded: movielens, other"):
            await engine.score(movielens_examples[:2], model="nope")
        await engine.astop()
        return default.name, chosen.name, [m["name"] for m in engine.describe()]

    assert run(main()) == ("movielens", "other", ["movielens", "other"])


def test_value_caches_overflowing_mid_batch_still_hash_every_value(bundle_store):
    """A batch whose new values overflow the per-feature row cache: values cached before the
    overflow must be hashed again, not looked up in the emptied cache (found by the locust run)."""
    import service.runtime

    bundle = load_bundle(bundle_store / "movielens" / "1")
    runtime = service.runtime.ModelRuntime(bundle, value_cache_bytes=13 * 2000)  # about 8 values per feature's cache
    assert 5 <= runtime.encoder.row_cache["user_id"].max_bytes // 250 <= 10
    reference = ReferenceScorer(bundle)
    first = [{"user_id": str(u), "movie_id": str(u)} for u in range(6)]
    second = [{"user_id": str(u), "movie_id": str(u)} for u in range(3, 12)]  # 3 cached, 6 new: over the cap
    for examples in (first, second):
        rows, weights = runtime.hash([runtime.canonicalise(examples)])
        expected_rows, expected_weights = reference.encode(examples)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(weights, expected_weights)


def test_lifecycle_calls_are_safe_in_any_order(bundle_store, movielens_examples):
    async def main():
        never_started = ScoringEngine(load_settings())
        await never_started.astop()  # releases its thread; nothing to drain
        await never_started.astop()
        engine = ScoringEngine(load_settings(bundle_store=bundle_store))
        engine.load(bundle_store / "movielens" / "1")
        with pytest.raises(NotReady):
            await engine.reload("movielens", "2")  # not started: refused, not a hang on a missing lock
        await engine.astart()
        await engine.astart()  # a second start keeps the one batch loop
        first_loop = engine._loop_task
        scores, _ = await engine.score(movielens_examples[:3])
        runtime = await engine.reload("movielens", "2")
        assert engine._loop_task is first_loop and runtime.version == "2"
        await engine.astop()
        await engine.astop()
        with pytest.raises(Overloaded):
            await engine.score(movielens_examples[:3])
        with pytest.raises(NotReady):
            await engine.astart()  # a stopped engine stays stopped
        return len(scores)

    assert run(main()) == 3


def test_a_dense_net_that_returns_the_wrong_number_of_scores_fails_its_batch(bundle_store, movielens_examples):
    async def main():
        engine = ScoringEngine(load_settings())
        runtime = engine.load(bundle_store / "movielens" / "1")
        await engine.astart()
        original = runtime.dense
        runtime.dense = lambda embeddings: original(embeddings)[:-1]
        with pytest.raises(Internal, match="returned 3 scores for 4 examples"):
            await engine.score(movielens_examples[:4])
        runtime.dense = original
        await engine.astop()

    run(main())


@pytest.mark.parametrize("on_loop", [True, False], ids=["batches-on-the-loop", "batches-on-a-thread"])
def test_ranking_requests_batch_together_and_look_up_their_context_once(bundle_store, movielens_examples, on_loop):
    """Batches of ranking requests only take the split path: each context's rows are looked up once (the ids a
    batch looks up count them once, so more requests fit a batch), and the scores are the flat examples' floats,
    whether batches run on the event loop or on a compute thread."""
    path = bundle_store / "movielens" / "1"
    user = ("user_id", "age", "gender", "occupation", "zip_code")
    requests = []
    for start in range(0, 200, 20):
        chunk = movielens_examples[start : start + 20]
        requests.append(({name: chunk[0][name] for name in user}, [{k: v for k, v in e.items() if k not in user} for e in chunk]))
    expected = ReferenceScorer(load_bundle(path)).score([{**context, **e} for context, examples in requests for e in examples])
    settings = load_settings(max_wait_ms=5, compute_on_event_loop=on_loop)

    async def main():
        engine = ScoringEngine(settings)
        runtime = engine.load(path)
        await engine.astart()
        results = await asyncio.gather(*(engine.score(examples, context=context) for context, examples in requests))
        await engine.astop()
        return engine, runtime, np.concatenate([scores for scores, _ in results])

    engine, runtime, scores = run(main())
    np.testing.assert_array_equal(scores, expected)
    assert engine.batches_on_loop is on_loop
    shared_slots = sum(runtime.encoder.feature_slots[name] for name in user)
    assert shared_slots == len(user)
    batches = sample_count(engine, "uembed_batch_examples_count")
    assert batches < len(requests)  # merged
    per_request_ids = 20 * (runtime.slots - shared_slots) + shared_slots
    assert sample_count(engine, "uembed_batch_ids_sum") == len(requests) * per_request_ids
