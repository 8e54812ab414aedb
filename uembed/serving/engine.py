"""The scoring engine: loaded models, the micro-batcher, and reloads. No HTTP in here.

Requests are admitted through a bound (``max_queue_examples``), each with one future.
One batch loop takes what queued while the previous batch ran (plus ``max_wait_ms``),
up to ``max_batch_ids`` looked-up ids, and runs it on the one compute thread: one hash,
one dedupe and lookup per table, one dense call (two, for a network split by a context feature group:
``uembed/bundle/dense_split.py``). A failed batch fails its requests,
never the loop. The compute thread is the event loop's own on the CPU (``compute_on_event_loop``:
the batch runs between the loop's reads and writes, with no GIL to hand back and forth), else
one executor thread (the CUDA path, which waits on the device).

    engine = ScoringEngine(settings)
    engine.load(path)                     # validate, warm, make it the model's live (primary) version
    await engine.astart()
    scores, runtime = await engine.score([{"user_id": "196"}])
    scores, runtime = await engine.score([{"movie_id": "242"}, {"movie_id": "302"}], context={"user_id": "196"})
    await engine.add_version("movielens", "2")          # loaded beside the primary
    await engine.set_routing(Route("movielens", {"1": 90, "2": 10}, sticky_feature="user_id"))
    scores, runtime = await engine.score([{"user_id": "196"}], "movielens", version="2")   # pinned
    await engine.astop()                  # drains what was admitted

Several versions of a model may be loaded (``versions``); ``models`` holds each name's primary, which a request
naming no version gets unless the name has a routing rule (``uembed/serving/routing.py``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from uembed.bundle.loader import load_bundle
from uembed.contract.errors import (
    Conflict,
    DeadlineExceeded,
    Internal,
    InvalidName,
    NotFound,
    NotReady,
    Overloaded,
    UembedError,
    internal,
)
from uembed.serving.metrics import ServiceMetrics, remove_quietly
from uembed.serving.pipeline.cuda import open_runtime
from uembed.serving.pipeline.encoding import CanonicalExamples
from uembed.serving.pipeline.runtime import ModelRuntime
from uembed.serving.routing import Route, ShadowCopy, ShadowScorer
from uembed.serving.rows.redis import RedisTier
from uembed.serving.settings import ServiceSettings

log = logging.getLogger("uembed.engine")

__all__ = ["Conflict", "DeadlineExceeded", "NotFound", "NotReady", "Overloaded", "Route", "ScoringEngine", "check_name"]

# A model or version name becomes one path component under the bundle store: checked before any path is built.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"


def check_name(what: str, name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, name):
        raise InvalidName(f"{what}: {name[:40]!r}{'...' if len(name) > 40 else ''} is not a valid name ({NAME_RULE})")


@dataclass
class Pending:
    runtime: ModelRuntime
    examples: CanonicalExamples
    future: asyncio.Future
    admitted: float = field(default_factory=time.perf_counter)
    timed_out: bool = False  # else a done future still queued was cancelled: its client went away


class ScoringEngine:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.models: dict[str, ModelRuntime] = {}  # name -> its primary version
        self.versions: dict[str, dict[str, ModelRuntime]] = {}  # name -> version -> runtime, the primary among them
        self.routes: dict[str, Route] = {}
        self.shadow_runtimes: dict[str, ModelRuntime] = {}  # name -> the shadow version's own copy (shadow thread only)
        self.shadow = ShadowScorer(self.metrics, settings.shadow_queue)
        self.default_model: str | None = None
        self._batch_runtime: ModelRuntime | None = None
        self.redis = None
        if settings.redis_url:
            self.redis = RedisTier(
                settings.redis_url,
                timeout_s=settings.redis_timeout_ms / 1000,
                retry_s=settings.redis_retry_s,
                bucket_rows=settings.redis_bucket_rows,
                fill_queue=settings.redis_fill_queue,
            )
        self._files_observed = -float("inf")
        self.queue: deque[Pending] = deque()
        self.queued_examples = 0
        self.running = False
        self.closing = False
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._idle: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uembed-compute")
        # Batches (and row updates, between them) on the event loop's thread, or on the executor's one thread.
        # Not with Redis in the batch's path (a tier-2 read may wait up to its timeout): the loop would wait with it.
        self.batches_on_loop = (settings.compute_on_event_loop and settings.device == "cpu" and not settings.redis_url
                                and settings.row_source == "files")  # fmt: skip
        self._loop: asyncio.AbstractEventLoop | None = None
        self.updates = None
        if settings.row_updates_url:
            from uembed.serving.rows.updates import UpdateReader

            self.updates = UpdateReader(self, settings.row_updates_url, settings.redis_prefix, self.UPDATES_TIMEOUT_S)

    # --- models ---------------------------------------------------------------------------
    BACKGROUND_ROW_CHECKS_BYTES = 64 * 2**20
    UPDATES_TIMEOUT_S = 2.0  # socket timeout of the update stream's reads: entries can hold thousands of rows  # row files under this, in all, are checked before serving anyway

    def open(self, path: str | Path, defer_row_checks: bool = False) -> ModelRuntime:
        """Load and validate a bundle and score one example with it (not yet live). With ``defer_row_checks`` the
        row files' sha256 checks start on a thread and the model refuses to score (503) until they pass. With
        ``row_source=redis`` the bundle needs no row files and its check is its publication's completion marker
        (``uembed/serving/rows/published.py``): polled on a thread when deferred, else read once (unpublished: refused)."""
        rows_in_redis = self.settings.row_source == "redis"
        bundle = load_bundle(path, defer_row_checks=defer_row_checks, row_files=not rows_in_redis)
        if rows_in_redis:
            from uembed.serving.rows.published import PublicationCheck

            bundle.row_checks = PublicationCheck(self.redis, self.settings.redis_prefix, bundle)
            bundle.row_checks.start() if defer_row_checks else bundle.row_checks.wait()
        elif bundle.row_checks is not None:
            if bundle.row_checks.total_bytes < self.BACKGROUND_ROW_CHECKS_BYTES:
                bundle.row_checks.wait()  # small files: checked here, as fast as starting a thread
            else:
                bundle.row_checks.start()
        runtime = open_runtime(bundle, self.settings, self.redis)
        if not (rows_in_redis and defer_row_checks):  # rows perhaps not yet published: /readyz scores the first
            runtime.score_encoded(*runtime.hash([runtime.canonicalise([{}])]))
        runtime.encoder.take_unseen()
        if self.updates is not None:
            self.updates.replay(runtime)  # not live yet: its batches will see every update published so far
        if self.redis is not None:
            for store in runtime.stores:
                problem = self.redis.compact_encoding_problem(store.codec.record_bytes)
                if problem:
                    log.warning("%s", problem)
        return runtime

    def activate(self, runtime: ModelRuntime) -> None:
        """Make ``runtime`` its model's primary version; requests already admitted keep their version. The
        previous primary is unloaded (one version per name, as before several could be loaded) unless the
        model's routing rule still names it; its Redis keys stay (other replicas may still serve it)."""
        previous = self.models.get(runtime.name)
        self._attach(runtime)
        self.models[runtime.name] = runtime
        self.default_model = self.default_model or runtime.name
        route = self.routes.get(runtime.name)
        if previous is not None and previous is not runtime and previous.version != runtime.version:
            if route is None or previous.version not in route.versions():
                self._detach(previous)
        self._publish_shares(runtime.name)

    def _attach(self, runtime: ModelRuntime) -> None:
        """``runtime`` among its model's loaded versions (replacing a copy of the same version), with its series."""
        loaded = self.versions.setdefault(runtime.name, {})
        replaced = loaded.get(runtime.version)
        if replaced is not None:
            self.metrics.model_info.remove(replaced.name, replaced.version, replaced.plan.method, rows_dtype(replaced))
        loaded[runtime.version] = runtime
        self._files_observed = -float("inf")  # the next scrape reports the new version's files
        self.metrics.model_info.labels(runtime.name, runtime.version, runtime.plan.method, rows_dtype(runtime)).set(1)
        self.metrics.version_series(runtime.name, runtime.version)
        # Series that exist before their first event, so dashboards show 0 rather than "no data".
        self.metrics.reloads.labels(runtime.name, "ok")
        for spec in runtime.bundle.feature_specs.values():
            if spec.kind == "multivalent":
                self.metrics.truncated.labels(spec.name)
        for feature in runtime.encoder.known:
            self.metrics.unseen.labels(runtime.name, feature)
        self.metrics.start_update_series(runtime.name, runtime.version, [store.overlay.rows for store in runtime.stores],
                                         [store.table.name for store in runtime.stores])  # fmt: skip
        self._observe_memory(runtime)

    def _detach(self, runtime: ModelRuntime) -> None:
        """``runtime`` no longer loaded: its requests already admitted still finish on it."""
        loaded = self.versions.get(runtime.name, {})
        if loaded.get(runtime.version) is runtime:
            del loaded[runtime.version]
        remove_quietly(self.metrics.model_info, runtime.name, runtime.version, runtime.plan.method, rows_dtype(runtime))
        self.metrics.forget_version(runtime.name, runtime.version)
        self.metrics.forget_update_series(runtime.name, runtime.version)

    def _publish_shares(self, name: str) -> None:
        route = self.routes.get(name)
        for version in self.versions.get(name, {}):
            share = route.split.get(version, 0.0) if route else float(version == self.models[name].version)
            self.metrics.routing_share.labels(name, version).set(share)

    def load(self, path: str | Path) -> ModelRuntime:
        """Load a bundle at start-up (row checks per ``settings.row_checks``; with rows in Redis, the wait for their
        publication always in the background) and make it live."""
        defer = self.settings.row_checks == "background" or self.settings.row_source == "redis"
        runtime = self.open(path, defer_row_checks=defer)
        self.activate(runtime)
        log.info("serving %s version %s from %s", runtime.name, runtime.version, runtime.bundle.path)
        return runtime

    async def reload(self, name: str, version: str) -> ModelRuntime:
        """Load ``<bundle_store>/<name>/<version>`` off the batch thread, then make it the primary atomically (a
        version already loaded beside the primary is promoted without loading it again)."""
        path = self._bundle_path(name, version)
        async with self._reload_lock:
            loaded = self.versions.get(name, {}).get(version)
            if loaded is not None and loaded is not self.models.get(name):
                runtime = loaded  # loaded beside the primary and warm already: promoted as it is
            else:
                runtime = await self._open_version(name, path)
            self.activate(runtime)
            self.metrics.reloads.labels(name, "ok").inc()
            log.info("reloaded %s: now version %s", name, runtime.version)
            return runtime

    async def _open_version(self, name: str, path: Path) -> ModelRuntime:
        try:
            runtime = await asyncio.to_thread(self.open, path)
        except UembedError:
            self.metrics.reloads.labels(name, "refused").inc()
            raise
        if runtime.name != name:
            self.metrics.reloads.labels(name, "refused").inc()
            raise NotFound(f"bundle {path} is model {runtime.name!r}, not {name!r}")
        return runtime

    def _bundle_path(self, name: str, version: str) -> Path:
        check_name("name", name)
        check_name("version", version)
        root = Path(self.settings.bundle_store)
        path = root / name / version
        if not path.is_dir():
            self.metrics.reloads.labels(name if name in self.models else "unknown", "not_found").inc()
            raise NotFound(f"no bundle {name}/{version} under the bundle store {root}")
        if not self.running:
            raise NotReady("the engine is not running")
        return path

    async def add_version(self, name: str, version: str) -> ModelRuntime:
        """Load ``<bundle_store>/<name>/<version>`` beside the model's loaded versions, not primary (the first
        version of a name is its primary). A version already loaded is returned as it is."""
        path = self._bundle_path(name, version)
        async with self._reload_lock:
            loaded = self.versions.get(name, {}).get(version)
            if loaded is not None:
                return loaded
            runtime = await self._open_version(name, path)
            if name in self.models:
                self._attach(runtime)
                self._publish_shares(name)
            else:
                self.activate(runtime)
            self.metrics.reloads.labels(name, "ok").inc()
            log.info("loaded %s version %s beside %s", name, version, self.models[name].version)
            return runtime

    async def remove_version(self, name: str, version: str) -> tuple[ModelRuntime, int | None]:
        """Unload a version that is neither the primary nor in the routing rule (409 otherwise), wait for its
        admitted requests, then delete its rows from Redis: the number of keys deleted, or None where none were
        (no Redis; ``row_source=redis``, whose publication other replicas read, is kept)."""
        runtime = self.runtime(name, version, check=False)
        if runtime is self.models[name]:
            raise Conflict(f"version: {version} is the primary version of model {name}; make another primary first "
                           f"(POST /v1/models/{name}/load)")  # fmt: skip
        route = self.routes.get(name)
        if route is not None and version in route.versions():
            raise Conflict(f"version: the routing rule of model {name} sends requests to version {version}; "
                           f"change it first (PUT or DELETE /v1/models/{name}/routing)")  # fmt: skip
        async with self._reload_lock:
            self._detach(runtime)
            self._publish_shares(name)
            deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
            while (self._batch_runtime is runtime or any(p.runtime is runtime for p in self.queue)) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            log.info("unloaded %s version %s", name, version)
            if self.redis is None or self.settings.row_source == "redis":
                return runtime, None
            return runtime, await asyncio.to_thread(self._delete_rows, runtime)

    def _delete_rows(self, runtime: ModelRuntime) -> int:
        self.redis.flush()  # its write-backs still queued would bring keys back
        return sum(self.redis.delete_namespace(store.namespace) for store in runtime.stores)

    async def set_routing(self, route: Route) -> None:
        """Make ``route`` its model's rule: its versions must be loaded (404 naming the field). A shadow version
        gets a copy of its runtime of its own, opened here, which only the shadow thread scores with."""
        name = route.model
        loaded = self.versions.get(name)
        if not loaded:
            raise NotFound(f"model: no model {name!r} is loaded; loaded: {', '.join(self.models) or 'none'}")
        for version in route.split:
            if version not in loaded:
                raise NotFound(f"split.{version}: model {name} has no loaded version {version!r}; loaded: {', '.join(loaded)}")
        async with self._reload_lock:
            copy = None
            if route.shadow is not None:
                if route.shadow not in loaded:
                    raise NotFound(f"shadow: model {name} has no loaded version {route.shadow!r}; loaded: {', '.join(loaded)}")
                current = self.shadow_runtimes.get(name)
                serving = loaded[route.shadow]
                if current is not None and current.bundle is serving.bundle:
                    copy = current
                else:
                    copy = await asyncio.to_thread(open_runtime, serving.bundle, self.settings, self.redis)
            self.routes[name] = route
            if copy is None:
                self.shadow_runtimes.pop(name, None)
            else:
                self.shadow_runtimes[name] = copy
                if self.updates is not None and copy is not current:
                    # Caught up on the shadow thread, after it is registered: an update published while the copy
                    # was opened is in the stream (replayed here) or deferred behind this (positions skip repeats).
                    self.shadow.defer(partial(self.updates.replay, copy, counted=False))
                self.shadow.start()
            self._publish_shares(name)
            log.info("routing of %s: %s", name, route.describe())

    def clear_routing(self, name: str) -> None:
        """Back to the primary for every request naming no version."""
        if name not in self.models:
            raise NotFound(f"model: no model {name!r} is loaded; loaded: {', '.join(self.models) or 'none'}")
        self.routes.pop(name, None)
        self.shadow_runtimes.pop(name, None)
        self._publish_shares(name)

    def runtimes_for(self, name: str, version: str) -> list[ModelRuntime]:
        """Every loaded copy of ``name``/``version``: the one requests get, and the shadow thread's own copy when
        the version is its model's shadow (row updates go to each; the shadow copy is only scored on the shadow
        thread)."""
        out = [runtime for runtime in (self.versions.get(name, {}).get(version),) if runtime is not None]
        shadow = self.shadow_runtimes.get(name)
        if shadow is not None and shadow.version == version:
            out.append(shadow)
        return out

    def describe_routing(self) -> dict[str, dict]:
        return {name: route.describe() for name, route in self.routes.items()}

    def runtime(self, name: str | None, version: str | None = None, check: bool = True) -> ModelRuntime:
        """The primary version of ``name`` (None: the default model), or its loaded ``version``; ready to score
        unless ``check`` is False."""
        if not self.models:
            raise NotReady("no model is loaded")
        chosen = name or self.default_model
        if chosen not in self.models:
            raise NotFound(f"model: no model {name!r} is loaded; loaded: {', '.join(self.models)}")
        if version is None:
            runtime = self.models[chosen]
        else:
            runtime = self.versions[chosen].get(version)
            if runtime is None:
                raise NotFound(f"version: model {chosen} has no loaded version {version!r}; loaded: "
                               f"{', '.join(self.versions[chosen])}")  # fmt: skip
        if check:
            self._require_checked(runtime)
        return runtime

    def route(self, name: str | None, version: str | None, routing_key: str | None, examples: list,
              context: dict | None) -> tuple[ModelRuntime, Route | None]:  # fmt: skip
        """The runtime that scores a request, and its model's routing rule (None: none, or a version was named)."""
        route = self.routes.get(name or self.default_model) if version is None else None
        if route is None:
            return self.runtime(name, version), None
        return self.runtime(route.model, route.choose(route.point(route.key(routing_key, examples, context)))), route

    def served_versions(self) -> list[tuple[str, str]]:
        """(name, version) of every loaded model version: the row-update streams a replica follows."""
        return [(name, version) for name, loaded in list(self.versions.items()) for version in list(loaded)]

    def submit_updates(self, name: str, version: str, entries: list) -> Future:
        """Row updates (``uembed/serving/rows/updates.py`` entries, in stream order) to apply where batches run, between
        two batches: a batch sees each delta whole or not at all. The future completes once they are applied."""
        loop = self._loop
        if not self.batches_on_loop or loop is None or loop.is_closed():
            return self.executor.submit(self._apply_updates, name, version, entries)
        future: Future = Future()

        def apply() -> None:  # a loop callback: never in the middle of a batch, which runs without awaiting
            if not future.set_running_or_notify_cancel():
                return
            try:
                self._apply_updates(name, version, entries)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting reader, as the executor would
                future.set_exception(exc)
            else:
                future.set_result(None)

        loop.call_soon_threadsafe(apply)
        return future

    def _apply_updates(self, name: str, version: str, entries: list) -> None:
        from uembed.serving.rows.updates import apply_entries

        shadow = self.shadow_runtimes.get(name)
        for runtime in self.runtimes_for(name, version):
            if runtime is shadow:  # only the shadow thread touches its copy: applied there, before its next batch
                self.shadow.defer(partial(apply_entries, runtime, entries, self.metrics, counted=False))
            else:
                apply_entries(runtime, entries, self.metrics)

    @staticmethod
    def _require_checked(runtime: ModelRuntime) -> None:
        """A model whose row files are still being checked, or whose rows in Redis are not published yet, is not
        ready (503, retry); one whose check failed will not become ready (500: the log names the file, a reload
        of a good version replaces it)."""
        checks = runtime.bundle.row_checks
        if checks is None or checks.passed:
            return
        message = f"model {runtime.name} version {runtime.version}: {checks.what} {checks.describe()}"
        raise Internal(message) if checks.failed else NotReady(message)

    def loaded(self) -> list[ModelRuntime]:
        """Every loaded version of every model (the copies requests get)."""
        return [runtime for versions in list(self.versions.values()) for runtime in list(versions.values())]

    def describe(self) -> list[dict]:
        out = []
        for runtime in self.loaded():
            memory = runtime.memory_bytes()
            primary = self.models.get(runtime.name) is runtime
            out.append(
                {
                    "name": runtime.name,
                    "version": runtime.version,
                    "primary": primary,
                    "method": runtime.plan.method,
                    "default": primary and runtime.name == self.default_model,
                    "device": runtime.device,
                    "features": [spec.to_dict() | {"width": runtime.widths[spec.name]} for spec in runtime.bundle.feature_specs.values()],
                    "tables": [
                        {
                            "name": store.table.name,
                            "rows": store.table.rows,
                            "dim": store.table.dim,
                            "dtype": store.table.dtype,
                            "bytes": {**memory[store.table.name], "file": store.table.nbytes if store.table.files else 0},  # mapped
                            "hot_rows_capacity": store.hot.capacity if store.hot is not None else 0,
                            "hot_rows_on_device": store.hot_on_device,
                            "redis": self.redis is not None,
                        }
                        for store in runtime.stores
                    ],
                    "training": {k: runtime.bundle.manifest["training"].get(k) for k in ("dataset", "test_auc", "test_logloss")},
                    "row_checks": runtime.bundle.row_checks.describe() if runtime.bundle.row_checks else "passed",
                    "row_updates": self.updates.describe(runtime) if self.updates is not None else None,
                }
            )
        return out

    # --- lifecycle ------------------------------------------------------------------------
    async def astart(self) -> None:
        """Start the batch loop; a second call while it runs does nothing. A stopped engine does not start again."""
        if self.running:
            return
        if self.closing:
            raise NotReady("the engine was stopped; create a new one")
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._reload_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self.running = True
        if self.shadow_runtimes:
            self.shadow.start()
        self._loop_task = asyncio.create_task(self._batch_loop(), name="uembed-batch-loop")
        if self.updates is not None:
            self.updates.start()

    async def astop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new work, finish what was admitted, then stop the loop and the Redis filler. Idempotent;
        stopping an engine that never started releases its threads and Redis connections."""
        if self.closing:
            return
        self.closing = True
        self.shadow.stop()  # never waits for a shadow that hangs: its thread is a daemon
        if self.updates is not None:
            await asyncio.to_thread(self.updates.stop)  # before the executor it submits to
        if not self.running:
            self.executor.shutdown(wait=True)
            if self.redis is not None:
                self.redis.close()
            return
        deadline = time.monotonic() + drain_timeout_s
        while (self.queue or not self._idle.is_set()) and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        self.running = False
        self._wakeup.set()
        if self._loop_task is not None:
            await self._loop_task
        for pending in self.queue:
            if not pending.future.done():
                pending.future.set_exception(Overloaded("the service is shutting down"))
        self.executor.shutdown(wait=True)
        if self.redis is not None:
            self.redis.close()

    # --- scoring --------------------------------------------------------------------------
    async def score(
        self, examples: list[dict], model: str | None = None, context: dict | None = None, version: str | None = None,
        routing_key: str | None = None,
    ) -> tuple[np.ndarray, ModelRuntime]:
        """Scores of ``examples`` in order; with ``context``, the examples are a ranking request's candidates and the
        context's features (shared by all of them) are canonicalised and hashed once. ``version`` pins a loaded
        version; else the model's routing rule (keyed by ``routing_key`` or its sticky feature) or its primary."""
        if self.closing or not self.running:
            self.metrics.rejected.labels("shutting_down").inc()
            raise Overloaded("the service is shutting down")
        runtime, route = self.route(model, version, routing_key, examples, context)
        canonical = runtime.canonicalise(examples, context)
        for feature, count in canonical.truncated.items():
            self.metrics.truncated.labels(feature).inc(count)
        if self.queued_examples + canonical.count > self.settings.max_queue_examples and self.queue:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(
                f"{self.queued_examples} examples are already waiting (limit {self.settings.max_queue_examples}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending = Pending(runtime, canonical, future)
        self.queue.append(pending)
        self.queued_examples += canonical.count
        self.metrics.queue_examples.set(self.queued_examples)
        self._wakeup.set()
        # A timer on the future itself, not asyncio.wait_for: that wraps every request in a second future and a
        # callback, a loop step each, for a deadline that almost never fires.
        deadline = loop.call_later(self.settings.request_timeout_ms / 1000, self._expire, pending)
        try:
            scores = await future
        finally:
            deadline.cancel()
        self.metrics.version_seconds.labels(runtime.name, runtime.version, "served").observe(time.perf_counter() - pending.admitted)
        if route is not None and route.shadow is not None and route.shadow != runtime.version:
            self._offer_shadow(route, routing_key, examples, context, scores)
        return scores, runtime

    def _expire(self, pending: Pending) -> None:
        """A request's deadline passed before its batch answered it: it fails with a 504, and the batch loop skips it
        if it is still queued."""
        if pending.future.done():
            return
        pending.timed_out = True
        self.metrics.rejected.labels("deadline").inc()
        pending.future.set_exception(
            DeadlineExceeded(f"not scored within request_timeout_ms={self.settings.request_timeout_ms:g}")
        )

    def _offer_shadow(self, route: Route, routing_key: str | None, examples: list, context: dict | None,
                      scores: np.ndarray) -> None:  # fmt: skip
        shadow = self.shadow_runtimes.get(route.model)
        if shadow is None or shadow.version != route.shadow:
            return
        if route.shadow_fraction < 1 and route.point(route.key(routing_key, examples, context), lookup=1) >= route.shadow_fraction:
            return
        self.shadow.offer(ShadowCopy(shadow, examples, context, scores))

    def _take_batch(self) -> list[Pending]:
        """The oldest live request, and after it every queued request of the same model version up to max_batch_ids
        row ids looked up, as the batch will look them up: the features every request of it shares (ranking
        requests' contexts) once a request when the runtime splits them out, the rest once an example."""
        batch: list[Pending] = []
        skipped: deque[Pending] = deque()
        count, context = 0, None
        while self.queue:
            pending = self.queue.popleft()
            if pending.future.done():  # timed out or the client went away: its work is skipped
                self.queued_examples -= pending.examples.count
                self.metrics.abandoned.labels("deadline" if pending.timed_out else "cancelled").inc()
                continue
            runtime = pending.runtime
            shared = pending.examples.shared if runtime.splits_context else frozenset()
            joined = shared if context is None else context & shared
            if batch and (runtime is not batch[0].runtime or runtime.encoder.ids_looked_up(
                    count + pending.examples.count, len(batch) + 1, joined) > self.settings.max_batch_ids):  # fmt: skip
                skipped.append(pending)
                if runtime is batch[0].runtime:
                    break
                continue
            batch.append(pending)
            count, context = count + pending.examples.count, joined
            self.queued_examples -= pending.examples.count
        self.queue.extendleft(reversed(skipped))
        self.metrics.queue_examples.set(self.queued_examples)
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.settings.max_wait_ms / 1000
        while self.running or self.queue:
            if not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if wait_s:
                await asyncio.sleep(wait_s)
            batch = self._take_batch()
            if not batch:
                continue
            self._idle.clear()
            self._batch_runtime = batch[0].runtime
            started = time.perf_counter()
            for pending in batch:
                self.metrics.stage_seconds.labels("queue").observe(started - pending.admitted)
            try:
                if self.batches_on_loop:
                    results = self._run_batch(batch)
                else:
                    results = await loop.run_in_executor(self.executor, self._run_batch, batch)
            except Exception as exc:  # noqa: BLE001 - one bad batch fails its requests, never the loop
                log.exception("batch of %d requests failed", len(batch))
                error = internal(exc)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
            else:
                for pending, scores in zip(batch, results):
                    if not pending.future.done():
                        pending.future.set_result(scores)
            finally:
                self._batch_runtime = None
                self._idle.set()
            if self.batches_on_loop:
                # A batch ran without awaiting: hand the loop its replies, reads, timers and row updates before the
                # next one (without this, a queue of batches ran back to back and held every reply till the end).
                await asyncio.sleep(0)

    def _run_batch(self, batch: list[Pending]) -> list[np.ndarray]:
        """On the compute thread: hash, lookup, assemble, dense; timed per stage."""
        runtime = batch[0].runtime
        observe = self.metrics.stage_seconds
        t0 = time.perf_counter()
        parts = [p.examples for p in batch]
        split = runtime.hash_split(parts) if runtime.splits_context else None
        if split is None:
            rows, weights = runtime.hash(parts)
        t1 = time.perf_counter()
        if split is not None:  # ranking requests: their contexts' rows hashed and looked up once a request
            looked_up = runtime.lookup_split(split)
            t2 = time.perf_counter()
            # a dense network split by this context (uembed/bundle/dense_split.py): the context's part once a request
            embeddings = runtime.factored_inputs(split, *looked_up)
            if embeddings is None:
                embeddings = runtime.assemble_split(split, *looked_up)
            t3 = time.perf_counter()
            scores = runtime.dense(embeddings)
        elif runtime.torchscript is not None:
            scores = runtime.score_encoded(rows, weights)
            t2 = t3 = time.perf_counter()
        else:
            factored = runtime.lookup_factored(rows, weights)  # a dense network split by a context: its parts' inputs
            if factored is None:
                looked_up = runtime.lookup(rows)
            t2 = time.perf_counter()
            embeddings = runtime.assemble(looked_up, weights) if factored is None else factored
            t3 = time.perf_counter()
            scores = runtime.dense(embeddings)
        t4 = time.perf_counter()
        for stage, seconds in (("hash", t1 - t0), ("lookup", t2 - t1), ("assemble", t3 - t2), ("dense", t4 - t3)):
            observe.labels(stage).observe(seconds)
        examples = sum(p.count for p in parts)
        self.metrics.batch_examples.observe(examples)
        self.metrics.batch_ids.observe(rows.size if split is None else split.ids)
        self.metrics.examples.labels(runtime.name).inc(examples)
        unique = 0
        for store in runtime.stores:
            counts = store.take_counts()
            unique += sum(counts.hits.values())
            self.metrics.observe_tiers(counts)
        self.metrics.batch_unique_ids.observe(unique)
        if self.redis is not None:
            self.metrics.observe_redis(self.redis.error_counts, self.redis.fills_dropped)
        for feature, count in runtime.encoder.take_unseen().items():
            if count:
                self.metrics.unseen.labels(runtime.name, feature).inc(count)
        self.metrics.value_cache_bytes.labels(runtime.name).set(runtime.encoder.cached_bytes())
        self._observe_memory(runtime)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if scores.shape[0] != examples:
            # A dense net that returns the wrong shape must not hand one request another's scores.
            raise Internal(f"the dense network returned {scores.shape[0]} scores for {examples} examples")
        self.metrics.observe_all(self.metrics.example_score.labels(runtime.name, runtime.version, "served"), scores)
        return np.split(scores, np.cumsum([p.count for p in parts])[:-1])

    def _observe_memory(self, runtime: ModelRuntime) -> None:
        for table, tiers in runtime.memory_bytes().items():
            for tier, value in tiers.items():
                self.metrics.table_memory.labels(runtime.name, table, tier).set(value)

    FILE_BYTES_EVERY_S = 5.0

    def observe_files(self) -> None:
        """The gauges read when /metrics is: every live model's row-check state, its row files' mapped and
        resident bytes and tier 1's index bytes, at most every FILE_BYTES_EVERY_S (a mincore pass over a
        100 M-row table takes tenths of a second: run it off the event loop)."""
        now = time.monotonic()
        if now - self._files_observed < self.FILE_BYTES_EVERY_S:
            return
        self._files_observed = now
        for runtime in self.loaded():
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

    async def ready(self) -> ModelRuntime:
        """Ready when every loaded model's row files passed their checks and one example goes through the
        batcher and back."""
        for runtime in list(self.models.values()):
            self._require_checked(runtime)
        _, runtime = await self.score([{}])
        return runtime


def rows_dtype(runtime: ModelRuntime) -> str:
    return next(iter(runtime.bundle.tables.values())).dtype if runtime.bundle.tables else "none"
