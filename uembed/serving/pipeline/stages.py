"""The stages after canonicalise, for one bundle: hash (``encoding.py``), lookup, assemble, dense, and the one call
that runs them on a batch, ``score_batch(parts) -> (scores, stage times)``.

A score runs these stages, in this order (each one method)::

    hash      canonical bytes -> row ids [B, S], pooling weights [B, S]               ExampleEncoder.hash
    lookup    each table's distinct ids -> rows, from the row sources -> [B, S, D]    Stages.lookup
    assemble  pooling, multi-size concat, feature biases -> [B, E]                    Stages.assemble
    dense     the dense network -> probabilities [B]                                  Stages.dense

A runtime picks its batch path once, at load (``BatchPath``): SPLIT keeps ranking requests' contexts at one row per
request (``hash_split``, ``lookup_split``, ``assemble_split``, and the dense network's context part where the
export split it); FLAT broadcasts them (the CUDA runtime, whose kernels take [B, S], and a runtime scoring with the
bundle's whole model, ``whole_model``, which takes hashed rows: TorchScript). The reference scorer (``reference.py``) is these stages over the
bundle's row files; the CPU runtime (``cpu.py``) puts lookup through the tiered row store.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import pyarrow as pa

from uembed.bundle.loader import Bundle
from uembed.contract.errors import UembedError
from uembed.serving.pipeline.canonical import CanonicalExamples
from uembed.serving.pipeline.dense import CPU_PROVIDERS, DenseParts, FactoredInputs, onnx_session, take_columns
from uembed.serving.pipeline.encoding import ExampleEncoder, SplitBatch
from uembed.serving.pipeline.values import NO_LIMITS, ValueLimits

try:  # the assemble stage's one pass in C (_pool.pyx), built by the install; numpy's passes without it
    from uembed.serving.pipeline import _pool
except ImportError:
    _pool = None
if os.environ.get("UEMBED_PURE_PYTHON", "") not in ("", "0"):
    _pool = None

log = logging.getLogger("uembed.pipeline")
# Tables of up to this many rows find a batch's distinct ids by a slot a row (_pool.distinct_ids); larger ones by
# Arrow's hash table. One scratch a thread, shared by every table and model version (each call leaves it all zero),
# as large as the largest such table seen: 16 MiB of int32 at most, of which only the pages of ids seen are resident.
DISTINCT_SCRATCH_ROWS = 2**22
_SCRATCH = threading.local()


def distinct_scratch(rows: int) -> np.ndarray:
    """This thread's zeroed int32 scratch of at least ``rows`` slots for ``_pool.distinct_ids``."""
    scratch = getattr(_SCRATCH, "slots", None)
    if scratch is None or scratch.size < rows:
        scratch = _SCRATCH.slots = np.zeros(rows, dtype=np.int32)  # calloc: pages not yet touched are not resident
    return scratch


class BatchPath(Enum):
    SPLIT = "split"  # ranking requests' contexts at one row per request
    FLAT = "flat"  # every example's rows


@dataclass(frozen=True)
class BatchTimes:
    """Seconds each stage of one batch took, and the row ids it looked up (before dedupe; in a batch of ranking
    requests, each context's once)."""

    hash: float
    lookup: float
    assemble: float
    dense: float
    ids: int

    def stages(self) -> tuple[tuple[str, float], ...]:
        return (("hash", self.hash), ("lookup", self.lookup), ("assemble", self.assemble), ("dense", self.dense))


def distinct(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``ids`` (in order of first appearance) and where each id is among them, in ``ids``' shape:
    ``unique[inverse]`` is ``ids``. A hash table (Arrow's dictionary encoding), not ``np.unique``'s sort: faster on a
    batch's ids (docs/BENCHMARKS.md)."""
    encoded = pa.array(np.ascontiguousarray(ids).ravel()).dictionary_encode()
    # Arrow's buffers are read-only in numpy: int64 copies, as np.unique returns them
    return encoded.dictionary.to_numpy(zero_copy_only=False, writable=True), encoded.indices.to_numpy().astype(np.int64).reshape(ids.shape)


def pooling_runs(pooling: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The plan's pooling matrix [groups, slots] as runs (first group, stop group, first slot, slots a group): each
    group's slots are side by side in the plan's layout, and consecutive one-slot groups make one run."""
    starts, widths = pooling.argmax(axis=1), pooling.sum(axis=1).astype(int)
    runs: list[list[int]] = []
    for group, (first, width) in enumerate(zip(starts.tolist(), widths.tolist())):
        if runs and width == 1 and runs[-1][3] == 1 and runs[-1][2] + runs[-1][1] - runs[-1][0] == first:
            runs[-1][1] = group + 1
        else:
            runs.append([group, group + 1, first, width])
    rebuilt = np.zeros_like(pooling)
    for group, stop, first, width in runs:
        for offset, row in enumerate(range(group, stop)):
            rebuilt[row, first + offset * width : first + (offset + 1) * width] = 1
    if (widths < 1).any() or not np.array_equal(rebuilt, pooling):  # a hand-written plan whose groups are not runs of one or more slots
        raise UembedError("the plan's pooling is not runs of side-by-side slots, one run a (feature, lookup) group")
    return [tuple(run) for run in runs]


def pool_slots(weighted: np.ndarray, runs: list[tuple[int, int, int, int]], groups: int) -> np.ndarray:
    """float32 [B, groups, D]: each group's weighted slot rows [B, S, D] summed, by ``pooling_runs``'s runs (what
    the product with the pooling matrix gives, without its zeros: several times cheaper than the product or
    ``np.add.reduceat`` over the slot axis)."""
    pooled = np.empty((len(weighted), groups, weighted.shape[2]), dtype=np.float32)
    for group, stop, first, width in runs:
        if width == 1:  # groups of one slot each, side by side: copied at once
            pooled[:, group:stop] = weighted[:, first : first + stop - group]
        else:  # one group's slots summed in order
            total = pooled[:, group]
            np.copyto(total, weighted[:, first])
            for slot in range(first + 1, first + width):
                total += weighted[:, slot]
    return pooled


class Stages:
    """hash, lookup, assemble and dense for one bundle, and ``score_batch``, which runs them on a batch by the path
    chosen at load (``batch_path``). Rows come from ``sources`` (one per table, each with ``gather(ids) -> rows``):
    the bundle's row files by default (the reference scorer), the tiered row store in the service."""

    def __init__(
        self,
        bundle: Bundle,
        threads: int = 1,
        providers: Sequence = CPU_PROVIDERS,
        limits: ValueLimits = NO_LIMITS,
        cache_bytes: int = 0,
        use_dense_parts: bool = True,
        sources: Sequence | None = None,
    ) -> None:
        self.bundle = bundle
        self.plan = bundle.plan
        self.input_name = bundle.manifest["dense"].get("input", {}).get("name", "embeddings")  # every export records it
        self.encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, limits, cache_bytes, bundle.known_values)
        self.session = onnx_session(bundle.dense_path, threads, providers)
        slot_tables = self.plan.slot_tables()
        self.table_slots = [
            (bundle.tables[t.name], np.flatnonzero(slot_tables == i)) for i, t in enumerate(self.plan.tables)
        ]
        # Where each table's rows come from: anything with gather(ids) -> float32 rows [len(ids), D].
        self.sources = list(sources) if sources is not None else [table for table, _ in self.table_slots]
        self.pooling = self.plan.pooling_matrix()
        self.one_slot_per_group = self.pooling.shape[0] == self.pooling.shape[1] and np.array_equal(self.pooling, np.eye(len(self.pooling)))
        self.pooling_runs = pooling_runs(self.pooling)
        self.bias_columns = self.plan.bias_columns()
        self.slot_tables = slot_tables
        self.dense_parts = None
        entry = bundle.manifest["dense"].get("context_split")
        on_cpu = all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in providers)
        if entry is not None and use_dense_parts and on_cpu:  # the CUDA runtime runs dense.onnx on its device buffers
            parts = DenseParts(bundle, entry, threads, self.input_name, self.one_slot_per_group, bool(self.bias_columns.size))
            if parts.rows_independent():
                self.dense_parts = parts
            else:  # batch-dependent scores would break parity between the forms, and between batches
                log.warning("bundle %s: the dense network's context part scores a row differently alone and among "
                            "others; serving dense.onnx whole instead", bundle.path)  # fmt: skip
        # The path every batch takes, chosen once: ranking requests' contexts split out where the runtime can.
        self.batch_path = BatchPath.SPLIT
        self.whole_model = None  # a function of hashed rows and weights -> scores, where the runtime has one
        # A flat batch's gather, weighting and pooling in one compiled pass (assemble_gathered): where the runtime
        # turns it on (the CPU service's, on a one-table plan), else lookup's [B, S, D] rows, then assemble.
        self.pools_in_one_pass = False
        # A table's distinct ids by a slot a row (_pool.distinct_ids) rather than Arrow's hash table: where the runtime
        # turns it on (the CPU service's; the reference scorer keeps its own dedupe)
        self.dedupes_by_slot = False

    def canonicalise(
        self, examples: Sequence[Mapping[str, object]], context: Mapping[str, object] | None = None
    ) -> CanonicalExamples:
        """Check one request's examples and turn their values into canonical bytes (a missing feature is the missing value).

        ``context``: feature -> value shared by every example (a ranking request's candidates), encoded once."""
        return self.encoder.canonicalise(examples, context)

    def hash(self, parts: Sequence[CanonicalExamples]) -> tuple[np.ndarray, np.ndarray]:
        """Rows int64 [B, S] and pooling weights float32 [B, S] of canonical examples, concatenated in order."""
        return self.encoder.hash(parts)

    def encode(self, examples: Sequence[Mapping[str, object]]) -> tuple[np.ndarray, np.ndarray]:
        """canonicalise + hash of one batch."""
        return self.encoder.encode(examples)

    def hash_split(self, parts: Sequence[CanonicalExamples]) -> SplitBatch | None:
        """``hash`` with the features every part shares (ranking requests' contexts) left at one row per part;
        None for a batch where some part shares nothing."""
        return self.encoder.hash_split(parts)

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Rows of every slot: float32 [B, S, D], each table's distinct ids gathered once."""
        if len(self.table_slots) == 1:  # one table (unified): its gather is the whole output, no second copy
            return self.gather_table(0, rows)
        out = np.empty(rows.shape + (self.plan.dim,), dtype=np.float32)
        for position, (_, slots) in enumerate(self.table_slots):
            out[:, slots] = self.gather_table(position, rows[:, slots])
        return out

    def gather_table(self, position: int, ids: np.ndarray) -> np.ndarray:
        """Rows float32 [*ids.shape, D] of ids of the table at ``position``, each distinct id gathered once."""
        rows, inverse = self.gather_distinct(position, ids)
        return np.take(rows, inverse, axis=0)

    def gather_distinct(self, position: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows float32 [U, D] of the distinct ``ids`` of the table at ``position``, and where each id's row is."""
        table_rows = self.table_slots[position][0].rows
        if not self.dedupes_by_slot or table_rows > DISTINCT_SCRATCH_ROWS:
            unique, inverse = distinct(ids)
        else:
            unique, inverse = _pool.distinct_ids(np.ascontiguousarray(ids, dtype=np.int64).ravel(), distinct_scratch(table_rows))
            inverse = inverse.reshape(ids.shape)
        return self.sources[position].gather(unique), inverse

    def lookup_split(self, batch: SplitBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A split batch's distinct rows float32 [U, D] and where each slot's row is among them: its own slots'
        [B, S_e] and its context slots' [P, S_c] (the context's rows once per part). Each table's ids of both are
        deduplicated and gathered in one call; the rows go to the batch's embeddings only in ``assemble_split``."""
        own_ids, shared_ids = batch.rows, batch.context_rows
        if len(self.table_slots) == 1:  # one table (unified): one gather
            rows, inverse = self.gather_distinct(0, np.concatenate([own_ids.ravel(), shared_ids.ravel()]))
            return rows, inverse[: own_ids.size].reshape(own_ids.shape), inverse[own_ids.size :].reshape(shared_ids.shape)
        own = np.empty(own_ids.shape, dtype=np.int64)
        shared = np.empty(shared_ids.shape, dtype=np.int64)
        own_tables, shared_tables = self.slot_tables[batch.slots], self.slot_tables[batch.context_slots]
        found, offset = [], 0
        for position in range(len(self.table_slots)):
            own_columns, shared_columns = np.flatnonzero(own_tables == position), np.flatnonzero(shared_tables == position)
            ids = np.concatenate([own_ids[:, own_columns].ravel(), shared_ids[:, shared_columns].ravel()])
            rows, inverse = self.gather_distinct(position, ids)
            inverse += offset  # positions in the tables' rows side by side
            split = len(own_ids) * len(own_columns)
            own[:, own_columns] = inverse[:split].reshape(len(own_ids), len(own_columns))
            shared[:, shared_columns] = inverse[split:].reshape(len(shared_ids), len(shared_columns))
            found.append(rows)
            offset += len(rows)
        return np.concatenate(found), own, shared

    def assemble(self, looked_up: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Pool each (feature, lookup), concatenate, add feature biases: float32 [B, E]. With every weight 1 (one-value
        features only) and no biases, the output is ``looked_up`` itself, reshaped (not copied, nor written to)."""
        unweighted = not self.bias_columns.size and (weights == 1).all()
        return self._pool(looked_up if unweighted else looked_up * weights[..., None])

    def assemble_gathered(self, rows: np.ndarray, inverse: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``assemble`` of ``lookup``'s rows given as the one table's distinct rows [U, D] and where each slot's row is
        among them [B, S]: gathered, weighted and pooled in one pass (``_pool.pool_rows``), the same float32 products
        and sums in the same order, so the same bits."""
        weighted = bool(self.bias_columns.size) or not (weights == 1).all()
        out = _pool.pool_rows(np.ascontiguousarray(rows, dtype=np.float32), inverse,
                              np.ascontiguousarray(weights, dtype=np.float32), self.pooling_runs, len(self.pooling), weighted)  # fmt: skip
        if self.bias_columns.size:
            out[:, self.bias_columns] += self.bundle.bias
        return out

    def assemble_split(self, batch: SplitBatch, rows: np.ndarray, own: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """``assemble`` of a split batch from ``lookup_split``'s distinct rows: each slot's row taken straight into the
        batch's [B, S, D] (a part's context positions repeated to its examples: ints, not rows, are broadcast), then
        weighted where some weight is not 1. The same products as ``assemble`` of the broadcast batch."""
        index = batch.place(own, np.repeat(shared, batch.counts, axis=0), np.int64)
        if self.pools_in_one_pass:
            weights = batch.place(batch.weights, np.repeat(batch.context_weights, batch.counts, axis=0), np.float32)
            return self.assemble_gathered(rows, index, weights)
        weighted = np.take(rows, index, axis=0)
        if not ((batch.weights == 1).all() and (batch.context_weights == 1).all()):
            weighted *= batch.place(batch.weights, np.repeat(batch.context_weights, batch.counts, axis=0), np.float32)[..., None]
        return self._pool(weighted)

    def _pool(self, weighted: np.ndarray) -> np.ndarray:
        if self.one_slot_per_group:  # every (feature, lookup) one slot: pooling is the identity (most plans)
            out = weighted.reshape(len(weighted), -1)
        else:
            out = pool_slots(weighted, self.pooling_runs, len(self.pooling)).reshape(len(weighted), -1)
        if self.bias_columns.size:
            out[:, self.bias_columns] += self.bundle.bias
        return out

    def dense(self, embeddings: np.ndarray | FactoredInputs) -> np.ndarray:
        """Scores [B] of embeddings [B, E], or of :class:`FactoredInputs` (a bundle with :class:`DenseParts`)."""
        if self.dense_parts is not None:
            return self.dense_parts.score(embeddings)
        return self.session.run(None, {self.input_name: embeddings})[0]

    def factored_inputs(self, batch: SplitBatch, rows: np.ndarray, own: np.ndarray, shared: np.ndarray) -> FactoredInputs | None:
        """Where the bundle's dense network is split by this batch's context (``uembed/bundle/dense_split.py``): the inputs of
        its parts from ``lookup_split``'s rows, the context's once a part (request), for ``dense``. None otherwise
        (then ``assemble_split``): no parts, another context, or a part without examples. The same floats either
        way."""
        parts = self.dense_parts
        if parts is None or not parts.matches(batch) or not batch.counts.all():
            return None
        if parts.columns_from_rows and (batch.weights == 1).all() and (batch.context_weights == 1).all():
            return parts.inputs(batch, rows, own, shared)  # each part's columns straight from the rows
        # Pooled lists, feature biases, a network that reads its whole input again: assembled as usual, then the
        # context's columns of each part's first example (the same in every example of the part).
        embeddings = self.assemble_split(batch, rows, own, shared)
        first = np.cumsum(batch.counts) - batch.counts
        own = take_columns(embeddings, parts.own_runs, len(parts.own_columns))
        context = take_columns(embeddings[first], parts.context_runs, len(parts.context_columns))
        return FactoredInputs(own, context, batch.counts, embeddings if parts.takes_embeddings else None)

    def lookup_factored(self, ids: np.ndarray, weights: np.ndarray) -> FactoredInputs | None:
        """``lookup`` and ``assemble`` of a flat batch [B, S] straight into the inputs of the dense network's parts
        (cheaper than taking each part's columns out of the whole input); None where the bundle has no parts or they
        need the assembled input (pooled, weighted or biased slots, several tables, a network that reads its whole
        input again): then ``lookup`` and ``assemble``."""
        parts = self.dense_parts
        if parts is None or parts.flat_session is not None:  # the parts in one model take the assembled input
            return None
        if not parts.columns_from_rows or len(self.table_slots) != 1 or not (weights == 1).all():
            return None
        rows, inverse = self.gather_distinct(0, ids)
        context = np.take(rows, inverse[:, parts.context_slots], axis=0).reshape(len(ids), len(parts.context_columns))
        own = np.take(rows, inverse[:, parts.own_slots], axis=0).reshape(len(ids), len(parts.own_columns))
        return FactoredInputs(own, context)

    @property
    def splits_context(self) -> bool:
        """Whether batches of ranking requests keep their contexts at one row per request (``hash_split``)."""
        return self.batch_path is BatchPath.SPLIT

    def score_batch(self, parts: Sequence[CanonicalExamples]) -> tuple[np.ndarray, BatchTimes]:
        """Scores [B] of a batch of canonical requests, and each stage's time: by the path chosen at load."""
        if self.batch_path is BatchPath.SPLIT:
            return self._split_batch(parts)
        started = time.perf_counter()
        return self._flat_batch(started, *self.hash(parts))

    def score(self, examples: Sequence[Mapping[str, object]], context: Mapping[str, object] | None = None) -> np.ndarray:
        """Scores [B] of one request's examples (with ``context``: a ranking request's candidates), a batch alone."""
        scores, _ = self.score_batch([self.canonicalise(examples, context)])
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    def score_encoded(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Scores of hashed rows and pooling weights [B, S] (``hash``'s output), as ``score_batch`` gives them."""
        scores, _ = self._flat_batch(time.perf_counter(), rows, weights)
        return scores

    def _split_batch(self, parts: Sequence[CanonicalExamples]) -> tuple[np.ndarray, BatchTimes]:
        """Ranking requests: their contexts' rows hashed and looked up once a request, and where the dense network
        is split by this context, its context part computed once a request. A batch where some request shares
        nothing is flat."""
        t0 = time.perf_counter()
        split = self.hash_split(parts)
        if split is None:
            return self._flat_batch(t0, *self.hash(parts))
        t1 = time.perf_counter()
        looked_up = self.lookup_split(split)
        t2 = time.perf_counter()
        embeddings = self.factored_inputs(split, *looked_up)
        if embeddings is None:
            embeddings = self.assemble_split(split, *looked_up)
        t3 = time.perf_counter()
        scores = self.dense(embeddings)
        return scores, BatchTimes(t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3, split.ids)

    def _flat_batch(self, t0: float, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, BatchTimes]:
        """Every example's rows [B, S] (hashed since ``t0``): looked up, assembled (straight into the dense network's
        parts where it is split and the batch allows it), scored; or scored by the whole model from the rows."""
        t1 = time.perf_counter()
        if self.whole_model is not None:  # its time counts as lookup's
            scores = self.whole_model(rows, weights)
            return scores, BatchTimes(t1 - t0, time.perf_counter() - t1, 0.0, 0.0, rows.size)
        factored = self.lookup_factored(rows, weights)
        if factored is None and self.pools_in_one_pass:
            gathered = self.gather_distinct(0, rows)
            t2 = time.perf_counter()
            embeddings = self.assemble_gathered(*gathered, weights)
        else:
            looked_up = self.lookup(rows) if factored is None else None
            t2 = time.perf_counter()
            embeddings = self.assemble(looked_up, weights) if factored is None else factored
        t3 = time.perf_counter()
        scores = self.dense(embeddings)
        return scores, BatchTimes(t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3, rows.size)
