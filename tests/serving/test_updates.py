"""Row updates: the overlay, the delta format's checks, the engine applying deltas between batches, and the
reader against a real redis-server that sends it bad entries and goes away."""

import asyncio
import threading

import numpy as np
import pytest

from uembed.bundle.codecs import encode_rows
from uembed.bundle.format import encode_records
from uembed.bundle.loader import TableRows, load_bundle
from uembed.loadtest.servers import RedisServer, wait_until
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.rows.overlay import RowOverlay
from uembed.serving.rows.push import RowPublisher, delta_file_rows
from uembed.serving.rows.updates import DeltaError, RowDelta, decode_delta, encode_delta, parse_position, stream_key
from uembed.serving.settings import load_settings


def test_overlay_holds_each_rows_latest_record_as_it_grows():
    overlay = RowOverlay(table_rows=10_000, record_bytes=8)
    rng = np.random.default_rng(0)
    latest = {}
    for step in range(20):
        ids = rng.choice(10_000, size=300, replace=False)
        records = np.full((300, 8), step, dtype=np.uint8)
        records[:, 0] = ids % 251
        overlay.apply(ids, records)
        latest.update({int(i): bytes(r) for i, r in zip(ids, records)})
    out = np.zeros((10_000, 8), dtype=np.uint8)
    hit = overlay.lookup(np.arange(10_000), out)
    assert overlay.rows == len(latest) == int(hit.sum()) > RowOverlay.INITIAL_CAPACITY
    assert all(bytes(out[i]) == record for i, record in latest.items())
    before = out.copy()
    overlay.apply(np.array(sorted(latest)), before[sorted(latest)])  # a replay: nothing changes
    out2 = np.zeros_like(out)
    overlay.lookup(np.arange(10_000), out2)
    assert overlay.rows == len(latest) and np.array_equal(out2, before)


def small_table(dtype: str = "float32") -> TableRows:
    values, scale_bias = encode_rows(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32), dtype)
    return TableRows("t", 10, 4, dtype, values, scale_bias)


def fields_of(table: TableRows, ids, rows, **changes) -> dict[bytes, bytes]:
    fields = encode_delta("m", "1", {"t": table}, {"t": (np.asarray(ids), encode_records(np.asarray(rows, np.float32), table.dtype))}, "test")
    fields.update(changes)
    return {k.encode(): v.encode() if isinstance(v, str) else v for k, v in fields.items()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4", "int2"])
def test_a_delta_round_trips_in_the_tables_stored_form(dtype):
    table = small_table(dtype)
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    delta = decode_delta(fields_of(table, [7, 2], rows), "m", "1", {"t": table})
    ids, records = delta.tables["t"]
    assert ids.tolist() == [7, 2] and delta.rows == 2 and delta.source == "test"
    assert np.array_equal(records, encode_records(rows, dtype))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "uembed-rows/9"}, "field format"),
        ({"model": "other"}, "fields model, version"),
        ({"tables": "not json"}, "field tables"),
        ({"tables": '[{"name": "u", "dtype": "float32", "dim": 4, "rows": 2}]'}, "no table 'u'"),
        ({"tables": '[{"name": "t", "dtype": "float16", "dim": 4, "rows": 2}]'}, "served as float32 x 4"),
        ({"records:t": b"\x00" * 5}, "records:t: 16 and 5 bytes"),
        ({"ids:t": np.array([3, 10], dtype="<i8").tobytes()}, "row ids must be in [0, 10)"),
        ({"ids:t": np.array([3, 3], dtype="<i8").tobytes()}, "a row id appears twice"),
        ({"records:t": np.full((2, 4), np.nan, dtype=np.float32).tobytes()}, "NaN or infinite"),
    ],
)
def test_bad_deltas_are_refused_naming_the_field(change, message):
    table = small_table()
    with pytest.raises(DeltaError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        decode_delta(fields_of(table, [3, 4], np.ones((2, 4)), **change), "m", "1", {"t": table})


def bundle_with_rows(path, rows: np.ndarray):
    bundle = load_bundle(path)
    bundle.tables["unified"].data = rows
    return bundle


@pytest.mark.parametrize("on_loop", [True, False], ids=["batches-on-the-loop", "batches-on-a-thread"])
def test_a_batch_never_sees_a_half_applied_delta(synthetic_store, movielens_examples, on_loop):
    """Deltas that rewrite every row of the table, alternating two sets of rows, applied while one request of 300
    examples is scored again and again: each response is wholly the old rows' scores or wholly the new ones',
    whether batches (and so the deltas, between them) run on the event loop or on a compute thread."""
    path = synthetic_store / "movielens" / "1"
    examples = movielens_examples[:300]
    old_rows = np.asarray(load_bundle(path).tables["unified"].data)
    new_rows = np.random.default_rng(1).normal(scale=0.3, size=old_rows.shape).astype(np.float32)
    expected = {name: ReferenceScorer(bundle_with_rows(path, rows)).score(examples) for name, rows in (("old", old_rows), ("new", new_rows))}
    assert np.abs(expected["old"] - expected["new"]).max() > 1e-2
    ids = np.arange(len(old_rows))
    deltas = {name: RowDelta({"unified": (ids, encode_records(rows, "float32"))}) for name, rows in (("old", old_rows), ("new", new_rows))}

    async def main():
        # half the rows in tier 1, the rest in the overlay
        engine = ScoringEngine(load_settings(hot_rows_bytes=8 * 1024, compute_on_event_loop=on_loop))
        engine.registry.load(path)
        await engine.astart()
        stop = threading.Event()

        def publish():
            step = 0
            while not stop.is_set():
                step += 1
                engine.submit_updates("movielens", "1", [((step, 0), deltas["new" if step % 2 else "old"])]).result()

        publisher = threading.Thread(target=publish)
        publisher.start()
        seen = []
        try:
            for _ in range(60):
                scores, _ = await engine.score(examples)
                seen.append(next((name for name, value in expected.items() if np.allclose(scores, value, atol=2e-6, rtol=0)), None))
        finally:
            stop.set()
            await asyncio.to_thread(publisher.join)  # the loop runs the deltas the publisher waits on
            await engine.astop()
        return seen

    seen = asyncio.run(main())
    assert None not in seen, f"a batch mixed old and new rows: {seen}"
    assert {"old", "new"} <= set(seen)


def test_the_reader_skips_bad_entries_and_outlives_redis_while_requests_go_on(synthetic_store, movielens_examples, tmp_path):
    path = synthetic_store / "movielens" / "1"
    examples = movielens_examples[:100]
    served = load_bundle(path)
    rows = np.asarray(served.tables["unified"].data)
    redis_server = RedisServer(tmp_path).start()
    key = stream_key("uembed", "movielens", "1")

    def delta_file(name: str, ids: np.ndarray, values: np.ndarray):
        np.savez(tmp_path / name, **{"unified.ids": ids, "unified.rows": values})
        return tmp_path / name

    def expected_after(changes: dict[int, np.ndarray]) -> np.ndarray:
        changed = rows.copy()
        for row, value in changes.items():
            changed[row] = value
        return ReferenceScorer(bundle_with_rows(path, changed)).score(examples)

    first = {int(i): np.full(rows.shape[1], 0.25 * (k % 3 - 1), dtype=np.float32) for k, i in enumerate(range(0, 350, 2))}
    second = {int(i): np.full(rows.shape[1], -0.2, dtype=np.float32) for i in range(1, 350, 2)}

    async def main():
        engine = ScoringEngine(load_settings(row_updates_url=redis_server.url, hot_rows_bytes=8 * 1024))
        engine.registry.load(path)
        runtime = engine.registry.models["movielens"]
        await engine.astart()
        publisher = RowPublisher(served, redis_server.client(), chunk_rows=64)
        try:
            redis_server.client().xadd(key, {"format": "garbage"})
            ids = np.array(sorted(first))
            report = publisher.publish(delta_file_rows(delta_file("first.npz", ids, np.stack([first[i] for i in ids])), served), "first")
            await asyncio.to_thread(wait_until, lambda: runtime.update_position == parse_position(report["last_id"]), 15, "first delta")
            after_first = (await engine.score(examples))[0]

            redis_server.kill()
            failures = 0
            for _ in range(20):  # the reader fails and backs off; scoring does not notice
                try:
                    await engine.score(examples)
                except Exception:  # noqa: BLE001 - counted: must stay 0
                    failures += 1
                await asyncio.sleep(0.05)
            errors = engine.metrics.redis_errors.labels("updates")._value.get()

            restarted = RedisServer(tmp_path, port=redis_server.port).start()
            publisher.client = restarted.client()
            ids = np.array(sorted(second))
            report = publisher.publish(delta_file_rows(delta_file("second.npz", ids, np.stack([second[i] for i in ids])), served), "second")
            await asyncio.to_thread(wait_until, lambda: runtime.update_position == parse_position(report["last_id"]), 30, "second delta")
            after_second = (await engine.score(examples))[0]
            rejected = engine.metrics.updates.labels("movielens", "1", "rejected", "format")._value.get()
            restarted.stop()
        finally:
            await engine.astop()
            redis_server.stop()
        return after_first, failures, errors, after_second, rejected

    after_first, failures, errors, after_second, rejected = asyncio.run(main())
    assert rejected == 1
    np.testing.assert_allclose(after_first, expected_after(first), atol=2e-6, rtol=0)
    assert failures == 0 and errors > 0
    np.testing.assert_allclose(after_second, expected_after(first | second), atol=2e-6, rtol=0)
