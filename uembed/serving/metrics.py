"""Prometheus metrics: prefix ``uembed_``, base units in names, bounded labels.

Labels are route, outcome, status, stage, tier, table, model, version, feature, reason and generation (and pid,
prometheus_client's, on a worker's own series): values the bundle or the code fixes, never a user's value. With
several uvicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` makes ``/metrics`` sum them (``uembed serve --workers N``
sets it up).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from uembed.contract.collisions import feature_shares
from uembed.serving.rows.store import TierCounts
from uembed.serving.rows.updates import REJECT_REASONS
from uembed.serving.vitals import WorkerVitals

log = logging.getLogger("uembed.metrics")


def remove_quietly(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def rows_dtype(runtime) -> str:
    """The stored dtype of a model version's rows (a label of its info series)."""
    return next(iter(runtime.bundle.tables.values())).dtype if runtime.bundle.tables else "none"

LATENCY_BUCKETS = tuple(round(0.0001 * 2**i, 6) for i in range(17))  # 0.1 ms .. 6.5 s
STAGES = ("queue", "hash", "lookup", "assemble", "dense")
SIZE_BUCKETS = tuple(float(2**i) for i in range(18))  # 1 .. 131072
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # a probability, in twentieths
DIFFERENCE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
TRAFFIC = ("served", "shadow")
SHADOW_OUTCOMES = ("scored", "dropped", "failed")


def outcome(status: int) -> str:
    """A request's outcome label from its HTTP status (a gRPC call's: the status of its row in the error table)."""
    if status < 400:
        return "ok"
    return {503: "overloaded", 504: "timeout"}.get(status, "client_error" if status < 500 else "error")


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def forget_dead_workers() -> list[int]:
    """Remove the live gauges' files of the workers that are gone, as prometheus_client's ``mark_process_dead``
    does: the supervisor that respawns a killed worker (uvicorn's) does not, so its last values would be summed with
    its successor's, and a table's memory counted twice. Counters and histograms keep a dead worker's counts, as they
    should. Each worker calls this as it starts; the pids forgotten. Never raises: two workers respawned together
    race to remove the same files, and a metrics folder must not stop a worker from starting."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return []
    try:
        files = [(f, int(m.group(1))) for f in Path(directory).glob("gauge_live*_*.db") if (m := LIVE_GAUGE_FILE.fullmatch(f.name))]
    except OSError as exc:
        log.warning("could not list %s to forget gone workers' gauges: %s", directory, exc)
        return []
    gone = {pid for _, pid in files if pid != os.getpid() and not process_alive(pid)}
    for path, pid in files:
        if pid in gone:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)
    return sorted(gone)


def forget_this_worker() -> None:
    """As a worker stops (multiprocess): its live gauges go with it, as they would with its successor's start."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for path in Path(directory).glob(f"gauge_live*_{os.getpid()}.db"):
            path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def observe_all(histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, with one increment per bucket (a 500-example batch would take 500
    observe calls). prometheus_client keeps per-bucket (not cumulative) counts in ``_buckets``."""
    if not len(values):
        return
    bounds = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    add_buckets(histogram, counts, float(np.sum(values, dtype=np.float64)))


def add_buckets(histogram, counts: np.ndarray, total: float) -> None:
    """Observations already counted per bucket (``counts``, one per upper bound) whose values sum to ``total``."""
    for bucket, count in zip(histogram._buckets, counts.tolist()):
        if count:
            bucket.inc(count)
    histogram._sum.inc(total)


class FlushFirst:
    """A collector that yields no series and runs ``hooks``: registered before the service's series."""

    def __init__(self, hooks: list[Callable[[], None]]) -> None:
        self.hooks = hooks

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        for hook in list(self.hooks):
            try:
                hook()
            except Exception:  # noqa: BLE001 - a failed flush must not fail the scrape of every other series
                log.exception("flushing tallied metrics failed")
        return []


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # *_created series only double the scrape size here
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Batch tallies' flushes (uembed/serving/metrics_tally.py), run by the first collector of the registry, so
        # every read of it sees every batch run so far.
        self.before_collect: list[Callable[[], None]] = []
        self.flush_first = FlushFirst(self.before_collect)
        r.register(self.flush_first)
        self.vitals = WorkerVitals(r)  # set at each read (first of before_collect) and on its own timer
        self.before_collect.append(self.vitals.update)
        self.request_seconds = Histogram(
            "uembed_request_duration_seconds", "HTTP request latency, end to end in the service.",
            ["route", "outcome"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "uembed_http_requests_total", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.grpc_seconds = Histogram(
            "uembed_grpc_request_duration_seconds", "gRPC call latency (Open Inference Protocol), end to end in the service.",
            ["method", "outcome"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.grpc_requests = Counter(
            "uembed_grpc_requests_total", "gRPC calls (Open Inference Protocol) by method and status code.",
            ["method", "code"], registry=r,
        )
        self.stage_seconds = Histogram(
            "uembed_stage_duration_seconds",
            "Time per stage: queue (per request, admission to batch start), hash, lookup, assemble, dense (per batch).",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_examples = Histogram(
            "uembed_batch_examples", "Examples per batch.", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_ids = Histogram(
            "uembed_batch_ids", "Row ids looked up per batch (before dedupe; in a batch of ranking requests, each context's once).", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_unique_ids = Histogram(
            "uembed_batch_unique_ids", "Distinct row ids per batch (after dedupe, summed over tables).",
            buckets=SIZE_BUCKETS, registry=r,
        )
        self.queue_examples = Gauge(
            "uembed_queue_examples", "Examples admitted and waiting for a batch.", registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "uembed_rejected_requests_total",
            "Requests refused or dropped by the batcher: overloaded (admission bound), deadline, shutting_down.",
            ["reason"], registry=r,
        )
        self.examples = Counter("uembed_scored_examples_total", "Examples scored.", ["model"], registry=r)
        self.table_memory = Gauge(
            "uembed_table_memory_bytes",
            "Bytes each process holds of its own, per table and tier: hot (tier 1 records in process memory), "
            "device (tier 1 rows in GPU memory), overlay (rows changed by row updates), index (tier 1's row -> slot index, in process memory; refreshed "
            "when /metrics is read). Summed over workers. The row files are shared: uembed_table_file_bytes.",
            ["model", "table", "tier"], registry=r, multiprocess_mode="livesum",
        )
        self.table_file = Gauge(
            "uembed_table_file_bytes",
            "Tier 3, a table's row files, shared by every worker through the page cache (not summed over workers): "
            "mapped (their size) and resident (how much of them is in memory now, by mincore(2); refreshed at "
            "most every few seconds, when /metrics is read).",
            ["model", "table", "state"], registry=r, multiprocess_mode="mostrecent",
        )
        self.row_checks = Gauge(
            "uembed_row_checks",
            "sha256 checks of a model version's row files (row_checks=background): 1 passed, 0 running, -1 failed "
            "(the model is not served; the log names the file). The lowest over workers.",
            ["model", "version"], registry=r, multiprocess_mode="livemin",
        )
        self.row_hits = Counter(
            "uembed_row_cache_hits_total", "Row lookups answered by a tier (hot, overlay: rows changed by updates, redis; file answers the rest).",
            ["tier"], registry=r,
        )
        self.row_misses = Counter(
            "uembed_row_cache_misses_total", "Row lookups a tier could not answer (hot, redis).", ["tier"], registry=r
        )
        self.redis_errors = Counter(
            "uembed_redis_errors_total", "Redis calls that failed or timed out.", ["operation"], registry=r
        )
        self.redis_fallbacks = Counter(
            "uembed_redis_fallbacks_total",
            "Table lookups served from the row files because Redis was down, slow or skipped after an error.",
            registry=r,
        )
        self.redis_fills_dropped = Counter(
            "uembed_redis_fills_dropped_total", "Row write-backs to Redis dropped because the fill queue was full.",
            registry=r,
        )
        self.model_info = Gauge(
            "uembed_model_info", "Loaded model versions (value 1).", ["model", "version", "method", "dtype"],
            registry=r, multiprocess_mode="max",
        )
        self.reloads = Counter(
            "uembed_model_reloads_total", "Model loads through the reload endpoint.", ["model", "outcome"], registry=r
        )
        self.truncated = Counter(
            "uembed_truncated_lists_total",
            "Multivalent lists longer than the trained width, cut to it.", ["feature"], registry=r,
        )
        self.missing = Counter(
            "uembed_missing_features_total",
            "Examples scored without a feature the model has (left out of the example and its context; scored "
            "with the missing value's row): a rise is a client that stopped sending or renamed a field.",
            ["model", "feature"], registry=r,
        )
        self.unseen = Counter(
            "uembed_unseen_values_total",
            "Feature values not seen in training (scored with whatever row they hash to): a rise is drift. "
            "Counted where the bundle records its training values; false 'seen' at about 1%.",
            ["model", "feature"], registry=r,
        )
        self.collision_share = Gauge(
            "uembed_feature_collision_share",
            "Per model and feature, the share of its training occurrences whose value shares its row with another value "
            "in every lookup, from the bundle's collision report (set at load; docs/MODELS.md). Absent for bundles without one.",
            ["model", "feature"], registry=r, multiprocess_mode="mostrecent",
        )
        self.abandoned = Counter(
            "uembed_abandoned_requests_total",
            "Requests whose batch had not run when they ended, so their work was skipped: cancelled (the client "
            "went away) or deadline (request_timeout_ms passed while queued).",
            ["reason"], registry=r,
        )
        self.value_cache_bytes = Gauge(
            "uembed_value_cache_bytes", "Bytes held by a model's caches of recent feature values (value_cache_bytes bounds it).",
            ["model"], registry=r, multiprocess_mode="livesum",
        )
        self.version_seconds = Histogram(
            "uembed_model_request_duration_seconds",
            "Per model version, a request's time in the engine, admission to scores (every front): served requests, "
            "and shadow copies (their wait in the shadow queue and their scoring on the shadow thread).",
            ["model", "version", "traffic"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.example_score = Histogram(
            "uembed_example_score", "Scores (probabilities) per model version, one observation per example: served, "
            "and those of shadow copies, never returned.", ["model", "version", "traffic"], buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.shadow = Counter(
            "uembed_shadow_requests_total",
            "Copies of requests for a shadow version: scored, dropped (its queue was full: the shadow is slower than "
            "the traffic), failed (the version refused the examples or its scoring raised).",
            ["model", "version", "outcome"], registry=r,
        )
        self.shadow_difference = Histogram(
            "uembed_shadow_score_difference",
            "Per example, |shadow score - served score| of a shadow copy: how far the candidate is from what was served.",
            ["model", "version"], buckets=DIFFERENCE_BUCKETS, registry=r,
        )
        self.routing_share = Gauge(
            "uembed_routing_share",
            "Share of a model's requests its routing sends to each loaded version (1 for the primary without a rule).",
            ["model", "version"], registry=r, multiprocess_mode="mostrecent",
        )
        self.desired_revision = Gauge(
            "uembed_desired_state_revision",
            "Revision of a model's desired state (docs/ROUTING.md): the latest a worker read (kind=desired) and the "
            "latest it applied (kind=applied); the lowest over workers, so applied < desired is a worker behind.",
            ["model", "kind"], registry=r, multiprocess_mode="livemin",
        )
        self.updates = Counter(
            "uembed_row_updates_total",
            "Row-update deltas (stream entries) by outcome: applied, or rejected (not a valid delta for the version, "
            "skipped: reason names the field at fault, or unexpected; the log says why). Each worker applies every delta.",
            ["model", "version", "outcome", "reason"], registry=r,
        )
        self.update_rows = Counter(
            "uembed_row_update_rows_total", "Rows changed by applied row updates (per worker).", ["model", "table"], registry=r
        )
        self.update_lag_seconds = Gauge(
            "uembed_row_update_lag_seconds",
            "Age of the oldest row update a worker has not applied yet, from its publication time (0: caught up). "
            "The highest over workers.",
            ["model", "version"], registry=r, multiprocess_mode="max",
        )
        self.update_reader_stuck_seconds = Gauge(
            "uembed_row_update_reader_stuck_seconds",
            "How long the row-update reader's rounds have applied nothing because they failed (Redis unreachable, or "
            "an error it did not expect: /v1/models row_updates.last_error); 0 while it progresses. The highest over workers.",
            registry=r, multiprocess_mode="max",
        )
        self.update_delay_seconds = Histogram(
            "uembed_row_update_delay_seconds",
            "Time from a row update's publication (its stream entry id) to its application between batches.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.overlay_rows = Gauge(
            "uembed_row_overlay_rows",
            "Rows of a table changed since its bundle, held in the update overlay (its bytes: uembed_table_memory_bytes"
            "{tier=\"overlay\"}). The highest over workers.",
            ["model", "table"], registry=r, multiprocess_mode="max",
        )
        self._redis_seen = {"fetch": 0, "fill": 0, "dropped": 0}
        # Label sets that exist from the start, so dashboards show 0 rather than "no data".
        for tier in ("hot", "overlay", "redis", "file"):
            self.row_hits.labels(tier)
        for tier in ("hot", "redis"):
            self.row_misses.labels(tier)
        for operation in ("fetch", "fill", "updates"):
            self.redis_errors.labels(operation)
        for reason in ("overloaded", "deadline", "shutting_down"):
            self.rejected.labels(reason)
        for reason in ("cancelled", "deadline"):
            self.abandoned.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)

    def version_loaded(self, runtime, replaced=None) -> None:
        """A loaded model version's series (a ``ModelRuntime``; ``replaced``: the copy of the same version it replaces):
        its info, and every series of it at 0 before its first event, so panels show 0 rather than "no data"."""
        name, version = runtime.name, runtime.version
        if replaced is not None:
            remove_quietly(self.model_info, replaced.name, replaced.version, replaced.plan.method, rows_dtype(replaced))
        self.model_info.labels(name, version, runtime.plan.method, rows_dtype(runtime)).set(1)
        for traffic in TRAFFIC:
            self.version_seconds.labels(name, version, traffic)
            self.example_score.labels(name, version, traffic)
        for kind in SHADOW_OUTCOMES:
            self.shadow.labels(name, version, kind)
        self.shadow_difference.labels(name, version)
        self.reloads.labels(name, "ok")
        for spec in runtime.bundle.feature_specs.values():
            if spec.kind == "multivalent":
                self.truncated.labels(spec.name)
        for feature in runtime.encoder.known:
            self.unseen.labels(name, feature)
        for feature in runtime.bundle.feature_specs:
            self.missing.labels(name, feature)
        # The version loaded last reports for its model; one without a report leaves no stale figures behind.
        shares = feature_shares(runtime.bundle.manifest)
        for feature in runtime.bundle.feature_specs:
            if feature in shares:
                self.collision_share.labels(name, feature).set(shares[feature])
            else:
                remove_quietly(self.collision_share, name, feature)
        self.updates.labels(name, version, "applied", "")
        for reason in REJECT_REASONS:
            self.updates.labels(name, version, "rejected", reason)
        self.update_lag_seconds.labels(name, version).set(0)
        for store in runtime.stores:
            self.update_rows.labels(name, store.table.name)
            self.overlay_rows.labels(name, store.table.name).set(store.overlay.rows)

    def observe_memory(self, runtime) -> None:
        """Per table and tier, the bytes of tier 1 a model version holds in this process."""
        for table, tiers in runtime.memory_bytes().items():
            for tier, value in tiers.items():
                self.table_memory.labels(runtime.name, table, tier).set(value)

    def version_unloaded(self, runtime) -> None:
        """An unloaded version's series go (their labels are bounded by what is loaded), its row updates' counts and lag
        with them. Not with several workers: prometheus_client cannot remove a series from its multiprocess files, so
        there they stay (stale) until the workers restart."""
        self.flush_first.collect()  # its tallied batches first: a later flush would bring its series back
        name, version = runtime.name, runtime.version
        remove_quietly(self.model_info, name, version, runtime.plan.method, rows_dtype(runtime))
        for traffic in TRAFFIC:
            for metric in (self.version_seconds, self.example_score):
                remove_quietly(metric, name, version, traffic)
        for kind in SHADOW_OUTCOMES:
            remove_quietly(self.shadow, name, version, kind)
        remove_quietly(self.shadow_difference, name, version)
        remove_quietly(self.routing_share, name, version)
        remove_quietly(self.update_lag_seconds, name, version)
        self.updates.remove_by_labels({"model": name, "version": version})  # a rejection's reason: any field

    def observe_tiers(self, counts: TierCounts) -> None:
        for tier, value in counts.hits.items():
            if value:
                self.row_hits.labels(tier).inc(value)
        for tier, value in counts.misses.items():
            if value:
                self.row_misses.labels(tier).inc(value)
        if counts.redis_fallbacks:
            self.redis_fallbacks.inc(counts.redis_fallbacks)

    def observe_redis(self, error_counts: dict[str, int], fills_dropped: int) -> None:
        """Counters from the Redis tier's running totals (its fill thread updates them)."""
        for operation in ("fetch", "fill"):
            delta = error_counts[operation] - self._redis_seen[operation]
            if delta:
                self.redis_errors.labels(operation).inc(delta)
                self._redis_seen[operation] += delta
        delta = fills_dropped - self._redis_seen["dropped"]
        if delta:
            self.redis_fills_dropped.inc(delta)
            self._redis_seen["dropped"] += delta

    def exposition(self) -> bytes:
        if multiprocess():  # this worker's tallied batches, into its series, before the files are read
            self.flush_first.collect()
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
