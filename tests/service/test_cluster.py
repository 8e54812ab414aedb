"""Redis Cluster as tier 2, `uembed publish`, and rows that live only in Redis: against a real 6-process
Redis Cluster (3 masters, 3 replicas) on loopback, started once for this module."""

import numpy as np
import pytest

from loadtest.servers import RedisClusterServers
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
