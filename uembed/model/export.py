"""Writing bundles: a trained run directory -> ``<out>/<name>/<version>/``.

A bundle is what the service loads, with no pickle and no training code::

    manifest.json              format version, features, tables, hashing spec + test vectors,
                               dense input layout, training metrics, software versions
    tables/<table>.npy         rows in the table's codec (uembed/bundle/codecs.py, docs/EXPORT.md): float32,
                               float16, or uint8 codes (int8, int4, int2 rowwise-quantised; pq)
    tables/<table>.scale_bias.npy   float32 [rows, 2] per-row scale and bias (int8, int4, int2)
    tables/<table>.codebooks.npy    float32 [M, 256, dim / M] product-quantisation codebooks (pq)
    vocab/<feature>.npy        sorted uint64 keys of a collisionless feature
    heads/<feature>.npy        sorted uint64 keys of a feature's head (hybrid tables, --head-share)
    dense.onnx                 network after the embeddings: embeddings [B, E] -> probability [B]
    dense_context.onnx, dense_rest.onnx   the same network split by a context feature group
                               (``--context-features``, ``uembed/bundle/dense_split.py``), which the CPU service runs;
    dense_flat.onnx            the two parts in one model, for flat batches
    model.onnx, model.pt       full model (rows, weights -> probability), float32 bundles whose
                               tables fit under the size limit

The bundle is written to a temporary folder beside the target and renamed into place, so
a failed export leaves nothing half-written: the staging folder is removed whatever stopped it. Free space
is checked first against the bundle's expected size, and a write that fails (a full disk, a file-size limit)
is one ExportError naming the bundle and the system's error: ``model.pt`` is serialised in memory and written by Python, as every
other file is, because torch's own file writer aborts the process on a failed write.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from uembed.bundle.codecs import PQ_CENTROIDS, ROWWISE_BITS, SCALE_BIAS_BYTES, default_subvectors, row_width
from uembed.bundle.dense_split import add_context_split, context_columns, layout_of
from uembed.bundle.format import (
    FORMAT,
    FORMAT_VERSION,
    NUMPY_ROW_DTYPE,
    ROW_DTYPES,
    file_entry,
    test_vectors,
    write_head,
    write_known_values,
    write_table_rows,
)
from uembed.contract.collisions import run_report
from uembed.contract.errors import UembedError
from uembed.contract.hashing import spec_description
from uembed.contract.known import KnownValues, load_known_values
from uembed.contract.plan import EmbeddingPlan, method_spec
from uembed.model.networks import RankingModel
from uembed.model.train import load_run


class ExportError(UembedError):
    kind = "export"


class ProbabilityModel(torch.nn.Module):
    """Full model with a sigmoid: rows ``[B, S]``, weights ``[B, S]`` -> probability ``[B]``."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(rows, weights))


class DenseProbability(torch.nn.Module):
    """The network after the embeddings: embeddings ``[B, E]`` -> probability ``[B]``."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.network = model.network

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(embeddings))


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("uembed", "torch", "numpy", "onnx", "onnxruntime", "xxhash"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def next_version(root: Path) -> str:
    existing = [int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    return str(max(existing, default=0) + 1)


SPACE_MARGIN_BYTES = 4 * 2**20  # the manifest, the ONNX graphs and the files' headers


def expected_bytes(plan: EmbeddingPlan, model: RankingModel, known: dict[str, KnownValues], dtype: str, full_model: bool,
                   context_split: bool, pq_subvectors: int | None = None) -> int:  # fmt: skip
    """About how many bytes the bundle's files take: the row files (and a pq table's codebooks), vocabularies, head
    keys and known values, the dense network (twice more when split by a context), and for a full model its ONNX and
    TorchScript files, each holding the float32 tables and the network."""
    item = np.dtype(NUMPY_ROW_DTYPE[dtype]).itemsize
    scale_bias = SCALE_BIAS_BYTES if dtype in ROWWISE_BITS else 0
    rows = sum(t.rows * (row_width(dtype, t.dim, pq_subvectors) * item + scale_bias) for t in plan.tables)
    if dtype == "pq":
        rows += sum(PQ_CENTROIDS * t.dim * 4 for t in plan.tables)
    values = sum(v.nbytes for v in (*plan.vocabularies.values(), *plan.heads.values())) + sum(k.bits.nbytes for k in known.values())
    network = 4 * sum(p.numel() for p in model.network.parameters())
    full = 2 * (4 * plan.table_parameters + network) if full_model else 0
    return rows + values + network * (4 if context_split else 1) + full + SPACE_MARGIN_BYTES


def writes_full_model(plan: EmbeddingPlan, dtype: str, limit_bytes: int) -> bool:
    return dtype == "float32" and plan.table_parameters * 4 <= limit_bytes


def check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ExportError(f"not enough space in {folder}: the bundle needs about {needed:,} bytes, {free:,} are free")


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write, also when a library wrapped it (the ONNX exporter does)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def export_onnx(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], path: Path) -> None:
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            module.eval(),
            inputs,
            str(path),
            input_names=names,
            output_names=["probability"],
            dynamic_shapes=tuple({0: batch} for _ in inputs),
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def trained_codebooks(model: RankingModel) -> np.ndarray | None:
    """float32 ``[tables, M, 256, dim / M]``: the codebooks a ``--qat pq`` run trained its rows with; None for
    another run."""
    codebooks = getattr(model.embedding, "base", model.embedding).pq_codebooks
    return None if codebooks is None else codebooks.detach().numpy()


def row_dtype_of(run_dir: Path, qat: str | None, dtype: str | None) -> str:
    """The codec a run's rows are exported in: a QAT run's own codec (another would serve rows it did not learn
    with), else ``dtype`` or float32."""
    if qat is None:
        return dtype or "float32"
    if dtype not in (None, qat):
        raise ExportError(f"{run_dir} was trained with --qat {qat}: export it with --dtype {qat} (the rows it learned with), not {dtype}")
    return qat


def export_run(
    run_dir: Path,
    out_root: Path,
    name: str,
    version: str | None = None,
    dtype: str | None = None,
    full_model_limit_bytes: int = 64 * 2**20,
    progress: bool = False,
    context_features: Sequence[str] = (),
    pq_subvectors: int | None = None,
) -> Path:
    """Export a training run as ``out_root/name/version``; returns the bundle path. ``dtype``: the row codec (default:
    the codec of a QAT run, else float32). ``context_features``: also write the dense network split by that group
    (``uembed/bundle/dense_split.py``), for ranking requests with that context. ``pq_subvectors``: M of a pq export
    (default: half the dim, two values a sub-vector)."""
    if dtype is not None and dtype not in ROW_DTYPES:
        raise ExportError(f"row dtype must be one of {', '.join(ROW_DTYPES)}, got {dtype!r}")
    if not (run_dir / "checkpoint.pt").is_file():
        raise ExportError(f"{run_dir} is not a training run directory (no checkpoint.pt)")
    config, plan, model, doc = load_run(run_dir)
    dtype = row_dtype_of(run_dir, config.qat, dtype)
    if pq_subvectors is not None and dtype != "pq":
        raise ExportError(f"--pq-subvectors is for --dtype pq, not {dtype}")
    trained = trained_codebooks(model)
    if trained is not None:
        if pq_subvectors not in (None, trained.shape[1]):
            raise ExportError(f"{run_dir} was trained with --qat pq in {trained.shape[1]} sub-vectors: leave out --pq-subvectors {pq_subvectors}")
        pq_subvectors = trained.shape[1]
    elif dtype == "pq":
        try:
            import faiss  # noqa: F401 - only whether it is there: the codebooks are trained in uembed.bundle.codecs
        except ImportError:
            raise ExportError("--dtype pq trains its codebooks with faiss, which is not installed: pip install 'uembed[train]'") from None
        pq_subvectors = default_subvectors(plan.dim, pq_subvectors)
        for table in plan.tables:
            if pq_subvectors < 1 or table.dim % pq_subvectors:
                raise ExportError(f"--pq-subvectors {pq_subvectors} does not divide table {table.name}'s dim {table.dim}")
    if context_features:
        context_columns(layout_of(plan), context_features)  # a bad name is refused before any row file is written
    if not method_spec(plan.method).servable:
        raise ExportError(
            f"{run_dir} is an SEO search run: it explores chunk policies and is not served. Train the Applier from "
            f"its policy (uembed train --embedding seo-applier --policy {run_dir / 'policy.json'}) and export that"
        )
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    version = version or next_version(out_root / name)
    target = out_root / name / version
    if target.exists():
        raise ExportError(f"bundle {target} already exists; choose another --version")
    known = load_known_values(run_dir / "known_values.npz")
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        full_model = writes_full_model(plan, dtype, full_model_limit_bytes)
        check_space(target.parent, expected_bytes(plan, model, known, dtype, full_model, bool(context_features), pq_subvectors))
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
        manifest = write_bundle(staging, plan, model, doc, metrics, name, version, dtype, full_model_limit_bytes, known, progress,
                                 pq_subvectors)  # fmt: skip
        manifest["collisions"] = run_report(run_dir, streamed=bool((doc.get("source") or {}).get("streaming")))
        if context_features:
            add_context_split(staging, manifest, context_features)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the service's user
        staging.rename(target)
        staging = None
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        code = errno.errorcode.get(failure.errno or 0, "")
        what = f"{failure.strerror} ({code}{', ' + str(failure.filename) if failure.filename else ''})" if code else str(failure)
        raise ExportError(f"writing bundle {target} failed: {what}; its staging folder was removed") from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def write_bundle(
    folder: Path,
    plan: EmbeddingPlan,
    model: RankingModel,
    doc: dict,
    metrics: dict,
    name: str,
    version: str,
    dtype: str,
    full_model_limit_bytes: int,
    known: dict[str, KnownValues] | None = None,
    progress: bool = False,
    pq_subvectors: int | None = None,
) -> dict:
    known = known or {}
    (folder / "tables").mkdir()
    tables = []
    weights = {n: w.detach().numpy() for n, w in model.embedding.table_weights().items()}
    trained = trained_codebooks(model)
    for index, table in enumerate(plan.tables):
        # Streamed: one chunk converted at a time, so a table as large as memory exports (the checkpoint
        # is memory-mapped by load_run; no second full copy of the rows exists at any point).
        rows = weights[table.name]
        tables.append(write_table_rows(folder, table.name, table.rows, table.dim, dtype,
                                       lambda start, stop, rows=rows: rows[start:stop], progress, pq_subvectors,
                                       None if trained is None else trained[index]))  # fmt: skip

    spec = doc["dataset"]["spec"]
    spec_by_name = {f["name"]: f for f in spec["features"]}
    group_of = {member: group for group, members in spec.get("groups", {}).items() for member in members}
    bias = model.embedding.bias.detach().numpy().astype(np.float32)
    bias_at, features = 0, []
    for feature in plan.features:
        entry = {**spec_by_name[feature.name], "group": group_of.get(feature.name), "bias": None, "vocabulary": None}
        if feature.bias:
            size = len(feature.lookups) * plan.dim
            entry["bias"] = [float(v) for v in bias[bias_at : bias_at + size]]
            bias_at += size
        if feature.vocabulary:
            (folder / "vocab").mkdir(exist_ok=True)
            np.save(folder / "vocab" / f"{feature.name}.npy", plan.vocabularies[feature.name])
            entry["vocabulary"] = {"size": int(plan.vocabularies[feature.name].size), **file_entry(folder, f"vocab/{feature.name}.npy")}
        if feature.name in plan.heads:
            entry["head"] = write_head(folder, feature.name, plan.heads[feature.name], feature.head_start)
        if feature.name in known:
            entry["known"] = write_known_values(folder, feature.name, known[feature.name])
        features.append(entry)

    example_rows = torch.zeros(2, plan.slots, dtype=torch.long)
    example_weights = torch.ones(2, plan.slots)
    export_onnx(DenseProbability(model), (torch.zeros(2, plan.output_dim),), ["embeddings"], folder / "dense.onnx")
    full_model = None
    if writes_full_model(plan, dtype, full_model_limit_bytes):
        export_onnx(ProbabilityModel(model), (example_rows, example_weights), ["rows", "weights"], folder / "model.onnx")
        buffer = io.BytesIO()  # torch's file writer aborts the process when a write fails; Python's raises
        torch.jit.save(torch.jit.script(ProbabilityModel(model).eval()), buffer)
        (folder / "model.pt").write_bytes(buffer.getbuffer())
        full_model = {
            "inputs": {"rows": ["batch", plan.slots, "int64"], "weights": ["batch", plan.slots, "float32"]},
            "output": {"probability": ["batch", "float32"]},
            "onnx": file_entry(folder, "model.onnx"),
            "torchscript": file_entry(folder, "model.pt"),
        }

    train_values = {}
    for feature in plan.features:
        # Real values for the test vectors: the collisionless vocabulary cannot be reversed,
        # so every bundle takes its vectors from the values recorded at training time.
        samples = doc.get("sample_values", {}).get(feature.name, []) + doc.get("head_samples", {}).get(feature.name, [])
        train_values[feature.name] = [v.encode("utf-8", "surrogateescape") for v in samples]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": software_versions(),
        "hashing": {**spec_description(), "test_vectors": test_vectors(plan, train_values)},
        "embedding": plan.to_dict(),
        "features": features,
        "label": spec["label"],
        "tables": tables,
        "dense": {
            **file_entry(folder, "dense.onnx"),
            "input": {"name": "embeddings", "shape": ["batch", plan.output_dim], "dtype": "float32"},
            "output": {"name": "probability", "shape": ["batch"], "dtype": "float32"},
            "layout": layout_of(plan),
        },
        "full_model": full_model,
        # SEO Applier bundles: the chunk policy the tables were built from (uembed/contract/seo.py).
        "policy": (doc.get("train") or {}).get("policy"),
        "training": {k: metrics.get(k) for k in ("dataset", "embedding", "test_auc", "test_logloss", "best_epoch", "embedding_bytes")}
        | {"config": doc.get("train"), "source": doc.get("source")},
        "command": " ".join(sys.argv),
    }
