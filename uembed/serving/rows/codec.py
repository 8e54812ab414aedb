"""Records and rows: every tier holds a row as the same *record*, the bytes of the stored row (float32, float16
or int8 values) followed, for int8 tables, by its float32 scale and offset. One decode turns records into
float32 rows, so every tier returns bit-identical rows."""

from __future__ import annotations

import numpy as np

from uembed.bundle.loader import TableRows

# float16 -> float32 by table: the float32 of each of the 65,536 float16 bit patterns, as astype gives it. numpy
# converts float16 one value at a time in software; a take from this table is faster and gives the same bits.
FLOAT16_TO_FLOAT32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
FLOAT16_TO_FLOAT32.setflags(write=False)


class RowCodec:
    """Records of one table: ``decode`` turns uint8 ``[k, record_bytes]`` into float32 ``[k, dim]``."""

    def __init__(self, table: TableRows) -> None:
        self.table = table
        self.row_bytes = table.dim * table.row_dtype.itemsize
        self.record_bytes = table.record_bytes

    def decode(self, records: np.ndarray) -> np.ndarray:
        records = np.ascontiguousarray(records)
        values = records[:, : self.row_bytes].view(self.table.row_dtype)
        if self.table.dtype == "float16":
            return np.take(FLOAT16_TO_FLOAT32, values.view(np.uint16))
        if self.table.dtype != "int8":
            return values.astype(np.float32, copy=False)
        scale_bias = records[:, self.row_bytes :].view(np.float32)
        return values.astype(np.float32) * scale_bias[:, :1] + scale_bias[:, 1:]
