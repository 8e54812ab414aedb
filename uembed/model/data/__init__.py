"""Data sources, one module per source (docs/ARCHITECTURE.md: `uembed/model/` in the table of packages).

* ``uembed.contract.columns``: in-memory datasets of canonical values (:class:`Dataset`, :class:`FeatureColumn`),
  splits, labels (torch-free: the serving encoder uses them too);
* ``files``: a user's Parquet or CSV file read whole (small data);
* ``movielens``: MovieLens-100K;
* ``synthetic``: power-law data in memory (``synthetic``) and the Criteo-shaped shard generator;
* ``criteo``: the Criteo click-log format (label, I1..I13, C1..C26, tab-separated; plain or gzip);
* ``stream``: the streaming pipeline (record batches -> encoded, shuffled batches) for data
  that does not fit in Python objects.

The names below are the package's public ones (``from uembed.model.data import Dataset``).
"""

from uembed.contract.columns import (
    Dataset,
    FeatureColumn,
    binary_labels,
    canonical_column,
    code_matrix,
    encode_values,
    from_table,
    split_indices,
)
from uembed.model.data.files import load_file
from uembed.model.data.movielens import (
    MOVIELENS_FILES,
    MOVIELENS_GENRES,
    MOVIELENS_WHEEL,
    cache_dir,
    fetch_movielens100k,
    load_movielens100k,
    movielens100k_spec,
    movielens100k_table,
)
from uembed.model.data.synthetic import AVAZU_VOCABULARY, CRITEO_VOCABULARY, SYNTHETIC_PRESETS, synthetic

__all__ = [
    "AVAZU_VOCABULARY", "CRITEO_VOCABULARY", "MOVIELENS_FILES", "MOVIELENS_GENRES", "MOVIELENS_WHEEL",
    "SYNTHETIC_PRESETS", "Dataset", "FeatureColumn", "binary_labels", "cache_dir", "canonical_column",
    "code_matrix", "encode_values", "fetch_movielens100k", "from_table", "load_file", "load_movielens100k",
    "movielens100k_spec", "movielens100k_table", "split_indices", "synthetic",
]  # fmt: skip
