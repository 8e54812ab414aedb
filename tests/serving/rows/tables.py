"""Tables of random rows for the row store's tests."""

import numpy as np

from uembed.bundle.format import quantise_rows
from uembed.bundle.loader import TableRows


def make_table(dtype: str, rows: int = 5000, dim: int = 16, seed: int = 0) -> TableRows:
    values = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    if dtype == "int8":
        codes, scale_bias = quantise_rows(values)
        return TableRows("t", rows, dim, dtype, codes, scale_bias)
    return TableRows("t", rows, dim, dtype, values.astype(dtype))
