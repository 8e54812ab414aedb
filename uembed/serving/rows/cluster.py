"""Tier 2 on Redis Cluster, through redis-py's cluster client.

``UEMBED_REDIS_URL=redis+cluster://host:port`` (``rediss+cluster://`` for TLS) names any one node of a
cluster; the client asks it for the slot map (CLUSTER SLOTS) and finds the others. Keys are the same 64-row
buckets as on one Redis (``uembed/serving/rows/store.py``), without hash tags, so a table's buckets spread over every
slot and every master. A batch read is one pipelined round per node: :func:`send_by_node` hands the commands
to redis-py's ``ClusterPipeline``, which groups them by the node that owns each key's slot, writes every
node's commands as one packed write, then reads each node's replies (``redis/cluster.py``,
``PipelineStrategy._send_cluster_commands``).

Nothing of the cluster is ours: sharding, replication and failover are Redis Cluster's; the slot map is
redis-py's. What this module decides is what a failure costs a batch. redis-py's pipeline, when a node
fails, times out or answers MOVED, re-sends each failed command one at a time with retries, which for a
paused node costs a timeout per key. Here a failed node's commands are misses instead (their rows come from
the next tier), the tier skips Redis for ``redis_retry_s`` as on one Redis, and re-reads the slot map before
it tries again, so a master that failed over to its replica is found without a restart.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

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
