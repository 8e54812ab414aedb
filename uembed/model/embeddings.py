"""The embedding module every method shares: rows and pooling weights in, one vector out.

All tables of a plan have the same ``dim``, so they live in ONE parameter matrix, table
after table; a slot's row id is offset by its table's first row. One gather serves the
whole batch, a fixed pooling matrix sums each (feature, lookup) group, and the groups
are already in output order (feature by feature, lookups concatenated).

Shapes: ``rows`` int64 ``[B, S]`` (row within the slot's table), ``weights`` float32
``[B, S]`` -> ``[B, plan.output_dim]``. Scriptable with TorchScript, exportable to ONNX.
"""

from __future__ import annotations

import collections

import numpy as np
import torch
from torch import nn

from uembed.bundle.codecs import PQ_CENTROIDS, check_subvectors
from uembed.contract.errors import SpecError
from uembed.contract.plan import EmbeddingPlan
from uembed.model.qat import PQ_RECENT_BATCHES, PQ_REFRESH_EVERY, fake_quantise, pq_fake_quantise, refresh_codebooks


class PlanEmbedding(nn.Module):
    def __init__(self, plan: EmbeddingPlan, init_std: float | None = None, sparse: bool = False) -> None:
        super().__init__()
        self.dim = plan.dim
        # sparse: the table's gradient holds only the rows a batch touched (uembed/model/optim.py).
        self.sparse = sparse
        # QAT (uembed/model/qat.py): bits a value of the codec the gathered rows are fake-quantised to; 0: none.
        self.qat_bits = 0
        # Pruning a QAT run (uembed/model/pruning.py): bool [S, dim], the columns each slot's quantiser looks at.
        self.qat_columns: torch.Tensor | None = None
        # pq QAT (uembed/model/qat.py): each table's codebooks, float32 [tables, M, 256, dim / M], and the training
        # batches seen (when to refresh them); None: not a pq run. ``qat_pq`` switches the quantiser (a warm start's
        # float32 phase, the study's decoded copies turn it off).
        self.register_buffer("pq_codebooks", None)
        self.register_buffer("pq_steps", None)
        self.qat_pq = False
        first_rows = np.cumsum([0] + [t.rows for t in plan.tables])
        total_rows = int(first_rows[-1])
        std = init_std if init_std is not None else plan.dim**-0.5
        # In place: a table of tens of millions of rows is allocated once (same values as randn * std).
        self.weight = nn.Parameter(torch.empty(total_rows, plan.dim).normal_(0.0, std))
        self.register_buffer("slot_offset", torch.from_numpy(first_rows[plan.slot_tables()]).long())
        self.register_buffer("pooling", torch.from_numpy(plan.pooling_matrix()))
        bias_columns = plan.bias_columns()
        scatter = np.zeros((bias_columns.size, plan.output_dim), dtype=np.float32)
        scatter[np.arange(bias_columns.size), bias_columns] = 1.0
        self.bias = nn.Parameter(torch.zeros(bias_columns.size))
        self.register_buffer("bias_scatter", torch.from_numpy(scatter))
        self.table_slices = [(t.name, int(a), int(b)) for t, a, b in zip(plan.tables, first_rows[:-1], first_rows[1:])]

    def forward(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # A QAT run exports in its codec, never as a float32 model whose forward is scripted.
        if not torch.jit.is_scripting() and (self.qat_bits > 0 or self.qat_pq):
            looked_up = self.quantised_lookup(rows + self.slot_offset)
        else:
            looked_up = nn.functional.embedding(rows + self.slot_offset, self.weight, sparse=self.sparse)  # [B, S, D]
        pooled = torch.einsum("gs,bsd->bgd", self.pooling, looked_up * weights.unsqueeze(-1))
        return pooled.reshape(rows.shape[0], -1) + self.bias @ self.bias_scatter

    def quantised_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The fake-quantised rows of ``ids`` ``[B, S]`` (rows of the one matrix) ``[B, S, D]``: each distinct row is
        quantised once (its range search costs per row), then gathered into every slot that looks it up."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        if self.qat_pq:
            return nn.functional.embedding(inverse, self.pq_lookup(unique))
        columns = None
        if self.qat_columns is not None:  # a row's slots all read its table, so any of them gives its columns
            slots = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            slot_of = torch.zeros_like(unique).scatter_(0, inverse.reshape(-1), slots.reshape(-1))
            columns = self.qat_columns[slot_of]
        quantised = fake_quantise(nn.functional.embedding(unique, self.weight, sparse=self.sparse), self.qat_bits, columns)
        return nn.functional.embedding(inverse, quantised)

    def train_pq(self, subvectors: int) -> None:
        """Make this a pq QAT module of ``subvectors`` sub-vectors a row (codebooks fitted at the first batch)."""
        try:
            check_subvectors(self.dim, subvectors)
        except ValueError as exc:
            raise SpecError(f"--qat pq: {exc}") from None
        tables = len(self.table_slices)
        self.pq_codebooks = torch.zeros(tables, subvectors, PQ_CENTROIDS, self.dim // subvectors)
        self.pq_steps = torch.zeros((), dtype=torch.long)
        self.pq_read: collections.deque[torch.Tensor] = collections.deque(maxlen=PQ_RECENT_BATCHES)  # distinct rows a batch
        self.qat_pq = True

    def pq_lookup(self, unique: torch.Tensor) -> torch.Tensor:
        """The rows ``unique`` (sorted rows of the one matrix) as their tables' nearest centroids ``[k, D]``; in
        training, the codebooks are refreshed first when it is their turn."""
        if self.training:
            step = int(self.pq_steps)
            self.pq_read.append(unique)
            if step % PQ_REFRESH_EVERY == 0:
                # Its own generator, from the run's seed: a pq run draws from the global one as a float32 run does.
                generator = torch.Generator().manual_seed(torch.initial_seed() + step)
                read = torch.cat(list(self.pq_read))
                for table, (_name, start, stop) in enumerate(self.table_slices):
                    rows = self.weight.detach()[start:stop]
                    refresh_codebooks(rows, self.pq_codebooks[table], generator, step == 0, read[(read >= start) & (read < stop)] - start)
            self.pq_steps += 1
        gathered = nn.functional.embedding(unique, self.weight, sparse=self.sparse)
        starts = torch.tensor([start for _name, start, _stop in self.table_slices] + [len(self.weight)], device=unique.device)
        bounds = torch.searchsorted(unique, starts).tolist()
        parts = [pq_fake_quantise(gathered[bounds[t] : bounds[t + 1]], self.pq_codebooks[t]) for t in range(len(self.table_slices))]
        return torch.cat(parts)

    def table_weights(self) -> dict[str, torch.Tensor]:
        """Each table's rows, as views of the one parameter matrix."""
        return {name: self.weight[start:stop] for name, start, stop in self.table_slices}


class SearchEmbedding(nn.Module):
    """SEO stage 1: a wide plan table whose rows are cut into chunks weighted by learned attention.

    The plan (method ``seo-search``) gives every feature one lookup into a table of
    ``N' * chunk_dim`` columns. Logits ``[F, N']`` go through ONE softmax over all
    ``F * N'`` entries (temperature ``temperature``), rescaled by ``F * N'`` so uniform
    attention leaves the chunks unchanged. Output: the scaled chunks concatenated
    ``[B, F * N' * chunk_dim]``, or with ``projected_chunks = M`` the pool of ``F * N'``
    chunks linearly projected to ``M`` chunks ``[B, M * chunk_dim]`` (down projection).
    """

    def __init__(self, plan: EmbeddingPlan, chunk_dim: int, temperature: float = 1.0, projected_chunks: int = 0) -> None:
        super().__init__()
        if plan.dim % chunk_dim or any(len(f.lookups) != 1 for f in plan.features):
            raise ValueError("a search plan has one lookup per feature and a width that is a multiple of chunk_dim")
        self.base = PlanEmbedding(plan)
        self.features = len(plan.features)
        self.chunks = plan.dim // chunk_dim
        self.chunk_dim = chunk_dim
        self.temperature = temperature
        self.logits = nn.Parameter(torch.zeros(self.features, self.chunks))
        pool = self.features * self.chunks
        self.projection = nn.Parameter(torch.randn(pool, projected_chunks) * pool**-0.5) if projected_chunks else None
        self.output_dim = (projected_chunks or pool) * chunk_dim

    def attention(self) -> torch.Tensor:
        """float ``[F, N']`` summing to 1 over all entries."""
        return torch.softmax(self.logits.flatten() / self.temperature, dim=0).view(self.features, self.chunks)

    def forward(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        batch = rows.shape[0]
        chunks = self.base(rows, weights).view(batch, self.features, self.chunks, self.chunk_dim)
        scaled = chunks * (self.attention() * (self.features * self.chunks)).unsqueeze(-1)
        if self.projection is None:
            return scaled.reshape(batch, -1)
        pool = scaled.reshape(batch, self.features * self.chunks, self.chunk_dim)
        return torch.einsum("bpd,pm->bmd", pool, self.projection).reshape(batch, -1)

    def table_weights(self) -> dict[str, torch.Tensor]:
        return self.base.table_weights()
