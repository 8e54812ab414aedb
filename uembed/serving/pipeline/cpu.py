"""One loaded model version on the CPU: the pipeline's stages (``stages.py``) with lookup through the tiered row store.

Canonicalise and hash are the shared :class:`ExampleEncoder` (with value caches bounded by ``value_cache_bytes``);
lookup goes through one :class:`TableStore` per table (tier 1, fresh rows, Redis, the row files); assemble and dense
are the stages'. With ``dense_backend="torchscript"`` a batch is scored by the bundle's whole TorchScript model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from uembed.bundle.loader import Bundle
from uembed.contract.errors import BundleError
from uembed.serving.pipeline import stages as stages_module
from uembed.serving.pipeline.dense import CPU_PROVIDERS
from uembed.serving.pipeline.stages import BatchPath, Stages
from uembed.serving.pipeline.values import ValueLimits
from uembed.serving.rows.redis import RedisTier
from uembed.serving.rows.store import TableStore


class ModelRuntime(Stages):
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
        # Hot-row budget is per model, shared by its tables in proportion to their bytes.
        total_bytes = sum(t.nbytes for t in bundle.tables.values()) or 1
        self.stores = [
            TableStore(
                bundle.tables[table.name],
                namespace=f"{redis_prefix}:{bundle.name}:{bundle.version}:{table.name}",
                hot_bytes=int(hot_rows_bytes * bundle.tables[table.name].nbytes / total_bytes),
                redis=redis,
                hot_on_device=hot_on_device,
            )
            for table in bundle.plan.tables
        ]
        # The TorchScript full model scores every request: a split network's parts would go unused.
        super().__init__(bundle, threads, providers, limits or ValueLimits(), value_cache_bytes,
                         use_dense_parts=dense_backend != "torchscript", sources=self.stores)  # fmt: skip
        self.widths = self.encoder.widths
        self.slots = self.plan.slots
        self.pools_in_one_pass = stages_module._pool is not None and len(self.table_slots) == 1
        self.dedupes_by_slot = stages_module._pool is not None
        self.table_position = {store.table.name: position for position, store in enumerate(self.stores)}
        # The id (milliseconds, sequence) of the last row update applied from this version's stream
        # (uembed/serving/rows/updates.py): a reader resumes after it, a replay skips what it already has.
        self.update_position: tuple[int, int] = (0, 0)
        self.torchscript = None
        if dense_backend == "torchscript":  # the bundle's whole model scores every batch, from the hashed rows
            self.torchscript = self.whole_model = load_torchscript(bundle, threads)
            self.batch_path = BatchPath.FLAT

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def apply_rows(self, table: str, ids: np.ndarray, records: np.ndarray) -> None:
        """Row updates of one table (compute thread, between batches): records in the table's stored form."""
        self.stores[self.table_position[table]].apply_rows(ids, records)

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
    """The bundle's TorchScript full model as a numpy -> numpy function (torch, an optional dependency of serving,
    imported only here)."""
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
