"""The row store: bit-identical rows through every tier, the distinct ids it is asked for, and a serving app
without torch."""

import subprocess
import sys

import numpy as np
import pytest

from tests.serving.rows.tables import make_table
from uembed.serving.pipeline.stages import distinct
from uembed.serving.rows.redis import RedisTier
from uembed.serving.rows.store import TableStore


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4", "int2"])
def test_every_tier_returns_bit_identical_rows(dtype, redis_server):
    table = make_table(dtype)
    redis = RedisTier(redis_server.url, timeout_s=0.5, retry_s=0.1, bucket_rows=64, fill_queue=16)
    store = TableStore(table, f"test:{dtype}", hot_bytes=200 * table.dim * 4, redis=redis)
    ids = np.unique(np.random.default_rng(1).integers(0, table.rows, 600))
    expected = table.gather(ids)
    from_files = store.gather(ids)  # tier 3 (tier 1 admits some, Redis is filled)
    assert redis.flush(), "the fill thread never marked its writes done (flush would wait out its timeout)"
    from_redis_and_hot = store.gather(ids)
    counts = store.take_counts()
    assert counts.hits["hot"] > 0 and counts.hits["redis"] > 0 and counts.hits["file"] == len(ids)
    for got in (from_files, from_redis_and_hot):
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    redis.close()


@pytest.mark.parametrize("shape", [(0,), (7,), (3020,), (500, 26), (1, 1)])
def test_distinct_ids_and_where_each_is(shape):
    ids = np.random.default_rng(3).integers(0, 50, size=shape) * 1_000_003  # repeats, and ids past 32 bits
    unique, inverse = distinct(ids)
    assert inverse.shape == ids.shape
    assert np.array_equal(unique[inverse], ids)
    assert np.array_equal(np.sort(unique), np.unique(ids))  # each id once
    assert np.array_equal(unique, ids.ravel()[np.sort(np.unique(ids.ravel(), return_index=True)[1])])  # first seen first
    assert inverse.dtype == np.int64 and inverse.flags.writeable and unique.flags.writeable  # as np.unique's


def test_the_service_does_not_import_torch():
    code = "import sys, uembed.serving.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
