"""A user's Parquet or CSV file declared by a spec, read whole into memory (small data)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from uembed.contract.columns import Dataset, from_table
from uembed.contract.errors import DataError
from uembed.contract.features import DatasetSpec


def load_file(path: str | Path, spec: DatasetSpec) -> Dataset:
    """Read a Parquet or CSV file declared by ``spec``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    try:
        if path.suffix in (".parquet", ".pq") or path.name.endswith(".parquet.brotli"):
            table = pq.read_table(path)
        elif path.suffix in (".csv", ".tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ",")
            # Categorical ids must stay strings: "007" and "7" are different values.
            string_columns = {f.column: pa.string() for f in spec.features if f.kind != "numeric"}
            table = pacsv.read_csv(path, parse_options=parse, convert_options=pacsv.ConvertOptions(column_types=string_columns))
        else:
            raise DataError(f"data file {path}: unknown format (expected .parquet, .csv or .tsv)")
    except pa.ArrowInvalid as exc:
        raise DataError(f"data file {path} could not be read: {exc}") from exc
    return from_table(table, spec, name=path.name)
