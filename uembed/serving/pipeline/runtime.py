"""One loaded model version: the reference scorer with its lookup put through the tiered row store.

The stages and their order are written down once, in ``uembed/serving/pipeline/encoding.py``; canonicalise and
hash are the shared :class:`ExampleEncoder` (with value caches bounded by ``value_cache_bytes``),
lookup goes through the row store's tiers, assemble and dense are the reference scorer's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from uembed.bundle.loader import Bundle
from uembed.serving.pipeline.encoding import ValueLimits
from uembed.serving.pipeline.scorer import CPU_PROVIDERS, ReferenceScorer, distinct
from uembed.serving.rows.redis import RedisTier
from uembed.serving.rows.store import TableStore


class ModelRuntime(ReferenceScorer):
    """The CPU path. ``uembed/serving/pipeline/cuda.py`` has the CUDA path, which keeps every stage's name and contract."""

    device = "cpu"

    def __init__(
        self,
        bundle: Bundle,
        hot_rows_bytes: int = 0,
        redis: RedisTier | None = None,
        redis_prefix: str = "uembed",
        threads: int = 1,
        dense_backend: str = "onnx",
        providers: Sequence = CPU_PROVIDERS,
        hot_on_device: bool = False,
        limits: ValueLimits | None = None,
        value_cache_bytes: int = 32 * 2**20,
    ) -> None:
        # The TorchScript full model scores every request: a split network's parts would go unused.
        super().__init__(bundle, threads, providers, limits or ValueLimits(), value_cache_bytes, dense_backend != "torchscript")
        self.widths = self.encoder.widths
        self.slots = self.plan.slots
        # Hot-row budget is per model, shared by its tables in proportion to their bytes.
        total_bytes = sum(t.nbytes for t in bundle.tables.values()) or 1
        self.stores = [
            TableStore(
                rows,
                namespace=f"{redis_prefix}:{bundle.name}:{bundle.version}:{rows.name}",
                hot_bytes=int(hot_rows_bytes * rows.nbytes / total_bytes),
                redis=redis,
                hot_on_device=hot_on_device,
            )
            for rows, _ in self.table_slots
        ]
        self.table_position = {store.table.name: position for position, store in enumerate(self.stores)}
        # The id (milliseconds, sequence) of the last row update applied from this version's stream
        # (uembed/serving/rows/updates.py): a reader resumes after it, a replay skips what it already has.
        self.update_position: tuple[int, int] = (0, 0)
        self.torchscript = None
        if dense_backend == "torchscript":
            self.torchscript = load_torchscript(bundle, threads)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Rows of every slot, float32 [B, S, D]: one dedupe per table, then the row store."""
        if len(self.stores) == 1:  # one table (unified): its gather is the whole output, no second copy
            return self.gather_table(0, rows)
        return super().lookup(rows)

    def gather_table(self, position: int, ids: np.ndarray) -> np.ndarray:
        """Rows of ids through the table's row store, each distinct id once."""
        rows, inverse = self.gather_distinct(position, ids)
        return np.take(rows, inverse, axis=0)  # a third of [inverse]'s time

    def gather_distinct(self, position: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the distinct ``ids`` through the table's row store, and where each id's row is."""
        unique, inverse = distinct(ids)
        return self.stores[position].gather(unique), inverse

    @property
    def splits_context(self) -> bool:
        """Whether batches of ranking requests go through hash_split / lookup_split / assemble_split (their contexts'
        rows looked up once a request): not with the TorchScript full model, nor on a runtime with its own lookup and
        assemble (CUDA), which take the broadcast path."""
        return self.torchscript is None

    def apply_rows(self, table: str, ids: np.ndarray, records: np.ndarray) -> None:
        """Row updates of one table (compute thread, between batches): records in the table's stored form."""
        self.stores[self.table_position[table]].apply_rows(ids, records)

    def score_encoded(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        if self.torchscript is not None:
            return self.torchscript(rows, weights)
        return super().score_encoded(rows, weights)

    def memory_bytes(self) -> dict[str, dict[str, int]]:
        """Per table, bytes of tier 1 this process holds."""
        return {store.table.name: store.memory_bytes() for store in self.stores}

    def index_bytes(self) -> dict[str, int]:
        """Per table, bytes of tier 1's index (a mincore pass for a dense one: not per batch)."""
        return {store.table.name: store.index_bytes() for store in self.stores}

    def file_bytes(self) -> dict[str, dict[str, int]]:
        """Per table, the row files' mapped and resident bytes (a mincore pass over each: not per batch)."""
        return {store.table.name: store.file_bytes() for store in self.stores}


def load_torchscript(bundle: Bundle, threads: int):
    """The bundle's TorchScript full model as a numpy -> numpy function (torch imported only here)."""
    from uembed.contract.errors import BundleError

    if not bundle.manifest.get("full_model"):
        raise BundleError(
            f"bundle {bundle.path}: dense_backend=torchscript needs the full model.pt, which this bundle does not "
            "have (only float32 bundles under the full-model size limit carry one); use dense_backend=onnx"
        )
    try:
        import torch
    except ImportError as exc:
        raise BundleError("dense_backend=torchscript needs torch: pip install 'uembed[train]'") from exc
    torch.set_num_threads(threads)
    module = torch.jit.load(str(bundle.path / bundle.manifest["full_model"]["torchscript"]["file"]))

    def run(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(rows), torch.from_numpy(weights)).numpy()

    return run
