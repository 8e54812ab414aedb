"""Tier 3 as the store sees it: a table's records straight from the bundle's memory-mapped row files
(``uembed/bundle/loader.py`` maps them), and how much of those files is in memory.

The files are shared through the page cache by every process that maps them; the last tier of the store's chain
when the bundle was loaded with its row files (with ``row_source=redis`` Redis is: ``redis.py``).
"""

from __future__ import annotations

import numpy as np

from uembed.bundle.codecs import SCALE_BIAS_BYTES
from uembed.bundle.loader import TableRows


class FileRows:
    """One table's row files: :meth:`read` gives records (uint8 ``[k, record_bytes]``, as every tier stores
    them); as the store's last tier :meth:`fetch` has every row."""

    NONE_MISSING = np.empty(0, dtype=np.int64)

    def __init__(self, table: TableRows) -> None:
        self.table = table
        self.row_bytes = table.row_bytes

    def read(self, ids: np.ndarray) -> np.ndarray:
        """uint8 ``[k, record_bytes]`` straight from the memory-mapped files."""
        rows = np.ascontiguousarray(self.table.data[ids]).view(np.uint8).reshape(len(ids), self.row_bytes)
        if self.table.scale_bias is None:
            return rows
        scale_bias = np.ascontiguousarray(self.table.scale_bias[ids]).view(np.uint8).reshape(len(ids), SCALE_BIAS_BYTES)
        return np.concatenate([rows, scale_bias], axis=1)

    def fetch(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Records of ``ids`` into ``out``: none missing."""
        out[:] = self.read(ids)
        return self.NONE_MISSING

    def count(self, counts, asked: int, missed: int) -> None:
        """Record one read of ``asked`` rows in the store's ``TierCounts``."""
        counts.hits["file"] += asked

    def file_bytes(self) -> dict[str, int]:
        """The row files' size (mapped) and how much of them is in memory now (resident); 0 for rows that live
        only in Redis."""
        return {"mapped": self.table.nbytes if self.table.files else 0, "resident": self.table.resident_bytes()}
