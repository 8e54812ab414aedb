"""/metrics: names and conventions, and the counters of what the service would otherwise do silently."""

import asyncio
import gc
import json
import os
import signal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.serving.inprocess import InProcessService
from tests.waiting import wait_until_async
from uembed.loadtest.servers import ServeProcess, parse_exposition, wait_until, worker_pids
from uembed.serving.metrics import ServiceMetrics
from uembed.serving.vitals import WorkerVitals

GOOD = {"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}
GOOD_CANDIDATE = {"movie_id": "242", "genres": ["Comedy"]}


@pytest.fixture(scope="module")
def app(synthetic_store):
    service = InProcessService(bundles=[synthetic_store / "movielens" / "1"], value_cache_bytes=200_000)
    yield service
    service.close()


def test_metrics_follow_prometheus_conventions(app):
    app.score([GOOD])
    text = app.get("/metrics").text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    expected = {
        "uembed_request_duration_seconds", "uembed_http_requests_total", "uembed_stage_duration_seconds",
        "uembed_batch_examples", "uembed_batch_ids", "uembed_queue_examples", "uembed_table_memory_bytes",
        "uembed_row_cache_hits_total", "uembed_row_cache_misses_total", "uembed_redis_errors_total",
        "uembed_redis_fallbacks_total", "uembed_model_info", "uembed_model_reloads_total",
        "uembed_rejected_requests_total", "uembed_unseen_values_total", "uembed_abandoned_requests_total",
        "uembed_value_cache_bytes", "uembed_table_file_bytes", "uembed_model_request_duration_seconds",
        "uembed_example_score", "uembed_shadow_requests_total", "uembed_shadow_score_difference", "uembed_routing_share",
        "uembed_worker_anonymous_memory_bytes", "uembed_gc_collected_objects_total",
    }  # fmt: skip
    assert expected <= names
    assert not any(name.endswith("_created") for name in names)
    samples = app.metrics()
    for stage in ("queue", "hash", "lookup", "assemble", "dense"):
        assert samples[f'uembed_stage_duration_seconds_count{{stage="{stage}"}}'] >= 1
    assert samples['uembed_model_info{dtype="float32",method="unified",model="movielens",version="1"}'] == 1
    mapped = samples['uembed_table_file_bytes{model="movielens",state="mapped",table="unified"}']
    resident = samples['uembed_table_file_bytes{model="movielens",state="resident",table="unified"}']
    table = app.get("/v1/models").json()["models"][0]["tables"][0]
    assert mapped == table["rows"] * table["dim"] * 4
    assert 0 < resident <= mapped + 4096  # whole pages; the bundle was just written and scored, so it is cached


def test_observing_scores_at_once_equals_observing_them_one_by_one():
    import numpy as np
    from prometheus_client import CollectorRegistry

    from uembed.serving.metrics import ServiceMetrics, observe_all

    values = np.concatenate([np.random.default_rng(0).random(997), [0.0, 0.05, 0.1, 1.0, 0.999999]]).astype(np.float32)
    one_by_one, at_once = ServiceMetrics(CollectorRegistry()), ServiceMetrics(CollectorRegistry())
    for value in values:
        one_by_one.example_score.labels("m", "1", "served").observe(float(value))
    observe_all(at_once.example_score.labels("m", "1", "served"), values)
    samples = [{(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics.registry.collect() for s in m.samples
                if m.name == "uembed_example_score"} for metrics in (one_by_one, at_once)]  # fmt: skip
    assert samples[0].keys() == samples[1].keys() and len(samples[0]) == 23
    for key, value in samples[0].items():
        assert samples[1][key] == pytest.approx(value, rel=1e-6), key


def test_a_scored_request_is_observed_under_its_model_version(app):
    before = app.metrics()
    app.score([GOOD, GOOD, GOOD])
    after = app.metrics()
    for name, grew in (("uembed_model_request_duration_seconds_count", 1), ("uembed_example_score_count", 3)):
        key = f'{name}{{model="movielens",traffic="served",version="1"}}'
        assert after[key] - before[key] == grew
    assert after['uembed_routing_share{model="movielens",version="1"}'] == 1


def test_a_batchs_metrics_reach_its_series_without_a_read_of_the_registry(synthetic_store):
    """Batches are tallied and put into the series in bulk: at every read of the registry, and by a loop timer at
    most FLUSH_SECONDS after a batch, so another worker's scrape (which reads this worker's series from their files,
    never this process's tally) sees them too."""
    service = InProcessService(bundles=[synthetic_store / "movielens" / "1"])
    try:
        batch_examples, scored = service.engine.metrics.batch_examples, service.engine.metrics.examples.labels("movielens")
        assert service.score([GOOD] * 5).status_code == 200
        # read from the series' own values: no collect of the registry, so no flush but the timer's
        wait_until(lambda: batch_examples._sum.get() == 5 and scored._value.get() == 5, 5, "the tally's timed flush")
        assert service.score([GOOD] * 2).status_code == 200
        after = service.metrics()  # a read flushes first, whatever the timer's turn
        assert after["uembed_batch_examples_sum"] == 7 and after['uembed_scored_examples_total{model="movielens"}'] == 7
        assert after['uembed_example_score_count{model="movielens",traffic="served",version="1"}'] == 7
        assert after['uembed_stage_duration_seconds_count{stage="dense"}'] == after["uembed_batch_examples_count"] == 2
    finally:
        service.close()


def test_values_unseen_in_training_are_counted_per_feature(app):
    key = 'uembed_unseen_values_total{feature="%s",model="movielens"}'
    before = app.metrics()
    assert before[key % "user_id"] >= 0 and before[key % "genres"] >= 0  # every feature's series exists
    seen = {"user_id": "196", "movie_id": "242", "genres": ["Comedy"], "occupation": "writer"}
    app.score([seen, seen])
    middle = app.metrics()
    assert middle[key % "user_id"] == before[key % "user_id"]
    new = {"user_id": "never-seen-user-7", "movie_id": "242", "genres": ["Comedy", "Space-Opera"], "occupation": None}
    app.score([new, new, seen])
    after = app.metrics()
    assert after[key % "user_id"] - middle[key % "user_id"] == 2  # per occurrence, missing values are not unseen
    assert after[key % "genres"] - middle[key % "genres"] == 2
    assert after[key % "occupation"] == middle[key % "occupation"]
    assert after[key % "movie_id"] == middle[key % "movie_id"]


def test_value_caches_are_bounded_in_bytes_and_reported(app):
    """A ranking request's context values go through the value cache (a column of plain strings is read in one
    compiled pass instead): thousands of distinct ones fill their features' shares of the budget, and no more."""
    runtime = app.engine.registry.runtime(None)
    share = runtime.encoder.cache_share
    for i in range(4000):
        context = {"zip_code": f"{i:0>60}", "user_id": f"u{i:0>60}"}
        assert app.score([GOOD_CANDIDATE], context=context).status_code == 200
    held = app.metrics()['uembed_value_cache_bytes{model="movielens"}']
    assert share < held <= 200_000, (share, held)  # both features' shares filled, within the whole budget


def test_requests_abandoned_before_their_batch_are_counted_and_skipped(synthetic_store):
    service = InProcessService(bundles=[synthetic_store / "movielens" / "1"], max_wait_ms=300, request_timeout_ms=5000)
    try:
        engine = service.engine
        cancelled = engine.metrics.abandoned.labels("cancelled")

        async def abandon():
            task = asyncio.ensure_future(engine.score([GOOD] * 3))
            await wait_until_async(lambda: engine.batcher.queued_examples >= 3, 5, "admitted, waiting for its batch (max_wait_ms)")
            assert engine.batcher.queued_examples == 3
            before = cancelled._value.get()
            task.cancel()
            await wait_until_async(lambda: cancelled._value.get() > before, 5, "the batch loop finding it abandoned")

        before = service.metrics()
        service.run(abandon())
        after = service.metrics()
        assert after['uembed_abandoned_requests_total{reason="cancelled"}'] - before['uembed_abandoned_requests_total{reason="cancelled"}'] == 1
        assert after.get('uembed_scored_examples_total{model="movielens"}', 0) == before.get('uembed_scored_examples_total{model="movielens"}', 0)
        assert service.engine.batcher.queued_examples == 0
    finally:
        service.close()


def test_requests_past_their_deadline_in_the_queue_are_counted_as_deadline(synthetic_store):
    from uembed.contract.errors import DeadlineExceeded

    service = InProcessService(bundles=[synthetic_store / "movielens" / "1"], max_wait_ms=400, request_timeout_ms=100)
    try:
        deadline = service.engine.metrics.abandoned.labels("deadline")

        async def late():
            before = deadline._value.get()
            try:
                await service.engine.score([GOOD])
            except DeadlineExceeded:
                # the batch loop wakes after max_wait_ms and meets the expired request
                await wait_until_async(lambda: deadline._value.get() > before, 5, "the expired request counted")
                return True
            return False

        before = service.metrics()
        assert service.run(late())
        after = service.metrics()
        for reason, added in (("deadline", 1), ("cancelled", 0)):
            key = f'uembed_abandoned_requests_total{{reason="{reason}"}}'
            assert after[key] - before[key] == added, reason
    finally:
        service.close()


def test_each_features_collision_share_is_a_gauge_set_from_the_bundles_report(app, synthetic_store):
    manifest = json.loads((synthetic_store / "movielens" / "1" / "manifest.json").read_text())
    report = manifest["collisions"]["features"]
    assert set(report) == {spec["name"] for spec in manifest["features"]}
    samples = app.metrics()
    for feature, entry in report.items():
        assert samples[f'uembed_feature_collision_share{{feature="{feature}",model="movielens"}}'] == pytest.approx(entry["shared_share"])
    assert any(entry["shared_share"] > 0 for entry in report.values())  # the synthetic store's table is a tenth of the values


def test_a_respawned_worker_replaces_its_predecessors_gauges_not_adds_to_them(synthetic_store, tmp_path):
    """`uembed serve --workers 2`, one worker killed with SIGKILL and respawned by the supervisor: the files of the
    killed worker's live gauges are removed as its successor starts, so /metrics no longer sums its last values (a
    table's memory in each worker) with the workers that serve; its counters stay. The successor says so in the log."""
    service = ServeProcess(synthetic_store / "movielens" / "1", tmp_path / "serve.log", workers=2).start()
    metrics_dir = Path(service.env.get("PROMETHEUS_MULTIPROC_DIR") or os.environ["PROMETHEUS_MULTIPROC_DIR"])
    try:
        def started(count: int) -> bool:
            return service.log_path.read_text().count("Application startup complete") >= count

        wait_until(lambda: len(worker_pids(service)) == 2 and started(2), 60, "both workers serving")
        killed = worker_pids(service)[0]
        wait_until(lambda: (metrics_dir / f"gauge_livesum_{killed}.db").exists(), 30, "its gauges written")
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: killed not in worker_pids(service) and len(worker_pids(service)) == 2, 60, "the respawn")
        wait_until(lambda: started(3), 60, "its start")
        left = sorted(f.name for f in metrics_dir.iterdir() if f.name.endswith(f"_{killed}.db"))
        assert left and all(not name.startswith("gauge_live") for name in left), left
        # the service's own log lines show under `uembed serve` (its logging configuration)
        log = service.log_path.read_text()
        assert f"forgot the live gauges of gone workers [{killed}]" in log and "serving movielens version 1 from" in log
    finally:
        service.stop()


def test_the_vitals_read_the_workers_memory_and_count_what_the_cycle_collector_frees():
    """Each read of the registry sets the worker's RSS and adds the objects the cycle collector freed since the last."""
    metrics = ServiceMetrics(CollectorRegistry())

    def read() -> dict[str, float]:
        return parse_exposition(metrics.exposition().decode())

    first = read()
    assert first["uembed_worker_anonymous_memory_bytes"] > 2**20
    for _ in range(500):  # lists that hold themselves: garbage only the cycle collector frees
        cycle = []
        cycle.append(cycle)
    del cycle
    gc.collect()  # whatever a young pass left of them

    def collected(sample: dict[str, float]) -> float:  # over the generations: young passes may have freed some
        return sum(sample[f'uembed_gc_collected_objects_total{{generation="{g}"}}'] for g in range(len(gc.get_stats())))

    assert collected(read()) - collected(first) >= 500


def test_an_idle_workers_vitals_refresh_on_their_own_timer():
    """Without a read of its registry or a batch, a worker's memory gauge follows its memory every refresh, so a scrape
    another worker answers sees an idle worker's values current; stop ends the refreshes."""
    registry = CollectorRegistry()
    vitals = WorkerVitals(registry)

    def gauge() -> float | None:  # the gauge as it was last set: reading the registry itself updates nothing
        return registry.get_sample_value("uembed_worker_anonymous_memory_bytes")

    async def scenario() -> None:
        vitals.keep_fresh(asyncio.get_running_loop(), every_s=0.01)
        await wait_until_async(lambda: gauge() > 0, 5, "a first refresh")  # unset, a gauge reads 0
        before = gauge()
        held = b"x" * (64 * 2**20)  # written, so resident
        await wait_until_async(lambda: gauge() > before + 48 * 2**20, 5, "a refresh that sees the memory")
        vitals.stop()
        del held
        stopped = gauge()
        await asyncio.sleep(0.1)
        assert gauge() == stopped

    asyncio.run(scenario())
