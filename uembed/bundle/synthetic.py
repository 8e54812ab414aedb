"""Bundles without training: random rows of any size and a random dense net.

A synthetic bundle is a real bundle: the loader checks it like any other, and its hashing
test vectors are real. Only its numbers mean nothing. It serves where training a model of
the size at hand is beside the point: a 100M-row Criteo-shaped table for the serving
benchmarks, small tables of every row dtype for the CUDA path's parity tests, MovieLens-shaped
bundles for the service tests (tests/conftest.py). Rows are written in chunks
(``uembed/bundle/format.py``'s ``write_table_rows``), so memory stays flat whatever the table size.
Needs numpy and onnx (the ``train`` extra), not torch.

>>> write_synthetic_bundle(Path("bundles"), "criteo-synth", criteo_features(), table_rows=100_000_000)  # doctest: +SKIP
PosixPath('bundles/criteo-synth/1')
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from uembed.bundle.dense_split import add_context_split, context_columns, layout_of
from uembed.bundle.format import (
    FORMAT,
    FORMAT_VERSION,
    ROW_DTYPES,
    file_entry,
    test_vectors,
    write_known_values,
    write_table_rows,
)
from uembed.contract.collisions import ValueCounts, collision_report
from uembed.contract.errors import UembedError
from uembed.contract.features import FeatureSpec
from uembed.contract.hashing import spec_description
from uembed.contract.known import KnownValues
from uembed.contract.plan import EmbeddingPlan, FeaturePlan, LookupPlan, TablePlan

TABLE = "unified"


def criteo_features(categorical: int = 26) -> tuple[FeatureSpec, ...]:
    """Criteo's categorical columns C1..C26, each one value per example."""
    return tuple(FeatureSpec(f"C{i}") for i in range(1, categorical + 1))


def synthetic_plan(features: Sequence[FeatureSpec], table_rows: int, dim: int, width: int, bias_features: Sequence[str]) -> EmbeddingPlan:
    """Unified embedding: one table of ``table_rows`` rows, every feature one lookup with its own seed;
    multivalent features pool up to ``width`` values."""
    plans = tuple(
        FeaturePlan(
            f.name,
            (LookupPlan(TABLE, f.name),),
            width=width if f.multivalent else 1,
            pooling=f.pooling,
            bias=f.name in bias_features,
        )
        for f in features
    )
    return EmbeddingPlan("unified", dim, (TablePlan(TABLE, table_rows, dim),), plans, budget_rows=table_rows)


def random_rows(dim: int, rng: np.random.Generator):
    """Chunks of random float32 rows for :func:`uembed.bundle.format.write_table_rows`."""
    return lambda start, stop: rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(0.2)


def write_dense(path: Path, inputs: int, hidden: Sequence[int], rng: np.random.Generator) -> None:
    """An MLP ``embeddings [B, E] -> probability [B]`` with random weights, as ONNX."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, initialisers = [], []
    previous, width = "embeddings", inputs
    for layer, size in enumerate([*hidden, 1]):
        weight = (rng.standard_normal((width, size)) * np.sqrt(2.0 / width)).astype(np.float32)
        bias = (rng.standard_normal(size) * 0.1).astype(np.float32)
        initialisers += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(bias, f"b{layer}")]
        nodes += [helper.make_node("MatMul", [previous, f"w{layer}"], [f"m{layer}"]),
                  helper.make_node("Add", [f"m{layer}", f"b{layer}"], [f"a{layer}"])]  # fmt: skip
        previous, width = f"a{layer}", size
        if layer < len(hidden):
            nodes.append(helper.make_node("Relu", [previous], [f"r{layer}"]))
            previous = f"r{layer}"
    initialisers.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"))
    nodes += [helper.make_node("Sigmoid", [previous], ["p"]), helper.make_node("Reshape", ["p", "flat"], ["probability"])]
    graph = helper.make_graph(
        nodes,
        "synthetic_dense",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"])],
        initialisers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="uembed-synthetic")
    model.ir_version = 9  # readable by every onnxruntime this project pins
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_synthetic_bundle(
    out_root: Path,
    name: str,
    features: Sequence[FeatureSpec],
    table_rows: int,
    *,
    version: str = "1",
    dim: int = 16,
    dtype: str = "float16",
    width: int = 4,
    bias_features: Sequence[str] = (),
    hidden: Sequence[int] = (64, 32),
    seed: int = 0,
    progress: bool = True,
    context_features: Sequence[str] = (),
    known: Mapping[str, KnownValues] | None = None,
    value_counts: Mapping[str, ValueCounts] | None = None,
) -> Path:
    """Write ``out_root/name/version``, a servable bundle of random rows; returns its path. ``context_features``:
    split the dense network's first layer by that group (``uembed/bundle/dense_split.py``). ``known``: feature ->
    the values it is to count as seen in training (``uembed_unseen_values_total``), as an export records them.
    ``value_counts``: feature -> training values and their occurrences, for the manifest's collision report in this
    bundle's table (``uembed/contract/collisions.py``), as an export carries its run's."""
    if dtype not in ROW_DTYPES:
        raise UembedError(f"row dtype must be one of {', '.join(ROW_DTYPES)}, got {dtype!r}")
    target = Path(out_root) / name / version
    if target.exists():
        raise UembedError(f"bundle {target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    plan = synthetic_plan(features, table_rows, dim, width, bias_features)
    if context_features:
        context_columns(layout_of(plan), context_features)  # a bad name is refused before the rows are written
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
    try:
        (staging / "tables").mkdir()
        table = write_table_rows(staging, TABLE, table_rows, dim, dtype, random_rows(dim, rng), progress)
        write_dense(staging / "dense.onnx", plan.output_dim, hidden, rng)
        feature_entries = []
        for spec, feature in zip(features, plan.features):
            bias = (rng.standard_normal(dim) * 0.1).astype(np.float32).tolist() if feature.bias else None
            entry = spec.to_dict() | {"group": None, "bias": bias, "vocabulary": None}
            if known and spec.name in known:
                entry["known"] = write_known_values(staging, spec.name, known[spec.name])
            feature_entries.append(entry)
        samples = {f.name: [str(v).encode() for v in range(3)] for f in plan.features}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "software": {"python": sys.version.split()[0]},
            "hashing": {**spec_description(), "test_vectors": test_vectors(plan, samples)},
            "embedding": plan.to_dict(),
            "features": feature_entries,
            "label": {"column": "label", "threshold": None},
            "tables": [table],
            "dense": {
                **file_entry(staging, "dense.onnx"),
                "input": {"name": "embeddings", "shape": ["batch", plan.output_dim], "dtype": "float32"},
                "output": {"name": "probability", "shape": ["batch"], "dtype": "float32"},
                "layout": layout_of(plan),
            },
            "full_model": None,
            "policy": None,
            "training": {"dataset": "synthetic (random rows and dense weights)", "embedding": "unified", "test_auc": None,
                         "test_logloss": None, "seed": seed},  # fmt: skip
            "command": " ".join(sys.argv),
        }
        if value_counts is not None:
            manifest["collisions"] = collision_report(plan, value_counts)
        if context_features:
            add_context_split(staging, manifest, context_features)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        staging.chmod(0o755)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
