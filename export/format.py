"""Constants, file records and row encodings shared by the bundle writers and the loader (no torch)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from model.hashing import MISSING
from model.plan import EmbeddingPlan

FORMAT = "uembed-bundle"
FORMAT_VERSION = 1
ROW_DTYPES = ("float32", "float16", "int8")
NUMPY_ROW_DTYPE = {"float32": "float32", "float16": "float16", "int8": "uint8"}
TEST_VECTORS = 12


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(folder: Path, relative: str) -> dict:
    """Manifest record of one bundle file: path relative to the bundle, size, sha256."""
    path = folder / relative
    return {"file": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def quantise_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rowwise int8: uint8 codes and float32 ``[rows, 2]`` (scale, offset); x ~ q * scale + offset."""
    low = rows.min(axis=1)
    high = rows.max(axis=1)
    scale = ((high - low) / 255.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint((rows - low[:, None]) / safe[:, None]), 0, 255).astype(np.uint8)
    return codes, np.stack([scale, low.astype(np.float32)], axis=1)


def test_vectors(plan: EmbeddingPlan, train_values: dict[str, list[bytes]], count: int = TEST_VECTORS) -> list[dict]:
    """(feature, value) -> rows per lookup, for a few real values of each feature and a missing one."""
    per_feature = max(1, -(-count // max(len(plan.features), 1)))  # ceiling: at least `count` vectors
    vectors = []
    for feature in plan.features:
        values = sorted(train_values.get(feature.name, []))[:per_feature]
        for value in values + ([MISSING] if feature is plan.features[0] else []):
            rows = [int(plan.rows_of_values(feature, lookup, [value])[0]) for lookup in feature.lookups]
            vectors.append({"feature": feature.name, "value": value.decode("utf-8", "surrogateescape"), "rows": rows})
    return vectors
