"""Each worker's own vitals, for a dashboard to draw: its anonymous resident memory (a gauge a worker) and the
objects Python's cycle collector has freed (a counter). A worker that grows under steady traffic shows in the
first; a count that rises with the traffic shows in the second, and means requests leave reference cycles, whose
memory waits for a collection (rare in this service: ``gc_gen0_threshold``).

The memory is the anonymous part of the resident set (heap, Python objects, buffers), not the mapped row files or
libraries, which are shared and the page cache's: a worker that keeps what it should free grows there.

prometheus_client's process and GC collectors cannot serve several workers (its multiprocess mode reads only the
series the workers write to their files), so each worker sets these itself (its memory one series a live worker,
a ``pid`` label with several workers): whenever its registry is read, and every ``REFRESH_S`` on its event loop
(:meth:`WorkerVitals.keep_fresh`, from the app's lifespan), so a scrape another worker answers sees an idle
worker's values as current as a busy one's.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge

REFRESH_S = 5.0
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def anonymous_resident_bytes() -> int | None:
    """This process's resident anonymous memory: /proc/self/statm's resident pages less its shared (file-backed)
    ones. None where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read().split()
        return (int(fields[1]) - int(fields[2])) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


class WorkerVitals:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.anonymous = Gauge(
            "uembed_worker_anonymous_memory_bytes",
            "Resident anonymous memory of each worker process (heap, objects, buffers; not the mapped row files).",
            registry=registry, multiprocess_mode="liveall",
        )  # fmt: skip
        self.collected = Counter(
            "uembed_gc_collected_objects_total",
            "Objects Python's cycle collector has freed, by generation (summed over workers): a rate that follows "
            "the traffic means requests leave reference cycles.",
            ["generation"], registry=registry,
        )  # fmt: skip
        self._generations = [self.collected.labels(str(generation)) for generation in range(len(gc.get_stats()))]
        self._lock = threading.Lock()  # updated from the event loop and from any thread that reads the registry
        self._timer: asyncio.TimerHandle | None = None
        self.rebase()

    def keep_fresh(self, loop: asyncio.AbstractEventLoop, every_s: float = REFRESH_S) -> None:
        """Update every ``every_s`` on ``loop`` until :meth:`stop`."""
        self.stop()
        self._timer = loop.call_later(every_s, self._refresh, loop, every_s)

    def _refresh(self, loop: asyncio.AbstractEventLoop, every_s: float) -> None:
        self._timer = loop.call_later(every_s, self._refresh, loop, every_s)  # first: a failed update stops nothing
        self.update()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def rebase(self) -> None:
        """Count the collections from now on (the service's start, loading its bundles, is not its traffic)."""
        with self._lock:
            self._counted = [stats["collected"] for stats in gc.get_stats()]

    def update(self) -> None:
        memory = anonymous_resident_bytes()
        if memory is not None:
            self.anonymous.set(memory)
        with self._lock:
            for generation, stats in enumerate(gc.get_stats()):
                if stats["collected"] > self._counted[generation]:
                    self._generations[generation].inc(stats["collected"] - self._counted[generation])
                    self._counted[generation] = stats["collected"]
