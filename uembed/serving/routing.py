"""Which loaded version of a model scores a request, and shadow scoring by a candidate version.

A model name has one *primary* version (what a request naming no version gets) and may have more loaded
beside it (``POST /v1/models/{name}/versions/{v}``). A routing rule per name (``PUT /v1/models/{name}/routing``)
splits its traffic between loaded versions and may copy some of it to a *shadow* version::

    >>> route = Route("movielens", split={"1": 90, "2": 10}, sticky_feature="user_id", shadow="3")
    >>> route.choose(route.point("196"))   # one user id, one version, on every replica and after restarts
    '1'

A request's routing key is its ``routing_key`` field, else the value of the rule's ``sticky_feature`` (in its
``context``, else in its first example or candidate). The key's canonical bytes are hashed by the project's one
hashing spec (``uembed/contract/hashing.py``, xxh3_64 with a seed of its own per model name) to a point in [0, 1); the
split's versions own consecutive ranges of [0, 1) in the order the rule lists them, each as wide as its share.
So a user keeps their version as long as the rule is unchanged, and moving weight to the last-listed version
moves only users onto it. A request with no key (no rule feature in it) takes a uniformly random point.

Shadow: after the served version answers, a copy of the request (its examples, as sent) is queued for the shadow
version, scored on a thread of its own by a copy of that version's runtime that nothing else uses, and only
metered (its scores' distribution, latency and difference from the served scores); a full queue drops the copy
and counts it. Nothing on the request's path waits on it or can fail because of it.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from uembed.contract.errors import ExampleError
from uembed.contract.hashing import hash_value, lookup_seed
from uembed.serving.metrics import observe_all

log = logging.getLogger("uembed.routing")

UNIT = 2.0**-53  # a 64-bit hash's top 53 bits as a float in [0, 1)


@dataclass
class Route:
    """A model's routing rule, checked: ``split`` maps version -> share of requests (shares sum to 1, in the
    order given); ``shadow`` a version that scores a copy of ``shadow_fraction`` of the requests (by their key)."""

    model: str
    split: Mapping[str, float]
    sticky_feature: str | None = None
    shadow: str | None = None
    shadow_fraction: float = 1.0
    _bounds: tuple[tuple[float, str], ...] = field(init=False, repr=False)
    _seed: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        total = sum(self.split.values())
        self.split = {version: weight / total for version, weight in self.split.items()}
        upper, bounds = 0.0, []
        for version, share in self.split.items():
            upper += share
            if share > 0:
                bounds.append((upper, version))
        self._bounds = tuple(bounds)
        self._seed = lookup_seed(f"routing/{self.model}")  # namespaces unlike any feature's: no shared seed

    def versions(self) -> set[str]:
        """Versions the rule sends requests or copies to (they cannot be unloaded while it does)."""
        return {v for v, share in self.split.items() if share > 0} | ({self.shadow} if self.shadow else set())

    def point(self, key: object, lookup: int = 0) -> float:
        """A uniform point in [0, 1) of a routing key (str, int, float, bool; None: random). Lookup 1 samples the
        shadow's copies, independently of the split."""
        if key is None:
            return random.random()
        seed = self._seed if lookup == 0 else lookup_seed(f"routing/{self.model}", lookup)
        return (hash_value(key, seed) >> 11) * UNIT

    def choose(self, point: float) -> str:
        for upper, version in self._bounds:
            if point < upper:
                return version
        return self._bounds[-1][1]  # shares that sum to 1 - 1e-16

    def key(self, routing_key: str | None, examples: list, context: Mapping | None) -> object:
        """The request's routing key: ``routing_key``, else its sticky feature's value (None: none)."""
        if routing_key is not None or self.sticky_feature is None:
            return routing_key
        feature = self.sticky_feature
        if context is not None and feature in context:
            where, value = f"context.{feature}", context[feature]
        elif examples and isinstance(examples[0], Mapping):
            where, value = f"{'candidates' if context is not None else 'examples'}[0].{feature}", examples[0].get(feature)
        else:
            return None
        if isinstance(value, (list, dict)):
            raise ExampleError(f"{where}: model {self.model} routes requests by {feature}, so it takes one value here, "
                               "not a list (or send routing_key)")  # fmt: skip
        return value

    def describe(self) -> dict:
        return {"split": dict(self.split), "sticky_feature": self.sticky_feature, "shadow": self.shadow,
                "shadow_fraction": self.shadow_fraction}  # fmt: skip


@dataclass
class ShadowCopy:
    runtime: object  # the shadow version's own ModelRuntime
    examples: list
    context: Mapping | None
    served: np.ndarray  # the served version's scores, to meter the difference
    admitted: float = field(default_factory=time.perf_counter)


class ShadowScorer:
    """Copies of requests scored by shadow versions on one daemon thread, never awaited by a request.

    ``offer`` never blocks (a full queue drops the copy, counted). The thread is a daemon so a shadow that hangs
    cannot hold the process at exit; ``stop`` does not wait for it beyond ``join_s``."""

    MAX_COPIES_PER_BATCH = 64

    def __init__(self, metrics, queue_limit: int) -> None:
        self.metrics = metrics
        self.queue: queue.Queue = queue.Queue(maxsize=max(queue_limit, 1))
        self.thread: threading.Thread | None = None
        self.deferred: collections.deque = collections.deque()  # work on the shadow copies (row updates), in order

    def defer(self, work) -> None:
        """Run ``work()`` on the shadow thread before its next batch (or within ``IDLE_S`` when it has none): the
        shadow copies are that thread's alone, and a slow shadow must not hold the caller (the compute thread
        applying row updates)."""
        self.deferred.append(work)

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="uembed-shadow", daemon=True)
            self.thread.start()

    def offer(self, copy: ShadowCopy) -> bool:
        runtime = copy.runtime
        try:
            self.queue.put_nowait(copy)
        except queue.Full:
            self.metrics.shadow.labels(runtime.name, runtime.version, "dropped").inc()
            return False
        return True

    def stop(self, join_s: float = 1.0) -> None:
        if self.thread is None:
            return
        try:
            self.queue.put_nowait(None)
        except queue.Full:  # a stuck shadow with a full queue: the daemon thread ends with the process
            pass
        self.thread.join(timeout=join_s)

    IDLE_S = 1.0  # with no copies to score, deferred work still runs this often (it holds row updates)

    def _run_deferred(self) -> None:
        while self.deferred:
            try:
                self.deferred.popleft()()
            except Exception:  # noqa: BLE001 - a shadow copy's failure never reaches the served traffic
                log.warning("shadow: deferred work failed", exc_info=True)

    def _loop(self) -> None:
        while True:
            try:
                copies = [self.queue.get(timeout=self.IDLE_S)]
            except queue.Empty:
                self._run_deferred()
                continue
            while len(copies) < self.MAX_COPIES_PER_BATCH and copies[-1] is not None:
                try:
                    copies.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = copies[-1] is None
            copies = [c for c in copies if c is not None]
            self._run_deferred()
            for runtime in {id(c.runtime): c.runtime for c in copies}.values():
                self._score([c for c in copies if c.runtime is runtime])
            if stop:
                return

    def _score(self, copies: list[ShadowCopy]) -> None:
        """One batch of one shadow runtime; a copy its version refuses (another feature set) fails alone."""
        runtime = copies[0].runtime
        counted = self.metrics.shadow.labels(runtime.name, runtime.version, "failed")
        parts, kept = [], []
        for copy in copies:
            try:
                parts.append(runtime.canonicalise(copy.examples, copy.context))
                kept.append(copy)
            except Exception as exc:  # noqa: BLE001 - a shadow's failure is metered, never raised
                counted.inc()
                log.debug("shadow %s/%s refused a copy: %s", runtime.name, runtime.version, exc)
        if not kept:
            return
        try:
            scores = np.asarray(runtime.score_batch(parts)[0], dtype=np.float32).reshape(-1)
            runtime.encoder.take_unseen()
            for store in runtime.stores:
                store.take_counts()  # a shadow's lookups are not the served traffic's tier figures
            if scores.shape[0] != sum(p.count for p in parts):
                raise ValueError(f"{scores.shape[0]} scores for {sum(p.count for p in parts)} examples")
        except Exception:  # noqa: BLE001
            counted.inc(len(kept))
            log.warning("shadow %s/%s failed a batch of %d copies", runtime.name, runtime.version, len(kept), exc_info=True)
            return
        done = time.perf_counter()
        latency = self.metrics.version_seconds.labels(runtime.name, runtime.version, "shadow")
        difference = self.metrics.shadow_difference.labels(runtime.name, runtime.version)
        split = np.split(scores, np.cumsum([p.count for p in parts])[:-1])
        for copy, shadow_scores in zip(kept, split):
            latency.observe(done - copy.admitted)
            if copy.served.shape == shadow_scores.shape:
                observe_all(difference, np.abs(shadow_scores - copy.served))
        observe_all(self.metrics.example_score.labels(runtime.name, runtime.version, "shadow"), scores)
        self.metrics.shadow.labels(runtime.name, runtime.version, "scored").inc(len(kept))
