"""Records and rows: every tier holds a row as the same *record*, the bytes of the stored row in its table's codec
(``uembed/bundle/codecs.py``: float32 or float16 values; int8, int4 or int2 codes then the row's float32 scale and
bias; one pq code a sub-vector). One decode turns the records of the rows a batch gathers into float32 rows, so
every tier returns bit-identical rows."""

from __future__ import annotations

import numpy as np

from uembed.bundle.codecs import decode_records
from uembed.bundle.loader import TableRows

# float16 -> float32 by table: the float32 of each of the 65,536 float16 bit patterns, as astype gives it. numpy
# converts float16 one value at a time in software; a take from this table is faster and gives the same bits.
FLOAT16_TO_FLOAT32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
FLOAT16_TO_FLOAT32.setflags(write=False)


class RowCodec:
    """Records of one table: ``decode`` turns uint8 ``[k, record_bytes]`` into float32 ``[k, dim]``."""

    def __init__(self, table: TableRows) -> None:
        self.table = table
        self.row_bytes = table.row_bytes
        self.record_bytes = table.record_bytes

    def decode(self, records: np.ndarray) -> np.ndarray:
        if self.table.dtype == "float16":
            values = np.ascontiguousarray(records)[:, : self.row_bytes].view(np.uint16)
            return np.take(FLOAT16_TO_FLOAT32, values)
        return decode_records(records, self.table.dtype, self.table.dim, self.table.codebooks)
