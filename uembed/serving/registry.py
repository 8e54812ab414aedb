"""The model versions this process has loaded, and which one a request gets. No batching and no HTTP in here.

    registry = ModelRegistry(settings, metrics, redis)
    registry.load(path)                                   # validate, warm, make it its model's primary version
    await registry.add_version("movielens", "2")          # beside the primary
    await registry.set_routing(Route("movielens", {"1": 90, "2": 10}, sticky_feature="user_id"))
    target = registry.resolve("movielens", None, None, examples, context)   # once per request, by its front

Several versions of a model may be loaded (``versions``); ``models`` holds each name's primary, which a request
naming no version gets unless the name has a routing rule (``uembed/serving/routing.py``). A shadow version gets a
copy of its runtime of its own, scored only on the shadow thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from uembed.bundle.loader import filing, load_bundle
from uembed.contract.errors import Conflict, Internal, InvalidName, NotFound, NotReady, UembedError, ValidationFailed
from uembed.contract.hashing import hashing_backend
from uembed.serving.metrics import ServiceMetrics
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.runtimes import open_runtime
from uembed.serving.routing import Route, ShadowScorer
from uembed.serving.rows.published import PublicationCheck
from uembed.serving.rows.redis import RedisTier
from uembed.serving.settings import ServiceSettings

log = logging.getLogger("uembed.registry")

# A model or version name becomes one path component under the bundle store: checked before any path is built. The
# fronts take feature names up to the same length.
MAX_NAME_CHARS = 128
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}$"
NAME_RULE = f"1 to {MAX_NAME_CHARS} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"


def check_name(what: str, name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, name):
        raise InvalidName(f"{what}: {name[:40]!r}{'...' if len(name) > 40 else ''} is not a valid name ({NAME_RULE})")


@dataclass(frozen=True)
class Target:
    """What a request was resolved to, once, by its front: the runtime that scores it (its inputs are checked
    against this runtime's features, and it scores them) and its model's routing rule (None: the model has none, or
    the request named a version), which decides whether a shadow copy is offered."""

    runtime: ModelRuntime
    route: Route | None = None
    key: object = None  # the request's routing key (its sticky feature's value), where its model has a rule

    @property
    def shadowed(self) -> bool:
        """Whether a shadow version may score a copy of the request (its model's rule names another version)."""
        route = self.route
        return route is not None and route.shadow is not None and route.shadow != self.runtime.version


class ModelRegistry:
    BACKGROUND_ROW_CHECKS_BYTES = 64 * 2**20  # row files under this, in all, are checked before serving anyway

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics, redis: RedisTier | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.redis = redis
        self.models: dict[str, ModelRuntime] = {}  # name -> its primary version
        self.versions: dict[str, dict[str, ModelRuntime]] = {}  # name -> version -> runtime, the primary among them
        self.routes: dict[str, Route] = {}
        self.shadow_runtimes: dict[str, ModelRuntime] = {}  # name -> the shadow version's own copy (shadow thread only)
        self.shadow = ShadowScorer(metrics, settings.shadow_queue)
        self.default_model: str | None = None
        self.updates = None  # the row-update reader (uembed/serving/rows/updates.py), where the engine has one
        self.accepting = False  # whether versions may be loaded by name (the engine is running)
        self.lock = asyncio.Lock()  # one load, unload or routing change at a time
        self.generation = 0  # how many versions were attached so far

    def open(self, path: str | Path, defer_row_checks: bool = False, filed_as: tuple[str, str] | None = None) -> ModelRuntime:
        """Load and validate a bundle and score one example with it (not yet live). With ``defer_row_checks`` the
        row files' sha256 checks start on a thread and the model refuses to score (503) until they pass. With
        ``row_source=redis`` the bundle needs no row files and its check is its publication's completion marker
        (``uembed/serving/rows/published.py``): polled on a thread when deferred, else read once (unpublished: refused). ``filed_as``: the
        (name, version) a bundle store files it as, which its manifest must name (422 naming both otherwise)."""
        rows_in_redis = self.settings.row_source == "redis"
        bundle = load_bundle(path, defer_row_checks=defer_row_checks, row_files=not rows_in_redis, filed_as=filed_as,
                             verify=self.settings.verify_rows)
        if rows_in_redis:
            bundle.row_checks = PublicationCheck(self.redis, self.settings.redis_prefix, bundle)
            bundle.row_checks.start() if defer_row_checks else bundle.row_checks.wait()
        elif bundle.row_checks is not None:
            if bundle.row_checks.total_bytes < self.BACKGROUND_ROW_CHECKS_BYTES:
                bundle.row_checks.wait()  # small files: checked here, as fast as starting a thread
            else:
                bundle.row_checks.start()
        runtime = open_runtime(bundle, self.settings, self.redis)
        if not (rows_in_redis and defer_row_checks):  # rows perhaps not yet published: /readyz scores the first
            runtime.score_batch([runtime.canonicalise([dict.fromkeys(runtime.bundle.feature_specs)])])
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
        self.metrics.version_loaded(runtime, replaced=loaded.get(runtime.version))
        loaded[runtime.version] = runtime
        self.generation += 1  # the next scrape reports its files
        self.metrics.observe_memory(runtime)

    def _detach(self, runtime: ModelRuntime) -> None:
        """``runtime`` no longer loaded: its requests already admitted still finish on it."""
        loaded = self.versions.get(runtime.name, {})
        if loaded.get(runtime.version) is runtime:
            del loaded[runtime.version]
        self.metrics.version_unloaded(runtime)

    def _publish_shares(self, name: str) -> None:
        route = self.routes.get(name)
        for version in self.versions.get(name, {}):
            share = route.split.get(version, 0.0) if route else float(version == self.models[name].version)
            self.metrics.routing_share.labels(name, version).set(share)

    def load(self, path: str | Path) -> ModelRuntime:
        """Load a bundle at start-up (row checks per ``settings.row_checks``; with rows in Redis, the wait for their
        publication always in the background) and make it live."""
        defer = self.settings.row_checks == "background" or self.settings.row_source == "redis"
        runtime = self.open(path, defer_row_checks=defer, filed_as=filing(path, self.settings.bundle_store))
        self.activate(runtime)
        log.info("serving %s version %s from %s (hashing: %s)", runtime.name, runtime.version, runtime.bundle.path,
                 hashing_backend())
        return runtime

    async def reload(self, name: str, version: str) -> ModelRuntime:
        """Load ``<bundle_store>/<name>/<version>`` off the batch thread, then make it the primary atomically (a
        version already loaded beside the primary is promoted without loading it again)."""
        path = self._bundle_path(name, version)
        async with self.lock:
            loaded = self.versions.get(name, {}).get(version)
            if loaded is not None and loaded is not self.models.get(name):
                runtime = loaded  # loaded beside the primary and warm already: promoted as it is
            else:
                runtime = await self._open_version(name, version, path)
            self.activate(runtime)
            self.metrics.reloads.labels(name, "ok").inc()
            log.info("reloaded %s: now version %s", name, runtime.version)
            return runtime

    async def _open_version(self, name: str, version: str, path: Path) -> ModelRuntime:
        try:
            return await asyncio.to_thread(self.open, path, False, (name, version))
        except UembedError:
            self.metrics.reloads.labels(name, "refused").inc()
            raise

    def _bundle_path(self, name: str, version: str) -> Path:
        check_name("name", name)
        check_name("version", version)
        root = Path(self.settings.bundle_store)
        path = root / name / version
        if not path.is_dir():
            self.metrics.reloads.labels(name if name in self.models else "unknown", "not_found").inc()
            raise NotFound(f"no bundle {name}/{version} under the bundle store {root}")
        if not self.accepting:
            raise NotReady("the engine is not running")
        return path

    async def add_version(self, name: str, version: str) -> ModelRuntime:
        """Load ``<bundle_store>/<name>/<version>`` beside the model's loaded versions, not primary (the first
        version of a name is its primary). A version already loaded is returned as it is."""
        path = self._bundle_path(name, version)
        async with self.lock:
            loaded = self.versions.get(name, {}).get(version)
            if loaded is not None:
                return loaded
            runtime = await self._open_version(name, version, path)
            if name in self.models:
                self._attach(runtime)
                self._publish_shares(name)
            else:
                self.activate(runtime)
            self.metrics.reloads.labels(name, "ok").inc()
            log.info("loaded %s version %s beside %s", name, version, self.models[name].version)
            return runtime

    def removable(self, name: str, version: str) -> ModelRuntime:
        """The loaded ``version`` of ``name`` if it may be unloaded: neither the primary nor in the routing rule
        (409 otherwise)."""
        runtime = self.runtime(name, version, check=False)
        if version == self.models[name].version:
            raise Conflict(f"version: {version} is the primary version of model {name}; make another primary first "
                           f"(POST /v1/models/{name}/load)")  # fmt: skip
        route = self.routes.get(name)
        if route is not None and version in route.versions():
            raise Conflict(f"version: the routing rule of model {name} sends requests to version {version}; "
                           f"change it first (PUT or DELETE /v1/models/{name}/routing)")  # fmt: skip
        return runtime

    def unload(self, runtime: ModelRuntime) -> None:
        """``runtime`` no longer among its model's versions; requests already admitted still finish on it."""
        self._detach(runtime)
        self._publish_shares(runtime.name)
        log.info("unloaded %s version %s", runtime.name, runtime.version)

    def delete_rows(self, runtime: ModelRuntime) -> int | None:
        """An unloaded version's rows deleted from Redis: the number of keys, or None where none are (no Redis;
        ``row_source=redis``, whose publication other replicas read, is kept). Blocks: call it off the loop."""
        if self.redis is None or self.settings.row_source == "redis":
            return None
        self.redis.flush()  # its write-backs still queued would bring keys back
        return sum(self.redis.delete_namespace(store.namespace) for store in runtime.stores)

    async def set_routing(self, route: Route) -> None:
        """Make ``route`` its model's rule: its versions must be loaded (404 naming the field). A shadow version
        gets a copy of its runtime of its own, opened here, which only the shadow thread scores with."""
        name = route.model
        loaded = self.versions.get(name)
        if not loaded:
            raise self.not_loaded("model", name)
        for version in route.split:
            if version not in loaded:
                raise self.not_loaded(f"split.{version}", name, version)
        if route.shadow is not None and route.shadow not in loaded:
            raise self.not_loaded("shadow", name, route.shadow)
        self.check_sticky(route, loaded)
        async with self.lock:
            copy = None
            if route.shadow is not None:
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

    @staticmethod
    def check_sticky(route: Route, loaded: dict[str, ModelRuntime]) -> None:
        """A rule's sticky feature gives every request one routing key: it must be a one-value feature of every
        version the rule names (a list feature would refuse every request, an unknown one would never be sent)."""
        feature = route.sticky_feature
        if feature is None:
            return
        for version in sorted(set(route.split) | ({route.shadow} if route.shadow else set())):
            specs = loaded[version].bundle.feature_specs
            spec = specs.get(feature)
            if spec is None or spec.multivalent:
                scalars = ", ".join(n for n, s in specs.items() if not s.multivalent)
                what = "has no feature" if spec is None else "takes a list for"
                raise ValidationFailed(f"sticky_feature: version {version} of model {route.model} {what} {feature!r}; "
                                       f"a routing key takes one value, from one of its one-value features: {scalars}")  # fmt: skip

    def clear_routing(self, name: str) -> None:
        """Back to the primary for every request naming no version."""
        if name not in self.models:
            raise self.not_loaded("model", name)
        self.routes.pop(name, None)
        self.shadow_runtimes.pop(name, None)
        self._publish_shares(name)

    def runtimes_for(self, name: str, version: str) -> list[ModelRuntime]:
        """Every loaded copy of ``name``/``version``: the one requests get, and the shadow thread's own copy when the
        version is its model's shadow (row updates go to each; only the shadow thread scores its copy)."""
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
        runtime = self.find(name or self.default_model, version)
        if check:
            self.require_checked(runtime)
        return runtime

    def find(self, name: str, version: str | None = None) -> ModelRuntime:
        """The loaded ``version`` of ``name``, or its primary, ready or not (404 when it is not loaded)."""
        if name not in self.models:
            raise self.not_loaded("model", name)
        if version is None:
            return self.models[name]
        runtime = self.versions[name].get(version)
        if runtime is None:
            raise self.not_loaded("version", name, version)
        return runtime

    def not_loaded(self, field: str, name: str, version: str | None = None) -> NotFound:
        """The one error for a model, or a ``version`` of it, that is not loaded, naming what is; ``field`` names
        where the request gave it."""
        if version is None or name not in self.versions:
            return NotFound(f"{field}: no model {name!r} is loaded; loaded: {', '.join(self.models) or 'none'}")
        return NotFound(f"{field}: model {name} has no loaded version {version!r}; loaded: {', '.join(self.versions[name])}")

    def resolve(self, name: str | None, version: str | None, routing_key: str | None, examples: list,
                context: dict | None) -> Target:  # fmt: skip
        """The runtime that scores a request, and its model's routing rule (None: none, or a version was named)."""
        route = self.routes.get(name or self.default_model) if version is None else None
        if route is None:
            return Target(self.runtime(name, version))
        key = route.key(routing_key, examples, context)
        return Target(self.runtime(route.model, route.choose(route.point(key))), route, key)

    def served_versions(self) -> list[tuple[str, str]]:
        """(name, version) of every loaded model version: the row-update streams a replica follows."""
        return [(name, version) for name, loaded in list(self.versions.items()) for version in list(loaded)]

    @staticmethod
    def require_checked(runtime: ModelRuntime) -> None:
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
