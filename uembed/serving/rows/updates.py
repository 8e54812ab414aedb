"""Row updates while serving: deltas of changed rows on a Redis Stream per model version, applied by every replica.

A producer (``uembed push-rows``, ``uembed train --continue-from RUN --publish-updates``) adds one stream
entry per delta of at most ``chunk_rows`` rows::

    key      <prefix>:<model>:<version>:updates        (one colon-part short of a row bucket: never one)
    fields   format            "uembed-rows/1"
             model, version    the served version the rows belong to
             tables            JSON [{"name", "dtype", "dim", "rows"}]: the tables this entry changes
             ids:<table>       int64 little-endian [rows]: unique row ids
             records:<table>   uint8 [rows, record_bytes]: each row as every tier stores it (the table's
                               stored dtype, then for int8 its float32 scale and offset; RowCodec)
             source            what produced it (for the log)

Every replica reads every entry (a broadcast read: ``XREAD`` from the position it has applied, kept per model
version in ``ModelRuntime.update_position``). A consumer group would hand each entry to one consumer of the
group, so each replica would need a group of its own, whose pending lists and acknowledgements buy nothing
here: applying an entry twice leaves the same rows (the overlay maps a row to its latest record), so a
replica needs only its own position, and a fresh one starts from 0.

The reader thread parses and checks entries off the compute thread; the compute thread applies them between
two batches (the engine submits them to where its batches run: the event loop, or its one-thread executor), so a batch sees each delta whole or not at
all. ``open`` replays a version's stream into its runtime before it goes live (start-up and reloads), so a
restarted replica serves the same rows as one that never stopped. A dead or slow Redis costs nothing but
freshness: the reader retries with backoff and requests go on with the rows the replica has.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import numpy as np

from uembed.bundle.loader import TableRows
from uembed.contract.errors import UembedError
from uembed.serving.rows.codec import RowCodec
from uembed.serving.rows.redis import redis_client

log = logging.getLogger("uembed.updates")

FORMAT = "uembed-rows/1"
STREAM = "updates"


def stream_key(prefix: str, name: str, version: str) -> str:
    return f"{prefix}:{name}:{version}:{STREAM}"


def parse_position(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id ``b"1712000000000-3"`` as (milliseconds, sequence), which orders like the stream."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, sequence = text.partition("-")
    return int(ms), int(sequence or 0)


def format_position(position: tuple[int, int]) -> str:
    return f"{position[0]}-{position[1]}"


class DeltaError(UembedError):
    """A stream entry that is not a valid delta for the served version (logged, counted by ``field``, skipped)."""

    kind = "bad_delta"

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


# Why an entry was rejected, the label of uembed_row_updates_total{outcome="rejected"}: the field at fault, or
# "unexpected" (the check itself failed: still skipped, logged with its traceback).
REJECT_REASONS = ("format", "model", "tables", "ids", "records", "unexpected")
COUNT_LIMIT = 2**40  # a dim or row count past this is no table's: refused before any arithmetic on it


def _constant(name: str):
    raise ValueError(f"{name} is not a number a table has")


def decode_header(raw: str) -> list[tuple[str, str, int, int]]:
    """The ``tables`` field as (name, dtype, dim, rows), or DeltaError: whatever the text holds (nesting deeper
    than the parser recurses, Infinity, huge or fractional numbers), the answer is a reason, never another error."""
    try:
        header = json.loads(raw, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        raise DeltaError(f"field tables: not JSON this reader takes ({type(exc).__name__}: {str(exc)[:80]})", "tables") from None
    if not isinstance(header, list) or not all(isinstance(t, dict) for t in header):
        raise DeltaError("field tables: not a JSON list of {name, dtype, dim, rows}", "tables")
    out = []
    for t in header:
        name, dtype, dim, rows = (t.get(key) for key in ("name", "dtype", "dim", "rows"))
        if not isinstance(name, str) or not isinstance(dtype, str):
            raise DeltaError("field tables: name and dtype must be strings", "tables")
        for key, value in (("dim", dim), ("rows", rows)):
            if type(value) is not int or not 0 <= value < COUNT_LIMIT:
                shown = "a number out of range" if isinstance(value, int | float) else type(value).__name__
                raise DeltaError(f"field tables: {name[:40]}.{key} must be a whole number in [0, 2**40), not {shown}", "tables")
        out.append((name, dtype, dim, rows))
    if len({entry[0] for entry in out}) != len(out):
        raise DeltaError("field tables: a table is listed twice", "tables")
    return out


@dataclass
class RowDelta:
    """One stream entry's rows: table -> (ids int64 [k], records uint8 [k, record_bytes])."""

    tables: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str = ""

    @property
    def rows(self) -> int:
        return sum(len(ids) for ids, _ in self.tables.values())


def encode_delta(name: str, version: str, tables: dict[str, TableRows], rows: dict[str, tuple[np.ndarray, np.ndarray]],
                 source: str) -> dict[str, bytes | str]:  # fmt: skip
    """The stream entry's fields for ``rows`` (table -> ids, records) of the version whose tables are ``tables``."""
    header = [{"name": t, "dtype": tables[t].dtype, "dim": tables[t].dim, "rows": len(ids)} for t, (ids, _) in rows.items()]
    fields: dict[str, bytes | str] = {"format": FORMAT, "model": name, "version": version, "tables": json.dumps(header),
                                      "source": source}  # fmt: skip
    for table, (ids, records) in rows.items():
        fields[f"ids:{table}"] = np.ascontiguousarray(ids, dtype="<i8").tobytes()
        fields[f"records:{table}"] = np.ascontiguousarray(records, dtype=np.uint8).tobytes()
    return fields


def decode_delta(fields: dict[bytes, bytes], name: str, version: str, tables: dict[str, TableRows]) -> RowDelta:
    """Check a stream entry against the served version's tables and return its rows, or raise DeltaError naming
    the field. The rows' values must be finite: one NaN row would turn every score it touches into NaN."""

    def text(field: str) -> str:
        value = fields.get(field.encode())
        if value is None:
            raise DeltaError(f"field {field} is missing", "model" if field == "version" else field)
        return value.decode("utf-8", "replace")

    if text("format") != FORMAT:
        raise DeltaError(f"field format: {text('format')[:40]!r}, this build reads {FORMAT!r}", "format")
    if (text("model"), text("version")) != (name, version):
        raise DeltaError(f"fields model, version: {text('model')[:40]}/{text('version')[:40]} on the stream of {name}/{version}", "model")
    out = {}
    for table, dtype, dim, count in decode_header(text("tables")):
        served = tables.get(table)
        if served is None:
            raise DeltaError(f"field tables: no table {table[:40]!r} in {name}/{version} (tables: {', '.join(tables)})", "tables")
        if (dtype, dim) != (served.dtype, served.dim):
            raise DeltaError(f"field tables: {table} rows are {dtype[:40]} x {dim}, served as {served.dtype} x {served.dim}", "tables")
        raw_ids, raw_records = fields.get(f"ids:{table}".encode()), fields.get(f"records:{table}".encode())
        if raw_ids is None or raw_records is None:
            raise DeltaError(f"fields ids:{table} and records:{table} are required", "ids" if raw_ids is None else "records")
        if len(raw_ids) != 8 * count or len(raw_records) != count * served.record_bytes:
            raise DeltaError(f"fields ids:{table}, records:{table}: {len(raw_ids)} and {len(raw_records)} bytes, "
                             f"{count} rows of {served.record_bytes} bytes need {8 * count} and {count * served.record_bytes}",
                             "ids" if len(raw_ids) != 8 * count else "records")  # fmt: skip
        ids = np.frombuffer(raw_ids, dtype="<i8").astype(np.int64)
        records = np.frombuffer(raw_records, dtype=np.uint8).reshape(count, served.record_bytes)
        if count and (ids.min() < 0 or ids.max() >= served.rows):
            raise DeltaError(f"field ids:{table}: row ids must be in [0, {served.rows})", "ids")
        if len(np.unique(ids)) != count:
            raise DeltaError(f"field ids:{table}: a row id appears twice", "ids")
        if not np.isfinite(RowCodec(served).decode(records)).all():
            raise DeltaError(f"field records:{table}: rows with NaN or infinite values", "records")
        out[table] = (ids, records)
    return RowDelta(out, text("source") if b"source" in fields else "")


Entry = tuple[tuple[int, int], RowDelta | None]  # position, and the delta (None: rejected, only moves the position)


def apply_entries(runtime, entries: Iterable[Entry], metrics, counted: bool = True) -> int:
    """Apply stream entries in order to ``runtime`` (its compute thread, or before it is live), skipping those at
    or before its position; returns the rows applied. ``counted`` False: a second copy of a version (the shadow
    thread's), whose updates the served copy already counts."""
    applied = 0
    now_ms = time.time() * 1000
    for position, delta in entries:
        if position <= runtime.update_position:
            continue
        if delta is not None:
            for table, (ids, records) in delta.tables.items():
                runtime.apply_rows(table, ids, records)
                if counted:
                    metrics.update_rows.labels(runtime.name, table).inc(len(ids))
            if counted:
                metrics.updates.labels(runtime.name, runtime.version, "applied", "").inc()
                metrics.update_delay_seconds.observe(max(now_ms - position[0], 0) / 1000)
            applied += delta.rows
        runtime.update_position = position
    if not counted:
        return applied
    for store in runtime.stores:
        metrics.overlay_rows.labels(runtime.name, store.table.name).set(store.overlay.rows)
    return applied


class UpdateReader:
    """The replica's reader of its served versions' update streams: a thread, started and stopped with the engine.

    ``engine`` gives the versions to follow (``served_versions``), their runtimes (``runtimes_for``) and
    ``submit_updates`` (entries -> a future completed once the compute thread applied them).
    """

    BLOCK_MS = 1000  # an idle XREAD returns this often, to see newly loaded versions and a stop
    COUNT = 256  # entries per read
    BACKOFF_S = (0.2, 10.0)  # first and longest wait after a Redis error, doubling in between
    LAG_EVERY_S = 0.5

    def __init__(self, engine, url: str, prefix: str, timeout_s: float) -> None:
        import redis

        self.engine = engine
        self.url, self.prefix, self.timeout_s = url, prefix, timeout_s
        self.metrics = engine.metrics
        self.errors = (redis.RedisError, OSError)
        self._client = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.last_error: str | None = None
        self.failing_since: float | None = None  # wall time of the first of the failed rounds in a row (None: it progresses)
        self.gaps: dict[str, str] = {}  # stream key -> why a replica cannot replay it whole (trimmed before its position)
        self._lag_observed = 0.0

    def client(self):
        if self._client is None:
            # A blocking read waits BLOCK_MS on the socket: the timeout covers it.
            self._client = redis_client(self.url, self.timeout_s + self.BLOCK_MS / 1000)
        return self._client

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> UpdateReader:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="uembed-row-updates", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._client is not None:
            self._client.close()

    # --- replay before a version goes live ------------------------------------------------------
    def replay(self, runtime, counted: bool = True) -> int:
        """Apply the version's stream to ``runtime`` (not yet live: on the caller's thread) up to the head; the
        rows applied. With Redis unreachable the runtime starts from its bundle (logged) and the reader catches
        it up once Redis answers."""
        key = stream_key(self.prefix, runtime.name, runtime.version)
        applied = 0
        try:
            self._check_trimmed(key, runtime.update_position)
            while True:
                start = f"({format_position(runtime.update_position)}"  # exclusive
                entries = self.client().xrange(key, min=start, max="+", count=self.COUNT)
                if not entries:
                    break
                applied += apply_entries(runtime, self._decode(runtime, key, entries), self.metrics, counted)
            self.connected = True
        except Exception as exc:  # noqa: BLE001 - a stream this cannot replay never keeps a version from loading
            if isinstance(exc, self.errors):
                self._failed(exc)
            else:
                self._stuck(exc)
            log.warning("replaying %s into %s/%s failed (%s: %s): serving its bundle's rows until the reader catches up",
                        key, runtime.name, runtime.version, type(exc).__name__, exc, exc_info=not isinstance(exc, self.errors))  # fmt: skip
        if applied:
            log.info("replayed %d rows from %s into %s/%s", applied, key, runtime.name, runtime.version)
        return applied

    # --- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                self._round()
                backoff = self.BACKOFF_S[0]
                self._progressed()
            except self.errors as exc:
                self._failed(exc)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.BACKOFF_S[1])
            except Exception as exc:  # noqa: BLE001 - the reader must outlive anything one round does
                log.exception("row-update reader round failed; retrying in %.1fs", backoff)
                self._stuck(exc)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.BACKOFF_S[1])

    def _failed(self, exc: Exception) -> None:
        if self.connected or self.last_error is None:
            log.warning("row-update stream unreachable at %s (%s: %s); retrying with backoff", self.url, type(exc).__name__, exc)
        self.connected = False
        self._stuck(exc)
        self.metrics.redis_errors.labels("updates").inc()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _stuck(self, exc: Exception) -> None:
        """A round (or a replay) that applied nothing: /v1/models and the stuck gauge say since when and why."""
        self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        now = time.time()
        self.failing_since = self.failing_since or now
        self.metrics.update_reader_stuck_seconds.set(now - self.failing_since)

    def _progressed(self) -> None:
        if self.failing_since is not None:
            log.info("row-update reader progresses again after %.1fs", time.time() - self.failing_since)
            self.failing_since = None
            self.metrics.update_reader_stuck_seconds.set(0)

    def _followed(self) -> dict[str, tuple[str, str, list]]:
        out = {}
        for name, version in self.engine.registry.served_versions():
            runtimes = self.engine.registry.runtimes_for(name, version)
            if runtimes:
                out[stream_key(self.prefix, name, version)] = (name, version, runtimes)
        return out

    def _round(self) -> None:
        followed = self._followed()
        if not followed:
            self._stop.wait(self.BLOCK_MS / 1000)
            return
        positions = {key: format_position(min(r.update_position for r in runtimes)) for key, (_, _, runtimes) in followed.items()}
        replies = self.client().xread(positions, count=self.COUNT, block=self.BLOCK_MS)
        if not self.connected:
            self.connected = True
            if self.last_error is not None:
                log.info("row-update stream at %s answers again", self.url)
        futures: list[Future] = []
        rejected: list[tuple[str, str, str]] = []
        for key, entries in replies or []:
            key = key.decode() if isinstance(key, bytes) else key
            name, version, runtimes = followed[key]
            reasons: list[str] = []
            futures.append(self.engine.submit_updates(name, version, self._decode(runtimes[0], key, entries, reasons)))
            rejected += [(name, version, reason) for reason in reasons]
        for future in futures:  # applied before the next read starts from the new positions
            future.result()
        ages = self._lag_ages(followed)
        if rejected or ages:
            self.engine.batcher.between_batches(partial(self._record, rejected, ages))

    def _decode(self, runtime, key: str, entries: list, rejected: list[str] | None = None) -> list[Entry]:
        """Each entry's delta, or None for one rejected: its position is consumed, the entries after it applied.
        The reasons are counted now, or go to ``rejected`` for :meth:`_record` (the reader's rounds)."""
        out = []
        for entry_id, fields in entries:
            shown = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                delta = decode_delta(fields, runtime.name, runtime.version, runtime.bundle.tables)
            except DeltaError as exc:
                log.warning("rejected row update %s of %s: %s", shown, key, exc)
                delta, reason = None, exc.field
            except Exception:  # noqa: BLE001 - a check that fails rejects the entry: it must not stop the stream
                log.exception("rejected row update %s of %s: checking it failed", shown, key)
                delta, reason = None, "unexpected"
            if delta is None:
                rejected.append(reason) if rejected is not None else self.metrics.updates.labels(
                    runtime.name, runtime.version, "rejected", reason).inc()  # fmt: skip
            out.append((parse_position(entry_id), delta))
        return out

    def _record(self, rejected: list[tuple[str, str, str]], ages: list[tuple[str, str, float]]) -> None:
        """Between batches, where versions are unloaded: a version unloaded since the reader read its stream gets no
        count or lag (its series went with it and must not come back)."""
        for name, version, reason in rejected:
            if self.engine.registry.runtimes_for(name, version):
                self.metrics.updates.labels(name, version, "rejected", reason).inc()
        for name, version, age in ages:
            if self.engine.registry.runtimes_for(name, version):
                self.metrics.update_lag_seconds.labels(name, version).set(age)

    def _check_trimmed(self, key: str, position: tuple[int, int]) -> None:
        """Note (and log) when entries after ``position`` were trimmed away: this replica cannot replay them."""
        try:
            info = self.client().xinfo_stream(key)
        except self.errors[0] as exc:
            if "no such key" in str(exc).lower():
                return
            raise
        deleted = parse_position(info.get("max-deleted-entry-id", b"0-0"))
        if deleted > position:
            self.gaps[key] = f"entries up to {format_position(deleted)} were trimmed before this replica read them"
            log.error("row-update stream %s: %s; rows they changed are served from the bundle here until a bundle "
                      "exported with them is loaded", key, self.gaps[key])  # fmt: skip

    def _lag_ages(self, followed: dict[str, tuple[str, str, list]]) -> list[tuple[str, str, float]]:
        """Per version, the age of the oldest entry this replica has not applied (0: caught up), every LAG_EVERY_S.
        Ages come from entry ids, which Redis stamps with its clock: a skew between the hosts' clocks shows."""
        now = time.monotonic()
        if now - self._lag_observed < self.LAG_EVERY_S:
            return []
        self._lag_observed = now
        pipe = self.client().pipeline(transaction=False)
        for key, (_, _, runtimes) in followed.items():
            pipe.xrange(key, min=f"({format_position(min(r.update_position for r in runtimes))}", max="+", count=1)
        now_ms = time.time() * 1000
        return [(name, version, max(now_ms - parse_position(oldest[0][0])[0], 0) / 1000 if oldest else 0.0)
                for (name, version, _), oldest in zip(followed.values(), pipe.execute())]  # fmt: skip

    def describe(self, runtime) -> dict:
        """For ``GET /v1/models``: where this version's updates come from and how far they are applied."""
        key = stream_key(self.prefix, runtime.name, runtime.version)
        return {
            "stream": key,
            "applied_id": format_position(runtime.update_position),
            "overlay_rows": sum(store.overlay.rows for store in runtime.stores),
            "reachable": self.connected,
            "gap": self.gaps.get(key),
            # the reader's, for every version it follows: since when its rounds apply nothing, and why
            "stuck_since": None if self.failing_since is None else datetime.fromtimestamp(self.failing_since, UTC).isoformat(),
            "last_error": None if self.failing_since is None else self.last_error,
        }


def publish_entries(client, key: str, entries: Iterable[dict], max_entries: int) -> list[str]:
    """XADD each entry, keeping about ``max_entries`` on the stream (MAXLEN ~); the new entries' ids."""
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(key, fields, maxlen=max_entries, approximate=True)
    return [entry_id.decode() if isinstance(entry_id, bytes) else entry_id for entry_id in pipe.execute()]


def chunked(rows: dict[str, tuple[np.ndarray, np.ndarray]], chunk_rows: int) -> Iterable[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Rows of several tables (table -> ids, records) cut into deltas of at most ``chunk_rows`` rows in all."""
    group: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    size = 0
    for table, (ids, records) in rows.items():
        start = 0
        while start < len(ids):
            take = min(chunk_rows - size, len(ids) - start)
            group[table] = (ids[start : start + take], records[start : start + take])
            start += take
            size += take
            if size == chunk_rows:
                yield group
                group, size = {}, 0
    if group:
        yield group
