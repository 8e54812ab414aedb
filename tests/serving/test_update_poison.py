"""Row-update entries that hold anything at all (#35, item 1): each is rejected with a reason, its position consumed,
and the entries after it applied: by a running reader, by a replica starting on the stream, and by a reload.
A reader that cannot make progress says so in /v1/models and a metric. Real redis-server and uvicorn."""

import asyncio

import httpx
import numpy as np
import pytest

from tests.serving.test_updates import bundle_with_rows, fields_of, small_table
from uembed.bundle.format import encode_records
from uembed.bundle.loader import load_bundle
from uembed.loadtest.servers import wait_until
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.rows.published import marker_problem
from uembed.serving.rows.updates import DeltaError, decode_delta, encode_delta, parse_position, stream_key
from uembed.serving.settings import load_settings

TOKEN = "poison-token-0123456789"
INFINITE_ROWS = '[{"name": "unified", "dtype": "float32", "dim": 8, "rows": Infinity}]'
DEEP = "[" * 100_000


@pytest.mark.parametrize(
    "tables",
    [
        '[{"name": "t", "dtype": "float32", "dim": 4, "rows": Infinity}]',
        '[{"name": "t", "dtype": "float32", "dim": 4, "rows": NaN}]',
        '[{"name": "t", "dtype": "float32", "dim": 4, "rows": 1e400}]',
        '[{"name": "t", "dtype": "float32", "dim": 4, "rows": 2.5}]',
        '[{"name": "t", "dtype": "float32", "dim": 4, "rows": true}]',
        '[{"name": "t", "dtype": "float32", "dim": 4, "rows": -2}]',
        '[{"name": "t", "dtype": "float32", "dim": 4, "rows": ' + "9" * 5000 + "}]",
        '[{"name": ["t"], "dtype": "float32", "dim": 4, "rows": 2}]',
        '{"name": "t"}',
        "[1, 2]",
        DEEP,
        '[{"t": ' * 50_000,
    ],
    ids=["infinity", "nan", "overflowing-float", "fraction", "bool", "negative", "5000-digits", "name-list", "object",
         "not-objects", "nested-lists", "nested-objects"],  # fmt: skip
)
def test_any_tables_field_is_rejected_naming_the_field(tables):
    table = small_table()
    with pytest.raises(DeltaError) as raised:
        decode_delta(fields_of(table, [3, 4], np.ones((2, 4)), tables=tables), "m", "1", {"t": table})
    assert raised.value.field == "tables" and str(raised.value).startswith("field tables:")


def poison(tables: str, bundle) -> dict:
    """An entry of the right format, model and version whose ``tables`` field is ``tables``."""
    return {"format": "uembed-rows/1", "model": bundle.name, "version": bundle.version, "tables": tables,
            "ids:unified": b"\x00" * 8, "records:unified": b"\x00" * 32, "source": "poison"}  # fmt: skip


def valid(bundle, ids: np.ndarray, value: float) -> tuple[dict, np.ndarray]:
    """An entry setting rows ``ids`` of the unified table to ``value``, and the table's rows afterwards."""
    table = bundle.tables["unified"]
    rows = np.asarray(table.data, dtype=np.float32).copy()
    rows[ids] = value
    fields = encode_delta(bundle.name, bundle.version, bundle.tables, {"unified": (ids, encode_records(rows[ids], table.dtype))}, "test")
    return fields, rows


def test_a_running_reader_skips_poison_entries_and_applies_what_follows(synthetic_store, movielens_examples, redis_server):
    path = synthetic_store / "movielens" / "1"
    served = load_bundle(path)
    examples = movielens_examples[:100]
    client = redis_server.client()
    key = stream_key("uembed", "movielens", "1")
    fields, rows = valid(served, np.arange(0, 300, 3), 0.3)
    expected = ReferenceScorer(bundle_with_rows(path, rows)).score(examples)

    async def main():
        engine = ScoringEngine(load_settings(row_updates_url=redis_server.url))
        engine.registry.load(path)
        runtime = engine.registry.models["movielens"]
        await engine.astart()
        try:
            client.xadd(key, poison(INFINITE_ROWS, served))
            client.xadd(key, poison(DEEP, served))
            last = client.xadd(key, fields)
            await asyncio.to_thread(wait_until, lambda: runtime.update_position == parse_position(last), 20, "the valid delta")
            scores = (await engine.score(examples))[0]
            counted = {reason: engine.metrics.updates.labels("movielens", "1", "rejected", reason)._value.get() for reason in ("tables", "unexpected")}
            return scores, counted, engine.registry.updates.describe(runtime)
        finally:
            await engine.astop()

    scores, counted, described = asyncio.run(main())
    np.testing.assert_allclose(scores, expected, atol=2e-6, rtol=0)
    assert counted == {"tables": 2, "unexpected": 0}
    assert described["stuck_since"] is None and described["reachable"] is True


def models(service) -> dict:
    return {m["version"]: m for m in httpx.get(f"{service.url}/v1/models", timeout=10).json()["models"]}


def test_a_replica_starting_on_a_poisoned_stream_starts_and_a_reload_on_one_is_no_500(synthetic_store, redis_server, start_service):
    """Version 1's stream holds the poison entries before the service starts, version 2's before it is loaded."""
    client = redis_server.client()
    last = {}
    for version in ("1", "2"):
        bundle = load_bundle(synthetic_store / "movielens" / version)
        client.xadd(stream_key("uembed", "movielens", version), poison(INFINITE_ROWS, bundle))
        client.xadd(stream_key("uembed", "movielens", version), poison(DEEP, bundle))
        last[version] = client.xadd(stream_key("uembed", "movielens", version), valid(bundle, np.arange(5, 50), -0.1)[0]).decode()

    service = start_service([synthetic_store / "movielens" / "1"], row_updates_url=redis_server.url,
                            bundle_store=synthetic_store, reload_token=TOKEN)  # fmt: skip
    started = models(service)["1"]["row_updates"]
    assert started["applied_id"] == last["1"] and started["overlay_rows"] == 45
    rejected = 'uembed_row_updates_total{{model="movielens",outcome="rejected",reason="tables",version="{}"}}'
    assert service.metrics()[rejected.format("1")] == 2
    response = httpx.post(f"{service.url}/v1/models/movielens/load", json={"version": "2"},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    reloaded = models(service)["2"]["row_updates"]
    assert reloaded["applied_id"] == last["2"] and reloaded["overlay_rows"] == 45
    metrics = service.metrics()
    assert metrics[rejected.format("2")] == 2
    assert rejected.format("1") not in metrics  # the replaced version's series went with it


def test_a_reader_that_cannot_progress_says_since_when_and_why(synthetic_store, redis_server):
    """The stream key holds a string, not a stream: every read fails until it is a stream again."""
    path = synthetic_store / "movielens" / "1"
    served = load_bundle(path)
    client = redis_server.client()
    key = stream_key("uembed", "movielens", "1")
    client.set(key, "not a stream")

    async def main():
        engine = ScoringEngine(load_settings(row_updates_url=redis_server.url))
        engine.registry.load(path)
        runtime = engine.registry.models["movielens"]
        reader, stuck = engine.registry.updates, engine.metrics.update_reader_stuck_seconds
        await engine.astart()
        try:
            await asyncio.to_thread(wait_until, lambda: stuck._value.get() > 0, 20, "the stuck gauge")
            while_stuck = reader.describe(runtime)
            client.delete(key)
            last = client.xadd(key, valid(served, np.arange(10), 0.2)[0])
            await asyncio.to_thread(wait_until, lambda: runtime.update_position == parse_position(last), 30, "the delta after")
            await asyncio.to_thread(wait_until, lambda: reader.describe(runtime)["stuck_since"] is None, 10, "progress")
            return while_stuck, reader.describe(runtime), stuck._value.get()
        finally:
            await engine.astop()

    while_stuck, after, gauge = asyncio.run(main())
    assert while_stuck["stuck_since"] is not None and "WRONGTYPE" in while_stuck["last_error"]
    assert after["last_error"] is None and gauge == 0


@pytest.mark.parametrize("found", [DEEP.encode(), b"[1, 2]", b'"a string"'], ids=["nested", "list", "string"])
def test_a_completion_marker_holding_anything_is_a_reason_to_wait(synthetic_store, found):
    manifest = load_bundle(synthetic_store / "movielens" / "1").manifest
    assert "the completion marker at k is not" in marker_problem(found, manifest, 64, "k")
