"""Redis Cluster as tier 2, `uembed publish`, and rows that live only in Redis: against a real 6-process
Redis Cluster (3 masters, 3 replicas) on loopback, started once for this module."""

import json
import subprocess
import sys

import numpy as np
import pytest

from export.loader import load_bundle
from loadtest.servers import RedisClusterServers
from service.rows.published import marker_key, table_namespace
from service.rowstore import RedisTier, RowCodec, TableStore
from tests.service.test_rowstore import make_table


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
    redis.write(namespace, ids, RowCodec(table).read(ids))
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
def test_publish_writes_every_row_and_verify_reads_them_back(where, bundle_store, redis_cluster, redis_server):
    url = redis_cluster.url if where == "cluster" else redis_server.url
    bundle = bundle_store / "movielens" / "2"  # float16 rows
    result = publish_cli(str(bundle), "--redis-url", url, "--verify", "--chunk-rows", "1000")
    assert result.returncode == 0, result.stderr
    assert "all match the row files" in result.stdout
    assert "publish" in result.stderr  # the progress bar

    loaded = load_bundle(bundle)
    table = next(iter(loaded.tables.values()))
    tier = RedisTier(url, timeout_s=2, retry_s=0, bucket_rows=64, fill_queue=0)
    ids = np.arange(table.rows)
    out = np.empty((table.rows, RowCodec(table).record_bytes), dtype=np.uint8)
    assert tier.read(table_namespace("uembed", "movielens", "2", table.name), ids, out).all()
    assert np.array_equal(out, RowCodec(table).read(ids)), "rows are stored as the tier stores them"
    marker = json.loads(tier.client.get(marker_key("uembed", "movielens", "2")))
    assert marker["tables"][0]["sha256"] == [loaded.manifest["tables"][0]["sha256"]]
    assert marker["rows"] == table.rows and marker["bucket_rows"] == 64

    again = publish_cli(str(bundle), "--redis-url", url, "--quiet")  # idempotent: the same keys, the same bytes
    assert again.returncode == 0 and again.stderr == ""
    assert publish_cli(str(bundle), "--redis-url", url, "--verify-only", "--quiet").returncode == 0
    tier.close()


def test_verify_finds_a_corrupted_row_and_a_missing_bucket(bundle_store, redis_cluster):
    bundle = bundle_store / "movielens" / "1"
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


def test_verify_refuses_a_marker_of_other_row_files(bundle_store, redis_server, tmp_path):
    bundle = bundle_store / "movielens" / "1"
    assert publish_cli(str(bundle), "--redis-url", redis_server.url, "--quiet").returncode == 0
    client = redis_server.client()
    key = marker_key("uembed", "movielens", "1")
    marker = json.loads(client.get(key))
    marker["tables"][0]["sha256"] = ["0" * 64]
    client.set(key, json.dumps(marker))
    result = publish_cli(str(bundle), "--redis-url", redis_server.url, "--verify-only", "--quiet")
    assert result.returncode == 1 and "of other row files than this bundle's manifest" in result.stdout
