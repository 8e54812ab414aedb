"""Per model version, what the Open Inference Protocol's statistics extension reports (Triton's ``ModelStatistics``):
requests that succeeded or failed and their time in the engine, their time queued, their batches' compute time, and
batches by size.

Plain integers, kept apart from the Prometheus metrics because the protocol reports cumulative counts and
nanoseconds per version, which histograms do not keep. Each worker process counts what it served (``/metrics`` sums
workers; these do not). The engine counts requests on the event loop and the batcher counts batches where they run,
each into fields of its own, so no lock is taken on the hot path.

As Triton counts them: ``success``/``fail`` and ``queue`` once per request; ``compute_input`` (hash, lookup,
assemble), ``compute_infer`` (the dense network) and ``compute_output`` (splitting the scores among the batch's
requests) once per request with its batch's time; ``batch_stats`` once per batch, by its examples;
``inference_count`` examples scored and ``execution_count`` batches run.
"""

from __future__ import annotations

import time

from uembed.serving.pipeline.stages import BatchTimes

COMPUTE = ("compute_input", "compute_infer", "compute_output")


class Duration:
    """A count and the nanoseconds it took in all (the protocol's ``StatisticDuration``)."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9) * count

    def report(self) -> dict:
        return {"count": self.count, "ns": self.ns}


class VersionStatistics:
    """One model version's counters in this process."""

    def __init__(self) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute = {stage: Duration() for stage in COMPUTE}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, dict[str, Duration]] = {}  # examples in a batch -> its compute times

    def request(self, seconds: float, failed: bool) -> None:
        (self.fail if failed else self.success).add(seconds)
        if not failed:
            self.last_inference_ms = int(time.time() * 1000)

    def batch(self, times: BatchTimes, split_s: float, examples: int, requests: int) -> None:
        """A batch of ``requests`` scored ``examples`` in ``times`` and split its scores in ``split_s``."""
        spent = {"compute_input": times.hash + times.lookup + times.assemble, "compute_infer": times.dense,
                 "compute_output": split_s}  # fmt: skip
        by_size = self.batches.get(examples)
        if by_size is None:
            by_size = self.batches[examples] = {stage: Duration() for stage in COMPUTE}
        for stage, seconds in spent.items():
            self.compute[stage].add(seconds, requests)
            by_size[stage].add(seconds)
        self.inference_count += examples
        self.execution_count += 1

    def report(self, name: str, version: str) -> dict:
        """The protocol's statistics of one model version (JSON as Triton's REST answers it)."""
        empty = {"count": 0, "ns": 0}
        batches = sorted(dict(self.batches).items())  # a copy: the batch thread may add a size meanwhile
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.report(),
                "fail": self.fail.report(),
                "queue": self.queue.report(),
                **{stage: self.compute[stage].report() for stage in COMPUTE},
                "cache_hit": empty,  # no response cache
                "cache_miss": empty,
            },
            "batch_stats": [{"batch_size": size, **{stage: spent[stage].report() for stage in COMPUTE}}
                            for size, spent in batches],  # fmt: skip
            "memory_usage": [],
        }


class InferenceStatistics:
    """Every model version's counters in this process, by (model, version); a version's go when it is unloaded."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], VersionStatistics] = {}

    def of(self, name: str, version: str) -> VersionStatistics:
        counters = self.versions.get((name, version))
        if counters is None:  # the loop and the compute thread may both ask first: one object is kept
            counters = self.versions.setdefault((name, version), VersionStatistics())
        return counters

    def forget(self, name: str, version: str) -> None:
        self.versions.pop((name, version), None)
