"""Tables of random rows for the row store's tests."""

import numpy as np

from uembed.bundle.codecs import encode_rows
from uembed.bundle.loader import TableRows


def make_table(dtype: str, rows: int = 5000, dim: int = 16, seed: int = 0) -> TableRows:
    """A table of ``rows`` random rows stored in the codec ``dtype`` (not pq: its codebooks are trained)."""
    values, scale_bias = encode_rows(np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32), dtype)
    return TableRows("t", rows, dim, dtype, values, scale_bias)
