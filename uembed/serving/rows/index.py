"""Row id -> slot indexes, for tier 1 (``hot.py``) and the update overlay (``overlay.py``): a hash table sized by
the slots, or an int32 per table row, whichever is smaller (:func:`slot_index`)."""

from __future__ import annotations

import mmap

import numpy as np

from uembed.bundle.loader import resident_bytes


class SlotIndex:
    """Row id -> tier-1 slot: an open-addressing hash table (linear probing) in numpy, vectorised per batch.

    Sized by the tier's capacity, not the table's rows: an array with an entry per table row would grow, per
    worker, with the table as scattered rows get cached; this grows with the tier. An entry packs the id and its
    slot in one int64 (``id << slot_bits | slot``): 8 bytes, where a key array and a slot array took 12, with
    look-ups as fast. Evicted entries become tombstones, cleared by a rebuild once they fill a quarter of the
    table, so probes stay short (the table is at most half full of live ids).
    """

    EMPTY, DELETED = -1, -2
    MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)

    ENTRY_BYTES = 8  # the id and the slot, packed

    @staticmethod
    def bits_for(capacity: int) -> int:
        """log2 of the entries for ``capacity`` ids: at most half full."""
        return max(4, int(np.ceil(np.log2(max(2 * capacity, 2)))))

    def __init__(self, capacity: int) -> None:
        bits = self.bits_for(capacity)
        self.mask = (1 << bits) - 1
        self.shift = np.uint64(64 - bits)
        self.slot_bits = max(1, int(capacity).bit_length())
        self.slot_mask = (1 << self.slot_bits) - 1
        self.max_id = self.max_id_for(capacity)
        self.entries = np.full(1 << bits, self.EMPTY, dtype=np.int64)
        self.deleted = 0

    @staticmethod
    def max_id_for(capacity: int) -> int:
        """The largest row id that fits in an entry beside a slot of a table of ``capacity``."""
        return (1 << (63 - max(1, int(capacity).bit_length()))) - 1

    @property
    def nbytes(self) -> int:
        return int(self.entries.nbytes)

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return ((ids.astype(np.uint64) * self.MULTIPLIER) >> self.shift).astype(np.int64)

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each of ``ids`` sits in the table (-1 where absent), and its entry there (-1 where absent)."""
        found = np.full(len(ids), -1, dtype=np.int64)
        entries = np.full(len(ids), -1, dtype=np.int64)
        pending = np.arange(len(ids))
        position = self._home(ids)
        while pending.size:
            probed = self.entries[position]
            hit = ((probed >> self.slot_bits) == ids[pending]) & (probed >= 0)  # the sentinels shift to -1
            found[pending[hit]] = position[hit]
            entries[pending[hit]] = probed[hit]
            probing = ~hit & (probed != self.EMPTY)  # past tombstones and other ids, up to an empty entry
            pending, position = pending[probing], (position[probing] + 1) & self.mask
        return found, entries

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each of ``ids``, -1 where not cached."""
        _, entries = self._find(ids)
        return np.where(entries >= 0, entries & self.slot_mask, -1)

    def remove(self, ids: np.ndarray) -> None:
        position, _ = self._find(ids)
        position = position[position >= 0]
        self.entries[position] = self.DELETED
        self.deleted += len(position)

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Add ``ids`` (unique, not present) owning ``slots``: each takes the first free entry from its home."""
        if len(ids) and (ids.min() < 0 or ids.max() > self.max_id):
            raise ValueError(f"row ids must be in [0, {self.max_id}] beside {self.slot_bits}-bit slots")
        packed = (ids.astype(np.int64) << self.slot_bits) | slots.astype(np.int64)
        pending = np.arange(len(ids))
        position = self._home(ids)
        while pending.size:
            free = np.flatnonzero(self.entries[position] < 0)  # empty, or a tombstone (reusable: ids are absent)
            won = np.zeros(len(pending), dtype=bool)
            if free.size:
                _, first = np.unique(position[free], return_index=True)  # one id per free entry this round
                winners = free[first]
                self.deleted -= int(np.count_nonzero(self.entries[position[winners]] == self.DELETED))
                self.entries[position[winners]] = packed[pending[winners]]
                won[winners] = True
            pending, position = pending[~won], (position[~won] + 1) & self.mask
        if self.deleted > len(self.entries) // 4:
            self._rebuild()

    def _rebuild(self) -> None:
        live = self.entries[self.entries >= 0]
        self.entries.fill(self.EMPTY)
        self.deleted = 0
        self.insert(live >> self.slot_bits, live & self.slot_mask)


class DenseSlotIndex:
    """Row id -> tier-1 slot as an int32 per table row (slot + 1; 0: not cached). Fresh anonymous pages, so
    only its pages where rows were cached become resident: the smaller index when the tier holds a good
    share of a table (:func:`slot_index` picks)."""

    def __init__(self, table_rows: int) -> None:
        # An anonymous mapping rather than np.zeros: calloc may hand back memory this process freed, which it
        # must then zero, making every page resident.
        self._pages = mmap.mmap(-1, max(4 * table_rows, 1))
        self.slot_of_row = np.frombuffer(self._pages, dtype=np.int32, count=table_rows)

    @property
    def nbytes(self) -> int:
        return resident_bytes(self.slot_of_row)  # the touched pages (mincore): not for every batch

    def get(self, ids: np.ndarray) -> np.ndarray:
        return self.slot_of_row[ids].astype(np.int64) - 1

    def remove(self, ids: np.ndarray) -> None:
        self.slot_of_row[ids] = 0

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        self.slot_of_row[ids] = slots + 1


def slot_index(table_rows: int, capacity: int) -> SlotIndex | DenseSlotIndex:
    """The smaller index at its largest: a hash table of 16-32 bytes per cached row, or 4 bytes per table row."""
    hashed_bytes = SlotIndex.ENTRY_BYTES << SlotIndex.bits_for(capacity)
    if hashed_bytes >= 4 * table_rows:
        return DenseSlotIndex(table_rows)
    if table_rows - 1 > SlotIndex.max_id_for(capacity):
        raise ValueError(f"a table of {table_rows} rows is too large for tier 1's index beside {capacity} slots")
    return SlotIndex(capacity)
