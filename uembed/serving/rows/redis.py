"""Tier 2: rows cached (or, with ``row_source=redis``, published) in Redis, on one Redis or a Redis Cluster.

:class:`RedisTier` is the connection, shared by every table of every model version; :class:`RedisRows` is one
table's rows on it, as the store chains them (``uembed/serving/rows/store.py``).

Redis Cluster, through redis-py's cluster client: ``UEMBED_REDIS_URL=redis+cluster://host:port``
(``rediss+cluster://`` for TLS) names any one node of a cluster; the client asks it for the slot map (CLUSTER
SLOTS) and finds the others. Keys are the same 64-row buckets as on one Redis, without hash tags, so a table's
buckets spread over every slot and every master. A batch read is one pipelined round per node:
:func:`send_by_node` hands the commands to redis-py's ``ClusterPipeline``, which groups them by the node that
owns each key's slot, writes every node's commands as one packed write, then reads each node's replies
(``redis/cluster.py``, ``PipelineStrategy._send_cluster_commands``).

Nothing of the cluster is ours: sharding, replication and failover are Redis Cluster's; the slot map is
redis-py's. What this module decides is what a failure costs a batch. redis-py's pipeline, when a node
fails, times out or answers MOVED, re-sends each failed command one at a time with retries, which for a
paused node costs a timeout per key. Here a failed node's commands are misses instead (their rows come from
the next tier), the tier skips Redis for ``redis_retry_s`` as on one Redis, and re-reads the slot map before
it tries again, so a master that failed over to its replica is found without a restart.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from uembed.contract.errors import RowsUnavailable

log = logging.getLogger("uembed.rows.redis")

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def redis_client(url: str, timeout_s: float, retries: int = 0):
    """A client for ``url``: ``redis.Redis`` for ``redis://`` and ``rediss://``, ``redis.cluster.RedisCluster``
    for ``redis+cluster://`` and ``rediss+cluster://`` (no database number: a cluster has only database 0).
    ``retries``: attempts after a connection error or timeout (0 for the serving tier: a failure is a miss)."""
    import redis
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.retry import Retry

    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries) if retries else Retry(NoBackoff(), 0)
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "health_check_interval": 0}
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        return redis.Redis.from_url(url, retry=retry, **options)
    from redis.cluster import RedisCluster

    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0; {url!r} names database {parts.path.strip('/')!r}")
    node_url = urlunsplit((CLUSTER_SCHEMES[parts.scheme], parts.netloc, "", parts.query, ""))
    return RedisCluster.from_url(node_url, retry=retry, **options)


def send_by_node(client, commands: list[tuple]) -> list:
    """Replies of ``commands`` (tuples such as ``("HMGET", key, field, ...)``), in order, sent as one pipelined
    round per node. A command whose node failed, timed out or no longer owns its slot gets the exception as
    its reply; nothing is retried or redirected (:func:`refresh_slots` then brings the slot map up to date).
    A failure before anything was sent (no connection to a node) raises."""
    from redis.cluster import PipelineCommand

    stack = [PipelineCommand(args, position=i) for i, args in enumerate(commands)]
    return client.pipeline(transaction=False).send_cluster_commands(stack, raise_on_error=False, allow_redirections=False)


def refresh_slots(client) -> None:
    """Re-read the slot map from the cluster (redis-py's ``NodesManager.initialize``): after a failover the
    promoted replica owns its master's slots."""
    client.nodes_manager.initialize()


def glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob (MATCH, KEYS)."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


class RedisTier:
    """Tier 2: records packed into Redis hashes of ``bucket_rows`` rows, on one Redis or a Redis Cluster
    (a ``redis+cluster://`` url).

    Key ``<prefix>:<model>:<version>:<table>:<row // bucket_rows>``, field ``row % bucket_rows``.
    A key per row would cost Redis more in key overhead than a 64-byte row; small hashes
    keep the compact listpack encoding (measured in docs/BENCHMARKS.md). Any error or
    timeout is a miss; after one, Redis is skipped for ``retry_s`` so a dead Redis costs
    no timeout per request, and it is used again once it answers.
    """

    def __init__(self, url: str, timeout_s: float, retry_s: float, bucket_rows: int, fill_queue: int, retries: int = 0) -> None:
        import redis
        from redis.exceptions import RedisClusterException

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


class RedisRows:
    """One table's rows in tier 2, as the store chains them: :class:`RedisTier` under the table's ``namespace``.

    Below it are the row files, or nothing when the rows live only in Redis (``row_source=redis``); then a row
    Redis cannot give is a :class:`RowsUnavailable` for the batch (:meth:`shortfall`), never a row made up.
    ``redis`` None (no ``redis_url``) is a Redis never available."""

    def __init__(self, redis: RedisTier | None, namespace: str, table: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self.table = table
        self.consulted = False  # whether the last fetch read Redis (it is skipped for a while after an error)

    def fetch(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Records of ``ids`` into ``out`` in one round trip (one per node on a cluster); returns the positions
        in ``ids`` that missed: every one when Redis was not read."""
        hit = self.redis.fetch(self.namespace, ids, out) if self.redis is not None else None
        self.consulted = hit is not None
        return np.arange(len(ids)) if hit is None else np.flatnonzero(~hit)

    def count(self, counts, asked: int, missed: int) -> None:
        """Record the last fetch in the store's ``TierCounts``: its hits and misses, or a fallback when Redis was
        not read."""
        if not self.consulted:
            counts.redis_fallbacks += 1
            return
        counts.hits["redis"] += asked - missed
        counts.misses["redis"] += missed

    def keep(self, ids: np.ndarray, records: np.ndarray) -> None:
        """Fill Redis, in the background, with rows the files gave for its misses (not after a fetch that skipped
        Redis: it is failing)."""
        if self.consulted:
            self.redis.fill(self.namespace, ids, records)

    def shortfall(self, asked: int, missed: int) -> RowsUnavailable:
        """Why ``missed`` of the ``asked`` rows of the last fetch are not here, when Redis holds the only copy."""
        where = f"table {self.table} (rows only in Redis, row_source=redis)"
        if not self.consulted:
            why = self.redis.last_error if self.redis else "no redis_url"
            return RowsUnavailable(f"{where}: Redis is unavailable ({why}); retry shortly")
        if not self.redis.available:  # a cluster node failed in this round: its rows were not read
            return RowsUnavailable(
                f"{where}: {missed} of {asked} rows were not read ({self.redis.last_error}); retry shortly"
            )
        return RowsUnavailable(
            f"{where}: {missed} of {asked} rows are not in Redis under {self.namespace}:*; publish the bundle "
            "again and check it (`uembed publish BUNDLE --redis-url URL --verify`)"
        )
