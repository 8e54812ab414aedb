"""A bundle's rows published to Redis (one Redis or a Redis Cluster): ``uembed publish`` writes and verifies
them, and a service with ``UEMBED_ROW_SOURCE=redis`` serves from them with no row files on its disk.

The layout is tier 2's, record for record (``uembed/serving/rows/redis.py``): hashes
``<prefix>:<model>:<version>:<table>:<row // bucket_rows>``, field ``row % bucket_rows``, value the row's
record as :class:`~uembed.serving.rows.files.FileRows` reads it from the row files (the stored codec's bytes, then for
int8, int4 and int2 the float32 scale and bias). A service that caches in Redis and a publication therefore share keys:
publishing fills the cache, and a cache holds nothing a publication would not.

Publishing writes whole buckets, pipelined a chunk at a time, and is idempotent (a second run rewrites the
same bytes to the same keys). It deletes the model version's completion marker first and writes it last:

    <prefix>:<model>:<version>:published  ->  JSON {"model", "version", "bucket_rows", "tables": [{"name",
        "rows", "dim", "dtype", "sha256": [row file, scale/bias or pq codebooks file]}], "rows", "published_at"}

A service reads it to decide readiness: present, and equal to what its own manifest says
(:func:`expected_marker`), else not ready and the reason. The row files' sha256 in it ties the rows in
Redis to the manifest the service loaded, so a version published from other files is never served.

    >>> report = publish("bundles/movielens/1", "redis+cluster://127.0.0.1:7000", verify=True)  # doctest: +SKIP
    >>> report["rows"], report["bad_rows"], report["marker_problem"]                          # doctest: +SKIP
    (9436, {}, None)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from uembed.bundle.format import table_files
from uembed.bundle.loader import Bundle, load_bundle
from uembed.contract.errors import BundleError, UembedError
from uembed.serving.rows.files import FileRows
from uembed.serving.rows.redis import RedisTier

log = logging.getLogger("uembed.published")

MARKER = "published"


def table_namespace(prefix: str, name: str, version: str, table: str) -> str:
    """Key prefix of one table's buckets (the service's TableStore namespace)."""
    return f"{prefix}:{name}:{version}:{table}"


def marker_key(prefix: str, name: str, version: str) -> str:
    """The completion marker of a model version; one colon-part short of any bucket key, so never one."""
    return f"{prefix}:{name}:{version}:{MARKER}"


def expected_marker(manifest: dict, bucket_rows: int) -> dict:
    """The marker a complete publication of this manifest's rows carries (less its ``published_at``)."""
    tables = []
    for entry in manifest["tables"]:
        files = table_files(entry)
        tables.append({"name": entry["name"], "rows": entry["rows"], "dim": entry["dim"], "dtype": entry["dtype"],
                       "sha256": [f["sha256"] for f in files]})  # fmt: skip
    return {"model": manifest["name"], "version": manifest["version"], "bucket_rows": bucket_rows, "tables": tables,
            "rows": sum(t["rows"] for t in tables)}  # fmt: skip


def marker_problem(found: bytes | None, manifest: dict, bucket_rows: int, key: str) -> str | None:
    """Why a marker read from Redis (None: absent) does not vouch for this manifest's rows; None if it does."""
    if found is None:
        return f"no completion marker at {key}: waiting for `uembed publish` of this bundle to finish"
    try:
        marker = json.loads(found)
    except (ValueError, RecursionError):  # whatever the key holds, the answer is a reason to wait, not an error
        return f"the completion marker at {key} is not JSON"
    if not isinstance(marker, dict):
        return f"the completion marker at {key} is not a JSON object"
    expected = expected_marker(manifest, bucket_rows)
    for field, value in expected.items():
        if marker.get(field) != value:
            if field == "tables":
                return (f"the completion marker at {key} is of other row files than this bundle's manifest (tables, "
                        "shapes or sha256 differ): publish this bundle's rows again")  # fmt: skip
            return f"the completion marker at {key} has {field}={repr(marker.get(field))[:80]}, this service expects {value!r}"
    return None


def _chunks(rows: int, chunk_rows: int):
    for start in range(0, rows, chunk_rows):
        yield np.arange(start, min(start + chunk_rows, rows), dtype=np.int64)


def publish(
    bundle_path: str | Path,
    url: str,
    prefix: str = "uembed",
    bucket_rows: int = 64,
    chunk_rows: int = 32768,
    timeout_s: float = 10.0,
    write: bool = True,
    verify: bool = False,
    progress: bool = True,
) -> dict:
    """Write every row of every table of a bundle to Redis at ``url`` (``redis://`` or ``redis+cluster://``),
    then its completion marker; with ``verify`` read every row back and compare it with the row files (and
    the marker with the manifest). ``write=False`` only verifies. Returns the figures; ``bad_rows`` maps a
    table to the count and first ids of its rows that were missing or differed (empty when all match), and
    ``marker_problem`` is None when the marker vouches for the bundle."""
    bundle = load_bundle(bundle_path)  # every file, row files included, checked against its sha256
    chunk_rows = max(bucket_rows, chunk_rows // bucket_rows * bucket_rows)  # whole buckets per chunk
    tier = RedisTier(url, timeout_s=timeout_s, retry_s=0, bucket_rows=bucket_rows, fill_queue=0, retries=3)
    key = marker_key(prefix, bundle.name, bundle.version)
    report: dict = {"model": bundle.name, "version": bundle.version, "url": url, "marker": key, "rows": 0,
                    "write_seconds": None, "verify_seconds": None, "bad_rows": {}, "marker_problem": None}  # fmt: skip
    try:
        if write:
            started = time.perf_counter()
            tier.client.delete(key)  # a publication under way is incomplete until its marker is back
            report["rows"] = _write(tier, bundle, prefix, chunk_rows, progress)
            marker = expected_marker(bundle.manifest, bucket_rows) | {"published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            tier.client.set(key, json.dumps(marker, sort_keys=True))
            report["write_seconds"] = round(time.perf_counter() - started, 3)
        if verify:
            started = time.perf_counter()
            report["bad_rows"] = _verify(tier, bundle, prefix, chunk_rows, progress)
            report["marker_problem"] = marker_problem(tier.client.get(key), bundle.manifest, bucket_rows, key)
            report["rows"] = sum(t.rows for t in bundle.tables.values())
            report["verify_seconds"] = round(time.perf_counter() - started, 3)
    except tier.errors as exc:
        raise UembedError(f"publish to {url}: Redis failed ({type(exc).__name__}: {exc}); publishing again is safe") from exc
    finally:
        tier.close()
    return report


def _each_chunk(bundle: Bundle, prefix: str, chunk_rows: int, what: str, progress: bool):
    """``(table name, namespace, row ids, their records from the row files)`` a chunk at a time, every table,
    under one progress bar."""
    total = sum(t.rows for t in bundle.tables.values())
    with tqdm(total=total, unit="rows", unit_scale=True, desc=what, disable=not progress) as bar:
        for table in bundle.tables.values():
            files = FileRows(table)
            namespace = table_namespace(prefix, bundle.name, bundle.version, table.name)
            for ids in _chunks(table.rows, chunk_rows):
                yield table.name, namespace, ids, files.read(ids)
                bar.update(len(ids))


def _write(tier: RedisTier, bundle: Bundle, prefix: str, chunk_rows: int, progress: bool) -> int:
    for _, namespace, ids, records in _each_chunk(bundle, prefix, chunk_rows, "publish", progress):
        tier.write(namespace, ids, records)
    return sum(t.rows for t in bundle.tables.values())


def _verify(tier: RedisTier, bundle: Bundle, prefix: str, chunk_rows: int, progress: bool) -> dict[str, dict]:
    """Table -> ``{"count", "first"}`` of its rows whose record in Redis is missing or differs from the row
    files (``first``: the lowest 20 row ids); tables whose rows all match are left out."""
    bad: dict[str, dict] = {}
    for name, namespace, ids, expected in _each_chunk(bundle, prefix, chunk_rows, "verify", progress):
        got = np.zeros_like(expected)
        wrong = ~tier.read(namespace, ids, got) | np.any(got != expected, axis=1)
        if wrong.any():
            entry = bad.setdefault(name, {"count": 0, "first": []})
            entry["count"] += int(wrong.sum())
            entry["first"] = (entry["first"] + ids[wrong][:20].tolist())[:20]
    return bad


class PublicationCheck:
    """Readiness of a bundle whose rows live only in Redis (``UEMBED_ROW_SOURCE=redis``): its completion
    marker, read on a thread every ``poll_s`` until it is there and matches the manifest. It has the face of
    the row files' :class:`~uembed.bundle.loader.RowChecks` (``passed``, ``failed``, ``describe``, ``start``,
    ``wait``), and sits where they do (``bundle.row_checks``), so the engine gates scoring on it the same way:
    503 ``not_ready`` with :meth:`describe` until it passes. It never fails for good: a marker that is absent,
    of other files, or unreadable (Redis down) is waited out, and publishing the bundle makes it pass without a
    restart."""

    what = "rows in Redis"
    failed = False

    def __init__(self, redis: RedisTier, prefix: str, bundle: Bundle, poll_s: float = 1.0) -> None:
        self.redis = redis
        self.manifest = bundle.manifest
        self.key = marker_key(prefix, bundle.name, bundle.version)
        self.poll_s = poll_s
        self.state = "not checked yet"
        self.done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def passed(self) -> bool:
        return self.done.is_set()

    def check(self) -> bool:
        """Read the marker once; True when it vouches for the bundle."""
        try:
            found = self.redis.client.get(self.key)
        except self.redis.errors as exc:
            self.state = f"not checked: Redis unavailable ({type(exc).__name__}: {exc})"
            return False
        problem = marker_problem(found, self.manifest, self.redis.bucket_rows, self.key)
        if problem is None:
            self.state = "passed"
            self.done.set()
            log.info("rows of %s version %s are published (%s)", self.manifest["name"], self.manifest["version"], self.key)
            return True
        self.state = f"not published: {problem}"
        return False

    def start(self) -> PublicationCheck:
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="uembed-publication-check", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        logged = None
        while not self.check():
            if self.state != logged:
                log.warning("%s version %s not ready: %s", self.manifest["name"], self.manifest["version"], self.state)
                logged = self.state
            time.sleep(self.poll_s)

    def wait(self, timeout_s: float | None = None) -> None:
        """One check here when nobody started the poll (a reload: refused at once if not published), else wait
        for the poll; a BundleError that says why when the rows are not published."""
        if self._thread is None:
            if not self.check():
                raise BundleError(f"model {self.manifest['name']} version {self.manifest['version']}: {self.what} {self.state}")
            return
        if not self.done.wait(timeout_s):
            raise TimeoutError(f"{self.key}: {self.state} after {timeout_s}s")

    def describe(self) -> str:
        return self.state
