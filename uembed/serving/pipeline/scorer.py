"""The reference scorer: examples -> row ids (``uembed/serving/pipeline/encoding.py``) -> rows from the row files -> assemble -> dense ONNX.

Plain and unbatched beyond the batch it is given; the service and the tests reuse its
stages (``uembed/serving/pipeline/encoding.py`` lists them in order). Each stage is one function:

>>> scorer = ReferenceScorer(load_bundle("bundles/movielens/1"))       # doctest: +SKIP
>>> scorer.score([{"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}])  # doctest: +SKIP
array([0.87], dtype=float32)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pyarrow as pa

from uembed.bundle.dense_split import CONTEXT_INPUT, OWN_INPUT, PARTIAL, context_columns
from uembed.bundle.loader import Bundle
from uembed.contract.errors import BundleError, ExampleError, UembedError
from uembed.serving.pipeline.encoding import NO_LIMITS, CanonicalExamples, ExampleEncoder, SplitBatch, ValueLimits

log = logging.getLogger("uembed.scorer")

__all__ = ["CPU_PROVIDERS", "ExampleError", "ReferenceScorer", "distinct", "onnx_session"]

CPU_PROVIDERS = ("CPUExecutionProvider",)


def distinct(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``ids`` (in order of first appearance) and where each id is among them, in ``ids``' shape:
    ``unique[inverse]`` is ``ids``. A hash table (Arrow's dictionary encoding), not ``np.unique``'s sort: on the
    scale bench's requests, 0.11 -> 0.08 ms for a ranking request's 3,020 ids and 0.141 -> 0.133 ms for the same
    500 examples flat (13,000 ids, against the sort of runs it replaced); one-off /tmp measurements, directions."""
    encoded = pa.array(np.ascontiguousarray(ids).ravel()).dictionary_encode()
    # Arrow's buffers are read-only in numpy: int64 copies, as np.unique returns them (a few microseconds)
    return encoded.dictionary.to_numpy(zero_copy_only=False, writable=True), encoded.indices.to_numpy().astype(np.int64).reshape(ids.shape)


def onnx_session(path, threads: int = 1, providers: Sequence = CPU_PROVIDERS) -> ort.InferenceSession:
    """An ONNX Runtime session with one compute thread (scale with processes, not threads).

    ``providers`` as ONNX Runtime takes them (names, or ``(name, options)`` pairs). The CPU provider unless a
    caller asks for another, so a score never depends on whether the machine happens to have a GPU.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    names = [p if isinstance(p, str) else p[0] for p in providers]
    if "CUDAExecutionProvider" in names and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels the gpu extra installs
    model = path if isinstance(path, bytes) else str(path)  # a file, or a serialised model
    return ort.InferenceSession(model, sess_options=options, providers=list(providers))


class ReferenceScorer:
    def __init__(
        self,
        bundle: Bundle,
        threads: int = 1,
        providers: Sequence = CPU_PROVIDERS,
        limits: ValueLimits = NO_LIMITS,
        cache_bytes: int = 0,
        use_dense_parts: bool = True,
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
        self.pooling = self.plan.pooling_matrix()
        self.one_slot_per_group = self.pooling.shape[0] == self.pooling.shape[1] and np.array_equal(self.pooling, np.eye(len(self.pooling)))
        self.bias_columns = self.plan.bias_columns()
        self.slot_tables = slot_tables
        self.dense_parts = None
        entry = bundle.manifest["dense"].get("context_split")
        on_cpu = all((p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in providers)
        if entry is not None and use_dense_parts and on_cpu:  # the CUDA runtime runs dense.onnx on its device buffers
            parts = DenseParts(self, entry, threads)
            if parts.rows_independent():
                self.dense_parts = parts
            else:  # batch-dependent scores would break parity between the forms, and between batches
                log.warning("bundle %s: the dense network's context part scores a row differently alone and among "
                            "others; serving dense.onnx whole instead", bundle.path)  # fmt: skip

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
        """Rows of every slot: float32 [B, S, D]."""
        out = np.empty(rows.shape + (self.plan.dim,), dtype=np.float32)
        for position, (_, slots) in enumerate(self.table_slots):
            out[:, slots] = self.gather_table(position, rows[:, slots])
        return out

    def gather_table(self, position: int, ids: np.ndarray) -> np.ndarray:
        """Rows float32 [*ids.shape, D] of ids of the table at ``position``."""
        return self.table_slots[position][0].gather(ids)

    def gather_distinct(self, position: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows float32 [U, D] of the distinct ``ids`` of the table at ``position``, and where each id's row is."""
        unique, inverse = distinct(ids)
        return self.table_slots[position][0].gather(unique), inverse

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

    def assemble_split(self, batch: SplitBatch, rows: np.ndarray, own: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """``assemble`` of a split batch from ``lookup_split``'s distinct rows: each slot's row taken straight into the
        batch's [B, S, D] (a part's context positions repeated to its examples: ints, not rows, are broadcast), then
        weighted where some weight is not 1. The same products as ``assemble`` of the broadcast batch."""
        index = batch.place(own, np.repeat(shared, batch.counts, axis=0), np.int64)
        weighted = np.take(rows, index, axis=0)
        if not ((batch.weights == 1).all() and (batch.context_weights == 1).all()):
            weighted *= batch.place(batch.weights, np.repeat(batch.context_weights, batch.counts, axis=0), np.float32)[..., None]
        return self._pool(weighted)

    def _pool(self, weighted: np.ndarray) -> np.ndarray:
        if self.one_slot_per_group:  # every (feature, lookup) one slot: pooling is the identity (most plans)
            out = weighted.reshape(len(weighted), -1)
        else:
            out = np.einsum("gs,bsd->bgd", self.pooling, weighted).reshape(len(weighted), -1).astype(np.float32)
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
        return FactoredInputs(np.take(embeddings, parts.own_columns, axis=1), embeddings[first][:, parts.context_columns],
                              batch.counts, embeddings if parts.takes_embeddings else None)  # fmt: skip

    def lookup_factored(self, ids: np.ndarray, weights: np.ndarray) -> FactoredInputs | None:
        """``lookup`` and ``assemble`` of a flat batch [B, S] straight into the inputs of the dense network's parts
        (taking each part's columns out of the whole input cost a flat 500-example request 0.14 ms, half its dense
        network's time, in a one-off /tmp measurement); None where the bundle has no parts or they need the assembled input (pooled, weighted or
        biased slots, several tables, a network that reads its whole input again): then ``lookup`` and ``assemble``."""
        parts = self.dense_parts
        if parts is None or not parts.columns_from_rows or len(self.table_slots) != 1 or not (weights == 1).all():
            return None
        rows, inverse = self.gather_distinct(0, ids)
        context = np.take(rows, inverse[:, parts.context_slots], axis=0).reshape(len(ids), len(parts.context_columns))
        own = np.take(rows, inverse[:, parts.own_slots], axis=0).reshape(len(ids), len(parts.own_columns))
        return FactoredInputs(own, context)

    def score(self, examples: Sequence[Mapping[str, object]]) -> np.ndarray:
        rows, weights = self.encode(examples)
        return self.score_encoded(rows, weights)

    def score_encoded(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        factored = self.lookup_factored(rows, weights)
        return self.dense(self.assemble(self.lookup(rows), weights) if factored is None else factored)


class DenseParts:
    """The dense network as its two parts split by a context feature group (``uembed/bundle/dense_split.py``), checked
    against the bundle's layout at load."""

    def __init__(self, scorer: ReferenceScorer, entry: dict, threads: int) -> None:
        bundle, plan = scorer.bundle, scorer.plan
        dense = bundle.manifest["dense"]
        where = f"bundle {bundle.path}: dense.context_split"
        missing = [key for key in ("features", "width", "of", "context", "rest") if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise BundleError(f"{where}: no {', '.join(missing)} (written by an older export?); export the bundle again")
        try:
            self.context_columns, self.own_columns = context_columns(dense["layout"], entry["features"])
        except (TypeError, UembedError) as exc:
            raise BundleError(f"{where}: {exc}") from exc
        if entry["of"] != dense["sha256"]:
            raise BundleError(f"{where}: cut from another dense.onnx than the bundle's (its sha256 differs); export the "
                              "bundle again")  # fmt: skip
        self.context_session = onnx_session(bundle.path / entry["context"]["file"], threads)
        self.rest_session = onnx_session(bundle.path / entry["rest"]["file"], threads)
        self.input_name = scorer.input_name
        width = lambda arg: arg.shape[-1] if arg.shape else None  # noqa: E731
        rest_inputs = {i.name: width(i) for i in self.rest_session.get_inputs()}
        self.takes_embeddings = self.input_name in rest_inputs  # a cross network reads its whole input again
        expected = {OWN_INPUT: len(self.own_columns), PARTIAL: entry["width"]} | ({self.input_name: plan.output_dim} if self.takes_embeddings else {})
        context_part = [(i.name, width(i)) for i in self.context_session.get_inputs()]
        context_out = [(o.name, width(o)) for o in self.context_session.get_outputs()]
        if rest_inputs != expected or context_part != [(CONTEXT_INPUT, len(self.context_columns))] or context_out != [(PARTIAL, entry["width"])]:
            raise BundleError(f"{where}: its parts take {context_part} -> {context_out} and {rest_inputs}; the layout "
                              f"gives {CONTEXT_INPUT}: {len(self.context_columns)} -> {PARTIAL}: {entry['width']} and {expected}")  # fmt: skip
        # The slots of the group's features: a split batch with exactly these context slots takes the factored path.
        chosen = set(entry["features"])
        in_context = np.concatenate([np.full(f.width * len(f.lookups), f.name in chosen) for f in plan.features])
        self.context_slots, self.own_slots = np.flatnonzero(in_context), np.flatnonzero(~in_context)
        # Whether slot s's row is columns [s * D, (s + 1) * D) of the input (one unpooled slot a feature, no feature
        # bias), and the rest part needs nothing else: then each part's columns come straight from the rows.
        slot_columns = lambda slots: (slots[:, None] * plan.dim + np.arange(plan.dim)).ravel()  # noqa: E731
        self.columns_from_rows = (scorer.one_slot_per_group and not scorer.bias_columns.size and not self.takes_embeddings
                                  and np.array_equal(self.context_columns, slot_columns(self.context_slots))
                                  and np.array_equal(self.own_columns, slot_columns(self.own_slots)))  # fmt: skip

    def rows_independent(self) -> bool:
        """Whether the context part gives rows the same floats in batches of 1, 3, 64 and 512: what computing it once
        a request, and scoring an example alike in any batch, rely on. True of ONNX Runtime's CPU matrix product with
        constant (prepacked) weights; checked at load rather than assumed."""
        rows = np.random.default_rng(0).standard_normal((512, len(self.context_columns))).astype(np.float32)
        together = self._context(rows)
        alone = [self._context(rows[i : i + 1]) for i in range(64)]
        return all(np.array_equal(self._context(rows[:n]), together[:n]) for n in (3, 64)) and np.array_equal(
            np.concatenate(alone), together[:64])

    def matches(self, batch: SplitBatch) -> bool:
        """Whether the batch's context (the features every part shares) is the split's group."""
        return np.array_equal(batch.context_slots, self.context_slots)

    def inputs(self, batch: SplitBatch, rows: np.ndarray, own: np.ndarray, shared: np.ndarray) -> FactoredInputs:
        context = np.take(rows, shared, axis=0).reshape(len(shared), len(self.context_columns))  # slots in input order
        own_columns = np.take(rows, own, axis=0).reshape(len(own), len(self.own_columns))
        return FactoredInputs(own_columns, context, batch.counts)

    def score(self, embeddings: np.ndarray | FactoredInputs) -> np.ndarray:
        """Scores of whole examples' embeddings [B, E] (both parts on every example), or of factored inputs (the
        context part on one row a part, repeated to its examples): the same floats for the same example."""
        if isinstance(embeddings, FactoredInputs):
            partial = self._context(embeddings.context)
            if embeddings.counts is not None:
                partial = np.repeat(partial, embeddings.counts, axis=0)
            return self._rest(embeddings.own, partial, embeddings.embeddings)
        context = np.take(embeddings, self.context_columns, axis=1)
        own = np.take(embeddings, self.own_columns, axis=1)
        return self._rest(own, self._context(context), embeddings)

    def _context(self, context: np.ndarray) -> np.ndarray:
        return self.context_session.run(None, {CONTEXT_INPUT: context})[0]

    def _rest(self, own: np.ndarray, partial: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        feeds = {OWN_INPUT: own, PARTIAL: partial}
        if self.takes_embeddings:
            feeds[self.input_name] = embeddings
        return self.rest_session.run(None, feeds)[0]


@dataclass
class FactoredInputs:
    """A batch's inputs to the dense network's parts: every example's own columns [B, E_o], and the context's columns:
    each part's [P, E_c], part p standing for ``counts[p]`` consecutive examples (a batch of ranking requests), or
    every example's [B, E_c] (``counts`` None: a flat batch)."""

    own: np.ndarray
    context: np.ndarray
    counts: np.ndarray | None = None
    embeddings: np.ndarray | None = None  # every example's whole input [B, E], where the rest part reads it too

    def __len__(self) -> int:
        return len(self.own)
