"""Sparse optimisers for embedding tables: only the rows a batch touched are read and written.

The embedding module gives its table a sparse gradient (``PlanEmbedding(sparse=True)``):
the touched row ids and their gradient rows. A dense optimiser would still pass over the
whole table every step (Adam's moments and the update are dense), which at tens of millions
of rows costs more than the batch itself. These optimisers work on the touched rows only:

* ``rowwise-adagrad`` (FBGEMM's and TorchRec's default for embedding tables): one
  accumulator per row, ``s_r += mean(g_r ** 2)``, ``w_r -= lr * g_r / (sqrt(s_r) + eps)``.
  State: 4 bytes per row. With a zero gradient a row is left as it is, so the sparse update
  equals the dense one exactly.
* ``sparse-adam`` (``torch.optim.SparseAdam``): Adam whose moments and bias correction move
  only on touched rows ("lazy Adam"). State: two floats per table value.
* ``adam``: the dense reference (``torch.optim.Adam``), for small tables.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

try:  # the one-pass coalesce in C (uembed/model/_rows.pyx), built by the install
    from uembed.model import _rows
except ImportError:
    _rows = None
if os.environ.get("UEMBED_PURE_PYTHON", "") not in ("", "0"):
    _rows = None
_SLOTS = threading.local()  # each thread's id -> place scratch of _rows.sum_rows, all -1 between calls

EMBEDDING_OPTIMIZERS = ("adam", "sparse-adam", "rowwise-adagrad")


def coalesce_rows(indices: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The coalesced sparse tensor of the rows ``values`` ``[N, D]`` at the row ids ``indices`` ``[N]`` (a repeated
    id's rows summed in their order here, from zero): what ``torch.sparse_coo_tensor(...).coalesce()`` gives, where
    torch's CPU coalesce adds the rows one by one. Float32 rows on the CPU are summed in one pass in C
    (``uembed/model/_rows.pyx``) and only the distinct ids sorted; otherwise from a stable sort of the ids and one
    vectorised ``index_add_``. Both give the same bits, and the same inputs the same bits on every rank."""
    if indices.dim() != 1:
        raise ValueError(f"coalesce_rows takes one row id per row of values, got indices of shape {tuple(indices.shape)}")
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < shape[0]:
        raise IndexError(f"row ids from {int(indices.min())} to {int(indices.max())} do not fit a table of {shape[0]} rows")
    if _rows is not None and values.dtype == torch.float32 and values.dim() == 2 and values.device.type == "cpu":
        ids, sums = _rows.sum_rows(indices.to(torch.int64).contiguous().numpy(), values.detach().contiguous().numpy(), _slots(shape[0]))
        rows, order = torch.sort(torch.from_numpy(ids))
        summed = torch.from_numpy(sums).index_select(0, order)
    else:
        ordered, order = torch.sort(indices, stable=True)
        rows, place = torch.unique_consecutive(ordered, return_inverse=True)
        positions = torch.empty_like(place)
        positions[order] = place
        summed = torch.zeros((rows.shape[0], *values.shape[1:]), dtype=values.dtype, device=values.device)
        summed.index_add_(0, positions, values)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), summed, shape, check_invariants=False, is_coalesced=True)


def _slots(table_rows: int) -> np.ndarray:
    """This thread's scratch of one entry per table row, -1 throughout (``_rows.sum_rows`` leaves it so)."""
    slots = getattr(_SLOTS, "array", None)
    if slots is None or slots.shape[0] < table_rows:
        slots = _SLOTS.array = np.full(table_rows, -1, dtype=np.int32)
    return slots[:table_rows]


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for ``[rows, dim]`` parameters with sparse (or dense) gradients."""

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8) -> None:
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "sum" not in state:
                    state["sum"] = torch.zeros(param.shape[0], dtype=param.dtype)
                if grad.is_sparse:
                    if not grad.is_coalesced():  # the tables' gradients: one sparse dimension, the rows
                        grad = coalesce_rows(grad._indices()[0], grad._values(), param.shape) if grad.sparse_dim() == 1 else grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows, values = torch.arange(param.shape[0]), grad
                accumulator = state["sum"]
                accumulator.index_add_(0, rows, values.pow(2).mean(dim=1))
                scale = group["lr"] / (accumulator[rows].sqrt() + group["eps"])
                param.index_add_(0, rows, values * -scale.unsqueeze(1))
        return None


def embedding_optimizer(kind: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimiser of the embedding tables by name (see the module docstring)."""
    if kind == "rowwise-adagrad":
        return RowWiseAdagrad(params, lr=lr)
    if kind == "sparse-adam":
        return torch.optim.SparseAdam(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown embedding optimizer {kind!r}; choose one of {', '.join(EMBEDDING_OPTIMIZERS)}")
