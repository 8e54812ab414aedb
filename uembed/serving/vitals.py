"""Each worker's own vitals, for a dashboard to draw: its resident memory (a gauge a worker), and the objects
Python's cycle collector has freed (a counter). A worker that grows under steady traffic shows here first; a count of collected objects
that rises with the traffic says requests leave reference cycles, whose memory waits for a collection (rare in this
service: ``gc_gen0_threshold``).

prometheus_client's process and GC collectors cannot serve several workers (its multiprocess mode reads only the
series the workers write to their files), so each worker sets these itself (its memory one series a live worker,
``pid`` label with several workers): whenever its registry is read and after its batches' metrics are flushed
(``metrics_tally.py``). An idle worker's values are those of its last read or batch.
"""

from __future__ import annotations

import gc
import os

from prometheus_client import CollectorRegistry, Counter, Gauge

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident set size, from /proc/self/statm (None where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


class WorkerVitals:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.resident = Gauge(
            "uembed_worker_resident_memory_bytes", "Resident memory (RSS) of each worker process.",
            registry=registry, multiprocess_mode="liveall",
        )  # fmt: skip
        self.collected = Counter(
            "uembed_gc_collected_objects",
            "Objects Python's cycle collector has freed, by generation (summed over workers): a rate that follows "
            "the traffic means requests leave reference cycles.",
            ["generation"], registry=registry,
        )  # fmt: skip
        self._generations = [self.collected.labels(str(generation)) for generation in range(len(gc.get_stats()))]
        self._counted = [stats["collected"] for stats in gc.get_stats()]  # before this: the start's own collections

    def update(self) -> None:
        rss = resident_bytes()
        if rss is not None:
            self.resident.set(rss)
        for generation, stats in enumerate(gc.get_stats()):
            if stats["collected"] > self._counted[generation]:
                self._generations[generation].inc(stats["collected"] - self._counted[generation])
                self._counted[generation] = stats["collected"]
