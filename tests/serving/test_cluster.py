"""Redis Cluster as tier 2, `uembed publish`, and rows that live only in Redis: against a real 6-process
Redis Cluster (3 masters, 3 replicas) on loopback, started once for this module."""

import asyncio
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.scoring import score
from tests.serving.rows.tables import make_table
from tests.serving.test_faults import Traffic
from tests.waiting import steady
from uembed.bundle.loader import load_bundle
from uembed.loadtest.servers import RedisClusterServers, http_get, wait_until
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.rows.codec import RowCodec
from uembed.serving.rows.files import FileRows
from uembed.serving.rows.published import expected_marker, marker_key, table_namespace
from uembed.serving.rows.redis import RedisTier
from uembed.serving.rows.store import TableStore


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


def cluster_tier(cluster: RedisClusterServers, **options) -> RedisTier:
    settings = {"timeout_s": 0.5, "retry_s": 0.1, "bucket_rows": 64, "fill_queue": 16} | options
    return RedisTier(cluster.url, **settings)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_cluster_tier_returns_bit_identical_rows_spread_over_every_master(dtype, redis_cluster):
    table = make_table(dtype)
    redis = cluster_tier(redis_cluster)
    store = TableStore(table, f"cluster-test:{dtype}", hot_bytes=0, redis=redis)
    ids = np.unique(np.random.default_rng(1).integers(0, table.rows, 600))
    from_files = store.gather(ids)
    assert redis.flush()
    from_redis = store.gather(ids)
    counts = store.take_counts()
    assert counts.hits["redis"] == len(ids) and counts.hits["file"] == len(ids)
    expected = table.gather(ids)
    for got in (from_files, from_redis):
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    holding = [port for port in redis_cluster.masters() if redis_cluster.node(port).dbsize() > 0]
    assert len(holding) == 3, "a table's buckets should spread over every master (no hash tag)"
    redis.close()


def test_a_batch_read_is_one_pipelined_round_per_node(redis_cluster, monkeypatch):
    """Count the packed writes redis-py sends: one per master for a batch whose buckets span them all."""
    from redis.connection import AbstractConnection

    table = make_table("float32", rows=64 * 300)
    redis = cluster_tier(redis_cluster, fill_queue=0)
    namespace = "cluster-test:rounds"
    ids = np.arange(table.rows)
    redis.write(namespace, ids, FileRows(table).read(ids))
    redis.client.get_nodes()  # the slot map is read before counting
    sends = []
    original = AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sends.append(self.port)
        return original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    out = np.empty((len(ids), RowCodec(table).record_bytes), dtype=np.uint8)
    hit = redis.fetch(namespace, ids, out)  # 300 buckets: 300 HMGETs
    assert hit is not None and hit.all()
    assert sorted(sends) == sorted(redis_cluster.masters()), sends
    redis.close()


# --- uembed publish -------------------------------------------------------------------------------


def publish_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uembed", "publish", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["cluster", "plain"])
def test_publish_writes_every_row_and_verify_reads_them_back(where, synthetic_store, redis_cluster, redis_server):
    url = redis_cluster.url if where == "cluster" else redis_server.url
    bundle = synthetic_store / "movielens" / "2"  # float16 rows
    result = publish_cli(str(bundle), "--redis-url", url, "--verify", "--chunk-rows", "1000")
    assert result.returncode == 0, result.stderr
    assert "all match the row files" in result.stdout
    assert result.stdout.splitlines()[-1] == f"next: UEMBED_ROW_SOURCE=redis uembed serve --bundle {bundle} --redis-url {url}"
    assert "publish" in result.stderr  # the progress bar

    loaded = load_bundle(bundle)
    table = next(iter(loaded.tables.values()))
    tier = RedisTier(url, timeout_s=2, retry_s=0, bucket_rows=64, fill_queue=0)
    ids = np.arange(table.rows)
    out = np.empty((table.rows, RowCodec(table).record_bytes), dtype=np.uint8)
    assert tier.read(table_namespace("uembed", "movielens", "2", table.name), ids, out).all()
    assert np.array_equal(out, FileRows(table).read(ids)), "rows are stored as the tier stores them"
    marker = json.loads(tier.client.get(marker_key("uembed", "movielens", "2")))
    assert marker["tables"][0]["sha256"] == [loaded.manifest["tables"][0]["sha256"]]
    assert marker["rows"] == table.rows and marker["bucket_rows"] == 64

    again = publish_cli(str(bundle), "--redis-url", url, "--quiet")  # idempotent: the same keys, the same bytes
    assert again.returncode == 0 and again.stderr == ""
    assert publish_cli(str(bundle), "--redis-url", url, "--verify-only", "--quiet").returncode == 0
    tier.close()


def test_verify_finds_a_corrupted_row_and_a_missing_bucket(synthetic_store, redis_cluster):
    bundle = synthetic_store / "movielens" / "1"
    assert publish_cli(str(bundle), "--redis-url", redis_cluster.url, "--quiet").returncode == 0
    table = next(iter(load_bundle(bundle).tables.values()))
    client = redis_cluster.client()
    namespace = table_namespace("uembed", "movielens", "1", table.name)
    record = client.hget(f"{namespace}:2", "5")
    client.hset(f"{namespace}:2", "5", bytes([record[0] ^ 1]) + record[1:])  # row 2 * 64 + 5, one bit flipped
    client.delete(f"{namespace}:3")  # rows 192 to 255
    result = publish_cli(str(bundle), "--redis-url", redis_cluster.url, "--verify-only", "--quiet")
    assert result.returncode == 1
    assert f"table {table.name}: 65 rows missing or different in Redis (first: [133, 192, 193" in result.stdout
    fixed = publish_cli(str(bundle), "--redis-url", redis_cluster.url, "--verify", "--quiet")
    assert fixed.returncode == 0, fixed.stdout
    client.close()


def test_verify_refuses_a_marker_of_other_row_files(synthetic_store, redis_server, tmp_path):
    bundle = synthetic_store / "movielens" / "1"
    assert publish_cli(str(bundle), "--redis-url", redis_server.url, "--quiet").returncode == 0
    client = redis_server.client()
    key = marker_key("uembed", "movielens", "1")
    marker = json.loads(client.get(key))
    marker["tables"][0]["sha256"] = ["0" * 64]
    client.set(key, json.dumps(marker))
    result = publish_cli(str(bundle), "--redis-url", redis_server.url, "--verify-only", "--quiet")
    assert result.returncode == 1 and "of other row files than this bundle's manifest" in result.stdout


# --- serving rows that live only in Redis ---------------------------------------------------------


def without_row_files(bundle: Path, folder: Path) -> Path:
    """A copy of ``bundle`` as a rows-in-Redis replica holds it: manifest, vocabularies, dense graph; no tables/."""
    copy = folder / bundle.name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("tables"))
    return copy


def test_rows_only_in_the_cluster_score_as_the_row_files_do(synthetic_store, redis_cluster, movielens_examples, start_service, tmp_path):
    bundle = synthetic_store / "movielens" / "2"
    replica_bundle = without_row_files(bundle, tmp_path)
    prefix = "rows-only"  # nothing published under it yet
    service = start_service([replica_bundle], ready_path="/healthz", redis_url=redis_cluster.url, row_source="redis",
                            redis_prefix=prefix, hot_rows_bytes=4096)  # fmt: skip
    status, body = http_get(f"{service.url}/readyz")
    detail = json.loads(body)["detail"]
    assert status == 503 and "rows in Redis not published: no completion marker at rows-only:movielens:2:published" in detail
    response = httpx.post(f"{service.url}/v1/score", json={"examples": movielens_examples[:2]})
    assert response.status_code == 503 and response.json()["error"] == "not_ready"

    result = publish_cli(str(bundle), "--redis-url", redis_cluster.url, "--prefix", prefix, "--quiet")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: http_get(f"{service.url}/readyz")[0] == 200, 10, "readiness after publish")

    from_redis = score(service.url, movielens_examples, chunk=250)
    from_files = score(start_service([bundle]).url, movielens_examples, chunk=250)
    np.testing.assert_array_equal(from_redis, from_files)
    metrics = service.metrics()
    assert metrics['uembed_row_cache_hits_total{tier="redis"}'] > 0
    assert metrics.get('uembed_row_cache_hits_total{tier="file"}', 0) == 0


def test_rows_only_refuses_what_redis_does_not_hold(synthetic_store, redis_cluster, movielens_examples, start_service, tmp_path):
    """A published version whose rows were deleted: the batch's requests get 503 rows_unavailable, never zeros."""
    bundle = synthetic_store / "movielens" / "1"
    prefix = "rows-lost"
    assert publish_cli(str(bundle), "--redis-url", redis_cluster.url, "--prefix", prefix, "--quiet").returncode == 0
    service = start_service([without_row_files(bundle, tmp_path)], ready_path="/healthz", redis_url=redis_cluster.url,
                            row_source="redis", redis_prefix=prefix, hot_rows_bytes=0)  # fmt: skip
    wait_until(lambda: http_get(f"{service.url}/readyz")[0] == 200, 10, "readiness")
    client = redis_cluster.client()
    for key in client.scan_iter(match=f"{prefix}:movielens:1:unified:*", count=1000):
        client.delete(key)
    response = httpx.post(f"{service.url}/v1/score", json={"examples": movielens_examples[:4]})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    body = response.json()
    assert body["error"] == "rows_unavailable" and "are not in Redis under rows-lost:movielens:1:unified" in body["detail"]
    client.close()


def test_rows_only_in_redis_wait_out_a_short_pause_of_redis_by_default(synthetic_store, redis_server, movielens_examples,
                                                                        start_service, tmp_path):  # fmt: skip
    """With the rows only in Redis a timeout fails the batch (503 rows_unavailable) and Redis is skipped for a
    while: there the default timeout outlasts a short pause of Redis's own, which a cache's 50 ms does not."""
    bundle = synthetic_store / "movielens" / "1"
    assert publish_cli(str(bundle), "--redis-url", redis_server.url, "--quiet").returncode == 0
    replica = without_row_files(bundle, tmp_path)
    options = {"redis_url": redis_server.url, "hot_rows_bytes": 0, "row_source": "redis"}
    by_default, at_50_ms = start_service([replica], **options), start_service([replica], redis_timeout_ms=50, **options)
    body = {"examples": movielens_examples[:8]}

    def scored_while_redis_pauses(service, seconds: float | None) -> httpx.Response:
        """A request sent while Redis is stopped, resumed ``seconds`` later (None: once the answer is in)."""
        assert httpx.post(f"{service.url}/v1/score", json=body, timeout=10).status_code == 200
        redis_server.pause()
        try:
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(httpx.post, f"{service.url}/v1/score", json=body, timeout=10)
                if seconds is not None:
                    time.sleep(seconds)
                    redis_server.resume()
                return answer.result()
        finally:
            redis_server.resume()

    waited = scored_while_redis_pauses(by_default, 0.2)
    assert waited.status_code == 200 and waited.elapsed.total_seconds() >= 0.1, "it waited the pause out"
    # Redis stays stopped until the answer: on a loaded machine the request could reach Redis after a timed pause
    refused = scored_while_redis_pauses(at_50_ms, None)
    assert (refused.status_code, refused.json().get("error")) == (503, "rows_unavailable"), refused.text


def test_the_cluster_as_a_cache_scores_as_the_row_files_do(synthetic_store, redis_cluster, movielens_examples, start_service):
    bundle = synthetic_store / "movielens" / "1"
    cached = start_service([bundle], redis_url=redis_cluster.url, redis_prefix="cache", hot_rows_bytes=0)
    first = score(cached.url, movielens_examples, chunk=250)  # rows from the files, filled into the cluster
    client = redis_cluster.client()
    cached_keys = lambda: len(set(client.scan_iter(match="cache:movielens:1:*", count=1000)))  # noqa: E731
    settled = steady(cached_keys)  # the fill thread writes behind the batches
    wait_until(lambda: settled() and cached_keys() > 0, 10, "rows filled into the cluster")
    client.close()
    second = score(cached.url, movielens_examples, chunk=250)
    metrics = cached.metrics()
    assert metrics['uembed_row_cache_hits_total{tier="redis"}'] > 0
    assert metrics.get('uembed_redis_errors_total{operation="fetch"}', 0) == 0
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, score(start_service([bundle]).url, movielens_examples, chunk=250))


def test_a_killed_master_fails_over_under_traffic(synthetic_store, movielens_examples, start_service, tmp_path):
    """One master killed under traffic, on a cluster of our own (cluster-node-timeout 1 s). With row files the
    cluster is a cache: not one request fails. With rows only in the cluster, the killed master's rows are
    503 rows_unavailable until its replica takes over; then the service scores again, with no restart."""
    cluster = RedisClusterServers(tmp_path / "cluster").start()
    try:
        bundle = synthetic_store / "movielens" / "1"
        assert publish_cli(str(bundle), "--redis-url", cluster.url, "--quiet").returncode == 0
        # A Redis call may wait for a core on a loaded machine: a short timeout would turn such a wait into a 503 for the
        # rows only in Redis, after the failover too, which this test would read as no recovery (the default there is
        # a quarter of request_timeout_ms, 250 ms with these options).
        options = {"redis_url": cluster.url, "hot_rows_bytes": 0, "redis_retry_s": 0.3, "request_timeout_ms": 1000,
                   "redis_timeout_ms": 500}  # fmt: skip
        cached = start_service([bundle], **options)
        only = start_service([without_row_files(bundle, tmp_path)], ready_path="/healthz", row_source="redis", **options)
        wait_until(lambda: http_get(f"{only.url}/readyz")[0] == 200, 10, "readiness")
        reference = ReferenceScorer(load_bundle(bundle)).score(movielens_examples)
        with Traffic(cached.url, movielens_examples, threads=2) as on_files, Traffic(only.url, movielens_examples, threads=2) as on_redis:
            wait_until(lambda: on_files.count() >= 20 and on_redis.count() >= 20, 30, "traffic before the kill")
            killed_at = time.perf_counter()
            cluster.kill(cluster.masters()[0])
            cluster.wait_healthy(timeout_s=20)  # the replica took over its slots
            failed_over_s = time.perf_counter() - killed_at
            recovered_from = killed_at + failed_over_s + 0.5
            wait_until(lambda: min(on_files.count_since(recovered_from), on_redis.count_since(recovered_from)) >= 20, 30,
                       "traffic after the failover")  # fmt: skip
        assert on_files.failures() == []
        failures = on_redis.failures()
        assert {(f["status"], f["body"]["error"]) for f in failures} <= {(503, "rows_unavailable")}
        recovered = [r for r in on_redis.results if r["sent_at"] > recovered_from]
        assert recovered and all(r["status"] == 200 for r in recovered), "the service did not recover without a restart"
        for traffic in (on_files, on_redis):
            for record in traffic.results:
                if record["status"] == 200:
                    expected = reference[record["start"] : record["start"] + traffic.chunk]
                    np.testing.assert_allclose(record["body"]["scores"], expected, atol=1e-6, rtol=0)
        window = [f["sent_at"] - killed_at for f in failures]
        print(f"\nfailover {failed_over_s:.1f}s after the kill; rows only in Redis: {len(failures)} of "
              f"{len(on_redis.results)} requests failed (503), from {min(window, default=0):.1f}s to "
              f"{max(window, default=0):.1f}s after the kill; with row files: 0 of {len(on_files.results)}")  # fmt: skip
    finally:
        cluster.stop()


def test_an_unpublished_or_differently_published_version_is_not_served(synthetic_store, redis_server, tmp_path):
    """In process: a reload of a version with no marker is refused; a marker of other row files keeps the
    model not ready, and says so, until the bundle is published."""
    from uembed.contract.errors import BundleError, NotReady
    from uembed.serving.engine import ScoringEngine
    from uembed.serving.settings import load_settings

    bundle = without_row_files(synthetic_store / "movielens" / "1", tmp_path)
    engine = ScoringEngine(load_settings(redis_url=redis_server.url, row_source="redis", redis_prefix="engine"))
    with pytest.raises(BundleError, match="rows in Redis not published: no completion marker at engine:movielens:1:published"):
        engine.registry.open(bundle)  # as a reload opens it
    client = redis_server.client()
    marker = expected_marker(load_bundle(bundle, row_files=False).manifest, 64) | {"rows": 1}
    client.set(marker_key("engine", "movielens", "1"), json.dumps(marker))
    runtime = engine.registry.load(bundle)  # as at start: waits in the background
    with pytest.raises(NotReady, match="the completion marker at engine:movielens:1:published has rows=1"):
        engine.registry.runtime(None)
    assert publish_cli(str(synthetic_store / "movielens" / "1"), "--redis-url", redis_server.url, "--prefix", "engine", "--quiet").returncode == 0
    runtime.bundle.row_checks.wait(timeout_s=5)
    assert engine.registry.runtime(None) is runtime
    asyncio.run(engine.astop())
    client.close()


def test_unloading_deletes_one_versions_keys_from_every_master(redis_cluster):
    """RedisTier.delete_namespace, as unloading a version runs it: SCAN on every node, UNLINK split by slot."""
    table = make_table("float32", rows=64 * 200)
    redis = cluster_tier(redis_cluster, fill_queue=0)
    ids = np.arange(table.rows)
    records = FileRows(table).read(ids)
    for version in ("1", "2"):
        redis.write(table_namespace("unload", "m", version, table.name), ids, records)
    client = redis_cluster.client()
    count = lambda version: len(set(client.scan_iter(match=f"unload:m:{version}:*", count=1000)))  # noqa: E731
    assert count("1") == count("2") == 200
    assert redis.delete_namespace(table_namespace("unload", "m", "2", table.name)) == 200
    assert count("2") == 0 and count("1") == 200
    assert redis.delete_namespace(table_namespace("unload", "m", "2", table.name)) == 0
    redis.close()
    client.close()
