"""One desired state of each model's versions and routing, shared by every worker and replica (docs/ROUTING.md).

An admin call is applied by the worker that got it, then recorded here as a document per model::

    {"revision": 7, "base": "1", "primary": "2", "versions": ["1", "2"], "routing": {"split": {...}, ...} | null}

in Redis (``UEMBED_REDIS_URL``: one hash, a field per model, written by compare-and-set on the revision) or else in a
state file (``UEMBED_DESIRED_STATE_FILE``, by default in the bundle store; written whole to a temporary file and
renamed over it, under an exclusive lock). Every worker reads it at start and every ``UEMBED_DESIRED_STATE_POLL_S``
and converges to any model's document whose revision it has not applied: a worker respawned after a crash, another
worker of ``--workers N``, another replica. ``base`` is the version the worker started the model from
(``UEMBED_BUNDLES``): a document recorded under another base (a deployment that since changed its bundles) is not
applied. A failure to apply (a bundle missing on this replica) is shown in ``/v1/models`` and retried, never fatal.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from uembed.contract.errors import NotReady
from uembed.serving.routing import Route

log = logging.getLogger("uembed.desired")

STATE_FILE = ".uembed-desired-state.json"

# Replace a model's document only if its revision is still the one the new document was computed from.
COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local revision = 0
if current then revision = cjson.decode(current)['revision'] end
if tonumber(revision) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


def write_atomically(path: Path, text: str) -> None:
    """``text`` as the whole of ``path``: a reader sees the old file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def next_document(current: dict | None, change: Callable[[dict | None], dict]) -> dict:
    return {**change(current), "revision": (current or {}).get("revision", 0) + 1}


class FileStates:
    """The documents in one JSON file ``{"models": {name: document}}``; writers hold an flock beside it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.where = f"file {self.path}"

    def read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")).get("models", {})
        except FileNotFoundError:
            return {}

    def update(self, name: str, change: Callable[[dict | None], dict]) -> dict:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            models = self.read()
            models[name] = next_document(models.get(name), change)
            write_atomically(self.path, json.dumps({"models": models}, indent=1, sort_keys=True))
            return models[name]


class RedisStates:
    """The documents as fields of one Redis hash ``<prefix>:desired-state`` (one key: a cluster serves it too)."""

    def __init__(self, client, prefix: str) -> None:
        self.client = client
        self.key = f"{prefix}:desired-state"
        self.where = f"redis {self.key}"

    def read(self) -> dict[str, dict]:
        return {field.decode(): json.loads(value) for field, value in self.client.hgetall(self.key).items()}

    def update(self, name: str, change: Callable[[dict | None], dict]) -> dict:
        while True:  # another writer got in between: computed again from its document
            raw = self.client.hget(self.key, name)
            current = json.loads(raw) if raw else None
            document = next_document(current, change)
            if self.client.eval(COMPARE_AND_SET, 1, self.key, name, document["revision"] - 1, json.dumps(document)):
                return document


# --- what each admin call changes in a model's document -------------------------------------------------------
def added(document: dict, version: str) -> dict:
    return {**document, "primary": document["primary"] or version, "versions": sorted({*document["versions"], version})}


def made_primary(document: dict, version: str) -> dict:
    """As ``ModelRegistry.activate``: the previous primary goes unless the routing rule still sends it requests."""
    previous, versions = document["primary"], {*document["versions"], version}
    routing = document["routing"]
    used = {v for v, share in routing["split"].items() if share > 0} | {routing["shadow"]} if routing else set()
    if previous and previous != version and previous not in used:
        versions.discard(previous)
    return {**document, "primary": version, "versions": sorted(versions)}


def removed(document: dict, version: str) -> dict:
    return {**document, "versions": [v for v in document["versions"] if v != version]}


def routed(document: dict, routing: dict | None) -> dict:
    return {**document, "routing": routing}


class DesiredState:
    """This worker's side: records what its admin calls changed, and converges to what others recorded."""

    RETRY_S = 30.0  # a revision that failed to apply is tried again this often (a bundle may arrive later)

    def __init__(self, registry, metrics, store: FileStates | RedisStates, poll_s: float,
                 unload: Callable[[str, str], Awaitable]) -> None:  # fmt: skip
        self.registry = registry
        self.metrics = metrics
        self.store = store
        self.poll_s = poll_s
        self.unload = unload  # (name, version): unloads a version without deleting its rows (its owner did)
        self.base: dict[str, str] = {}  # model -> the version it was started from
        self.applied: dict[str, int] = {}
        self.desired: dict[str, int] = {}
        self.errors: dict[str, tuple[int, float, str]] = {}  # model -> (revision, when, what failed)
        self.read_error: str | None = None
        self.lock = asyncio.Lock()  # an admin call and a reconcile pass never interleave in one worker
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        """Converge once (before this worker serves), then poll."""
        self.base = {name: runtime.version for name, runtime in self.registry.models.items()}
        await self.reconcile()
        self.task = asyncio.create_task(self._poll(), name="uembed-desired-state")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - a failed pass is shown and the next one tries again
                log.warning("reconciling the desired state failed", exc_info=True)

    async def admin(self, name: str, work: Awaitable, change: Callable[[dict], dict]):
        """Apply an admin call here (``work``, as before: its error is the call's), then record ``change`` for every
        other worker and replica. Not recorded: a 503 (it holds on this worker only)."""
        async with self.lock:
            documents = await self._read()
            if documents is not None:  # caught up first: a call may build on one another worker just took
                await self._converge_all(documents)
            result = await work
            try:
                document = await asyncio.to_thread(self.store.update, name, partial_change(self, name, change))
            except Exception as exc:  # noqa: BLE001 - the store's failure is the call's answer
                log.warning("recording the desired state of %s failed", name, exc_info=True)
                raise NotReady(f"applied on this worker, but the desired state ({self.store.where}) could not be "
                               f"recorded, so other workers and replicas will not follow: {exc}") from exc  # fmt: skip
            await self._converge(name, document)
            return result

    def snapshot(self, name: str) -> dict:
        """This worker's state of ``name`` as a document (the start of a model's first one)."""
        route = self.registry.routes.get(name)
        primary = self.registry.models.get(name)
        return {"base": self.base.get(name), "primary": primary.version if primary else None,
                "versions": sorted(self.registry.versions.get(name, {})), "routing": route.describe() if route else None}  # fmt: skip

    async def reconcile(self) -> None:
        # read under the lock: documents read before an admin call of this worker recorded its change would take
        # the worker back to the revision before it
        async with self.lock:
            documents = await self._read()
            if documents is not None:
                await self._converge_all(documents)

    async def _read(self) -> dict[str, dict] | None:
        try:
            documents = await asyncio.to_thread(self.store.read)
        except Exception as exc:  # noqa: BLE001 - shown in /v1/models; serving goes on as it is
            self.read_error = f"reading {self.store.where}: {exc}"
            log.warning("%s", self.read_error)
            return None
        self.read_error = None
        return documents

    async def _converge_all(self, documents: dict[str, dict]) -> None:
        for name, document in documents.items():
            if document.get("base") != self.base.get(name):
                continue  # recorded for another deployment's bundles
            revision = document["revision"]
            self.desired[name] = revision
            self.metrics.desired_revision.labels(name, "desired").set(revision)
            failed = self.errors.get(name)
            if self.applied.get(name) == revision:
                continue
            if failed and failed[0] == revision and time.monotonic() - failed[1] < self.RETRY_S:
                continue
            await self._converge(name, document)

    async def _converge(self, name: str, document: dict) -> None:
        registry, revision = self.registry, document["revision"]
        self.desired[name] = revision
        self.metrics.desired_revision.labels(name, "desired").set(revision)
        try:
            primary = document["primary"]
            if primary and (name not in registry.models or registry.models[name].version != primary):
                await registry.reload(name, primary)
            for version in document["versions"]:
                if version not in registry.versions.get(name, {}):
                    await registry.add_version(name, version)
            routing = document["routing"]
            if routing is not None:
                await registry.set_routing(Route(name, routing["split"], routing["sticky_feature"], routing["shadow"],
                                                 routing["shadow_fraction"]))  # fmt: skip
            elif name in registry.routes:
                registry.clear_routing(name)
            route = registry.routes.get(name)
            for version in list(registry.versions.get(name, {})):
                keep = version in document["versions"] or version == registry.models[name].version
                if not keep and (route is None or version not in route.versions()):
                    await self.unload(name, version)
        except Exception as exc:  # noqa: BLE001 - shown in /v1/models and retried, never fatal to the worker
            self.errors[name] = (revision, time.monotonic(), f"revision {revision}: {exc}")
            log.warning("applying the desired state of %s (revision %d) failed: %s", name, revision, exc)
            return
        self.errors.pop(name, None)
        self.applied[name] = revision
        self.metrics.desired_revision.labels(name, "applied").set(revision)

    def describe(self) -> dict:
        names = sorted({*self.desired, *self.applied, *self.errors})
        return {
            "store": self.store.where,
            "poll_s": self.poll_s,
            "error": self.read_error,
            "models": {name: {"desired_revision": self.desired.get(name), "applied_revision": self.applied.get(name),
                              "error": self.errors[name][2] if name in self.errors else None} for name in names},  # fmt: skip
        }


def partial_change(state: DesiredState, name: str, change: Callable[[dict], dict]) -> Callable[[dict | None], dict]:
    """``change`` on the model's current document; a model with none yet (or one recorded under another base)
    starts from this worker's state before the call, with the call then applied to it."""

    def apply(current: dict | None) -> dict:
        if current is None or current.get("base") != state.base.get(name):
            return state.snapshot(name)  # this worker already applied the call: its state is the new document
        return change(current)

    return apply
