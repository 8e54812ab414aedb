"""Tier 1: a table's hottest rows in process memory (or, on the CUDA path, their slots in GPU memory), bounded by
bytes and admitted by frequency, so a scan of cold rows cannot flush the hot set.

Only the batch thread uses tier 1 (one compute thread per process), so it needs no locks.
"""

from __future__ import annotations

import numpy as np

from uembed.serving.rows.index import slot_index


class FrequencySketch:
    """Count-min sketch of row accesses (4 counters per row id, 8-bit saturating), halved periodically so old
    heat fades.

    Tier 1 admits a row only when it is estimated to be more frequent than the row it
    would evict (TinyLFU's idea), so a scan of cold rows cannot flush the hot set. A width of
    the tier's capacity (as Caffeine sizes its sketch) costs 4 to 8 bytes per cached row.

    Blocked, as Caffeine's is: an id's 4 counters lie in one 64-byte block, one in each 16-byte quarter, so an
    access touches one cache line rather than four (the sketch of a large tier is far past the CPU's caches). An
    increment is a plain fancy-index add: two ids of one batch that meet in a counter count once there (rare, and
    a sketch undercounting by one is harmless), far cheaper than ``np.add.at``.
    """

    DEPTH = 4
    BLOCK_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # picks the block (top bits of the product)
    COUNTER_MULTIPLIER = np.uint64(0xC2B2AE3D27D4EB4F)  # picks the counter in each quarter (4 bits each)

    def __init__(self, width: int) -> None:
        self.bits = max(10, int(np.ceil(np.log2(max(width, 2)))))  # 2**bits counters per hash, as a flat sketch has
        # Blocks start on 64-byte boundaries (a large allocation starts 16 bytes past a page): one cache line each.
        raw = np.zeros((self.DEPTH << self.bits) + 64, dtype=np.uint8)
        start = -raw.ctypes.data % 64
        self.flat = raw[start : start + (self.DEPTH << self.bits)]
        self.block_shift = np.uint64(64 - (self.bits + 2 - 6))  # blocks of 64 counters
        self.quarters = (np.arange(self.DEPTH, dtype=np.int64) * 16)[:, None]
        self.counter_shifts = (np.uint64(40) + np.arange(self.DEPTH, dtype=np.uint64) * np.uint64(4))[:, None]
        self.added = 0
        self.halve_every = 10 << self.bits

    def _index(self, ids: np.ndarray) -> np.ndarray:
        """Positions in ``flat`` of each id's counters: int64 [DEPTH * len(ids)], counter by counter."""
        keys = ids.astype(np.uint64)
        block = ((keys * self.BLOCK_MULTIPLIER) >> self.block_shift).astype(np.int64) << 6
        mixed = (keys ^ (keys >> np.uint64(29))) * self.COUNTER_MULTIPLIER
        counters = ((mixed[None, :] >> self.counter_shifts) & np.uint64(15)).astype(np.int64)
        return (block[None, :] + self.quarters + counters).ravel()

    def add(self, ids: np.ndarray) -> None:
        index = self._index(ids)
        counts = self.flat[index]
        self.flat[index] = counts + (counts < 255)  # saturating
        self.added += len(ids)
        if self.added >= self.halve_every:
            self.flat >>= 1
            self.added = 0

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        return np.min(self.flat[self._index(ids)].reshape(self.DEPTH, -1), axis=0)


class HotRows:
    """Tier 1's index and (on the host) its records: at most ``capacity`` rows, admitted by frequency.

    ``index`` maps a row id to its slot (:func:`slot_index`). With ``host_records`` False the
    records live elsewhere (GPU memory, ``uembed/serving/pipeline/cuda.py``) and this object only decides
    which row sits in which slot (:meth:`slots`, :meth:`admit`). With host records the store asks it as it asks
    every tier (``uembed/serving/rows/store.py``): :meth:`fetch`, then :meth:`keep` and :meth:`count`.
    """

    SAMPLE = 4  # eviction looks at this many random slots per admitted row (like Redis' LFU)

    def __init__(self, table_rows: int, capacity: int, record_bytes: int, seed: int = 0, host_records: bool = True) -> None:
        self.capacity = int(capacity)
        self.record_bytes = record_bytes
        self.index = slot_index(table_rows, self.capacity)
        self.records = np.empty((self.capacity, record_bytes), dtype=np.uint8) if host_records else None
        self.owner = np.full(self.capacity, -1, dtype=np.int64)
        self.used = 0
        # A tier as large as its table never evicts (each row id has a free slot waiting): no admission to decide,
        # so no accesses to count, which would cost each batch more than the rest of its look-up in tier 1.
        self.sketch = FrequencySketch(self.capacity) if self.capacity < table_rows else None
        self.rng = np.random.default_rng(seed)

    @classmethod
    def for_budget(cls, table_rows: int, record_bytes: int, budget_bytes: int, host_records: bool = True) -> HotRows | None:
        capacity = min(budget_bytes // record_bytes, table_rows)
        return cls(table_rows, capacity, record_bytes, host_records=host_records) if capacity > 0 else None

    @property
    def nbytes(self) -> int:
        """Resident bytes of the records in use (the index: ``index.nbytes``)."""
        return int(self.used * self.record_bytes)

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each of ``ids`` (unique), -1 where not cached; counts the accesses for admission."""
        if self.sketch is not None:
            self.sketch.add(ids)
        return self.index.get(ids)

    NONE_MISSED = np.empty(0, dtype=np.int64)

    def fetch(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy cached records of ``ids`` (unique) into ``out``; returns the positions in ``ids`` that missed."""
        slots = self.slots(ids)
        hit = slots >= 0
        if hit.all():  # the steady state: one take, no masks
            np.take(self.records, slots, axis=0, out=out)
            return self.NONE_MISSED
        out[hit] = self.records[slots[hit]]
        return np.flatnonzero(~hit)

    def count(self, counts, asked: int, missed: int) -> None:
        """Record one look-up of ``asked`` rows in the store's ``TierCounts``."""
        counts.hits["hot"] += asked - missed
        counts.misses["hot"] += missed

    def keep(self, ids: np.ndarray, records: np.ndarray) -> None:
        """Admit missed rows, whose records the tiers below found (host records)."""
        slots, chosen = self.admit(ids)
        self.records[slots] = records[chosen]

    def admit(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decide where missed ``ids`` (unique, not cached) go: free slots first, then over sampled colder
        rows. Updates the index and returns ``(slots, chosen)``: row ``ids[chosen[k]]`` now owns ``slots[k]``,
        and the caller must write its record there."""
        none = np.empty(0, dtype=np.int64)
        if not len(ids) or not self.capacity:
            return none, none
        if self.sketch is None:  # the whole table fits: every missed row takes a free slot, in the order asked
            if len(ids) > self.capacity - self.used:  # checked before anything changes: the index stays as it was
                raise ValueError(f"{len(ids)} rows missed with {self.capacity - self.used} free slots in a tier as large "
                                 "as its table: ids asked twice, or already cached")  # fmt: skip
            heat, order = None, np.arange(len(ids))
        else:
            heat = self.sketch.estimate(ids)
            order = np.argsort(-heat.astype(np.int64), kind="stable")
        free = min(self.capacity - self.used, len(ids))
        placed_slots, placed = [none], [none]
        if free:
            slots = np.arange(self.used, self.used + free, dtype=np.int64)
            self._own(slots, ids[order[:free]])
            self.used += free
            placed_slots.append(slots)
            placed.append(order[:free])
        rest = order[free:]
        if len(rest):
            sample = self.rng.integers(0, self.capacity, size=(len(rest), self.SAMPLE))
            sample_heat = self.sketch.estimate(self.owner[sample].ravel()).reshape(sample.shape)
            victims = sample[np.arange(len(rest)), np.argmin(sample_heat, axis=1)]
            admitted = heat[rest] > sample_heat.min(axis=1)
            victims, first = np.unique(np.where(admitted, victims, -1), return_index=True)
            keep = victims >= 0
            victims, chosen = victims[keep], rest[first[keep]]
            if len(victims):
                self.index.remove(self.owner[victims])
                self._own(victims, ids[chosen])
                placed_slots.append(victims)
                placed.append(chosen)
        return np.concatenate(placed_slots), np.concatenate(placed)

    def _own(self, slots: np.ndarray, ids: np.ndarray) -> None:
        self.owner[slots] = ids
        self.index.insert(ids, slots)
