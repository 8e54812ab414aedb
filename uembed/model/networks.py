"""Ranking networks on top of the assembled embedding vector, and the full model.

Both output one logit per example; the probability is its sigmoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from uembed.contract.plan import NETWORKS
from uembed.model.embeddings import PlanEmbedding


def feed_forward(width: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """``[B, input_dim]`` -> ReLU hidden layers -> ``[B]`` logits."""

    def __init__(self, input_dim: int, hidden: Sequence[int] = (192,)) -> None:
        super().__init__()
        self.layers = feed_forward(input_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class CrossLayer(nn.Module):
    """DCN-v2 cross layer: ``x0 * (W x + b) + x`` with a full-rank ``W``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DCNv2(nn.Module):
    """Cross layers, then an MLP: ``[B, input_dim]`` -> ``[B]`` logits."""

    def __init__(self, input_dim: int, hidden: Sequence[int] = (192,), cross_layers: int = 1) -> None:
        super().__init__()
        self.cross = nn.ModuleList(CrossLayer(input_dim) for _ in range(cross_layers))
        self.layers = feed_forward(input_dim, hidden)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.layers(x).squeeze(-1)


def build_network(kind: str, input_dim: int, hidden: Sequence[int], cross_layers: int) -> nn.Module:
    if kind == "mlp":
        return MLP(input_dim, hidden)
    if kind == "dcn":
        return DCNv2(input_dim, hidden, cross_layers)
    raise ValueError(f"unknown network {kind!r}; choose one of {', '.join(NETWORKS)}")


class RankingModel(nn.Module):
    """rows ``[B, S]`` int64 and weights ``[B, S]`` -> logits ``[B]``."""

    def __init__(self, embedding: PlanEmbedding, network: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.network = network

    def forward(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.network(self.embedding(rows, weights))
