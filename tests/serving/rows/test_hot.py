"""Tier 1: frequency admission keeps the hot set through a scan, and an all-hit look-up."""

import numpy as np
import pytest

from tests.serving.rows.tables import make_table
from uembed.serving.rows.codec import RowCodec
from uembed.serving.rows.hot import FrequencySketch, HotRows
from uembed.serving.rows.store import TableStore


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


def test_a_tier_as_large_as_its_table_counts_no_accesses_and_still_serves_every_row():
    """With room for every row nothing is ever evicted, so there is no admission to decide: no sketch (its counting
    cost each batch more than the rest of tier 1's look-up). Every row missed takes a free slot and is served from
    tier 1 after; a tier one row smaller keeps its sketch."""
    table = make_table("float32", rows=500)
    codec = RowCodec(table)
    store = TableStore(table, "whole", hot_bytes=table.rows * codec.record_bytes)
    assert store.hot.capacity == table.rows and store.hot.sketch is None
    rng = np.random.default_rng(0)
    for _ in range(30):  # batches of distinct ids, in any order, until every row is in tier 1
        ids = np.unique(rng.integers(0, table.rows, size=200))
        assert np.array_equal(store.gather(ids), table.gather(ids))
    store.gather(np.arange(table.rows))
    store.take_counts()
    assert np.array_equal(store.gather(np.arange(table.rows)), table.gather(np.arange(table.rows)))
    counts = store.take_counts()
    assert counts.hits["hot"] == table.rows and counts.misses["hot"] == 0
    assert sorted(store.hot.owner.tolist()) == list(range(table.rows)) and store.hot.used == table.rows
    smaller = HotRows(table.rows, capacity=table.rows - 1, record_bytes=codec.record_bytes)
    assert isinstance(smaller.sketch, FrequencySketch)


def test_a_tier_as_large_as_its_table_refuses_rows_asked_twice_before_it_changes_anything():
    """``admit`` takes distinct rows not yet cached. Asked for more than its free slots (an id twice), a tier without a
    sketch refuses before it hands out a slot, so it goes on serving the right rows."""
    table = make_table("float32", rows=8)
    store = TableStore(table, "whole", hot_bytes=table.rows * RowCodec(table).record_bytes)
    with pytest.raises(ValueError, match="9 rows missed with 8 free slots"):
        store.gather(np.array([0, 1, 2, 3, 4, 5, 6, 7, 7]))
    assert store.hot.used == 0
    assert np.array_equal(store.gather(np.arange(8)), table.gather(np.arange(8)))
    assert np.array_equal(store.gather(np.array([0, 5])), table.gather(np.array([0, 5])))
    slots, misses, rows, admit_slots, admit_from = store.resolve(np.array([3]))  # the device path's look-up
    assert slots.tolist() == [3] and not len(misses) and not len(admit_slots)
