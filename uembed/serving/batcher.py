"""Admission, micro-batches and the compute loop: requests of one model version, resolved and canonicalised by the
engine, wait here until a batch takes them; the runtime scores the batch in one call. No HTTP, no versions.

Requests are admitted through a bound (``max_queue_examples``), each with one future. One batch loop takes what
queued while the previous batch ran (plus ``max_wait_ms``, else two turns of the event loop: the last batch's replies
leave, and the requests just read are queued), up to ``max_batch_ids`` looked-up ids, and runs it on the one compute
thread: ``runtime.score_batch`` (``uembed/serving/pipeline/``). A failed batch fails its requests, never
the loop. The compute thread is the event loop's own on the CPU (``compute_on_event_loop``: the batch runs between
the loop's reads and writes, with no GIL to hand back and forth), else one executor thread (the CUDA path, which waits
on the device, and a path through Redis, whose reads may wait up to their timeout). With ``busy_poll_ms`` the loop
polls for the next request a while after a batch before it sleeps (a sleeping core wakes slowly).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

from uembed.contract.errors import DeadlineExceeded, Internal, NotReady, Overloaded, internal
from uembed.serving.metrics import ServiceMetrics
from uembed.serving.metrics_tally import FLUSH_SECONDS, BatchTally
from uembed.serving.pipeline.canonical import CanonicalExamples
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.stages import BatchTimes
from uembed.serving.rows.redis import RedisTier
from uembed.serving.settings import ServiceSettings
from uembed.serving.statistics import InferenceStatistics

log = logging.getLogger("uembed.batcher")


@dataclass
class Pending:
    runtime: ModelRuntime
    examples: CanonicalExamples
    future: asyncio.Future
    admitted: float = field(default_factory=time.perf_counter)
    timed_out: bool = False  # else a done future still queued was cancelled: its client went away
    deadline: float = 0.0  # the event loop's time at which it fails unanswered (request_timeout_ms after admission)


class Batcher:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics, redis: RedisTier | None = None,
                 stats: InferenceStatistics | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.metrics = metrics
        self.stats = stats or InferenceStatistics()
        self.redis = redis
        self.queue: deque[Pending] = deque()
        # Every admitted request not yet answered (and some answered since), in admission order: the order of their
        # deadlines, as every request has the same timeout. One timer waits for the oldest one's (_expire_due).
        self.unanswered: deque[Pending] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.queued_examples = 0
        self.running = False
        self.closing = False
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._idle: asyncio.Event | None = None
        self._batch_runtime: ModelRuntime | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uembed-compute")
        # Batches (and row updates, between them) on the event loop's thread, or on the executor's one thread.
        # Not with Redis in the batch's path (a tier-2 read may wait up to its timeout): the loop would wait with it.
        self.batches_on_loop = (settings.compute_on_event_loop and settings.device == "cpu" and not settings.redis_url
                                and settings.row_source == "files")  # fmt: skip
        self._loop: asyncio.AbstractEventLoop | None = None
        # A batch's metrics, tallied and flushed in bulk (uembed/serving/metrics_tally.py).
        self.tally = BatchTally(metrics)
        self._flush_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Start the batch loop; a second call while it runs does nothing. A stopped batcher does not start again."""
        if self.running:
            return
        if self.closing:
            raise NotReady("the engine was stopped; create a new one")
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        self.running = True
        self._loop_task = asyncio.create_task(self._batch_loop(), name="uembed-batch-loop")

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new work, finish what was admitted (up to ``drain_timeout_s``), then stop the loop; what is still
        queued fails with 503."""
        self.closing = True
        if not self.running:
            self.executor.shutdown(wait=True)
            return
        deadline = time.monotonic() + drain_timeout_s
        while (self.queue or not self._idle.is_set()) and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        self.running = False
        self._wakeup.set()
        if self._loop_task is not None:
            await self._loop_task
        for timer in (self._flush_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        # a request admitted after this (one that passed the engine's closing check before the stop) arms a deadline
        # timer of its own and fails at its deadline, never waiting on a queue no batch loop serves
        self._flush_timer = self._deadline_timer = None
        self._flush()
        self.metrics.before_collect.remove(self.tally.flush)  # a stopped batcher tallies nothing more
        for pending in self.queue:
            if not pending.future.done():
                pending.future.set_exception(Overloaded("the service is shutting down"))
        self.executor.shutdown(wait=True)

    async def score(self, runtime: ModelRuntime, canonical: CanonicalExamples) -> tuple[np.ndarray, float]:
        """Admit one request's canonical examples, wait for its batch: its scores, and when it was admitted."""
        if self.queued_examples + canonical.count > self.settings.max_queue_examples and self.queue:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(
                f"{self.queued_examples} examples are already waiting (limit {self.settings.max_queue_examples}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        pending = Pending(runtime, canonical, loop.create_future())
        pending.deadline = loop.time() + self.settings.request_timeout_ms / 1000
        self.queue.append(pending)
        self.unanswered.append(pending)
        self.queued_examples += canonical.count
        self.metrics.queue_examples.set(self.queued_examples)
        self._wakeup.set()
        # Not asyncio.wait_for (a second future and a callback a request, a loop step each) nor a timer a request
        # (armed and cancelled every request): one timer for the oldest request's deadline, which almost never fires.
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(pending.deadline, self._expire_due)
        return await pending.future, pending.admitted

    def holds(self, runtime: ModelRuntime) -> bool:
        """Whether a request of ``runtime`` is queued or in the running batch."""
        return self._batch_runtime is runtime or any(p.runtime is runtime for p in self.queue)

    def between_batches(self, work: Callable[[], None]) -> Future:
        """Run ``work`` where batches run, between two of them (a batch sees its effect whole or not at all); the
        future completes when it has run."""
        loop = self._loop
        if not self.batches_on_loop or loop is None or loop.is_closed():
            return self.executor.submit(work)
        future: Future = Future()

        def apply() -> None:  # a loop callback: never in the middle of a batch, which runs without awaiting
            if not future.set_running_or_notify_cancel():
                return
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, as the executor would
                future.set_exception(exc)
            else:
                future.set_result(None)

        loop.call_soon_threadsafe(apply)
        return future

    def _expire_due(self) -> None:
        """The deadline timer: each request whose deadline has passed unanswered fails (``_expire``), then the timer
        waits for the oldest one still waiting; answered requests are dropped from ``unanswered`` on the way."""
        self._deadline_timer = None
        loop, unanswered = asyncio.get_running_loop(), self.unanswered
        now = loop.time()
        while unanswered:
            pending = unanswered[0]
            if not pending.future.done():
                if pending.deadline > now:
                    self._deadline_timer = loop.call_at(pending.deadline, self._expire_due)
                    return
                self._expire(pending)
            unanswered.popleft()

    def _drop_answered(self) -> None:
        """Drop the answered requests at the front of ``unanswered`` (after a batch: mostly those it answered), so
        it holds few besides those still waiting."""
        unanswered = self.unanswered
        while unanswered and unanswered[0].future.done():
            unanswered.popleft()

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
        poll_s = self.settings.busy_poll_ms / 1000
        poll = False  # after a batch, an empty queue is polled for busy_poll_ms before the loop sleeps
        while self.running or self.queue:
            if not self.queue:
                if poll:
                    poll = False
                    await self._poll_for_work(poll_s)
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if wait_s:
                await asyncio.sleep(wait_s)
            else:
                # Two turns of the loop before every batch. In them the last batch's replies are written and sent
                # (CoalescedWrites sends a write a turn after it is made), so none waits behind this batch, a lone
                # request's neither; and requests read meanwhile are queued by their handlers' first steps, a turn
                # after they are read, so they join it. With one turn the batch left behind those read in it.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            batch = self._take_batch()
            if not batch:
                continue
            self._idle.clear()
            self._batch_runtime = batch[0].runtime
            started = time.perf_counter()
            counters = self.stats.of(batch[0].runtime.name, batch[0].runtime.version)
            waits = [started - pending.admitted for pending in batch]
            self.tally.queued(waits)
            for wait in waits:
                counters.queue.add(wait)
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
                self._drop_answered()
                self._idle.set()
                poll = poll_s > 0
                if self._flush_timer is None:
                    self._flush_timer = loop.call_later(FLUSH_SECONDS, self._flush)
            if self.batches_on_loop:
                # A batch ran without awaiting: hand the loop its replies, reads, timers and row updates before the
                # next one (without this, a queue of batches ran back to back and held every reply till the end).
                await asyncio.sleep(0)

    async def _poll_for_work(self, seconds: float) -> None:
        """Step the loop, its sockets polled without a timeout, until a request is queued or ``seconds`` pass, so the
        core is awake for it (busy_poll_ms). Each step yields the core to any other runnable thread: a first try
        without the yield had a worse tail at half load than no polling, its load generator waiting on the spin."""
        until = time.perf_counter() + seconds
        while not self.queue and self.running and time.perf_counter() < until:
            await asyncio.sleep(0)
            os.sched_yield()

    def _run_batch(self, batch: list[Pending]) -> list[np.ndarray]:
        """On the compute thread: the runtime scores the batch in one call; its stages' times are observed here."""
        runtime = batch[0].runtime
        parts = [p.examples for p in batch]
        scores, times = runtime.score_batch(parts)
        examples = sum(p.count for p in parts)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        self._observe(runtime, times, examples, scores)
        if scores.shape[0] != examples:
            # A dense net that returns the wrong shape must not hand one request another's scores.
            raise Internal(f"the dense network returned {scores.shape[0]} scores for {examples} examples")
        split = time.perf_counter()
        # each request's scores a view of the batch's; np.split costs a few times more than slicing for a handful of
        # requests, and a batch of one request (every request, at low load) takes the batch's scores whole
        if len(parts) == 1:
            results = [scores]
        else:
            ends = list(accumulate(p.count for p in parts))
            results = [scores[start:end] for start, end in zip([0, *ends[:-1]], ends)]
        self.stats.of(runtime.name, runtime.version).batch(times, time.perf_counter() - split, examples, len(batch))
        return results

    def _observe(self, runtime: ModelRuntime, times: BatchTimes, examples: int, scores: np.ndarray) -> None:
        self.tally.add(runtime, times, examples, scores)
        if self.redis is not None:
            self.metrics.observe_redis(self.redis.error_counts, self.redis.fills_dropped)

    def _flush(self) -> None:
        """The batches tallied since the last flush, into the metrics (a loop timer, armed by the batch after one)."""
        self._flush_timer = None
        self.tally.flush()
