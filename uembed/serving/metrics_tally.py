"""A batch's metrics, tallied as plain numbers and put into the Prometheus series in bulk.

Every batch observes its stages' times, its size, its ids and distinct ids, its examples, its row tiers' hits, its
unseen values and every example's score. As Prometheus observations (a lock and a bucket walk each, a file write
each with several workers) they cost a lone request a noticeable share of its time. :class:`BatchTally` keeps them
as lists, sums and bucket counts instead, and :meth:`BatchTally.flush` adds them to the series: the batch loop
flushes at most ``FLUSH_SECONDS`` after a batch, and every read of the registry (``/metrics``, a test's
``registry.collect()``) flushes first, so a scrape of this process never misses a batch it ran. With several
workers a scrape reads the other workers' series as their last flush left them: at most ``FLUSH_SECONDS`` old.

The gauges a batch used to set (each model's value-cache bytes and tier-1 memory) are set at a flush, from the last
runtime of that model the tally saw. ``add`` runs on the compute thread, ``flush`` wherever the registry is read: a
lock hands the tally over whole, and a second one makes a read wait for a flush under way. A version's series are
removed when it is unloaded: the tally is flushed first, so no late flush brings them back.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np

from uembed.serving.metrics import SCORE_BUCKETS, STAGES, ServiceMetrics, add_buckets, observe_all
from uembed.serving.rows.store import TierCounts

FLUSH_SECONDS = 0.5
SCORE_BOUNDS = np.array([*SCORE_BUCKETS, np.inf])  # the score histogram's upper bounds, +Inf last as Prometheus has them


class BatchTally:
    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()  # add and take
        self._flushing = threading.Lock()  # a read on another thread waits for a flush under way to finish
        self._take()
        # each stage's latency child, resolved once (labels() costs more than an observation; never removed)
        self._stage_seconds = {stage: metrics.stage_seconds.labels(stage) for stage in STAGES}
        metrics.before_collect.append(self.flush)

    def _take(self) -> tuple:
        """What is tallied, and a fresh tally in its place (under the lock, or before any batch)."""
        taken = (self.stages, self.sizes, self.examples, self.hits, self.misses, self.fallbacks, self.unseen, self.scores,
                 self.runtimes) if hasattr(self, "stages") else None  # fmt: skip
        self.stages = {stage: [] for stage in STAGES}
        self.sizes = ([], [], [])  # per batch: examples, ids looked up, distinct ids
        self.examples = defaultdict(int)  # model -> examples scored
        self.hits, self.misses, self.fallbacks = defaultdict(int), defaultdict(int), [0]
        self.unseen = defaultdict(int)  # (model, feature) -> values not seen in training
        self.scores = {}  # (model, version) -> [bucket counts, sum]
        self.runtimes = {}  # model -> the runtime that scored its last batch (its gauges are set at a flush)
        return taken

    def queued(self, seconds: list[float]) -> None:
        """Each request's wait from admission to its batch's start."""
        with self._lock:
            self.stages["queue"].extend(seconds)

    def add(self, runtime, times, examples: int, scores: np.ndarray) -> None:
        """One scored batch of ``runtime``: its stage ``times`` (a ``BatchTimes``), ``examples`` and their scores;
        the row tiers' counts and unseen values are taken from the runtime's stores and encoder here."""
        counts = [store.take_counts() for store in runtime.stores]
        unseen = runtime.encoder.take_unseen()
        buckets = np.bincount(np.searchsorted(SCORE_BOUNDS, scores, side="left"), minlength=len(SCORE_BOUNDS)) if len(scores) else None
        total = float(np.sum(scores, dtype=np.float64))
        with self._lock:
            for stage, seconds in times.stages():
                self.stages[stage].append(seconds)
            unique = 0
            for count in counts:
                unique += self._add_tiers(count)
            for size, value in zip(self.sizes, (examples, times.ids, unique)):
                size.append(value)
            self.examples[runtime.name] += examples
            for feature, count in unseen.items():
                if count:
                    self.unseen[runtime.name, feature] += count
            if buckets is not None:
                tallied = self.scores.setdefault((runtime.name, runtime.version), [np.zeros(len(SCORE_BOUNDS), np.int64), 0.0])
                tallied[0] += buckets
                tallied[1] += total
            self.runtimes[runtime.name] = runtime

    def _add_tiers(self, counts: TierCounts) -> int:
        """Adds one store's tier counts; returns its distinct ids (every one is a hit in some tier)."""
        for tier, value in counts.hits.items():
            self.hits[tier] += value
        for tier, value in counts.misses.items():
            self.misses[tier] += value
        self.fallbacks[0] += counts.redis_fallbacks
        return sum(counts.hits.values())

    def flush(self) -> None:
        """Put everything tallied since the last flush into the Prometheus series."""
        with self._flushing:
            with self._lock:
                taken = self._take()
            self._apply(*taken)

    def _apply(self, stages, sizes, examples, hits, misses, fallbacks, unseen, scores, runtimes) -> None:
        metrics = self.metrics
        for stage, values in stages.items():
            if values:
                observe_all(self._stage_seconds[stage], np.asarray(values, dtype=np.float64))
        for histogram, values in zip((metrics.batch_examples, metrics.batch_ids, metrics.batch_unique_ids), sizes):
            if values:
                observe_all(histogram, np.asarray(values, dtype=np.float64))
        for model, count in examples.items():
            metrics.examples.labels(model).inc(count)
        metrics.observe_tiers(TierCounts(hits=dict(hits), misses=dict(misses), redis_fallbacks=fallbacks[0]))
        for (model, feature), count in unseen.items():
            metrics.unseen.labels(model, feature).inc(count)
        for (model, version), (buckets, total) in scores.items():
            add_buckets(metrics.example_score.labels(model, version, "served"), buckets, total)
        for runtime in runtimes.values():
            metrics.value_cache_bytes.labels(runtime.name).set(runtime.encoder.cached_bytes())
            metrics.observe_memory(runtime)
