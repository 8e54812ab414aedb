"""Row id -> slot indexes: the hash table against a dict, and the smaller of the two kinds picked."""

import numpy as np
import pytest

from tests.serving.rows.tables import make_table
from uembed.serving.rows.hot import HotRows
from uembed.serving.rows.index import DenseSlotIndex, SlotIndex, slot_index
from uembed.serving.rows.store import TableStore


def test_slot_index_agrees_with_a_dict_through_inserts_evictions_and_rebuilds():
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
    with pytest.raises(ValueError, match="too large for tier 1's index"):
        slot_index(2**62, 2**20)  # refused before a hash table is allocated


def test_the_slot_index_is_the_smaller_of_a_hash_table_and_an_entry_per_row():
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
