"""Shared Embedding Optimization (SEO): chunk policies and the Applier's plan (numpy only).

Stage 1 (search, ``uembed/model/embeddings.py: SearchEmbedding``) trains a table of width
``D_search`` whose rows are cut into ``N' = D_search / chunk_dim`` chunks, with learnable
logits ``L [F, N']``. One softmax over all ``F * N'`` logits gives the attention
``alpha``; a feature's embedding is its chunks, each scaled by its attention.

Policy derivation: a feature keeps the chunks whose attention is at least the uniform
share ``1 / (F * N')``, and always its strongest chunk. The policy is a JSON file a
person can read and edit::

    {"format": "uembed-seo-policy", "version": 1, "chunk_dim": 8, "pool_chunks": 4, "dim": 16,
     "features": {"user_id": [0, 2, 3], "gender": [1]},
     "attention": {"user_id": [0.09, 0.01, 0.11, 0.07], ...}, "search": {...}}

Stage 2 (Applier): a new model built from the policy and trained from scratch. Its
``M`` chunk tables (one per chunk the policy uses) hold ``chunk_dim`` columns each;
a feature concatenates its chunks, all read at the row its hash gives. Two variants:

* Exact: a feature uses exactly the chunks it chose (renumbered 0..M-1 in order);
* RR (round-robin): a feature keeps only its *number* of chunks; chunks are dealt out
  in turn over the M tables, wrapping around (2 then 3 chunks over 4 tables:
  ``{0, 1}`` and ``{2, 3, 0}``).

Adjusting hash buckets is mandatory: the chunk tables share ``budget_rows * dim /
chunk_dim`` rows between them, so the Applier has exactly ``budget_rows * dim``
embedding parameters, like every baseline at that budget.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uembed.contract.errors import BudgetError, SpecError

POLICY_FORMAT = "uembed-seo-policy"
POLICY_VERSION = 1
APPLIER_VARIANTS = ("exact", "rr")


@dataclass
class ChunkPolicy:
    chunk_dim: int
    pool_chunks: int  # N': chunks per row of the search table
    dim: int  # D: the baselines' embedding width, which fixes the budget in parameters
    features: dict[str, tuple[int, ...]]  # feature -> chosen chunk indices, 0-based, ascending
    attention: dict[str, list[float]] = field(default_factory=dict)
    search: dict = field(default_factory=dict)  # where the policy came from (run, budget, options)

    def __post_init__(self) -> None:
        if self.chunk_dim <= 0 or self.pool_chunks <= 0 or self.dim <= 0:
            raise SpecError("policy: chunk_dim, pool_chunks and dim must be positive")
        for name, chunks in self.features.items():
            if not chunks:
                raise SpecError(f"policy: feature {name!r} has no chunks; every feature needs at least one")
            if len(set(chunks)) != len(chunks) or min(chunks) < 0 or max(chunks) >= self.pool_chunks:
                raise SpecError(
                    f"policy: feature {name!r} has chunks {list(chunks)}; they must be distinct, in 0..{self.pool_chunks - 1}"
                )
        self.features = {name: tuple(sorted(chunks)) for name, chunks in self.features.items()}

    def counts(self) -> dict[str, int]:
        return {name: len(chunks) for name, chunks in self.features.items()}

    def to_dict(self) -> dict:
        return {
            "format": POLICY_FORMAT,
            "version": POLICY_VERSION,
            "chunk_dim": self.chunk_dim,
            "pool_chunks": self.pool_chunks,
            "dim": self.dim,
            "features": {name: list(chunks) for name, chunks in self.features.items()},
            "attention": self.attention,
            "search": self.search,
        }

    @classmethod
    def from_dict(cls, raw: Mapping, source: str = "policy") -> ChunkPolicy:
        if raw.get("format") != POLICY_FORMAT or raw.get("version") != POLICY_VERSION:
            raise SpecError(f"{source}: not a {POLICY_FORMAT} version {POLICY_VERSION} file")
        try:
            return cls(
                chunk_dim=int(raw["chunk_dim"]),
                pool_chunks=int(raw["pool_chunks"]),
                dim=int(raw["dim"]),
                features={str(k): tuple(int(c) for c in v) for k, v in raw["features"].items()},
                attention=dict(raw.get("attention") or {}),
                search=dict(raw.get("search") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"{source}: malformed policy ({type(exc).__name__}: {exc})") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_policy(path: str | Path) -> ChunkPolicy:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"policy file {path} does not exist (write one with `uembed search`)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"policy file {path} is not valid JSON: {exc}") from exc
    return ChunkPolicy.from_dict(raw, str(path))


def attention(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Global softmax over all ``F * N'`` logits (one distribution), as float64 ``[F, N']``."""
    scaled = np.asarray(logits, dtype=np.float64).ravel() / temperature
    weights = np.exp(scaled - scaled.max())
    return (weights / weights.sum()).reshape(np.shape(logits))


def derive_policy(
    logits: np.ndarray, features: Sequence[str], temperature: float, chunk_dim: int, dim: int, search: dict | None = None
) -> ChunkPolicy:
    """Per feature, the chunks with at least the uniform share of attention (at least its strongest one)."""
    alpha = attention(logits, temperature)
    if alpha.shape[0] != len(features):
        raise SpecError(f"{alpha.shape[0]} rows of logits for {len(features)} features")
    uniform = 1.0 / alpha.size
    chosen = {}
    for name, row in zip(features, alpha):
        picked = np.flatnonzero(row >= uniform)
        chosen[name] = tuple(int(i) for i in (picked if picked.size else [int(np.argmax(row))]))
    return ChunkPolicy(
        chunk_dim=chunk_dim,
        pool_chunks=alpha.shape[1],
        dim=dim,
        features=chosen,
        attention={name: [round(float(a), 6) for a in row] for name, row in zip(features, alpha)},
        search=dict(search or {}),
    )


def exact_assignment(policy: ChunkPolicy) -> tuple[int, dict[str, tuple[int, ...]]]:
    """The chunks each feature chose, renumbered over the chunks in use: (tables M, feature -> tables)."""
    used = sorted({c for chunks in policy.features.values() for c in chunks})
    number = {chunk: i for i, chunk in enumerate(used)}
    return len(used), {name: tuple(number[c] for c in chunks) for name, chunks in policy.features.items()}


def round_robin_assignment(counts: Mapping[str, int], tables: int) -> dict[str, tuple[int, ...]]:
    """Deal each feature its number of chunks in turn over ``tables``, wrapping around."""
    if tables <= 0:
        raise SpecError("round-robin assignment needs at least one table")
    out, cursor = {}, 0
    for name, count in counts.items():
        if not 0 < count <= tables:
            raise SpecError(f"feature {name!r} needs {count} chunks but there are {tables} tables")
        out[name] = tuple((cursor + i) % tables for i in range(count))
        cursor = (cursor + count) % tables
    return out


def applier_assignment(policy: ChunkPolicy, variant: str) -> tuple[int, dict[str, tuple[int, ...]]]:
    if variant not in APPLIER_VARIANTS:
        raise SpecError(f"applier variant must be one of {', '.join(APPLIER_VARIANTS)}, got {variant!r}")
    tables, exact = exact_assignment(policy)
    if variant == "exact":
        return tables, exact
    return tables, round_robin_assignment(policy.counts(), tables)


def chunk_table_rows(budget_rows: int, dim: int, chunk_dim: int, tables: int) -> list[int]:
    """Rows of each chunk table so that ``sum(rows) * chunk_dim == budget_rows * dim`` exactly."""
    total, remainder = divmod(budget_rows * dim, chunk_dim)
    if remainder:
        raise BudgetError(f"a budget of {budget_rows} x {dim} parameters is not a whole number of {chunk_dim}-wide chunk rows")
    if total < tables:
        raise BudgetError(f"a budget of {budget_rows} rows cannot give {tables} chunk tables a row each")
    base, extra = divmod(total, tables)
    return [base + (1 if i < extra else 0) for i in range(tables)]
