"""The embedding module every method shares: rows and pooling weights in, one vector out.

All tables of a plan have the same ``dim``, so they live in ONE parameter matrix, table
after table; a slot's row id is offset by its table's first row. One gather serves the
whole batch, a fixed pooling matrix sums each (feature, lookup) group, and the groups
are already in output order (feature by feature, lookups concatenated).

Shapes: ``rows`` int64 ``[B, S]`` (row within the slot's table), ``weights`` float32
``[B, S]`` -> ``[B, plan.output_dim]``. Scriptable with TorchScript, exportable to ONNX.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from model.plan import EmbeddingPlan


class PlanEmbedding(nn.Module):
    def __init__(self, plan: EmbeddingPlan, init_std: float | None = None) -> None:
        super().__init__()
        self.dim = plan.dim
        first_rows = np.cumsum([0] + [t.rows for t in plan.tables])
        total_rows = int(first_rows[-1])
        std = init_std if init_std is not None else plan.dim**-0.5
        self.weight = nn.Parameter(torch.randn(total_rows, plan.dim) * std)
        self.register_buffer("slot_offset", torch.from_numpy(first_rows[plan.slot_tables()]).long())
        self.register_buffer("pooling", torch.from_numpy(plan.pooling_matrix()))
        bias_columns = plan.bias_columns()
        scatter = np.zeros((bias_columns.size, plan.output_dim), dtype=np.float32)
        scatter[np.arange(bias_columns.size), bias_columns] = 1.0
        self.bias = nn.Parameter(torch.zeros(bias_columns.size))
        self.register_buffer("bias_scatter", torch.from_numpy(scatter))
        self.table_slices = [(t.name, int(a), int(b)) for t, a, b in zip(plan.tables, first_rows[:-1], first_rows[1:])]

    def forward(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        looked_up = nn.functional.embedding(rows + self.slot_offset, self.weight)  # [B, S, D]
        pooled = torch.einsum("gs,bsd->bgd", self.pooling, looked_up * weights.unsqueeze(-1))
        return pooled.reshape(rows.shape[0], -1) + self.bias @ self.bias_scatter

    def table_weights(self) -> dict[str, torch.Tensor]:
        """Each table's rows, as views of the one parameter matrix."""
        return {name: self.weight[start:stop] for name, start, stop in self.table_slices}
