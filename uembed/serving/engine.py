"""The scoring engine: the registry of loaded model versions (``registry.py``) and the batcher (``batcher.py``),
wired together with tier 2's connection and the row-update reader. No HTTP in here.

    engine = ScoringEngine(settings)
    engine.registry.load(path)            # validate, warm, make it the model's live (primary) version
    await engine.astart()
    scores, runtime = await engine.score([{"user_id": "196"}])
    scores, runtime = await engine.score([{"movie_id": "242"}, {"movie_id": "302"}], context={"user_id": "196"})
    target = engine.resolve("movielens", None, None, examples, None)   # a front resolves once ...
    scores = await engine.score_resolved(target, examples)             # ... and scores what it resolved
    await engine.astop()                  # drains what was admitted

A request is resolved to one model version once (its inputs are checked against that version and scored by it),
canonicalised on the event loop (per request), admitted to the batcher, and scored in a batch of requests of the same
version; a routing rule's shadow version gets a copy afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import numpy as np

from uembed.contract.errors import Overloaded
from uembed.serving.batcher import Batcher
from uembed.serving.desired import (
    STATE_FILE,
    DesiredState,
    FileStates,
    RedisStates,
    added,
    made_primary,
    removed,
    routed,
)
from uembed.serving.metrics import ServiceMetrics
from uembed.serving.pipeline.canonical import CanonicalExamples, ExampleColumns
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.registry import ModelRegistry, Target
from uembed.serving.routing import Route, ShadowCopy
from uembed.serving.rows.redis import RedisTier, redis_client
from uembed.serving.rows.updates import UpdateReader, apply_entries
from uembed.serving.settings import ServiceSettings
from uembed.serving.statistics import InferenceStatistics

# values (examples x features, or a request's tensor elements) from which a request is decoded beside the loop
OFF_LOOP_VALUES = 4096

log = logging.getLogger("uembed.engine")


class ScoringEngine:
    UPDATES_TIMEOUT_S = 2.0  # socket timeout of the update stream's reads: entries can hold thousands of rows

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.redis = None
        if settings.redis_url:
            self.redis = RedisTier(
                settings.redis_url,
                timeout_s=settings.redis_timeout_ms / 1000,
                retry_s=settings.redis_retry_s,
                bucket_rows=settings.redis_bucket_rows,
                fill_queue=settings.redis_fill_queue,
            )
        self.registry = ModelRegistry(settings, self.metrics, self.redis)
        self.stats = InferenceStatistics()  # the Open Inference Protocol's statistics, per version
        self.batcher = Batcher(settings, self.metrics, self.redis, self.stats)
        self.updates = None
        if settings.row_updates_url:
            self.updates = UpdateReader(self, settings.row_updates_url, settings.redis_prefix, self.UPDATES_TIMEOUT_S)
        self.registry.updates = self.updates
        if settings.redis_url:
            states = RedisStates(redis_client(settings.redis_url, self.UPDATES_TIMEOUT_S, retries=1), settings.redis_prefix)
        else:
            states = FileStates(settings.desired_state_file or Path(settings.bundle_store) / STATE_FILE)
        self.desired = DesiredState(self.registry, self.metrics, states, settings.desired_state_poll_s,
                                    partial(self.remove_version, delete_rows=False))  # fmt: skip
        self._files_observed = (-float("inf"), -1)  # when, and the registry's generation then

    @property
    def running(self) -> bool:
        return self.batcher.running

    # --- lifecycle ------------------------------------------------------------------------
    async def astart(self) -> None:
        """Start the batch loop (and the shadow thread and the update reader); a second call while it runs does
        nothing. A stopped engine does not start again."""
        if self.batcher.running:
            return
        await self.batcher.start()
        self.registry.accepting = True
        await self.desired.start()  # before this worker serves: a respawned worker comes back as the others are
        if self.registry.shadow_runtimes:
            self.registry.shadow.start()
        if self.updates is not None:
            self.updates.start()

    async def astop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new work, finish what was admitted, then stop the loop and the Redis filler. Idempotent;
        stopping an engine that never started releases its threads and Redis connections."""
        if self.batcher.closing:
            return
        self.batcher.closing = True
        await self.desired.stop()
        self.registry.shadow.stop()  # never waits for a shadow that hangs: its thread is a daemon
        if self.updates is not None:
            await asyncio.to_thread(self.updates.stop)  # before the executor it submits to
        await self.batcher.stop(drain_timeout_s)
        self.registry.accepting = False  # versions may be loaded by name until the drain is over, as before
        if self.redis is not None:
            self.redis.close()

    # --- scoring --------------------------------------------------------------------------
    def resolve(self, model: str | None = None, version: str | None = None, routing_key: str | None = None,
                examples: list | None = None, context: dict | None = None) -> Target:  # fmt: skip
        """The model version a request is scored by: ``version`` pins a loaded version; else the model's routing rule
        (keyed by ``routing_key`` or its sticky feature in ``examples``/``context``) or its primary. A front resolves
        once and checks its inputs against ``target.runtime``."""
        if self.batcher.closing or not self.batcher.running:
            self.metrics.rejected.labels("shutting_down").inc()
            raise Overloaded("the service is shutting down")
        return self.registry.resolve(model, version, routing_key, examples or [], context)

    async def score(
        self, examples: list[dict], model: str | None = None, context: dict | None = None, version: str | None = None,
        routing_key: str | None = None,
    ) -> tuple[np.ndarray, ModelRuntime]:
        """Scores of ``examples`` in order, and the runtime that scored them; with ``context``, the examples are a
        ranking request's candidates and the context's features (shared by all of them) are canonicalised and
        hashed once."""
        target = self.resolve(model, version, routing_key, examples, context)
        return await self.score_resolved(target, examples, context), target.runtime

    async def decoded(self, values: int, work, *args):
        """``work(*args)``: a request's decoding (reading its tensors, canonicalising its values), for a request of
        ``values`` values. A small one is decoded on the loop, where a thread's hand-off would cost more than the
        work; a large one on a thread beside it, so that the loop answers health probes and other requests
        meanwhile. The value caches it fills are also filled by the shadow thread: their entries are whole values."""
        if values < OFF_LOOP_VALUES:
            return work(*args)
        return await asyncio.to_thread(work, *args)

    async def score_resolved(self, target: Target, examples, context: dict | None = None,
                             canonical: CanonicalExamples | None = None, owned: bool = False) -> np.ndarray:  # fmt: skip
        """Scores of a request already resolved to ``target``: its examples (rows, or a front's columns) and context.
        ``canonical``: its examples already canonicalised by ``target.runtime`` (a front that decodes straight into
        columns); else they are canonicalised here. ``owned``: the examples list is this request's alone (decoded
        from its body), emptied once canonicalised unless a shadow version will score a copy of it."""
        if self.batcher.closing or not self.batcher.running:
            self.metrics.rejected.labels("shutting_down").inc()
            raise Overloaded("the service is shutting down")
        runtime = target.runtime
        if canonical is None:
            values = len(examples) * len(runtime.bundle.feature_specs)
            canonical = await self.decoded(values, runtime.canonicalise, examples, context)
            if owned and not target.shadowed:
                # Freed now, not when the batch answers: the requests waiting for a batch then hold only their
                # canonical values, and the next request's decoding reuses memory still in the cache.
                if type(examples) is list:
                    examples.clear()
                elif type(examples) is ExampleColumns:  # each list emptied, not dropped: read again, it fails loudly
                    for column in examples.columns.values():
                        if type(column) is list:
                            column.clear()
        for feature, count in canonical.truncated.items():
            self.metrics.truncated.labels(feature).inc(count)
        for feature, count in canonical.missing.items():
            self.metrics.missing.labels(runtime.name, feature).inc(count)
        counters = self.stats.of(runtime.name, runtime.version)
        entered = time.perf_counter()
        try:
            scores, admitted = await self.batcher.score(runtime, canonical)
        except BaseException:
            counters.request(time.perf_counter() - entered, failed=True)
            raise
        counters.request(time.perf_counter() - entered, failed=False)
        self.metrics.version_seconds.labels(runtime.name, runtime.version, "served").observe(time.perf_counter() - admitted)
        if target.shadowed:
            self._offer_shadow(target, examples, context, scores)
        return scores

    def _offer_shadow(self, target: Target, examples: list, context: dict | None, scores: np.ndarray) -> None:
        route = target.route
        shadow = self.registry.shadow_runtimes.get(route.model)
        if shadow is None or shadow.version != route.shadow:
            return
        if route.shadow_fraction < 1 and route.point(target.key, lookup=1) >= route.shadow_fraction:
            return
        self.registry.shadow.offer(ShadowCopy(shadow, examples, context, scores))

    async def ready(self) -> ModelRuntime:
        """Ready when every loaded model's row files passed their checks and one example goes through the
        batcher and back."""
        for runtime in list(self.registry.models.values()):
            self.registry.require_checked(runtime)
        target = self.resolve()
        # every feature given (as null), so the probe counts as no client's missing feature and passes
        # require_features
        await self.score_resolved(target, [dict.fromkeys(target.runtime.bundle.feature_specs)])
        return target.runtime

    FILE_BYTES_EVERY_S = 5.0

    def observe_files(self) -> None:
        """The gauges read when /metrics is: every live model's row-check state, its row files' mapped and resident
        bytes and tier 1's index bytes, at most every FILE_BYTES_EVERY_S unless a version was loaded since (a mincore
        pass over a large table is slow: the scrape runs it off the event loop)."""
        now, generation = time.monotonic(), self.registry.generation
        last, last_generation = self._files_observed
        if now - last < self.FILE_BYTES_EVERY_S and generation == last_generation:
            return
        self._files_observed = (now, generation)
        for runtime in self.registry.loaded():
            checks = runtime.bundle.row_checks
            state = 1 if checks is None or checks.passed else (-1 if checks.failed else 0)
            self.metrics.row_checks.labels(runtime.name, runtime.version).set(state)
            try:
                for table, states in runtime.file_bytes().items():
                    for name, value in states.items():
                        self.metrics.table_file.labels(runtime.name, table, name).set(value)
                for table, value in runtime.index_bytes().items():
                    self.metrics.table_memory.labels(runtime.name, table, "index").set(value)
            except OSError as exc:  # a failed mincore must not cost the scrape every other metric
                log.warning("measuring the row files of %s failed: %s", runtime.name, exc)

    # --- versions: what needs both the registry and the batcher -----------------------------
    # The admin calls: applied here, then recorded in the desired state that every worker and replica follows.
    async def load(self, name: str, version: str) -> ModelRuntime:
        return await self.desired.admin(name, self.registry.reload(name, version), partial(made_primary, version=version))

    async def add_version(self, name: str, version: str) -> ModelRuntime:
        return await self.desired.admin(name, self.registry.add_version(name, version), partial(added, version=version))

    async def unload_version(self, name: str, version: str) -> tuple[ModelRuntime, int | None]:
        return await self.desired.admin(name, self.remove_version(name, version), partial(removed, version=version))

    async def set_routing(self, route: Route) -> None:
        await self.desired.admin(route.model, self.registry.set_routing(route), partial(routed, routing=route.describe()))

    async def clear_routing(self, name: str) -> None:
        async def clear() -> None:
            self.registry.clear_routing(name)

        await self.desired.admin(name, clear(), partial(routed, routing=None))

    async def remove_version(self, name: str, version: str, delete_rows: bool = True) -> tuple[ModelRuntime, int | None]:
        """Unload a version that is neither the primary nor in the routing rule (409 otherwise), wait for its
        admitted requests, then delete its rows from Redis: the number of keys deleted, or None where none were
        (no Redis; ``row_source=redis``, whose publication other replicas read, is kept; ``delete_rows`` False: a
        worker following another's call, which deleted them)."""
        runtime = self.registry.removable(name, version)
        async with self.registry.lock:
            self.registry.unload(runtime)
            self.stats.forget(name, version)
            deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
            while self.batcher.holds(runtime) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if not delete_rows:
                return runtime, None
            return runtime, await asyncio.to_thread(self.registry.delete_rows, runtime)

    def submit_updates(self, name: str, version: str, entries: list) -> Future:
        """Row updates (``uembed/serving/rows/updates.py`` entries, in stream order) to apply where batches run,
        between two batches: a batch sees each delta whole or not at all. The future completes once they are
        applied."""
        return self.batcher.between_batches(partial(self._apply_updates, name, version, entries))

    def _apply_updates(self, name: str, version: str, entries: list) -> None:
        shadow = self.registry.shadow_runtimes.get(name)
        for runtime in self.registry.runtimes_for(name, version):
            if runtime is shadow:  # only the shadow thread touches its copy: applied there, before its next batch
                self.registry.shadow.defer(partial(apply_entries, runtime, entries, self.metrics, counted=False))
            else:
                apply_entries(runtime, entries, self.metrics)
