"""The dense stage's ONNX sessions: the network whole (``dense.onnx``), or its two parts where the export split it by a
context feature group (``uembed/bundle/dense_split.py``): the context's part computed once a request, the rest per
example, with the same floats."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from uembed.bundle.dense_split import CONTEXT_INPUT, OWN_INPUT, PARTIAL, context_columns
from uembed.bundle.loader import Bundle
from uembed.contract.errors import BundleError, UembedError
from uembed.serving.pipeline.encoding import SplitBatch, slot_runs

log = logging.getLogger("uembed.pipeline")
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


class DenseParts:
    """The dense network as its two parts split by a context feature group (``uembed/bundle/dense_split.py``), checked
    against the bundle's layout at load."""

    def __init__(self, bundle: Bundle, entry: dict, threads: int, input_name: str, one_slot_per_group: bool,
                 has_biases: bool) -> None:  # fmt: skip
        plan = bundle.plan
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
        self.flat_session = None
        self.input_name = input_name
        width = lambda arg: arg.shape[-1] if arg.shape else None  # noqa: E731
        rest_inputs = {i.name: width(i) for i in self.rest_session.get_inputs()}
        self.takes_embeddings = self.input_name in rest_inputs  # a cross network reads its whole input again
        expected = {OWN_INPUT: len(self.own_columns), PARTIAL: entry["width"]} | ({self.input_name: plan.output_dim} if self.takes_embeddings else {})
        context_part = [(i.name, width(i)) for i in self.context_session.get_inputs()]
        context_out = [(o.name, width(o)) for o in self.context_session.get_outputs()]
        self.context_runs, self.own_runs = slot_runs(self.context_columns), slot_runs(self.own_columns)
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
        self.columns_from_rows = (one_slot_per_group and not has_biases and not self.takes_embeddings
                                  and np.array_equal(self.context_columns, slot_columns(self.context_slots))
                                  and np.array_equal(self.own_columns, slot_columns(self.own_slots)))  # fmt: skip
        if "flat" in entry:
            self.flat_session = self._flat_model(bundle.path / entry["flat"]["file"], threads, plan.output_dim)

    def _flat_model(self, path, threads: int, input_width: int) -> ort.InferenceSession | None:
        """Both parts in one model (``uembed/bundle/dense_split.py``), for flat batches: one call rather than two,
        where it takes the whole input and gives the two parts' floats; else None (the two parts), and the log says
        why. An optional file: never the reason a bundle does not load."""
        try:
            session = onnx_session(path, threads)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors: the parts stand without it
            reason = f"ONNX Runtime cannot load it: {exc}"
        else:
            inputs = [(i.name, i.shape[-1] if i.shape else None) for i in session.get_inputs()]
            if inputs != [(self.input_name, input_width)]:
                reason = f"it takes {inputs}, not {self.input_name}: {input_width}"
            elif not self.flat_matches_parts(session):
                reason = "it scores otherwise than the two parts"
            else:
                return session
        log.warning("%s (dense.context_split.flat): %s; flat batches run the two parts instead", path, reason)
        return None

    def rows_independent(self) -> bool:
        """Whether the context part gives rows the same floats in batches of 1, 3, 64 and 512: what computing it once
        a request, and scoring an example alike in any batch, rely on. True of ONNX Runtime's CPU matrix product with
        constant (prepacked) weights; checked at load rather than assumed."""
        rows = np.random.default_rng(0).standard_normal((512, len(self.context_columns))).astype(np.float32)
        together = self._context(rows)
        alone = [self._context(rows[i : i + 1]) for i in range(64)]
        return all(np.array_equal(self._context(rows[:n]), together[:n]) for n in (3, 64)) and np.array_equal(
            np.concatenate(alone), together[:64])

    def flat_matches_parts(self, session: ort.InferenceSession) -> bool:
        """Whether a flat model scores whole inputs with the two parts' floats, in batches of 1, 3, 64 and 512."""
        width = len(self.context_columns) + len(self.own_columns)
        embeddings = np.random.default_rng(1).standard_normal((512, width)).astype(np.float32)
        return all(np.array_equal(session.run(None, {self.input_name: embeddings[:n]})[0], self._parts(embeddings[:n]))
                   for n in (1, 3, 64, 512))  # fmt: skip

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
        if self.flat_session is not None:
            return self._flat(embeddings)
        return self._parts(embeddings)

    def _parts(self, embeddings: np.ndarray) -> np.ndarray:
        context = take_columns(embeddings, self.context_runs, len(self.context_columns))
        own = take_columns(embeddings, self.own_runs, len(self.own_columns))
        return self._rest(own, self._context(context), embeddings)

    def _flat(self, embeddings: np.ndarray) -> np.ndarray:
        return self.flat_session.run(None, {self.input_name: embeddings})[0]

    def _context(self, context: np.ndarray) -> np.ndarray:
        return self.context_session.run(None, {CONTEXT_INPUT: context})[0]

    def _rest(self, own: np.ndarray, partial: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        feeds = {OWN_INPUT: own, PARTIAL: partial}
        if self.takes_embeddings:
            feeds[self.input_name] = embeddings
        return self.rest_session.run(None, feeds)[0]


def take_columns(matrix: np.ndarray, runs: tuple[tuple[int, int, int], ...], width: int) -> np.ndarray:
    """``matrix[:, columns]`` (a contiguous copy) of columns given as ``slot_runs``' runs of consecutive indices: a
    slice copied a run, several times faster than ``np.take`` along the column axis for a batch's rows."""
    out = np.empty((len(matrix), width), dtype=matrix.dtype)
    for position, first, length in runs:
        out[:, position : position + length] = matrix[:, first : first + length]
    return out


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
