"""The Criteo click-log format: ``label \\t I1..I13 \\t C1..C26`` per line, no header.

The Kaggle ``train.txt`` and the Terabyte ``day_N`` files (plain or ``.gz``): integer
columns may be empty (missing), categorical columns are 8 hex digits or empty. Read as a
stream of Arrow record batches (pyarrow's incremental CSV reader), never whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


def read_criteo(path: Path, columns: list[str] | None = None, block_bytes: int = 16 << 20) -> Iterator[pa.RecordBatch]:
    """Record batches of a Criteo-format file (gzip when the name ends in .gz); only ``columns``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    types = {"label": pa.int8(), **{c: pa.int64() for c in CRITEO_INTEGER_COLUMNS}, **{c: pa.string() for c in CRITEO_CATEGORICAL_COLUMNS}}
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
