"""Constants, file records and row encodings shared by the bundle writers and the loader (no torch)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from uembed.bundle.codecs import (  # noqa: F401 - ROW_DTYPES, quantise_rows, encode_records: imported from here too
    NUMPY_ROW_DTYPE,
    ROW_DTYPES,
    ROWWISE_BITS,
    check_subvectors,
    decode_rows,
    default_subvectors,
    encode_records,
    encode_rows,
    quantise_rows,
    row_width,
    train_codebooks,
)
from uembed.contract.hashing import MISSING, hash_canonical
from uembed.contract.known import KnownValues
from uembed.contract.plan import EmbeddingPlan

FORMAT = "uembed-bundle"
FORMAT_VERSION = 1
TEST_VECTORS = 12
CHUNK_ROWS = 1 << 20  # rows converted and written at a time: 64 MiB of float32 rows of 16
PQ_SAMPLE_SPANS, PQ_SAMPLE_SPAN_ROWS = 64, 1024  # rows a pq table's codebooks learn from: spans spread over the table


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


def write_head(folder: Path, feature: str, keys: np.ndarray, start: int) -> dict:
    """Write ``heads/<feature>.npy`` (the head's sorted uint64 keys); the feature's manifest record of it (``"head"``:
    key ``i`` reads row ``start + i`` of the feature's table, uembed/contract/hashing.py 5.)."""
    (folder / "heads").mkdir(exist_ok=True)
    np.save(folder / "heads" / f"{feature}.npy", np.ascontiguousarray(keys, dtype=np.uint64))
    return {"size": int(keys.size), "start": int(start), **file_entry(folder, f"heads/{feature}.npy")}


def write_table_rows(
    folder: Path,
    name: str,
    rows: int,
    dim: int,
    dtype: str,
    chunks: Callable[[int, int], np.ndarray],
    progress: bool = False,
    subvectors: int | None = None,
    codebooks: np.ndarray | None = None,
) -> dict:
    """``tables/<name>.npy`` (and ``tables/<name>.scale_bias.npy`` for the rowwise codecs, ``.codebooks.npy`` for
    pq) from float32 row chunks, in the codec of ``dtype`` (``uembed/bundle/codecs.py``). pq's ``codebooks``
    ``[M, 256, dim / M]``: the ones a pq QAT run trained with; None: trained here on a sample of the rows.

    ``chunks(start, stop)`` returns float32 rows ``[stop - start, dim]``; each chunk is encoded and written
    before the next is asked for, so at most one chunk of the table is ever held (pq first trains its codebooks
    on spans of rows spread over the table). Returns the table's manifest entry, with the decoded floats of a
    few rows (``test_rows``) that another decoder of the codec must reproduce.
    """
    entry: dict = {"name": name, "rows": rows, "dim": dim, "dtype": dtype}
    if dtype == "pq":
        subvectors = default_subvectors(dim, subvectors) if codebooks is None else codebooks.shape[0]
        check_subvectors(dim, subvectors)
        if codebooks is None:
            codebooks = train_codebooks(pq_sample(rows, chunks), subvectors)
        codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)
        np.save(folder / f"tables/{name}.codebooks.npy", codebooks)
        entry |= {"subvectors": subvectors, "codebooks": file_entry(folder, f"tables/{name}.codebooks.npy")}
    data = NpyWriter(folder, f"tables/{name}.npy", NUMPY_ROW_DTYPE[dtype], (rows, row_width(dtype, dim, subvectors)))
    scale_bias = NpyWriter(folder, f"tables/{name}.scale_bias.npy", "float32", (rows, 2)) if dtype in ROWWISE_BITS else None
    wanted, test_rows = test_row_ids(rows), []
    try:
        with tqdm(total=rows, desc=f"rows of {name}", unit="row", unit_scale=True, disable=not progress) as bar:
            for start, stop in chunk_bounds(rows):
                values, offsets = encode_rows(chunks(start, stop), dtype, codebooks)
                data.write(values)
                if scale_bias is not None:
                    scale_bias.write(offsets)
                here = wanted[(wanted >= start) & (wanted < stop)] - start
                if len(here):
                    decoded = decode_rows(values[here], dtype, dim, None if offsets is None else offsets[here], codebooks)
                    test_rows += [{"row": int(start + i), "values": [float(v) for v in row]} for i, row in zip(here, decoded)]
                bar.update(stop - start)
    finally:
        data.handle.close()
        if scale_bias is not None:
            scale_bias.handle.close()
    if scale_bias is not None:
        entry["scale_bias"] = scale_bias.close()
    return entry | data.close() | {"test_rows": test_rows}


def test_row_ids(rows: int) -> np.ndarray:
    """The rows whose decoded floats a manifest records: the first two, one in the middle and the last."""
    return np.unique(np.array([0, 1, rows // 2, rows - 1], dtype=np.int64).clip(0, max(rows - 1, 0)))[: rows]


def pq_sample(rows: int, chunks: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """float32 rows for training a table's codebooks: spans spread evenly over the table (all of a small one)."""
    if rows <= PQ_SAMPLE_SPANS * PQ_SAMPLE_SPAN_ROWS:
        return np.concatenate([np.asarray(chunks(start, stop), dtype=np.float32) for start, stop in chunk_bounds(rows)])
    starts = np.linspace(0, rows - PQ_SAMPLE_SPAN_ROWS, PQ_SAMPLE_SPANS).astype(np.int64)
    return np.concatenate([np.asarray(chunks(int(s), int(s) + PQ_SAMPLE_SPAN_ROWS), dtype=np.float32) for s in starts])


def table_files(entry: dict) -> list[dict]:
    """The file records of one table of a manifest: its row file, then its scale and bias or its codebooks."""
    return [entry] + [entry[part] for part in ("scale_bias", "codebooks") if entry.get(part)]


def chunk_bounds(rows: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, chunk_rows):
        yield start, min(start + chunk_rows, rows)


def test_vectors(plan: EmbeddingPlan, train_values: dict[str, list[bytes]], count: int = TEST_VECTORS) -> list[dict]:
    """(feature, value) -> rows per lookup, for a few real values of each feature and a missing one; a feature with
    a head says of each value whether it is a head value (``"head"``), its training values including some of each."""
    per_feature = max(1, -(-count // max(len(plan.features), 1)))  # ceiling: at least `count` vectors
    vectors = []
    for feature in plan.features:
        # A head's feature keeps all its values: its head and tail samples come after the first few.
        values = sorted(set(train_values.get(feature.name, [])))[: None if feature.name in plan.heads else per_feature]
        for value in values + ([MISSING] if feature is plan.features[0] else []):
            rows = [int(plan.rows_of_values(feature, lookup, [value])[0]) for lookup in feature.lookups]
            vector = {"feature": feature.name, "value": value.decode("utf-8", "surrogateescape"), "rows": rows}
            if feature.name in plan.heads:
                vector["head"] = bool(np.isin(hash_canonical([value], feature.lookups[0].seed), plan.heads[feature.name])[0])
            vectors.append(vector)
    return vectors
