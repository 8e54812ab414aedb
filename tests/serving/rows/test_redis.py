"""Tier 2 on one Redis: rows packed into small hashes, and a dead Redis skipped for a while."""

import numpy as np

from tests.serving.rows.tables import make_table
from uembed.serving.rows.codec import RowCodec
from uembed.serving.rows.files import FileRows
from uembed.serving.rows.redis import RedisTier
from uembed.serving.rows.store import TableStore


def test_redis_rows_are_packed_into_small_hashes(redis_server):
    table = make_table("float32", rows=1000)
    codec = RowCodec(table)
    redis = RedisTier(redis_server.url, timeout_s=0.5, retry_s=0.1, bucket_rows=64, fill_queue=4)
    ids = np.arange(0, 1000, 3)
    redis.write("ml:1:t", ids, FileRows(table).read(ids))
    client = redis_server.client()
    assert client.dbsize() == len(np.unique(ids // 64))
    assert client.object("encoding", "ml:1:t:0") == b"listpack"
    out = np.empty((len(ids), codec.record_bytes), dtype=np.uint8)
    hit = redis.fetch("ml:1:t", ids, out)
    assert hit.all() and np.array_equal(codec.decode(out), table.gather(ids))
    assert redis.compact_encoding_problem(codec.record_bytes) is None
    assert "hash-max-listpack-value" in redis.compact_encoding_problem(10_000)
    redis.close()


def test_a_dead_redis_is_a_miss_and_is_skipped_for_a_while(redis_server):
    table = make_table("float32", rows=100)
    redis = RedisTier(redis_server.url, timeout_s=0.2, retry_s=60, bucket_rows=64, fill_queue=4)
    store = TableStore(table, "dead", redis=redis)
    redis_server.kill()
    ids = np.arange(10)
    assert np.array_equal(store.gather(ids), table.gather(ids))
    assert redis.error_counts["fetch"] == 1 and not redis.available
    store.gather(ids)  # skipped, not retried: no second error
    assert redis.error_counts["fetch"] == 1
    assert store.take_counts().redis_fallbacks == 2
    redis.close()
