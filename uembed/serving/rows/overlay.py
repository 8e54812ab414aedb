"""The update overlay: rows of one table changed since its bundle was exported, in front of the read-only files.

A bundle's row files never change (they are checksummed and memory-mapped). Row updates
(``uembed/serving/rows/updates.py``) land here instead: row id -> record, the record as every
tier stores it (``uembed/serving/rows/codec.py``). ``TableStore`` consults it before
Redis and the files, so a changed row wins over every copy below it.

    >>> overlay = RowOverlay(table_rows=1000, record_bytes=64)
    >>> overlay.apply(np.array([7, 3]), np.full((2, 64), 1, dtype=np.uint8))
    >>> out = np.zeros((3, 64), dtype=np.uint8)
    >>> overlay.lookup(np.array([3, 4, 7]), out).tolist()
    [True, False, True]

Applying the same rows again leaves the same overlay (a row holds its latest record),
which is what makes replaying a stream idempotent. Memory: the records and an index of
16 to 32 bytes per changed row (``uembed/serving/rows/index.py``; up to 64 just after it doubles), grown by doubling.
Only the compute thread applies and looks up, so there is no lock.
"""

from __future__ import annotations

import numpy as np

from uembed.serving.rows.index import DenseSlotIndex, slot_index


class RowOverlay:
    INITIAL_CAPACITY = 64

    def __init__(self, table_rows: int, record_bytes: int) -> None:
        self.table_rows = table_rows
        self.record_bytes = record_bytes
        self.rows = 0
        self._grow(self.INITIAL_CAPACITY)

    def _grow(self, capacity: int) -> None:
        ids = self.ids[: self.rows] if self.rows else np.empty(0, dtype=np.int64)
        records = self.records[: self.rows] if self.rows else np.empty((0, self.record_bytes), dtype=np.uint8)
        self.index = slot_index(self.table_rows, capacity)
        self.capacity = capacity
        self.ids = np.empty(capacity, dtype=np.int64)
        self.records = np.empty((capacity, self.record_bytes), dtype=np.uint8)
        self.ids[: self.rows] = ids
        self.records[: self.rows] = records
        if self.rows:
            self.index.insert(ids.copy(), np.arange(self.rows, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes allocated: records, ids and index (a dense index counted whole: measuring its resident pages
        takes a mincore pass, too slow for every batch)."""
        index = self.index.slot_of_row.nbytes if isinstance(self.index, DenseSlotIndex) else self.index.nbytes
        return int(self.records.nbytes + self.ids.nbytes + index)

    def apply(self, ids: np.ndarray, records: np.ndarray) -> None:
        """Set the records of ``ids`` (unique, within the table) to ``records`` uint8 ``[k, record_bytes]``."""
        if not len(ids):
            return
        slots = self.index.get(ids) if self.rows else np.full(len(ids), -1, dtype=np.int64)
        present = slots >= 0
        self.records[slots[present]] = records[present]
        new = np.flatnonzero(~present)
        if not len(new):
            return
        if self.rows + len(new) > self.capacity:
            self._grow(max(2 * self.capacity, self.rows + len(new)))
        new_slots = np.arange(self.rows, self.rows + len(new), dtype=np.int64)
        self.ids[new_slots] = ids[new]
        self.records[new_slots] = records[new]
        self.index.insert(ids[new].astype(np.int64), new_slots)
        self.rows += len(new)

    def lookup(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the records of those of ``ids`` (unique) that changed into ``out``; returns the hit mask."""
        if not self.rows or not len(ids):
            return np.zeros(len(ids), dtype=bool)
        slots = self.index.get(ids)
        hit = slots >= 0
        out[hit] = self.records[slots[hit]]
        return hit

    def fetch(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """As a tier of the store's chain: :meth:`lookup`, returning the positions in ``ids`` that did not change."""
        return np.flatnonzero(~self.lookup(ids, out))

    def count(self, counts, asked: int, missed: int) -> None:
        """Record one look-up of ``asked`` rows in the store's ``TierCounts``."""
        counts.hits["overlay"] += asked - missed

    def keep(self, ids: np.ndarray, records: np.ndarray) -> None:
        """Rows the tiers below found are the bundle's, not changes: nothing to keep."""
