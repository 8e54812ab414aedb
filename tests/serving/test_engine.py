"""The engine without HTTP: micro-batching, failure isolation, admission, deadlines."""

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from tests.waiting import wait_until_async
from uembed.bundle.loader import load_bundle
from uembed.contract.errors import DeadlineExceeded, Internal, NotReady, Overloaded
from uembed.serving import batcher
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.canonical import ExampleColumns
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.protocols.v1 import describe_models
from uembed.serving.settings import load_settings


def run(coroutine):
    return asyncio.run(coroutine)


def score_concurrently(path, settings, requests):
    """An engine serving ``path`` scores ``(context, examples)`` requests all at once; the engine and the scores in order."""

    async def main():
        engine = ScoringEngine(settings)
        engine.registry.load(path)
        await engine.astart()
        results = await asyncio.gather(*(engine.score(examples, context=context) for context, examples in requests))
        await engine.astop()
        return engine, np.concatenate([scores for scores, _ in results])

    return run(main())


def sample_count(engine, name):
    return next(s.value for m in engine.metrics.registry.collect() for s in m.samples if s.name == name)


def test_concurrent_requests_are_merged_into_batches(synthetic_store, movielens_examples):
    path = synthetic_store / "movielens" / "1"
    expected = ReferenceScorer(load_bundle(path)).score(movielens_examples[:200])

    async def main():
        engine = ScoringEngine(load_settings(max_wait_ms=5))
        engine.registry.load(path)
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


def test_ranking_requests_batch_with_flat_ones_and_score_as_their_flat_examples(synthetic_store, movielens_examples):
    """Requests with a context (one per user, its candidates the user's examples) and flat requests, merged
    into batches: each scores as its examples sent flat, and the batch's size is the candidates'."""
    path = synthetic_store / "movielens" / "1"
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

    engine, scores = score_concurrently(path, load_settings(max_wait_ms=5), requests)
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
    assert sample_count(engine, "uembed_batch_examples_count") < len(requests)  # merged
    assert sample_count(engine, "uembed_batch_examples_sum") == 120


def test_a_failing_batch_fails_its_requests_and_not_the_loop(synthetic_store, movielens_examples):
    async def main():
        engine = ScoringEngine(load_settings())
        runtime = engine.registry.load(synthetic_store / "movielens" / "1")
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


def test_admission_bound_and_deadline(synthetic_store, movielens_examples):
    async def main():
        engine = ScoringEngine(load_settings(max_queue_examples=10, request_timeout_ms=50, max_wait_ms=200))
        engine.registry.load(synthetic_store / "movielens" / "1")
        await engine.astart()
        first = asyncio.create_task(engine.score(movielens_examples[:8]))
        await wait_until_async(lambda: engine.batcher.queued_examples == 8, 5, "the first request admitted")
        with pytest.raises(Overloaded):
            await engine.score(movielens_examples[:8])
        with pytest.raises(DeadlineExceeded):
            await first  # the 200 ms batching window outlasts the 50 ms deadline
        gone = asyncio.create_task(engine.score(movielens_examples[:2]))
        await wait_until_async(lambda: any(p.examples.count == 2 for p in engine.batcher.queue), 5, "the request admitted")
        gone.cancel()  # the client went away: cancelled, not past its deadline
        with pytest.raises(asyncio.CancelledError):
            await gone
        cancelled = engine.metrics.abandoned.labels("cancelled")
        await wait_until_async(lambda: cancelled._value.get() == 1, 5, "the batch loop skipping the cancelled request")
        await engine.astop()
        return engine

    engine = run(main())
    by_reason = lambda name: {s.labels["reason"]: s.value for m in engine.metrics.registry.collect()  # noqa: E731
                              for s in m.samples if s.name == name}  # fmt: skip
    assert by_reason("uembed_rejected_requests_total") == {"overloaded": 1, "deadline": 1, "shutting_down": 0}
    assert by_reason("uembed_abandoned_requests_total") == {"deadline": 1, "cancelled": 1}  # each skipped by the batcher


def test_each_request_fails_at_its_own_deadline_and_answered_ones_are_not_kept(synthetic_store, movielens_examples):
    """One timer serves every request's deadline: requests admitted at different times, all waiting past their
    request_timeout_ms, each fail when their own deadline passes (not all at the first's, nor all at the last's);
    once a batch answers the requests, none of them is kept for their deadlines."""
    timeout_s, apart_s = 0.6, 0.3

    async def main():
        engine = ScoringEngine(load_settings(request_timeout_ms=timeout_s * 1000, max_wait_ms=3000))
        engine.registry.load(synthetic_store / "movielens" / "1")
        await engine.astart()

        async def timed():
            admitted = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await engine.score(movielens_examples[:2])
            return time.monotonic() - admitted

        waits = []
        for _ in range(3):
            waits.append(asyncio.create_task(timed()))
            await asyncio.sleep(apart_s)
        waited = await asyncio.gather(*waits)
        await engine.astop()
        engine = ScoringEngine(load_settings(request_timeout_ms=timeout_s * 1000))  # batches at once
        engine.registry.load(synthetic_store / "movielens" / "1")
        await engine.astart()
        await asyncio.gather(*[engine.score(movielens_examples[:2]) for _ in range(4)])
        kept = len(engine.batcher.unanswered)
        await engine.astop()
        return waited, kept

    waited, kept = run(main())
    # all failing at the first one's deadline would give the last a wait of timeout_s - 2 * apart_s; all at the
    # last one's, the first a wait of timeout_s + 2 * apart_s
    assert all(timeout_s * 0.95 <= wait < timeout_s + 1.5 * apart_s for wait in waited), waited
    assert kept == 0


def test_a_request_admitted_after_the_batcher_stopped_fails_at_its_deadline(synthetic_store, movielens_examples):
    """A request that passed the engine's closing check before a stop (one decoding on a thread meanwhile) is admitted
    to a queue no batch loop serves: it fails at its deadline (504) rather than waiting for good."""

    async def main():
        engine = ScoringEngine(load_settings(request_timeout_ms=300))
        runtime = engine.registry.load(synthetic_store / "movielens" / "1")
        await engine.astart()
        await engine.score(movielens_examples[:2])  # the deadline timer armed, still waiting when the engine stops
        await engine.astop()
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(engine.batcher.score(runtime, runtime.canonicalise(movielens_examples[:2])), 5)

    run(main())


def test_torchscript_backend_scores_like_onnx(bundle_store, movielens_examples):
    path = bundle_store / "movielens" / "1"

    async def scores(backend):
        engine = ScoringEngine(load_settings(dense_backend=backend))
        engine.registry.load(path)
        await engine.astart()
        out, runtime = await engine.score(movielens_examples[:256])
        await engine.astop()
        return out, runtime

    onnx, _ = run(scores("onnx"))
    scripted, runtime = run(scores("torchscript"))
    assert runtime.torchscript is not None
    np.testing.assert_allclose(scripted, onnx, atol=1e-5, rtol=0)


def test_torchscript_backend_refuses_a_bundle_without_the_full_model(synthetic_store):
    from uembed.bundle.loader import BundleError

    engine = ScoringEngine(load_settings(dense_backend="torchscript"))
    with pytest.raises(BundleError, match="dense_backend=onnx"):
        engine.registry.load(synthetic_store / "movielens" / "2")  # float16: no full model


def test_several_models_are_chosen_by_name(synthetic_store, movielens_examples, tmp_path):
    import json
    import shutil

    from uembed.contract.errors import NotFound as ModelNotFound

    other = tmp_path / "other" / "1"
    shutil.copytree(synthetic_store / "movielens" / "1", other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest | {"name": "other"}))

    async def main():
        engine = ScoringEngine(load_settings())
        engine.registry.load(synthetic_store / "movielens" / "1")
        engine.registry.load(other)
        await engine.astart()
        _, default = await engine.score(movielens_examples[:2])
        _, chosen = await engine.score(movielens_examples[:2], model="other")
        with pytest.raises(ModelNotFound, match="loaded: movielens, other"):
            await engine.score(movielens_examples[:2], model="nope")
        await engine.astop()
        return default.name, chosen.name, [m["name"] for m in describe_models(engine.registry)]

    assert run(main()) == ("movielens", "other", ["movielens", "other"])


def test_value_caches_overflowing_mid_batch_still_hash_every_value(synthetic_store):
    """A batch whose new values overflow the per-feature row cache: values cached before the
    overflow must be hashed again, not looked up in the emptied cache (found by the locust run)."""
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    runtime = ModelRuntime(bundle, value_cache_bytes=13 * 2000)  # about 8 values per feature's cache
    assert 5 <= runtime.encoder.row_cache["user_id"].max_bytes // 250 <= 10
    reference = ReferenceScorer(bundle)
    first = [{"user_id": str(u), "movie_id": str(u)} for u in range(6)]
    second = [{"user_id": str(u), "movie_id": str(u)} for u in range(3, 12)]  # 3 cached, 6 new: over the cap
    for examples in (first, second):
        rows, weights = runtime.hash([runtime.canonicalise(examples)])
        expected_rows, expected_weights = reference.encode(examples)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(weights, expected_weights)


def test_lifecycle_calls_are_safe_in_any_order(synthetic_store, movielens_examples):
    async def main():
        never_started = ScoringEngine(load_settings())
        await never_started.astop()  # releases its thread; nothing to drain
        await never_started.astop()
        engine = ScoringEngine(load_settings(bundle_store=synthetic_store))
        engine.registry.load(synthetic_store / "movielens" / "1")
        with pytest.raises(NotReady):
            await engine.registry.reload("movielens", "2")  # not started: refused, not a hang on a missing lock
        await engine.astart()
        await engine.astart()  # a second start keeps the one batch loop
        first_loop = engine.batcher._loop_task
        scores, _ = await engine.score(movielens_examples[:3])
        runtime = await engine.registry.reload("movielens", "2")
        assert engine.batcher._loop_task is first_loop and runtime.version == "2"
        await engine.astop()
        await engine.astop()
        with pytest.raises(Overloaded):
            await engine.score(movielens_examples[:3])
        with pytest.raises(NotReady):
            await engine.astart()  # a stopped engine stays stopped
        return len(scores)

    assert run(main()) == 3


def test_a_dense_net_that_returns_the_wrong_number_of_scores_fails_its_batch(synthetic_store, movielens_examples):
    async def main():
        engine = ScoringEngine(load_settings())
        runtime = engine.registry.load(synthetic_store / "movielens" / "1")
        await engine.astart()
        original = runtime.dense
        runtime.dense = lambda embeddings: original(embeddings)[:-1]
        with pytest.raises(Internal, match="returned 3 scores for 4 examples"):
            await engine.score(movielens_examples[:4])
        runtime.dense = original
        await engine.astop()

    run(main())


@pytest.mark.parametrize("on_loop", [True, False], ids=["batches-on-the-loop", "batches-on-a-thread"])
def test_ranking_requests_batch_together_and_look_up_their_context_once(synthetic_store, movielens_examples, on_loop):
    """Batches of ranking requests take the split path: each context's rows are looked up once, and counted once
    against max_batch_ids (a budget that fits two such requests, not one with its context repeated), and the
    scores are the flat examples' floats, whether batches run on the event loop or on a compute thread."""
    path = synthetic_store / "movielens" / "1"
    user = ("user_id", "age", "gender", "occupation", "zip_code")
    requests = []
    for start in range(0, 200, 20):
        chunk = movielens_examples[start : start + 20]
        requests.append(({name: chunk[0][name] for name in user}, [{k: v for k, v in e.items() if k not in user} for e in chunk]))
    expected = ReferenceScorer(load_bundle(path)).score([{**context, **e} for context, examples in requests for e in examples])
    bundle = load_bundle(path)
    slots = bundle.plan.slots
    shared_slots = sum(f.width * len(f.lookups) for f in bundle.plan.features if f.name in user)
    per_request_ids = 20 * (slots - shared_slots) + shared_slots
    assert per_request_ids < 20 * slots  # the budget below fits two requests split, not two broadcast
    settings = load_settings(max_wait_ms=20, compute_on_event_loop=on_loop, max_batch_ids=2 * per_request_ids)

    engine, scores = score_concurrently(path, settings, requests)
    np.testing.assert_array_equal(scores, expected)
    assert engine.batcher.batches_on_loop is on_loop
    assert sample_count(engine, "uembed_batch_examples_count") == len(requests) / 2  # two requests a batch
    assert sample_count(engine, "uembed_batch_ids_sum") == len(requests) * per_request_ids


def test_a_batch_counts_the_ids_it_will_look_up(synthetic_store, movielens_examples):
    """max_batch_ids is charged what the batch looks up: contexts once a request only where every request of the
    batch shares them (a flat request in it, or a runtime that does not split, repeats them)."""
    runtime = ScoringEngine(load_settings()).registry.open(synthetic_store / "movielens" / "1")
    encoder = runtime.encoder
    user = ("user_id", "age", "gender", "occupation", "zip_code")
    ranked = [encoder.canonicalise([{k: v for k, v in e.items() if k not in shared} for e in movielens_examples[:12]],
                                   {n: movielens_examples[i][n] for n in shared})
              for i, shared in enumerate((user, user, ("user_id", "genres")))]  # fmt: skip
    flat = encoder.canonicalise(movielens_examples[20:27])
    for parts in ([ranked[0]], ranked[:2], ranked, ranked[:2] + [flat], [flat]):
        context = frozenset.intersection(*(p.shared for p in parts))
        charged = encoder.ids_looked_up(sum(p.count for p in parts), len(parts), context)
        split = runtime.hash_split(parts)
        looked_up = split.ids if split is not None else runtime.hash(parts)[0].size
        assert charged == looked_up
    assert ranked[0].ids == encoder.ids_looked_up(12, 1, ranked[0].shared) < 12 * encoder.slots


def test_batches_on_the_loop_hand_it_back_between_batches(synthetic_store, movielens_examples):
    """Each request its own batch (max_batch_ids=1), six queued at once: the first reply reaches its caller before
    the last batch has run (the loop runs replies, reads and row updates between two batches)."""
    path = synthetic_store / "movielens" / "1"

    async def main():
        engine = ScoringEngine(load_settings(max_batch_ids=1))
        engine.registry.load(path)
        await engine.astart()
        batches_seen = []

        async def one(i):
            await engine.score(movielens_examples[i : i + 1])
            batches_seen.append(sample_count(engine, "uembed_batch_examples_count"))

        await asyncio.gather(*(one(i) for i in range(6)))
        await engine.astop()
        return engine, batches_seen

    engine, batches_seen = run(main())
    assert engine.batcher.batches_on_loop and sorted(batches_seen) == batches_seen and batches_seen[-1] == 6
    assert batches_seen[0] < 6, batches_seen


def test_busy_poll_keeps_the_loop_polling_after_a_batch_then_sleeps(synthetic_store, movielens_examples, monkeypatch):
    """busy_poll_ms: after a batch the loop keeps stepping (each step yields the core: counted here, so a loaded
    machine cannot fool the test) until the window passes, then sleeps (no steps); a request in the window is scored
    as ever, a callback from another thread runs in it, and stopping does not wait for the window to end. Without
    the setting the loop sleeps at once."""
    path = synthetic_store / "movielens" / "1"
    expected = ReferenceScorer(load_bundle(path)).score(movielens_examples[:4])
    steps = []
    monkeypatch.setattr(os, "sched_yield", lambda: steps.append(1))

    async def steps_while_waiting(seconds: float) -> int:
        before = len(steps)
        await asyncio.sleep(seconds)
        return len(steps) - before

    async def main(busy_poll_ms: float):
        engine = ScoringEngine(load_settings(busy_poll_ms=busy_poll_ms))
        engine.registry.load(path)
        await engine.astart()
        scores = [(await engine.score(movielens_examples[:2]))[0]]
        polling = await steps_while_waiting(0.1)
        ran = []  # a row update's way in: from the reader's thread, onto the polling loop
        await asyncio.to_thread(lambda: engine.batcher.between_batches(lambda: ran.append("ran")).result(timeout=2))
        from_thread = ran
        scores.append((await engine.score(movielens_examples[2:4]))[0])
        await asyncio.sleep(busy_poll_ms / 1000 + 0.05)
        after_window = await steps_while_waiting(0.1)
        await engine.score(movielens_examples[:1])  # a new window, cut short by the stop
        stop_started = time.perf_counter()
        await engine.astop()
        return np.concatenate(scores), polling, from_thread, after_window, time.perf_counter() - stop_started

    scores, polling, from_thread, after_window, stop_s = run(main(400))
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
    assert polling > 10 and from_thread == ["ran"], polling
    assert after_window == 0 and stop_s < 0.3, (after_window, stop_s)
    _, sleeping, _, _, _ = run(main(0))
    assert sleeping == 0


def test_a_batchs_replies_leave_before_the_next_batch_runs(synthetic_store, movielens_examples, monkeypatch):
    """A front writes a reply a turn after its request's batch ends, and sends it a turn after that (the service's
    protocols coalesce a turn's writes): the next batch, already queued, must not run in between and hold the reply
    back for its whole length, also when the batch before held one request."""
    path = synthetic_store / "movielens" / "1"
    events = []
    take = batcher.Batcher._take_batch
    monkeypatch.setattr(batcher.Batcher, "_take_batch", lambda self: events.append(f"batch of {len(taken := take(self))}") or taken)

    async def reply(engine, index: int) -> None:
        await engine.score(movielens_examples[index : index + 1])
        asyncio.get_running_loop().call_soon(events.append, f"reply {index} sent")  # as CoalescedWrites sends it

    async def main() -> list:
        engine = ScoringEngine(load_settings(max_batch_ids=load_bundle(path).plan.slots))  # one request a batch
        engine.registry.load(path)
        await engine.astart()
        await asyncio.gather(*(reply(engine, i) for i in range(3)))
        await engine.astop()
        return events

    assert run(main()) == ["batch of 1", "reply 0 sent", "batch of 1", "reply 1 sent", "batch of 1", "reply 2 sent"]


def test_the_loop_turns_twice_before_every_batch(synthetic_store, movielens_examples, monkeypatch):
    """Every batch is taken two turns of the loop after the batch loop finds work (bare yields, counted here): the
    last batch's replies are sent a turn after their handlers write them, and requests are queued a turn after they
    are read, so a batch taken sooner would hold the replies before it and miss the requests read meanwhile. After a
    batch the loop turns once more (its replies' handlers run)."""
    path = synthetic_store / "movielens" / "1"
    events = []

    class Yields:  # the batcher's asyncio, its bare yields recorded
        def __getattr__(self, name):
            return getattr(asyncio, name)

        async def sleep(self, delay, *args):
            if delay == 0:
                events.append("turn")
            return await asyncio.sleep(delay, *args)

    monkeypatch.setattr(batcher, "asyncio", Yields())
    take = batcher.Batcher._take_batch
    monkeypatch.setattr(batcher.Batcher, "_take_batch", lambda self: events.append(len(taken := take(self))) or taken)

    async def main(*rounds: int) -> list:
        engine = ScoringEngine(load_settings(max_batch_ids=2 * load_bundle(path).plan.slots))  # two requests a batch
        engine.registry.load(path)
        await engine.astart()
        for count in rounds:  # requests sent at once; the loop sleeps between rounds
            await asyncio.gather(*(engine.score(movielens_examples[i : i + 1]) for i in range(count)))
            await asyncio.sleep(0.01)
        await engine.astop()
        return [event for event in events if event != 0]

    assert run(main(1)) == ["turn", "turn", 1, "turn"]
    events.clear()
    assert run(main(3)) == ["turn", "turn", 2, "turn", "turn", "turn", 1, "turn"]
    events.clear()
    assert run(main(2, 1)) == ["turn", "turn", 2, "turn", "turn", "turn", 1, "turn"]  # the loop slept between the two rounds


def as_columns(examples: list[dict]) -> ExampleColumns:
    """Examples naming the same features as a front's columns (the /v1 reader's form)."""
    return ExampleColumns({name: [e[name] for e in examples] for name in examples[0]}, len(examples))


def emptied(examples) -> bool:
    return not examples if type(examples) is list else not any(examples.columns.values())


@pytest.mark.parametrize("form", [list, as_columns], ids=["rows", "columns"])
def test_a_requests_own_examples_are_freed_once_canonicalised_not_when_its_batch_answers(synthetic_store,
                                                                                       movielens_examples, form):  # fmt: skip
    """A front that decoded the examples from the request's body (``owned``) gets its list (or each column's list)
    emptied as soon as its values are canonical, while the request still waits for its batch; the scores are those
    of the same examples not owned, which stay as they were."""
    path = synthetic_store / "movielens" / "1"
    expected = ReferenceScorer(load_bundle(path)).score(movielens_examples[:8])

    async def main():
        engine = ScoringEngine(load_settings(compute_on_event_loop=False))
        engine.registry.load(path)
        await engine.astart()
        target = engine.resolve()
        held = threading.Event()
        engine.batcher.executor.submit(held.wait, 30)  # as a long batch holds the compute thread
        owned, kept = form([dict(e) for e in movielens_examples[:8]]), form([dict(e) for e in movielens_examples[:8]])
        waiting = [asyncio.ensure_future(engine.score_resolved(target, owned, owned=True)),
                   asyncio.ensure_future(engine.score_resolved(target, kept))]  # fmt: skip
        await wait_until_async(lambda: emptied(owned), 5, "the owned examples freed")
        assert kept == form(movielens_examples[:8]) and not any(task.done() for task in waiting)  # both wait for the batch
        held.set()
        scores = await asyncio.gather(*waiting)
        await engine.astop()
        return scores

    for scores in run(main()):
        np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
