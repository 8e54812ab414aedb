"""The row store: tier 1 in-process hot rows, tier 2 Redis, tier 3 the bundle's mmap'd row files, with the
update overlay (rows changed since the bundle, ``uembed/serving/rows/overlay.py``) in front of tiers 2 and 3.

Every tier holds a row as the same *record*: the bytes of the stored row (float32,
float16 or int8 values) followed, for int8 tables, by its float32 scale and offset. One
decode turns records into float32 rows, so every tier returns bit-identical rows.

Example (tiers 1 and 3; ``table`` from :func:`export.loader.load_bundle`)::

    >>> store = TableStore(table, namespace="ml:1:unified", hot_bytes=2**20)  # doctest: +SKIP
    >>> store.gather(np.array([3, 17, 3]))                        # float32 [3, dim]  # doctest: +SKIP

Only the batch thread calls ``gather`` (one compute thread per process), so tier 1 needs
no locks; Redis fills run on a background thread and never block a batch.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from uembed.bundle.loader import TableRows

log = logging.getLogger("uembed.rowstore")


# float16 -> float32 by table: the float32 of each of the 65,536 float16 bit patterns (256 KiB), as astype gives
# it. numpy converts float16 one value at a time in software; a take from this table is twice as fast (55 -> 27 us
# for 2,077 rows of 16, a ranking request's distinct rows: a one-off /tmp measurement, a direction) and gives the
# same bits.
FLOAT16_TO_FLOAT32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
FLOAT16_TO_FLOAT32.setflags(write=False)


class RowCodec:
    """Records of one table: ``read`` from the row files, ``decode`` to float32 ``[k, dim]``."""

    def __init__(self, table: TableRows) -> None:
        self.table = table
        self.row_bytes = table.dim * table.row_dtype.itemsize
        self.record_bytes = table.record_bytes

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Tier 3: uint8 ``[k, record_bytes]`` straight from the memory-mapped files."""
        rows = np.ascontiguousarray(self.table.data[ids]).view(np.uint8).reshape(len(ids), self.row_bytes)
        if self.table.scale_bias is None:
            return rows
        scale_bias = np.ascontiguousarray(self.table.scale_bias[ids]).view(np.uint8).reshape(len(ids), 8)
        return np.concatenate([rows, scale_bias], axis=1)

    def decode(self, records: np.ndarray) -> np.ndarray:
        records = np.ascontiguousarray(records)
        values = records[:, : self.row_bytes].view(self.table.row_dtype)
        if self.table.dtype == "float16":
            return np.take(FLOAT16_TO_FLOAT32, values.view(np.uint16))
        if self.table.dtype != "int8":
            return values.astype(np.float32, copy=False)
        scale_bias = records[:, self.row_bytes :].view(np.float32)
        return values.astype(np.float32) * scale_bias[:, :1] + scale_bias[:, 1:]


class FrequencySketch:
    """Count-min sketch of row accesses (4 counters per row id, 8-bit saturating), halved periodically so old
    heat fades.

    Tier 1 admits a row only when it is estimated to be more frequent than the row it
    would evict (TinyLFU's idea), so a scan of cold rows cannot flush the hot set. A width of
    the tier's capacity (as Caffeine sizes its sketch) costs 4 to 8 bytes per cached row.

    Blocked, as Caffeine's is: an id's 4 counters lie in one 64-byte block, one in each 16-byte quarter, so an
    access touches one cache line rather than four (the sketch of a tier of 8 M rows is 32 MB, far past the CPU's
    caches; a one-off /tmp micro-benchmark, a direction: 199 -> 173 us an add of 2,100 ids with cold caches, the
    same with warm ones). An increment
    is a plain fancy-index add: two ids of one batch that meet in a counter count once there (rare, and a sketch
    undercounting by one is harmless), at a tenth of ``np.add.at``'s cost.
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


class SlotIndex:
    """Row id -> tier-1 slot: an open-addressing hash table (linear probing) in numpy, vectorised per batch.

    Sized by the tier's capacity, not the table's rows: for 2 M cached rows of a 100 M-row table it
    holds 32 MB, where an array with an entry per table row would grow to 400 MB per worker as
    scattered rows get cached. An entry packs the id and its slot in one int64 (``id << slot_bits | slot``):
    8 bytes, where a key array and a slot array took 12 (64 MB less per worker for a tier of 8 M rows; look-ups
    as fast in a one-off /tmp micro-benchmark). Evicted entries become tombstones, cleared by a rebuild once they fill a quarter of the
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
    """Row id -> tier-1 slot as an int32 per table row (slot + 1; 0: not cached). Allocated as zeros, so
    only its pages where rows were cached become resident: the smaller index when the tier holds a good
    share of a table (:func:`slot_index` picks)."""

    def __init__(self, table_rows: int) -> None:
        self.slot_of_row = np.zeros(table_rows, dtype=np.int32)

    @property
    def nbytes(self) -> int:
        from uembed.bundle.loader import resident_bytes

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


class HotRows:
    """Tier 1's index and (on the host) its records: at most ``capacity`` rows, admitted by frequency.

    ``index`` maps a row id to its slot (:func:`slot_index`). With ``host_records`` False the
    records live elsewhere (GPU memory, ``uembed/serving/pipeline/cuda.py``) and this object only decides
    which row sits in which slot.
    """

    SAMPLE = 4  # eviction looks at this many random slots per admitted row (like Redis' LFU)

    def __init__(self, table_rows: int, capacity: int, record_bytes: int, seed: int = 0, host_records: bool = True) -> None:
        self.capacity = int(capacity)
        self.record_bytes = record_bytes
        self.index = slot_index(table_rows, self.capacity)
        self.records = np.empty((self.capacity, record_bytes), dtype=np.uint8) if host_records else None
        self.owner = np.full(self.capacity, -1, dtype=np.int64)
        self.used = 0
        self.sketch = FrequencySketch(self.capacity)
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
        self.sketch.add(ids)
        return self.index.get(ids)

    NONE_MISSED = np.empty(0, dtype=np.int64)

    def lookup(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy cached records of ``ids`` (unique) into ``out``; returns the positions in ``ids`` that missed."""
        slots = self.slots(ids)
        hit = slots >= 0
        if hit.all():  # the steady state: one take, no masks
            np.take(self.records, slots, axis=0, out=out)
            return self.NONE_MISSED
        out[hit] = self.records[slots[hit]]
        return np.flatnonzero(~hit)

    def offer(self, ids: np.ndarray, records: np.ndarray) -> None:
        """Admit missed rows (host records)."""
        slots, chosen = self.admit(ids)
        self.records[slots] = records[chosen]

    def admit(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decide where missed ``ids`` (unique, not cached) go: free slots first, then over sampled colder
        rows. Updates the index and returns ``(slots, chosen)``: row ``ids[chosen[k]]`` now owns ``slots[k]``,
        and the caller must write its record there."""
        none = np.empty(0, dtype=np.int64)
        if not len(ids) or not self.capacity:
            return none, none
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


def glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob (MATCH, KEYS)."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


@dataclass
class TierCounts:
    """Hits and misses per tier since the last ``take`` (the metrics layer drains them)."""

    hits: dict[str, int] = field(default_factory=lambda: {"hot": 0, "overlay": 0, "redis": 0, "file": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"hot": 0, "redis": 0})
    redis_fallbacks: int = 0


class RedisTier:
    """Tier 2: records packed into Redis hashes of ``bucket_rows`` rows, on one Redis or a Redis Cluster
    (a ``redis+cluster://`` url: ``uembed/serving/rows/cluster.py``).

    Key ``<prefix>:<model>:<version>:<table>:<row // bucket_rows>``, field ``row % bucket_rows``.
    A key per row would cost Redis more in key overhead than a 64-byte row; small hashes
    keep the compact listpack encoding (measured in docs/BENCHMARKS.md). Any error or
    timeout is a miss; after one, Redis is skipped for ``retry_s`` so a dead Redis costs
    no timeout per request, and it is used again once it answers.
    """

    def __init__(self, url: str, timeout_s: float, retry_s: float, bucket_rows: int, fill_queue: int, retries: int = 0) -> None:
        import redis
        from redis.exceptions import RedisClusterException

        from uembed.serving.rows.cluster import is_cluster_url

        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.cluster = is_cluster_url(url)
        self._client = None
        self.errors = redis.RedisError, RedisClusterException, OSError
        self.retry_s = retry_s
        self.bucket_rows = bucket_rows
        self.skip_until = 0.0
        self.last_error: str | None = None
        self._refresh_slots = False
        self.error_counts: dict[str, int] = {"fetch": 0, "fill": 0}
        self.fills_dropped = 0
        self._fills: queue.Queue = queue.Queue(maxsize=max(fill_queue, 1))
        self._fill_enabled = fill_queue > 0
        self._filler = None
        if self._fill_enabled:
            self._filler = threading.Thread(target=self._fill_loop, name="uembed-redis-fill", daemon=True)
            self._filler.start()

    @property
    def client(self):
        """The client, made on first use: a cluster client reads the slot map when it is made, and a cluster
        that is down at start must cost misses (then a retry), not the service's start."""
        if self._client is None:
            from uembed.serving.rows.cluster import redis_client

            self._client = redis_client(self.url, self.timeout_s, self.retries)
        return self._client

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.skip_until

    def _failed(self, operation: str, exc: Exception) -> None:
        self.error_counts[operation] += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._refresh_slots = self.cluster  # a failover moves slots: re-read the map before the next try
        if self.available:
            log.warning("redis %s failed (%s: %s); not using it for %.1fs", operation, type(exc).__name__, exc, self.retry_s)
        self.skip_until = time.monotonic() + self.retry_s

    def _buckets(self, namespace: str, ids: np.ndarray) -> tuple[list[str], list[list[bytes]], list[np.ndarray]]:
        """Group ids by hash key: keys, their field names, and positions of each group in ``ids``."""
        bucket = ids // self.bucket_rows
        order = np.argsort(bucket, kind="stable")
        starts = np.flatnonzero(np.diff(bucket[order], prepend=-1))
        groups = np.split(order, starts[1:])
        keys = [f"{namespace}:{int(bucket[g[0]])}" for g in groups]
        fields = [[str(int(i)).encode() for i in ids[g] % self.bucket_rows] for g in groups]
        return keys, fields, groups

    def _read(self, namespace: str, ids: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, Exception | None]:
        """Records of ``ids`` into ``out``: the hit mask, and on a cluster the first error of a node whose
        rows were not read (its rows are misses). One pipelined round (per node, on a cluster)."""
        keys, fields, groups = self._buckets(namespace, ids)
        commands = [("HMGET", key, *names) for key, names in zip(keys, fields)]
        if self.cluster:
            from uembed.serving.rows.cluster import send_by_node

            replies = send_by_node(self.client, commands)
        else:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = pipe.execute()
        error = next((r for r in replies if isinstance(r, Exception)), None)
        width = out.shape[1]
        found = [(p, v) for positions, values in zip(groups, replies) if not isinstance(values, Exception)
                 for p, v in zip(positions, values) if v is not None and len(v) == width]  # fmt: skip
        hit = np.zeros(len(ids), dtype=bool)
        if found:
            positions = np.fromiter((p for p, _ in found), dtype=np.int64, count=len(found))
            out[positions] = np.frombuffer(b"".join(v for _, v in found), dtype=np.uint8).reshape(-1, width)
            hit[positions] = True
        return hit, error

    def fetch(self, namespace: str, ids: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """Records of ``ids`` into ``out`` in one round trip (one per node on a cluster); the hit mask, or None
        when Redis was not used. A cluster node that failed costs its rows (misses) and starts the skip window."""
        if not len(ids) or not self.available:
            return None
        try:
            if self._refresh_slots:
                from uembed.serving.rows.cluster import refresh_slots

                refresh_slots(self.client)
                self._refresh_slots = False
            hit, error = self._read(namespace, ids, out)
        except self.errors as exc:
            self._failed("fetch", exc)
            return None
        if error is not None:
            self._failed("fetch", error)
        return hit

    def read(self, namespace: str, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """As :meth:`fetch`, but any failure raises (bulk checks: ``uembed publish --verify``)."""
        hit, error = self._read(namespace, ids, out)
        if error is not None:
            raise error
        return hit

    def fill(self, namespace: str, ids: np.ndarray, records: np.ndarray) -> None:
        """Queue rows to write back; dropped (and counted) when the queue is full or Redis is down."""
        if not len(ids) or not self._fill_enabled or not self.available:
            return
        try:
            self._fills.put_nowait((namespace, ids.copy(), records.copy()))
        except queue.Full:
            self.fills_dropped += 1

    def write(self, namespace: str, ids: np.ndarray, records: np.ndarray) -> None:
        """Write rows now (bulk loads, the fill thread)."""
        keys, fields, groups = self._buckets(namespace, ids)
        pipe = self.client.pipeline(transaction=False)
        for key, names, positions in zip(keys, fields, groups):
            pipe.hset(key, mapping={name: records[p].tobytes() for name, p in zip(names, positions)})
        pipe.execute()

    DELETE_BATCH = 500

    def delete_namespace(self, namespace: str) -> int:
        """Delete every key under ``<namespace>:`` (a table's buckets of one model version): SCAN with a match,
        UNLINK (freed off Redis' main thread) ``DELETE_BATCH`` keys at a time, so no call blocks Redis for long.
        On a cluster the scan visits every node and each UNLINK is split by slot (redis-py). Keys written while
        it runs (another replica still serving the version) may stay. Raises on a Redis error."""
        pattern = glob_escape(namespace) + ":*"
        deleted, keys = 0, []
        for key in self.client.scan_iter(match=pattern, count=self.DELETE_BATCH):
            keys.append(key)
            if len(keys) == self.DELETE_BATCH:
                deleted += self.client.unlink(*keys)
                keys = []
        if keys:
            deleted += self.client.unlink(*keys)
        return deleted

    def forget(self, namespace: str, ids: np.ndarray) -> None:
        """Queue the deletion of cached rows (row updates): behind this process's earlier fills, so a fill of an
        older record queued before cannot land after it. Dropped like a fill when the queue is full."""
        if not len(ids) or not self._fill_enabled:
            return
        try:
            self._fills.put_nowait((namespace, ids.copy(), None))
        except queue.Full:
            self.fills_dropped += 1

    def delete(self, namespace: str, ids: np.ndarray) -> None:
        keys, fields, _ = self._buckets(namespace, ids)
        pipe = self.client.pipeline(transaction=False)
        for key, names in zip(keys, fields):
            pipe.hdel(key, *names)
        pipe.execute()

    def _fill_loop(self) -> None:
        while True:
            item = self._fills.get()
            try:
                if item is None:
                    return
                namespace, ids, records = item
                self.write(namespace, ids, records) if records is not None else self.delete(namespace, ids)
            except self.errors as exc:
                self._failed("fill", exc)
            finally:
                self._fills.task_done()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until queued fills are written (tests and benchmarks); False if some were still queued at the timeout."""
        deadline = time.monotonic() + timeout_s
        while self._fills.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._fills.unfinished_tasks

    def close(self) -> None:
        if self._filler is not None:
            try:
                self._fills.put(None, timeout=2)  # a filler stuck on a dead Redis must not hold the shutdown
            except queue.Full:
                pass
            self._filler.join(timeout=2)
        if self._client is not None:
            self._client.close()

    def compact_encoding_problem(self, record_bytes: int) -> str | None:
        """Why this Redis would store our hashes uncompactly, if it would (checked at start)."""
        try:
            config = self.client.config_get("hash-max-listpack-*")
        except self.errors:
            return None
        entries = int(config.get("hash-max-listpack-entries", 0) or 0)
        value = int(config.get("hash-max-listpack-value", 0) or 0)
        if entries < self.bucket_rows or value < record_bytes:
            return (
                f"Redis has hash-max-listpack-entries={entries}, hash-max-listpack-value={value}; rows of "
                f"{record_bytes} bytes in buckets of {self.bucket_rows} need at least {self.bucket_rows} and "
                f"{record_bytes} or every hash falls back to a memory-hungry encoding"
            )
        return None


class TableStore:
    """One table of one model version, through tiers 1, 2 and 3.

    ``gather`` serves the CPU path: float32 rows on the host. With ``hot_on_device`` tier 1's
    records are float32 rows in GPU memory (``uembed/serving/pipeline/cuda.py`` owns them); this object keeps
    their index and ``resolve`` tells the device path which rows it holds and fetches the rest.
    """

    def __init__(
        self, table: TableRows, namespace: str, hot_bytes: int = 0, redis: RedisTier | None = None, hot_on_device: bool = False
    ) -> None:
        self.codec = RowCodec(table)
        self.table = table
        self.namespace = namespace
        self.hot_on_device = hot_on_device
        # On the device tier 1 holds decoded float32 rows (what the gather kernel reads), whatever the file dtype.
        hot_record_bytes = table.dim * 4 if hot_on_device else self.codec.record_bytes
        self.hot = HotRows.for_budget(table.rows, hot_record_bytes, hot_bytes, host_records=not hot_on_device) if hot_bytes else None
        self.redis = redis
        from uembed.serving.rows.overlay import RowOverlay  # it builds on this module's slot index

        self.overlay = RowOverlay(table.rows, self.codec.record_bytes)
        self.counts = TierCounts()  # only the batch thread gathers and drains them: no lock

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows ``[k, dim]`` of unique row ids."""
        records = np.empty((len(ids), self.codec.record_bytes), dtype=np.uint8)
        if self.hot is None:
            records[:] = self._fetch(ids)
            return self.codec.decode(records)
        miss_positions = self.hot.lookup(ids, records)
        if len(miss_positions):
            miss_ids = ids[miss_positions]
            records[miss_positions] = self._fetch(miss_ids)
            self.hot.offer(miss_ids, records[miss_positions])
        self._count_hot(len(ids), len(miss_positions))
        return self.codec.decode(records)

    def resolve(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For the device path, of unique ``ids``: ``slots`` (device tier-1 slot, -1 for a miss), ``misses``
        (positions in ``ids`` of the misses), their float32 ``rows [m, dim]`` from Redis or the row files, and
        the admissions ``(admit_slots, admit_from)``: miss ``admit_from[k]`` (a position in ``misses``) is to be
        written to device slot ``admit_slots[k]`` after this batch's gather. The index already counts them."""
        slots = self.hot.slots(ids) if self.hot is not None else np.full(len(ids), -1, dtype=np.int64)
        misses = np.flatnonzero(slots < 0)
        rows = self.codec.decode(self._fetch(ids[misses]))
        if self.hot is not None:
            admit_slots, admit_from = self.hot.admit(ids[misses])
        else:
            admit_slots = admit_from = np.empty(0, dtype=np.int64)
        self._count_hot(len(ids), len(misses))
        return slots, misses, rows, admit_slots, admit_from

    def apply_rows(self, ids: np.ndarray, records: np.ndarray) -> np.ndarray:
        """Row updates, on the compute thread between batches: ``records`` uint8 ``[k, record_bytes]`` become the
        rows of ``ids`` (unique, within the table) in the overlay and, where resident, in tier 1 on the host.
        Tier 2 forgets its cached copies (with row files; rows published to Redis stay the bundle's, verifiable
        by ``uembed publish --verify``): a replica that has not applied this update yet then reads its own old
        rows, never a mix of old and new within one batch, and one that has reads the overlay before Redis.
        Returns the tier-1 slot of each id (-1 where not resident): the device path rewrites those."""
        self.overlay.apply(ids, records)
        slots = self.hot.index.get(ids) if self.hot is not None else np.full(len(ids), -1, dtype=np.int64)
        if self.hot is not None and self.hot.records is not None:
            resident = slots >= 0
            self.hot.records[slots[resident]] = records[resident]
        if self.redis is not None and self.table.files:
            self.redis.forget(self.namespace, ids)
        return slots

    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        """Records of tier-1 misses from the overlay, else tier 2, else tier 3: uint8 ``[k, record_bytes]``."""
        if not self.overlay.rows:
            return self._fetch_below(ids)
        records = np.empty((len(ids), self.codec.record_bytes), dtype=np.uint8)
        changed = self.overlay.lookup(ids, records)
        rest = np.flatnonzero(~changed)
        self.counts.hits["overlay"] += len(ids) - len(rest)
        records[rest] = self._fetch_below(ids[rest])
        return records

    def _fetch_below(self, ids: np.ndarray) -> np.ndarray:
        """Records of ``ids`` from tier 2, else tier 3 (then filled back into tier 2)."""
        if not self.table.files:
            return self._fetch_published(ids)
        records = np.empty((len(ids), self.codec.record_bytes), dtype=np.uint8)
        need_file = np.arange(len(ids))
        redis_used = False
        counts = self.counts
        if self.redis is not None and len(ids):
            redis_hit = self.redis.fetch(self.namespace, ids, records)
            if redis_hit is not None:
                redis_used = True
                need_file = np.flatnonzero(~redis_hit)
                counts.hits["redis"] += len(ids) - len(need_file)
                counts.misses["redis"] += len(need_file)
            else:
                counts.redis_fallbacks += 1
        if len(need_file):
            records[need_file] = self.codec.read(ids[need_file])
            if redis_used:
                self.redis.fill(self.namespace, ids[need_file], records[need_file])
        counts.hits["file"] += len(need_file)
        return records

    def _fetch_published(self, ids: np.ndarray) -> np.ndarray:
        """Records of tier-1 misses of a table whose rows live only in Redis (``row_source=redis``): all of them,
        or :class:`RowsUnavailable` (a 503 for the batch) naming why; never rows made up."""
        from uembed.contract.errors import RowsUnavailable

        records = np.empty((len(ids), self.codec.record_bytes), dtype=np.uint8)
        if not len(ids):
            return records
        where = f"table {self.table.name} (rows only in Redis, row_source=redis)"
        hit = self.redis.fetch(self.namespace, ids, records) if self.redis is not None else None
        if hit is None:
            self.counts.redis_fallbacks += 1
            raise RowsUnavailable(f"{where}: Redis is unavailable ({self.redis.last_error if self.redis else 'no redis_url'}); retry shortly")
        missed = len(ids) - int(hit.sum())
        self.counts.hits["redis"] += len(ids) - missed
        self.counts.misses["redis"] += missed
        if missed and not self.redis.available:  # a cluster node failed in this round: its rows were not read
            raise RowsUnavailable(f"{where}: {missed} of {len(ids)} rows were not read ({self.redis.last_error}); retry shortly")
        if missed:
            raise RowsUnavailable(
                f"{where}: {missed} of {len(ids)} rows are not in Redis under {self.namespace}:*; publish the bundle "
                "again and check it (`uembed publish BUNDLE --redis-url URL --verify`)"
            )
        return records

    def _count_hot(self, looked_up: int, missed: int) -> None:
        if self.hot is not None:
            self.counts.hits["hot"] += looked_up - missed
            self.counts.misses["hot"] += missed

    def take_counts(self) -> TierCounts:
        counts, self.counts = self.counts, TierCounts()
        return counts

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this process holds: tier 1's resident records (``device`` when they sit in GPU memory) and the
        update overlay's. The row
        files (tier 3) are shared through the page cache: ``file_bytes``; Redis is shared too: see its INFO."""
        hot = self.hot.nbytes if self.hot is not None else 0
        return {"device" if self.hot_on_device else "hot": hot, "overlay": self.overlay.nbytes}

    def index_bytes(self) -> int:
        """Tier 1's row -> slot index, resident bytes."""
        return self.hot.index.nbytes if self.hot is not None else 0

    def file_bytes(self) -> dict[str, int]:
        """Tier 3: the row files' size (mapped) and how much of them is in memory now (resident); 0 for rows
        that live only in Redis."""
        return {"mapped": self.table.nbytes if self.table.files else 0, "resident": self.table.resident_bytes()}
