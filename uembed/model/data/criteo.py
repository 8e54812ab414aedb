"""The Criteo click-log format: ``label \\t I1..I13 \\t C1..C26`` per line, no header.

The Kaggle ``train.txt`` and the Terabyte ``day_N`` files (plain or ``.gz``): integer
columns may be empty (missing), categorical columns are 8 hex digits or empty. Read as a
stream of Arrow record batches (pyarrow's incremental CSV reader), never whole.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from uembed.contract.errors import DataError
from uembed.contract.features import DatasetSpec
from uembed.model.data.synthetic import CRITEO_CATEGORICAL_COLUMNS, CRITEO_INTEGER_COLUMNS, criteo_spec_text

CRITEO_COLUMNS = ("label", *CRITEO_INTEGER_COLUMNS, *CRITEO_CATEGORICAL_COLUMNS)


def criteo_spec(quantiles: int = 16) -> DatasetSpec:
    """label; I1..I13 numeric, bucketised at ``quantiles`` quantiles of the training data; C1..C26 categorical."""
    import tomllib

    return DatasetSpec.from_dict(tomllib.loads(criteo_spec_text(quantiles)), source="criteo")


def read_criteo(path: Path, columns: list[str] | None = None, block_bytes: int = 16 << 20,
                byte_range: tuple[int, int] | None = None) -> Iterator[pa.RecordBatch]:  # fmt: skip
    """Record batches of a Criteo-format file (gzip when the name ends in .gz); only ``columns``. ``byte_range``
    (begin, end), on line boundaries (:func:`line_range`): only the lines there, of a plain text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    types = {"label": pa.int8(), **{c: pa.int64() for c in CRITEO_INTEGER_COLUMNS}, **{c: pa.string() for c in CRITEO_CATEGORICAL_COLUMNS}}
    if byte_range is not None:
        begin, end = byte_range
        if begin >= end:
            return
        stream = pa.BufferReader(pa.memory_map(str(path)).read_at(end - begin, begin))  # mapped: no copy
    else:
        stream = pa.input_stream(str(path), compression="gzip" if path.suffix == ".gz" else None)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=list(CRITEO_COLUMNS), block_size=block_bytes),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=list(columns or CRITEO_COLUMNS), strings_can_be_null=True
            ),
        )
        for batch in reader:
            yield batch
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path} is not in the Criteo format (label, 13 integers, 26 categorical, tab-separated): {exc}") from exc
    finally:
        stream.close()


# Newlines are counted this many bytes at a time (a bounded temporary, however big the file).
COUNT_BYTES = 16 << 20
NEWLINE = ord("\n")


def line_range(path: Path, part: int, parts: int) -> tuple[int, int, int]:
    """``(begin, end, first_row)`` of share ``part`` of ``parts`` of a plain text file split by byte range, the
    standard split: the file's bytes cut in ``parts`` equal ranges, a share starts at the first line that starts in
    its range and ends with the line that crosses its range's end, so every line is in exactly one share.
    ``first_row`` is the number of rows before ``begin`` (lines that hold something: the reader skips empty ones),
    counted over the memory-mapped bytes (numpy, no parsing): a row keeps the position it has in the whole file,
    which its split is a hash of. Kept per file version: each epoch reads the share again, and counts nothing."""
    stat = path.stat()
    return _line_range(path, part, parts, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _line_range(path: Path, part: int, parts: int, size: int, modified: int) -> tuple[int, int, int]:
    if size == 0:
        return 0, 0, 0
    data = np.memmap(path, dtype=np.uint8, mode="r")
    begin, end = (line_start(data, size * cut // parts) for cut in (part, part + 1))
    return begin, end, rows_before(data, begin)


def line_start(data: np.ndarray, offset: int) -> int:
    """The first line boundary at or after ``offset`` (the file's end when none)."""
    if offset == 0 or offset >= data.size:
        return min(offset, data.size)
    at = offset - 1  # a line starts at ``offset`` itself when the byte before it ends a line
    while at < data.size:
        chunk = data[at : at + (1 << 20)]
        found = np.flatnonzero(chunk == NEWLINE)
        if found.size:
            return at + int(found[0]) + 1
        at += chunk.size
    return int(data.size)


def rows_before(data: np.ndarray, end: int) -> int:
    """Lines that end before ``end`` (a line boundary) and hold something."""
    rows, previous = 0, NEWLINE  # the file's start counts as a line's end
    for start in range(0, end, COUNT_BYTES):
        chunk = data[start : min(start + COUNT_BYTES, end)]
        ends = np.flatnonzero(chunk == NEWLINE)  # one a line: few, next to the bytes
        # a newline right after another one (or the file's start) ends an empty line, which the reader skips
        empty = np.count_nonzero(np.diff(ends) == 1) + int(ends.size > 0 and ends[0] == 0 and previous == NEWLINE)
        rows += ends.size - empty
        previous = int(chunk[-1])
    return int(rows)


def text_rows(path: Path) -> int:
    """The rows of a plain text file (its lines that hold something, the last one with or without a newline)."""
    stat = path.stat()
    return _text_rows(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _text_rows(path: Path, size: int, modified: int) -> int:
    if size == 0:
        return 0
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return rows_before(data, size) + int(data[-1] != NEWLINE)
