"""The row store: one table of one model version through its tiers, each in its own module:

    tier 1     hot.py       the hottest rows in process memory (or GPU memory), admitted by frequency
    overlay    overlay.py   rows changed since the bundle (row updates), in front of every copy below
    tier 2     redis.py     rows cached in Redis (one Redis or a Redis Cluster)
    tier 3     files.py     the bundle's memory-mapped row files; with ``row_source=redis`` Redis holds the only
                            copy and is the last tier

Every tier below tier 1 holds a row as the same record (``codec.py``: the bytes of the table's codec), and tier 1
holds the rows those records decode to (float32: a hot row is decoded once, when admitted, whatever the codec),
so every tier returns bit-identical rows. The store
asks the tiers in that order through one method, ``fetch(ids, out) -> missing``: a tier fills ``out`` with
the rows it has and returns the positions of the rest, which the next tier is asked for. On the way back each
tier that missed ``keep``s what the tiers below found (tier 1 admits it, Redis is filled from the files), and
each tier ``count``s its answer in :class:`TierCounts`. Tier 1 has two forms, records on the host (``gather``)
and slots of rows in GPU memory (``resolve``), so both ask it first themselves and hand its misses to the one
loop over the tiers below (``_fetch``).

Example (tiers 1 and 3; ``table`` from :func:`uembed.bundle.loader.load_bundle`)::

    >>> store = TableStore(table, namespace="ml:1:unified", hot_bytes=2**20)  # doctest: +SKIP
    >>> store.gather(np.array([3, 17, 5]))                        # float32 [3, dim]  # doctest: +SKIP

Only the batch thread calls ``gather`` (one compute thread per process), so the tiers need no locks; Redis
fills run on a background thread and never block a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from uembed.bundle.loader import TableRows
from uembed.serving.rows.codec import RowCodec
from uembed.serving.rows.files import FileRows
from uembed.serving.rows.hot import HotRows
from uembed.serving.rows.overlay import RowOverlay
from uembed.serving.rows.redis import RedisRows, RedisTier


@dataclass
class TierCounts:
    """Hits and misses per tier since the last ``take`` (the metrics layer drains them)."""

    hits: dict[str, int] = field(default_factory=lambda: {"hot": 0, "overlay": 0, "redis": 0, "file": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"hot": 0, "redis": 0})
    redis_fallbacks: int = 0


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
        # Tier 1 holds decoded float32 rows, whatever the codec (on the device: what the gather kernel reads): the
        # hot head is decoded once, not on every batch, at the price of fewer hot rows in its bytes.
        self.hot = HotRows.for_budget(table.rows, table.dim * 4, hot_bytes, host_records=not hot_on_device) if hot_bytes else None
        self.overlay = RowOverlay(table.rows, self.codec.record_bytes)
        self.redis = redis
        # Rows that live only in Redis (no row files here) are read from Redis with or without a redis_url.
        self.redis_rows = RedisRows(redis, namespace, table.name) if redis is not None or not table.files else None
        self.files = FileRows(table)
        self.counts = TierCounts()  # only the batch thread gathers and drains them: no lock

    def _tiers_below_hot(self) -> list[RowOverlay | RedisRows | FileRows]:
        """Where a tier-1 miss is looked for, in order: the overlay (once it holds rows), Redis, the row files."""
        tiers: list[RowOverlay | RedisRows | FileRows] = [self.overlay] if self.overlay.rows else []
        if self.redis_rows is not None:
            tiers.append(self.redis_rows)
        if self.table.files:
            tiers.append(self.files)
        return tiers

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows ``[k, dim]`` of unique row ids: tier 1's, then its misses from the tiers below (which
        it then admits, as it can). Tier 1 counts once they are found, as on the device path (:meth:`resolve`):
        a batch that fails below it (rows only in Redis) does not count in tier 1."""
        if self.hot is None:
            records = np.empty((len(ids), self.codec.record_bytes), dtype=np.uint8)
            self._fetch(ids, records, self._tiers_below_hot())
            return self.codec.decode(records)
        rows = np.empty((len(ids), self.table.dim), dtype=np.float32)
        missed = self.hot.fetch(ids, rows.view(np.uint8))
        if len(missed):
            missed_ids, records = ids[missed], np.empty((len(missed), self.codec.record_bytes), dtype=np.uint8)
            self._fetch(missed_ids, records, self._tiers_below_hot())
            found = self.codec.decode(records)  # only the rows tier 1 missed are decoded
            rows[missed] = found
            self.hot.keep(missed_ids, np.ascontiguousarray(found, dtype=np.float32).view(np.uint8))
        self.hot.count(self.counts, len(ids), len(missed))
        return rows

    def resolve(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For the device path, of unique ``ids``: ``slots`` (device tier-1 slot, -1 for a miss), ``misses``
        (positions in ``ids`` of the misses), their float32 ``rows [m, dim]`` from the tiers below tier 1, and
        the admissions ``(admit_slots, admit_from)``: miss ``admit_from[k]`` (a position in ``misses``) is to be
        written to device slot ``admit_slots[k]`` after this batch's gather. The index already counts them."""
        slots = self.hot.slots(ids) if self.hot is not None else np.full(len(ids), -1, dtype=np.int64)
        misses = np.flatnonzero(slots < 0)
        records = np.empty((len(misses), self.codec.record_bytes), dtype=np.uint8)
        self._fetch(ids[misses], records, self._tiers_below_hot())
        rows = self.codec.decode(records)
        if self.hot is not None:
            admit_slots, admit_from = self.hot.admit(ids[misses])
            self.hot.count(self.counts, len(ids), len(misses))
        else:
            admit_slots = admit_from = np.empty(0, dtype=np.int64)
        return slots, misses, rows, admit_slots, admit_from

    def _fetch(self, ids: np.ndarray, out: np.ndarray, tiers: list) -> None:
        """Records of ``ids`` into ``out`` (uint8 ``[len(ids), record_bytes]``) from ``tiers``, in order: each
        fills the rows it has and the next is asked for the rest; then, deepest first, each tier that missed
        keeps what the tiers below found. Only a last tier that can miss (rows only in Redis) leaves rows
        missing: :class:`RowsUnavailable` for the batch, never rows made up."""
        if not len(ids):
            return
        # per tier that missed: (tier, its out, the positions it missed (None: all), the ids and out handed down)
        handed_down = []
        for tier in tiers:
            missing = tier.fetch(ids, out)
            tier.count(self.counts, len(ids), len(missing))
            if not len(missing):
                break
            if tier is tiers[-1]:
                raise tier.shortfall(len(ids), len(missing))
            if len(missing) == len(ids):  # nothing here: the next tier fills the same rows in place
                handed_down.append((tier, out, None, ids, out))
                continue
            below_ids, below_out = ids[missing], np.empty((len(missing), out.shape[1]), dtype=np.uint8)
            handed_down.append((tier, out, missing, below_ids, below_out))
            ids, out = below_ids, below_out
        for tier, tier_out, missing, below_ids, below_out in reversed(handed_down):
            if missing is not None:
                tier_out[missing] = below_out
            tier.keep(below_ids, below_out)

    def apply_rows(self, ids: np.ndarray, records: np.ndarray) -> np.ndarray:
        """Row updates, on the compute thread between batches: ``records`` uint8 ``[k, record_bytes]`` become the
        rows of ``ids`` (unique, within the table) in the overlay and, where resident, in tier 1 on the host (decoded).
        Tier 2 forgets its cached copies (with row files; rows published to Redis stay the bundle's, verifiable
        by ``uembed publish --verify``): a replica that has not applied this update yet then reads its own old
        rows, never a mix of old and new within one batch, and one that has reads the overlay before Redis.
        Returns the tier-1 slot of each id (-1 where not resident): the device path rewrites those."""
        self.overlay.apply(ids, records)
        slots = self.hot.index.get(ids) if self.hot is not None else np.full(len(ids), -1, dtype=np.int64)
        if self.hot is not None and self.hot.records is not None:
            resident = slots >= 0
            self.hot.records[slots[resident]] = np.ascontiguousarray(self.codec.decode(records[resident]), dtype=np.float32).view(np.uint8)
        if self.redis is not None and self.table.files:
            self.redis.forget(self.namespace, ids)
        return slots

    def take_counts(self) -> TierCounts:
        counts, self.counts = self.counts, TierCounts()
        return counts

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this process holds: tier 1's resident records (``device`` when they sit in GPU memory) and the
        update overlay's. The row files (tier 3) are shared through the page cache: ``file_bytes``; Redis is
        shared too: see its INFO."""
        hot = self.hot.nbytes if self.hot is not None else 0
        return {"device" if self.hot_on_device else "hot": hot, "overlay": self.overlay.nbytes}

    def index_bytes(self) -> int:
        """Tier 1's row -> slot index, resident bytes."""
        return self.hot.index.nbytes if self.hot is not None else 0

    def file_bytes(self) -> dict[str, int]:
        """Tier 3: the row files' size (mapped) and how much of them is in memory now (resident)."""
        return self.files.file_bytes()
