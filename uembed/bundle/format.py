"""Constants, file records and row encodings shared by the bundle writers and the loader (no torch)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from uembed.contract.hashing import MISSING
from uembed.contract.known import KnownValues
from uembed.contract.plan import EmbeddingPlan

FORMAT = "uembed-bundle"
FORMAT_VERSION = 1
ROW_DTYPES = ("float32", "float16", "int8")
NUMPY_ROW_DTYPE = {"float32": "float32", "float16": "float16", "int8": "uint8"}
TEST_VECTORS = 12
CHUNK_ROWS = 1 << 20  # rows converted and written at a time: 64 MiB of float32 rows of 16


def sha256_file(path: Path, chunk: int = 1 << 20, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file read in chunks; ``progress(bytes)`` after each chunk."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


def file_entry(folder: Path, relative: str) -> dict:
    """Manifest record of one bundle file: path relative to the bundle, size, sha256."""
    path = folder / relative
    return {"file": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


class NpyWriter:
    """A ``.npy`` file written front to back in chunks, hashed as it is written (no second read, no mmap).

    Memory stays at one chunk whatever the array size, and a process under a data-size limit
    (``RLIMIT_DATA``) or an address-space limit can still write arrays larger than the limit.
    """

    def __init__(self, folder: Path, relative: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.folder, self.relative = folder, relative
        self.dtype, self.shape = np.dtype(dtype), tuple(int(n) for n in shape)  # numpy ints would enter the header as np.int64(..)
        self.rows_written = 0
        self.digest = hashlib.sha256()
        self.handle = (folder / relative).open("wb")
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        )
        self._write(header.getvalue())

    def _write(self, data) -> None:
        self.digest.update(data)
        self.handle.write(data)

    def write(self, chunk: np.ndarray) -> None:
        if chunk.dtype != self.dtype or chunk.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.relative}: chunk {chunk.dtype} {chunk.shape} does not fit {self.dtype} {self.shape}")
        self._write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        self.rows_written += len(chunk)

    def close(self) -> dict:
        """Finish the file; its manifest record (as :func:`file_entry` would compute it)."""
        self.handle.close()
        if self.rows_written != self.shape[0]:
            raise ValueError(f"{self.relative}: {self.rows_written} rows written, {self.shape[0]} declared")
        path = self.folder / self.relative
        return {"file": self.relative, "bytes": path.stat().st_size, "sha256": self.digest.hexdigest()}


def write_known_values(folder: Path, feature: str, known: KnownValues) -> dict:
    """Write ``known/<feature>.npy``; the feature's manifest record of it (``"known"``)."""
    (folder / "known").mkdir(exist_ok=True)
    np.save(folder / "known" / f"{feature}.npy", known.bits)
    return {"bits": known.size, "hashes": KnownValues.HASHES, **file_entry(folder, f"known/{feature}.npy")}


def write_table_rows(
    folder: Path,
    name: str,
    rows: int,
    dim: int,
    dtype: str,
    chunks: Callable[[int, int], np.ndarray],
    progress: bool = False,
) -> dict:
    """``tables/<name>.npy`` (and for int8 ``tables/<name>.scale_bias.npy``) from float32 row chunks.

    ``chunks(start, stop)`` returns float32 rows ``[stop - start, dim]``; each chunk is converted
    (float16, or int8 rowwise) and written before the next is asked for, so at most one chunk of
    the table is ever held. Returns the table's manifest entry.
    """
    data = NpyWriter(folder, f"tables/{name}.npy", NUMPY_ROW_DTYPE[dtype], (rows, dim))
    scale_bias = NpyWriter(folder, f"tables/{name}.scale_bias.npy", "float32", (rows, 2)) if dtype == "int8" else None
    try:
        with tqdm(total=rows, desc=f"rows of {name}", unit="row", unit_scale=True, disable=not progress) as bar:
            for start, stop in chunk_bounds(rows):
                values = chunks(start, stop)
                if scale_bias is not None:
                    codes, offsets = quantise_rows(np.asarray(values, dtype=np.float32))
                    data.write(codes)
                    scale_bias.write(offsets)
                else:
                    data.write(np.asarray(values).astype(data.dtype, copy=False))
                bar.update(stop - start)
    finally:
        data.handle.close()
        if scale_bias is not None:
            scale_bias.handle.close()
    entry = {"name": name, "rows": rows, "dim": dim, "dtype": dtype}
    if scale_bias is not None:
        entry["scale_bias"] = scale_bias.close()
    return entry | data.close()


def chunk_bounds(rows: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, chunk_rows):
        yield start, min(start + chunk_rows, rows)


def quantise_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rowwise int8: uint8 codes and float32 ``[rows, 2]`` (scale, offset); x ~ q * scale + offset."""
    low = rows.min(axis=1)
    high = rows.max(axis=1)
    scale = ((high - low) / 255.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint((rows - low[:, None]) / safe[:, None]), 0, 255).astype(np.uint8)
    return codes, np.stack([scale, low.astype(np.float32)], axis=1)


def encode_records(rows: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows ``[k, dim]`` as the records a ``dtype`` table stores (what a row file and every serving tier
    hold, byte for byte as an export writes them): uint8 ``[k, record_bytes]``, for int8 the codes then the
    float32 scale and offset."""
    rows = np.asarray(rows, dtype=np.float32)
    if dtype == "int8":
        codes, scale_bias = quantise_rows(rows)
        return np.concatenate([codes, scale_bias.view(np.uint8)], axis=1)
    values = np.ascontiguousarray(rows.astype(NUMPY_ROW_DTYPE[dtype], copy=False))
    return values.view(np.uint8).reshape(len(rows), -1)


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
