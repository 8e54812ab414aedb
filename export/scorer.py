"""The reference scorer: examples -> row ids (``export/encoding.py``) -> rows from the row files -> assemble -> dense ONNX.

Plain and unbatched beyond the batch it is given; the service and the tests reuse its
stages (``export/encoding.py`` lists them in order). Each stage is one function:

>>> scorer = ReferenceScorer(load_bundle("bundles/movielens/1"))       # doctest: +SKIP
>>> scorer.score([{"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}])  # doctest: +SKIP
array([0.87], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from export.encoding import NO_LIMITS, CanonicalExamples, ExampleEncoder, ValueLimits
from export.loader import Bundle
from model.errors import ExampleError

__all__ = ["CPU_PROVIDERS", "ExampleError", "ReferenceScorer", "onnx_session"]

CPU_PROVIDERS = ("CPUExecutionProvider",)


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
    ) -> None:
        self.bundle = bundle
        self.plan = bundle.plan
        self.encoder = ExampleEncoder(bundle.feature_specs, bundle.plan, limits, cache_bytes, bundle.known_values)
        self.session = onnx_session(bundle.dense_path, threads, providers)
        slot_tables = self.plan.slot_tables()
        self.table_slots = [
            (bundle.tables[t.name], np.flatnonzero(slot_tables == i)) for i, t in enumerate(self.plan.tables)
        ]
        self.pooling = self.plan.pooling_matrix()
        self.one_slot_per_group = self.pooling.shape[0] == self.pooling.shape[1] and np.array_equal(self.pooling, np.eye(len(self.pooling)))
        self.bias_columns = self.plan.bias_columns()

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

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Rows of every slot: float32 [B, S, D]."""
        out = np.empty(rows.shape + (self.plan.dim,), dtype=np.float32)
        for table, slots in self.table_slots:
            out[:, slots] = table.gather(rows[:, slots])
        return out

    def assemble(self, looked_up: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Pool each (feature, lookup), concatenate, add feature biases: float32 [B, E]."""
        weighted = looked_up * weights[..., None]
        if self.one_slot_per_group:  # every (feature, lookup) one slot: pooling is the identity (most plans)
            out = weighted.reshape(len(looked_up), -1)
        else:
            out = np.einsum("gs,bsd->bgd", self.pooling, weighted).reshape(len(looked_up), -1).astype(np.float32)
        if self.bias_columns.size:
            out[:, self.bias_columns] += self.bundle.bias
        return out

    def dense(self, embeddings: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"embeddings": embeddings})[0]

    def score(self, examples: Sequence[Mapping[str, object]]) -> np.ndarray:
        rows, weights = self.encode(examples)
        return self.score_encoded(rows, weights)

    def score_encoded(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.dense(self.assemble(self.lookup(rows), weights))
