"""Records to float32 rows: bit for bit what numpy gives."""

import numpy as np

from uembed.bundle.loader import TableRows
from uembed.serving.rows.codec import RowCodec
from uembed.serving.rows.files import FileRows


def test_float16_rows_decode_to_the_bits_numpy_gives_for_every_pattern():
    """The float16 table lookup covers every bit pattern (zeros, subnormals, infinities, NaN payloads) as astype does."""
    patterns = np.arange(1 << 16, dtype=np.uint16).reshape(-1, 16)
    table = TableRows("t", len(patterns), 16, "float16", patterns.view(np.float16))
    decoded = RowCodec(table).decode(FileRows(table).read(np.arange(len(patterns))))
    assert decoded.dtype == np.float32 and decoded.shape == (len(patterns), 16)
    assert np.array_equal(decoded.view(np.uint32), patterns.view(np.float16).astype(np.float32).view(np.uint32))
