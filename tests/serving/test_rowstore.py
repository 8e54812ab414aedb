"""Row store tiers: bit-identical rows from every tier, frequency admission, Redis layout."""

import subprocess
import sys

import numpy as np
import pytest

from uembed.bundle.format import quantise_rows
from uembed.bundle.loader import TableRows
from uembed.serving.pipeline.stages import distinct
from uembed.serving.rows.store import FrequencySketch, HotRows, RedisTier, RowCodec, TableStore


def make_table(dtype: str, rows: int = 5000, dim: int = 16, seed: int = 0) -> TableRows:
    values = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    if dtype == "int8":
        codes, scale_bias = quantise_rows(values)
        return TableRows("t", rows, dim, dtype, codes, scale_bias)
    return TableRows("t", rows, dim, dtype, values.astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_every_tier_returns_bit_identical_rows(dtype, redis_server):
    table = make_table(dtype)
    redis = RedisTier(redis_server.url, timeout_s=0.5, retry_s=0.1, bucket_rows=64, fill_queue=16)
    store = TableStore(table, f"test:{dtype}", hot_bytes=200 * RowCodec(table).record_bytes, redis=redis)
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


def test_float16_rows_decode_to_the_bits_numpy_gives_for_every_pattern():
    """The float16 table lookup covers every bit pattern (zeros, subnormals, infinities, NaN payloads) as astype does."""
    patterns = np.arange(1 << 16, dtype=np.uint16).reshape(-1, 16)
    table = TableRows("t", len(patterns), 16, "float16", patterns.view(np.float16))
    codec = RowCodec(table)
    decoded = codec.decode(codec.read(np.arange(len(patterns))))
    assert decoded.dtype == np.float32 and decoded.shape == (len(patterns), 16)
    assert np.array_equal(decoded.view(np.uint32), patterns.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("shape", [(0,), (7,), (3020,), (500, 26), (1, 1)])
def test_distinct_ids_and_where_each_is(shape):
    ids = np.random.default_rng(3).integers(0, 50, size=shape) * 1_000_003  # repeats, and ids past 32 bits
    unique, inverse = distinct(ids)
    assert inverse.shape == ids.shape
    assert np.array_equal(unique[inverse], ids)
    assert np.array_equal(np.sort(unique), np.unique(ids))  # each id once
    assert np.array_equal(unique, ids.ravel()[np.sort(np.unique(ids.ravel(), return_index=True)[1])])  # first seen first
    assert inverse.dtype == np.int64 and inverse.flags.writeable and unique.flags.writeable  # as np.unique's


def test_hot_rows_keep_frequent_rows_through_a_scan():
    table = make_table("float32", rows=10_000)
    codec = RowCodec(table)
    hot = HotRows(table.rows, capacity=100, record_bytes=codec.record_bytes)
    store = TableStore(table, "scan")
    store.hot = hot
    frequent = np.arange(100)
    for _ in range(20):
        store.gather(frequent)
    assert set(hot.owner.tolist()) == set(frequent.tolist())
    for start in range(1000, 9000, 500):  # a one-off scan of 8,000 cold rows
        store.gather(np.arange(start, start + 500))
    kept = np.isin(frequent, hot.owner).mean()
    assert kept > 0.9
    store.take_counts()
    store.gather(frequent)
    assert store.take_counts().hits["hot"] >= 90


def test_hot_rows_admit_a_row_that_became_frequent():
    table = make_table("float32", rows=10_000)
    hot = HotRows(table.rows, capacity=50, record_bytes=RowCodec(table).record_bytes)
    store = TableStore(table, "shift")
    store.hot = hot
    for _ in range(5):
        store.gather(np.arange(50))
    newcomers = np.arange(5000, 5050)
    for _ in range(30):
        store.gather(newcomers)
    assert np.isin(newcomers, hot.owner).mean() > 0.8
    assert np.array_equal(store.gather(newcomers), table.gather(newcomers))


def test_frequency_sketch_orders_by_count():
    sketch = FrequencySketch(1024)
    for count, row in ((1, 7), (5, 8), (20, 9)):
        for _ in range(count):
            sketch.add(np.array([row]))
    estimates = sketch.estimate(np.array([7, 8, 9, 10]))
    assert estimates[0] < estimates[1] < estimates[2] and estimates[3] <= estimates[0]


def test_the_sketch_keeps_each_ids_counters_in_one_aligned_cache_line_and_halves_them():
    sketch = FrequencySketch(1 << 16)
    assert sketch.flat.ctypes.data % 64 == 0
    ids = np.random.default_rng(5).integers(0, 10**9, 100_000)
    index = sketch._index(ids).reshape(FrequencySketch.DEPTH, -1)
    assert index.min() >= 0 and index.max() < len(sketch.flat)
    assert (index >> 6 == index[0] >> 6).all()  # one 64-byte block per id
    assert ((index & 63) >> 4 == np.arange(FrequencySketch.DEPTH)[:, None]).all()  # one counter in each quarter
    hot = np.array([42])
    for _ in range(40):
        sketch.add(hot)
    before = int(sketch.estimate(hot)[0])
    sketch.add(np.arange(sketch.halve_every - sketch.added) + 10**6)  # the add that reaches halve_every
    assert before >= 40 and int(sketch.estimate(hot)[0]) <= before // 2 + 1


def test_an_all_hit_lookup_returns_the_rows_and_counts_only_hits():
    table = make_table("float16", rows=1000)
    store = TableStore(table, "all-hit", hot_bytes=1000 * RowCodec(table).record_bytes)
    ids = np.arange(0, 1000, 3)
    first = store.gather(ids)  # every id missed, then admitted (the tier has room for all)
    counts = store.take_counts()
    assert counts.misses["hot"] == len(ids) and counts.hits["hot"] == 0
    again = store.gather(ids)
    counts = store.take_counts()
    assert counts.hits["hot"] == len(ids) and counts.misses["hot"] == 0
    assert np.array_equal(again.view(np.uint32), first.view(np.uint32))
    assert np.array_equal(again, table.gather(ids))


def test_redis_rows_are_packed_into_small_hashes(redis_server):
    table = make_table("float32", rows=1000)
    codec = RowCodec(table)
    redis = RedisTier(redis_server.url, timeout_s=0.5, retry_s=0.1, bucket_rows=64, fill_queue=4)
    ids = np.arange(0, 1000, 3)
    redis.write("ml:1:t", ids, codec.read(ids))
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


def test_the_service_does_not_import_torch():
    code = "import sys, uembed.serving.app, uembed.serving.engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_slot_index_agrees_with_a_dict_through_inserts_evictions_and_rebuilds():
    from uembed.serving.rows.store import SlotIndex

    rng = np.random.default_rng(3)
    index = SlotIndex(capacity=500)
    reference: dict[int, int] = {}
    rebuilt = False
    for _ in range(400):
        absent = np.setdiff1d(np.unique(rng.integers(0, 10**12, 40)), list(reference))
        room = 500 - len(reference)
        if room < len(absent):  # full: evict some, as tier 1 does
            victims = rng.choice(list(reference), size=len(absent) - room + 5, replace=False)
            index.remove(victims)
            for victim in victims.tolist():
                del reference[victim]
        deleted_before = index.deleted
        slots = rng.integers(0, 500, len(absent))
        index.insert(absent, slots)
        rebuilt |= index.deleted < deleted_before - len(absent)  # tombstones cleared
        reference.update(zip(absent.tolist(), slots.tolist()))
        probe = np.concatenate([np.array(list(reference), dtype=np.int64), rng.integers(0, 10**12, 50)])
        expected = np.array([reference.get(i, -1) for i in probe.tolist()])
        assert np.array_equal(index.get(probe), expected)
    assert rebuilt, "the tombstones never reached a rebuild"
    assert index.nbytes == 8 << SlotIndex.bits_for(500)  # sized by the capacity (500), not by ids up to 10**12
    assert index.get(np.array([-1]))[0] == -1
    deleted = index.deleted
    index.remove(np.array([-1]))  # not an id: no entry (an empty one least of all) becomes a tombstone
    assert index.deleted == deleted
    with pytest.raises(ValueError, match="row ids must be in"):
        index.insert(np.array([index.max_id + 1]), np.array([0]))
    from uembed.serving.rows.store import slot_index

    with pytest.raises(ValueError, match="too large for tier 1's index"):
        slot_index(2**62, 2**20)  # refused before a hash table is allocated


def test_the_slot_index_is_the_smaller_of_a_hash_table_and_an_entry_per_row():
    from uembed.serving.rows.store import DenseSlotIndex, SlotIndex

    big = HotRows.for_budget(table_rows=100_000_000, record_bytes=32, budget_bytes=2**20)
    assert big.capacity == 2**15 and isinstance(big.index, SlotIndex)
    assert big.index.nbytes == SlotIndex.ENTRY_BYTES << SlotIndex.bits_for(big.capacity) == 8 * 2 * big.capacity  # not 400 MB
    small = HotRows.for_budget(table_rows=100_000, record_bytes=32, budget_bytes=2**20)
    assert isinstance(small.index, DenseSlotIndex)
    rows = 10_000_000  # a 40 MB index: mapped zero pages (an array this size does not come from the heap)
    store = TableStore(make_table("float32", rows=rows, dim=1), "dense", hot_bytes=16 * 2**20)
    assert isinstance(store.hot.index, DenseSlotIndex)
    assert store.index_bytes() <= 8192  # nothing cached yet: only touched pages count
    store.gather(np.arange(0, rows, 7))
    assert store.index_bytes() >= rows * 4 // 2  # rows cached across the table touched most of it
