"""The memory levers a study crosses with its methods and budgets, and the bytes a bundle serves with each.

Three levers besides the rows a method gets:

* a **row codec** applied after training (``uembed export --dtype``): :func:`with_codec` gives a copy of a trained
  model whose table rows are encoded and decoded exactly as an export writes them and a bundle's reader decodes
  them (``uembed/bundle/codecs.py``; pq codebooks trained on the same sample of rows), so its AUC is the AUC of
  that bundle;
* **quantization-aware training** (``TrainConfig.qat``, ``uembed/model/qat.py``): a training setting; a QAT run is
  only evaluated in its own codec, since the export writes no other (a pq QAT run with the codebooks it trained);
* **structured dimension pruning** (``uembed/model/pruning.py``): a trained run narrowed to ``keep`` columns with
  fine-tuning, then evaluated in each codec like any run.

:func:`served_bytes` counts what serving the embeddings takes in a codec: every table's records (values, and the
rowwise codecs' float32 scale and bias), pq codebooks, the per-feature biases, and the maps from values to rows
that some methods need (collisionless vocabularies, hybrid heads' sorted keys). A study compares each
configuration's served bytes with the collisionless float32 table's rows (its vocabularies left out, which
understates every compression a little).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from uembed.bundle.codecs import (
    NUMPY_ROW_DTYPE,
    PQ_CENTROIDS,
    ROWWISE_BITS,
    SCALE_BIAS_BYTES,
    decode_rows,
    default_subvectors,
    encode_rows,
    row_width,
    train_codebooks,
)
from uembed.bundle.format import chunk_bounds, pq_sample
from uembed.contract.errors import UembedError
from uembed.contract.plan import EmbeddingPlan
from uembed.model.networks import RankingModel
from uembed.model.qat import QAT_CODECS

FLOAT_CODECS = ("float32", "float16")


class LeverError(UembedError):
    kind = "study"


def record_bytes(codec: str, dim: int, subvectors: int | None = None) -> int:
    """Bytes one row of ``dim`` values takes in ``codec``'s record (values, then a rowwise codec's scale and bias)."""
    width = row_width(codec, dim, default_subvectors(dim, subvectors) if codec == "pq" else None)
    return width * np.dtype(NUMPY_ROW_DTYPE[codec]).itemsize + (SCALE_BIAS_BYTES if codec in ROWWISE_BITS else 0)


def served_bytes(plan: EmbeddingPlan, codec: str, subvectors: int | None = None, maps: bool = True) -> int:
    """Bytes the embeddings of ``plan`` take when a bundle serves them in ``codec`` (module docstring); without
    ``maps``, the tables' files alone (records, codebooks) and the biases."""
    total = sum(t.rows * record_bytes(codec, t.dim, subvectors) for t in plan.tables)
    if codec == "pq":
        total += sum(PQ_CENTROIDS * t.dim * 4 for t in plan.tables)
    values = sum(v.nbytes for v in (*plan.vocabularies.values(), *plan.heads.values())) if maps else 0
    return total + values + 4 * plan.bias_parameters


def check_codecs(codecs: tuple[str, ...], qat: tuple[str | None, ...], dims: tuple[int, ...], subvectors: int | None,
                 prune_keep: tuple[int, ...] = ()) -> None:  # fmt: skip
    """One-line errors for lever settings that cannot be studied, before any training."""
    if "pq" in codecs:
        for dim in dims:
            if dim % default_subvectors(dim, subvectors):
                given = f"--pq-subvectors {subvectors}" if subvectors else f"pq's default of {default_subvectors(dim, None)} sub-vectors"
                raise LeverError(f"{given} does not divide the dim {dim} (a studied or pruned width); pick a divisor of every one")
    for codec in qat:
        if codec is not None and codec not in QAT_CODECS:
            raise LeverError(f"--qat {codec!r}: QAT trains {', '.join(QAT_CODECS)} or none")
    if "pq" in qat:
        if prune_keep:
            raise LeverError("--qat pq with --prune-keep: a pq run's codebooks are as wide as its rows, so it is not pruned")
        for dim in dims:
            if dim % default_subvectors(dim, subvectors):
                raise LeverError(f"--qat pq: {subvectors or 'the default'} sub-vectors do not divide the dim {dim}; give --pq-subvectors")


def codec_rows(rows: np.ndarray, codec: str, subvectors: int | None = None, codebooks: np.ndarray | None = None) -> np.ndarray:
    """float32 rows ``[k, dim]`` as a bundle of ``codec`` serves them (encoded as the export encodes, then decoded);
    pq's ``codebooks``: a pq QAT run's own (None: trained here, as the export trains them)."""
    if codec == "float32":
        return rows
    dim = rows.shape[1]
    if codec == "pq" and codebooks is None:
        codebooks = train_codebooks(pq_sample(len(rows), lambda start, stop: rows[start:stop]), default_subvectors(dim, subvectors))
    out = np.empty_like(rows)
    for start, stop in chunk_bounds(len(rows)):
        values, scale_bias = encode_rows(rows[start:stop], codec, codebooks)
        out[start:stop] = decode_rows(values, codec, dim, scale_bias, codebooks)
    return out


def table_holder(model: RankingModel):
    """The PlanEmbedding holding the model's tables (a pruned or search model wraps one)."""
    return getattr(model.embedding, "base", model.embedding)


def with_codec(model: RankingModel, codec: str, subvectors: int | None = None) -> RankingModel:
    """A copy of ``model`` scoring with its table rows as a ``codec`` bundle serves them."""
    copied = copy.deepcopy(model)
    tables = table_holder(copied)
    # The decoded rows are already what the codec serves: quantising them again in the forward pass could move them.
    tables.qat_bits, tables.qat_pq = 0, False
    if codec == "float32":
        return copied
    trained = tables.pq_codebooks.numpy() if codec == "pq" and tables.pq_codebooks is not None else None
    with torch.no_grad():
        weight = tables.weight.detach().numpy()
        for index, (_name, start, stop) in enumerate(tables.table_slices):
            decoded = codec_rows(np.ascontiguousarray(weight[start:stop]), codec, subvectors, None if trained is None else trained[index])
            tables.weight[start:stop] = torch.from_numpy(decoded)
    return copied


def codecs_for(qat: str | None, codecs: tuple[str, ...]) -> tuple[str, ...]:
    """The codecs a run is evaluated in: a QAT run in its own codec only, any other in each codec studied."""
    return (qat,) if qat else codecs
