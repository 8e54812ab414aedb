"""Embedding plans: which tables exist and which rows each feature reads (numpy only).

A plan is the whole contract between the hashing spec and an embedding module: tables
(rows x dim, one dim per model), and per feature its lookups (table, hash seed) and how
many values it pools. Each method is one way of building a plan under a budget, and
each is ONE entry of :data:`METHOD_REGISTRY` (a :class:`MethodSpec`: its name, a summary,
its builder and its role: fixed size, budgeted, SEO search or Applier). Adding a method
is adding a :class:`Method` member and one ``@register``-ed builder below; training, the
study, the export and the CLI read the roles from the registry.

Every budgeted method has *exactly* ``budget_rows * dim`` embedding parameters: the
semantic-group tables give up one row per biased feature to pay for the biases.

Encoding lays out *slots*: feature by feature, lookup by lookup, ``width`` values each.
``encode`` turns feature columns into ``rows [N, S]`` (row within the slot's table) and
``weights [N, S]`` (pooling weights, 0 on padding), which the torch module consumes.

A hybrid plan (``head_share`` > 0, :func:`with_heads`) gives the most frequent training values of the
one-lookup hashed features a row each (their *head*), at the end of the table they read, and hashes every
other value into the rows before them: the slots, the tables and the dense input are those of the plan
without heads, only which row of the slot's table a value reads changes (``uembed/contract/hashing.py``, 5.).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum, unique

import numpy as np

from uembed.contract.columns import FeatureColumn
from uembed.contract.errors import BudgetError, SpecError
from uembed.contract.features import DatasetSpec, Pooling
from uembed.contract.hashing import hash_canonical, head_rows, lookup_seed, rows_of, vocabulary_rows
from uembed.contract.seo import ChunkPolicy, applier_assignment, chunk_table_rows

MAX_MULTI_SIZE_LOOKUPS = 4
# The dense networks a plan can be trained with (uembed.model.networks builds them); named here so that the
# CLI offers them in every install, the serving one without torch included.
NETWORKS = ("mlp", "dcn")


@dataclass(frozen=True)
class TablePlan:
    name: str
    rows: int
    dim: int
    head_rows: int = 0  # the last rows: the heads of the features that read this table, one row a head value

    @property
    def hashed_rows(self) -> int:
        """Rows that values outside every head hash into: ``key % hashed_rows``."""
        return self.rows - self.head_rows

    @property
    def parameters(self) -> int:
        return self.rows * self.dim


@dataclass(frozen=True)
class LookupPlan:
    """One lookup: a table, and the hash namespace and lookup index that give its seed."""

    table: str
    namespace: str
    index: int = 0

    @property
    def seed(self) -> int:
        return lookup_seed(self.namespace, self.index)


@dataclass(frozen=True)
class FeaturePlan:
    name: str
    lookups: tuple[LookupPlan, ...]
    width: int = 1
    pooling: Pooling = Pooling.MEAN
    bias: bool = False
    vocabulary: bool = False  # collisionless: rows come from the sorted vocabulary keys
    head_start: int = 0  # a feature with a head (EmbeddingPlan.heads): the row of its first head value

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooling", Pooling(self.pooling))


@dataclass
class EmbeddingPlan:
    method: str
    dim: int
    tables: tuple[TablePlan, ...]
    features: tuple[FeaturePlan, ...]
    budget_rows: int
    vocabularies: dict[str, np.ndarray] = field(default_factory=dict)
    # Hybrid tables: per feature with a head, the sorted keys (uint64, under its lookup's seed) of its head values.
    heads: dict[str, np.ndarray] = field(default_factory=dict)
    # What a user must hear about this plan (a feature with a constant embedding...); not serialised.
    warnings: list[str] = field(default_factory=list, compare=False)

    # --- layout -----------------------------------------------------------------------------
    def table(self, name: str) -> TablePlan:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)

    @property
    def slots(self) -> int:
        return sum(len(f.lookups) * f.width for f in self.features)

    @property
    def groups(self) -> int:
        """Pooled vectors in the output: one per (feature, lookup)."""
        return sum(len(f.lookups) for f in self.features)

    @property
    def output_dim(self) -> int:
        return self.groups * self.dim

    def feature_columns(self) -> dict[str, tuple[int, int]]:
        """Output column range [start, stop) of each feature."""
        out, start = {}, 0
        for feature in self.features:
            stop = start + len(feature.lookups) * self.dim
            out[feature.name] = (start, stop)
            start = stop
        return out

    def table_features(self) -> dict[str, list[str]]:
        """Features that read each table."""
        out: dict[str, list[str]] = {t.name: [] for t in self.tables}
        for feature in self.features:
            for table in dict.fromkeys(lookup.table for lookup in feature.lookups):
                out[table].append(feature.name)
        return out

    def slot_tables(self) -> np.ndarray:
        """Index into ``tables`` of every slot (int64 [S])."""
        position = {t.name: i for i, t in enumerate(self.tables)}
        return np.array(
            [position[lookup.table] for f in self.features for lookup in f.lookups for _ in range(f.width)],
            dtype=np.int64,
        )

    def pooling_matrix(self) -> np.ndarray:
        """float32 [groups, slots]: 1 where a slot belongs to a (feature, lookup) group."""
        matrix = np.zeros((self.groups, self.slots), dtype=np.float32)
        widths = [f.width for f in self.features for _ in f.lookups]
        starts = np.cumsum([0] + widths[:-1])
        for group, (start, width) in enumerate(zip(starts, widths)):
            matrix[group, start : start + width] = 1.0
        return matrix

    def bias_columns(self) -> np.ndarray:
        """Output columns that carry a learned per-feature bias (int64)."""
        ranges = self.feature_columns()
        return np.array(
            [c for f in self.features if f.bias for c in range(*ranges[f.name])], dtype=np.int64
        )

    # --- sizes ------------------------------------------------------------------------------
    @property
    def table_parameters(self) -> int:
        return sum(t.parameters for t in self.tables)

    @property
    def bias_parameters(self) -> int:
        return int(self.bias_columns().size)

    @property
    def embedding_parameters(self) -> int:
        """Table rows x dim plus per-feature biases: what the budget pays for."""
        return self.table_parameters + self.bias_parameters

    def embedding_bytes(self, bytes_per_value: int = 4) -> int:
        return self.embedding_parameters * bytes_per_value

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, columns: Mapping[str, FeatureColumn]) -> tuple[np.ndarray, np.ndarray]:
        """rows int64 [N, S] and pooling weights float32 [N, S] for canonical columns."""
        missing = [f.name for f in self.features if f.name not in columns]
        if missing:
            raise SpecError(f"no column for feature(s) {', '.join(missing)}")
        parts = [self.encode_feature(feature, columns[feature.name]) for feature in self.features]
        return np.concatenate([rows for rows, _ in parts], axis=1), np.concatenate([w for _, w in parts], axis=1)

    def encode_feature(self, feature: FeaturePlan, column: FeatureColumn) -> tuple[np.ndarray, np.ndarray]:
        """One feature's slots: rows int64 [N, lookups * width] and weights float32, lookup-major."""
        codes = column.codes[:, : feature.width]
        if codes.shape[1] < feature.width:
            pad = np.full((codes.shape[0], feature.width - codes.shape[1]), -1, dtype=codes.dtype)
            codes = np.concatenate([codes, pad], axis=1)
        present = codes >= 0
        if feature.pooling == Pooling.MEAN:
            weights = (present / np.maximum(present.sum(axis=1, keepdims=True), 1)).astype(np.float32)
        else:
            weights = present.astype(np.float32)
        safe_codes = np.where(present, codes, 0)
        rows = [self.rows_of_values(feature, lookup, column.uniques)[safe_codes] for lookup in feature.lookups]
        return np.concatenate(rows, axis=1), np.tile(weights, (1, len(feature.lookups)))

    def rows_of_values(self, feature: FeaturePlan, lookup: LookupPlan, values: list[bytes]) -> np.ndarray:
        """Row ids (int64) of canonical values for one lookup of one feature."""
        keys = hash_canonical(values, lookup.seed, count=len(values))
        if feature.vocabulary:
            return vocabulary_rows(keys, self.vocabularies[feature.name])
        table = self.table(lookup.table)
        if feature.name in self.heads:  # only one-lookup features get a head
            return head_rows(keys, self.heads[feature.name], feature.head_start, table.hashed_rows)
        return rows_of(keys, table.hashed_rows)

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "method": str(self.method),
            "dim": self.dim,
            "budget_rows": self.budget_rows,
            # A plan without heads is written as before heads existed: no zero head fields.
            "tables": [_without_zero(asdict(t), "head_rows") for t in self.tables],
            "features": [
                _without_zero({**asdict(f), "pooling": f.pooling.value, "lookups": [asdict(lookup) for lookup in f.lookups]},
                              "head_start") if f.name not in self.heads else
                {**asdict(f), "pooling": f.pooling.value, "lookups": [asdict(lookup) for lookup in f.lookups],
                 "head_size": int(self.heads[f.name].size)}
                for f in self.features
            ],
        }

    @classmethod
    def from_dict(cls, raw: dict, vocabularies: Mapping[str, np.ndarray] | None = None,
                  heads: Mapping[str, np.ndarray] | None = None) -> EmbeddingPlan:  # fmt: skip
        features = tuple(
            FeaturePlan(**{k: v for k, v in f.items() if k != "head_size"} | {"lookups": tuple(LookupPlan(**lookup) for lookup in f["lookups"])})
            for f in raw["features"]
        )
        heads = dict(heads or {})
        sizes = {f["name"]: f["head_size"] for f in raw["features"] if "head_size" in f}
        if set(sizes) != set(heads) or any(heads[n].size != sizes[n] for n in sizes):
            raise SpecError(f"the plan's heads ({sizes}) and the head keys given "
                            f"({ {n: int(k.size) for n, k in heads.items()} }) differ")  # fmt: skip
        return cls(
            method=raw["method"],
            dim=int(raw["dim"]),
            tables=tuple(TablePlan(**t) for t in raw["tables"]),
            features=features,
            budget_rows=int(raw["budget_rows"]),
            vocabularies=dict(vocabularies or {}),
            heads=heads,
        )._checked_heads()

    def _checked_heads(self) -> EmbeddingPlan:
        """This plan, once its heads are found to be what the contract says: strictly increasing keys, each block
        within its table's head rows."""
        for feature in self.features:
            if feature.name not in self.heads:
                continue
            keys, table = self.heads[feature.name], self.table(feature.lookups[0].table)
            if keys.dtype != np.uint64 or (keys.size > 1 and not (keys[1:] > keys[:-1]).all()):
                raise SpecError(f"the head keys of feature {feature.name!r} are not strictly increasing uint64")
            if not table.hashed_rows <= feature.head_start <= table.rows - keys.size:
                raise SpecError(f"the head of feature {feature.name!r} (rows {feature.head_start} + {keys.size}) is not "
                                f"within the head rows [{table.hashed_rows}, {table.rows}) of table {table.name!r}")  # fmt: skip
        return self


def _without_zero(entry: dict, key: str) -> dict:
    return {k: v for k, v in entry.items() if k != key or v}


# --- building plans ---------------------------------------------------------------------------


def vocabulary_sizes(columns: Mapping[str, FeatureColumn]) -> dict[str, int]:
    """Distinct non-missing values per feature (of the training split)."""
    return {name: len(column.present_values()) for name, column in columns.items()}


def collisionless_rows(vocabulary: Mapping[str, int]) -> int:
    """Rows of the collisionless model: every value plus one unknown row per feature."""
    return sum(v + 1 for v in vocabulary.values())


def resolve_budget(vocabulary: Mapping[str, int], fraction: float | None, rows: int | None) -> int:
    """Budget in rows: an absolute row count (wins when given), or a fraction of the collisionless rows."""
    if rows is None:
        if not fraction or fraction <= 0 or not math.isfinite(fraction):
            raise BudgetError(f"budget fraction must be positive, got {fraction}")
        rows = int(round(fraction * collisionless_rows(vocabulary)))
    if rows <= 0:
        raise BudgetError(f"budget must be at least one row, got {rows}")
    return rows


def split_by_share(total: int, shares: Mapping[str, float], minimum: int = 1) -> dict[str, int]:
    """Integers proportional to ``shares`` summing exactly to ``total`` (largest remainder).

    Example: ``split_by_share(10, {"a": 3, "b": 1})`` -> ``{"a": 7, "b": 3}`` (7.5 and 2.5
    rounded so the sum stays 10; ties go to the first).
    """
    names = list(shares)
    if total < minimum * len(names):
        raise BudgetError(f"a budget of {total} rows cannot give {len(names)} tables {minimum} row(s) each")
    if not sum(shares.values()):
        shares = dict.fromkeys(names, 1.0)
    spare = total - minimum * len(names)
    exact = {n: spare * shares[n] / sum(shares.values()) for n in names}
    out = {n: minimum + int(math.floor(exact[n])) for n in names}
    left = total - sum(out.values())
    by_remainder = sorted(names, key=lambda n: (-(exact[n] - math.floor(exact[n])), names.index(n)))
    for name in by_remainder[:left]:
        out[name] += 1
    return out


def default_lookups(vocabulary_size: int, offset: int = 0) -> int:
    """Multi-size default: one lookup per decade of vocabulary past the first (plus ``offset``), 1 to 4."""
    return max(1, min(MAX_MULTI_SIZE_LOOKUPS, math.ceil(math.log10(max(vocabulary_size, 1))) - 1 + offset))


@dataclass
class PlanRequest:
    """What a method's builder gets: the features, their training statistics and the options.

    ``budget`` is the resolved budget in rows (``None`` for a method of fixed size);
    ``policy`` the SEO policy of the Appliers; ``chunk_dim`` the chunk width of the
    monolithic baseline; ``search_multiplier`` and ``adjust_hash_buckets`` shape the SEO
    search table.
    """

    method: Method
    spec: DatasetSpec
    vocabulary_keys: Callable[[str], np.ndarray]  # sorted keys of a feature's training values
    dim: int
    vocabulary: dict[str, int]
    widths: dict[str, int]
    budget: int | None = None
    policy: ChunkPolicy | None = None
    chunk_dim: int = 8
    search_multiplier: int = 2
    adjust_hash_buckets: bool = True
    lookups_offset: int = 0

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.spec.features]

    def feature(self, name: str, lookups: tuple[LookupPlan, ...], **extra) -> FeaturePlan:
        """A feature's plan with its list width and pooling from the spec."""
        return FeaturePlan(name=name, lookups=lookups, width=self.widths[name], pooling=self.spec.feature(name).pooling, **extra)

    def plan(self, tables: tuple[TablePlan, ...], features: tuple[FeaturePlan, ...], dim: int | None = None, **extra) -> EmbeddingPlan:
        return EmbeddingPlan(self.method, dim or self.dim, tables, features, self.budget, **extra)


@unique
class Method(StrEnum):
    """The embedding methods; each has one entry in :data:`METHOD_REGISTRY`."""

    COLLISIONLESS = "collisionless"
    HASHING_TRICK = "hashing-trick"
    UNIFIED = "unified"
    MULTI_SIZE_UNIFIED = "multi-size-unified"
    SEMANTIC_GROUP = "semantic-group"
    SEPARATE = "separate"
    MONOLITHIC_SHARED = "monolithic-shared"
    SEO_SEARCH = "seo-search"
    SEO_APPLIER_EXACT = "seo-applier-exact"
    SEO_APPLIER_RR = "seo-applier-rr"


@dataclass(frozen=True)
class MethodSpec:
    """One embedding method: its name, what it is, how it builds a plan, and its role.

    Args:
        name: the method's name (``--embedding``).
        summary: one line for the help and the docs.
        build: ``PlanRequest -> EmbeddingPlan``.
        fixed_size: the plan's size comes from the data, not from a budget (collisionless);
            a study trains it once per seed.
        budgeted: the plan needs only a budget and has exactly ``budget_rows * dim``
            embedding parameters.
        search: SEO stage 1: trains chunk attention and derives a policy; never served.
        applier: SEO stage 2 variant (``"exact"`` or ``"rr"``); needs the search's policy.
    """

    name: Method
    summary: str
    build: Callable[[PlanRequest], EmbeddingPlan]
    fixed_size: bool = False
    budgeted: bool = True
    search: bool = False
    applier: str | None = None

    @property
    def needs_policy(self) -> bool:
        return self.applier is not None

    @property
    def servable(self) -> bool:
        return not self.search


METHOD_REGISTRY: dict[Method, MethodSpec] = {}


def register(name: Method, summary: str, **role) -> Callable:
    """Decorator: register a plan builder as the method ``name``."""

    def add(build: Callable[[PlanRequest], EmbeddingPlan]) -> Callable[[PlanRequest], EmbeddingPlan]:
        METHOD_REGISTRY[name] = MethodSpec(name, summary, build, **role)
        return build

    return add


def method_spec(name: str) -> MethodSpec:
    """The registry entry of a method name; a clear error for an unknown one."""
    try:
        return METHOD_REGISTRY[Method(name)]
    except ValueError:
        raise SpecError(f"unknown embedding method {name!r}; choose one of {', '.join(METHODS)}") from None


@register(Method.COLLISIONLESS, "one table per feature, one row per training value (row 0: unknown or missing)",
          fixed_size=True, budgeted=False)  # fmt: skip
def _collisionless(request: PlanRequest) -> EmbeddingPlan:
    names, vocabulary = request.names, request.vocabulary
    tables = tuple(TablePlan(name, vocabulary[name] + 1, request.dim) for name in names)
    features = tuple(request.feature(n, (LookupPlan(n, n),), vocabulary=True) for n in names)
    vocabularies = {name: request.vocabulary_keys(name) for name in names}
    return EmbeddingPlan(request.method, request.dim, tables, features, collisionless_rows(vocabulary), vocabularies)


@register(Method.HASHING_TRICK, "one hashed table per feature, the budget split by vocabulary share")
def _hashing_trick(request: PlanRequest) -> EmbeddingPlan:
    rows = split_by_share(request.budget, request.vocabulary)
    tables = tuple(TablePlan(n, rows[n], request.dim) for n in request.names)
    return request.plan(tables, tuple(request.feature(n, (LookupPlan(n, n),)) for n in request.names))


@register(Method.UNIFIED, "one hashed table shared by every feature, each feature with its own hash seed")
def _unified(request: PlanRequest) -> EmbeddingPlan:
    tables = (TablePlan("unified", request.budget, request.dim),)
    return request.plan(tables, tuple(request.feature(n, (LookupPlan("unified", n),)) for n in request.names))


@register(Method.MULTI_SIZE_UNIFIED, "one shared table; a feature concatenates 1-4 lookups (more for larger vocabularies)")
def _multi_size_unified(request: PlanRequest) -> EmbeddingPlan:
    tables = (TablePlan("unified", request.budget, request.dim),)
    lookups = {
        f.name: f.lookups or default_lookups(request.vocabulary[f.name], request.lookups_offset) for f in request.spec.features
    }
    features = tuple(
        request.feature(n, tuple(LookupPlan("unified", n, j) for j in range(lookups[n]))) for n in request.names
    )
    return request.plan(tables, features)


@register(Method.SEMANTIC_GROUP, "one table per declared group of features, a learned per-feature bias after lookup")
def _semantic_group(request: PlanRequest) -> EmbeddingPlan:
    spec, names, budget = request.spec, request.names, request.budget
    table_of = {n: spec.group_of(n) or n for n in names}
    members: dict[str, list[str]] = {}
    for name in names:
        members.setdefault(table_of[name], []).append(name)
    biased = {n for n in names if spec.group_of(n)}
    # Each biased feature pays for its bias (dim values) with one row of the budget.
    table_rows = budget - len(biased)
    if table_rows < len(members):
        raise BudgetError(
            f"a budget of {budget} rows cannot hold {len(members)} tables and {len(biased)} feature biases: "
            f"semantic-group needs at least {len(members) + len(biased)} rows (--budget-rows {len(members) + len(biased)})"
        )
    rows = split_by_share(table_rows, {t: sum(request.vocabulary[n] for n in m) for t, m in members.items()})
    tables = tuple(TablePlan(t, rows[t], request.dim) for t in members)
    return request.plan(tables, tuple(request.feature(n, (LookupPlan(table_of[n], n),), bias=n in biased) for n in names))


@register(Method.SEPARATE, "one hashed table per feature, the budget split evenly (the SEO paper's baseline)")
def _separate(request: PlanRequest) -> EmbeddingPlan:
    rows = split_by_share(request.budget, dict.fromkeys(request.names, 1.0))
    tables = tuple(TablePlan(n, rows[n], request.dim) for n in request.names)
    return request.plan(tables, tuple(request.feature(n, (LookupPlan(n, n),)) for n in request.names))


def _chunk_plan(request: PlanRequest, policy: ChunkPolicy, variant: str) -> EmbeddingPlan:
    """Chunk tables of ``policy.chunk_dim`` columns sharing the budget, each feature reading its chunks."""
    missing = set(request.names) - set(policy.features)
    if missing:
        raise SpecError(f"the policy has no chunks for feature(s) {', '.join(sorted(missing))}")
    if policy.dim != request.dim:
        raise SpecError(f"the policy was searched for dim {policy.dim}, this model has dim {request.dim}")
    count, assignment = applier_assignment(policy, variant)
    rows = chunk_table_rows(request.budget, request.dim, policy.chunk_dim, count)
    tables = tuple(TablePlan(f"chunk{i}", rows[i], policy.chunk_dim) for i in range(count))
    # One key per feature for all its chunks: the chunk tables are column blocks of one table.
    features = tuple(request.feature(n, tuple(LookupPlan(f"chunk{t}", n) for t in assignment[n])) for n in request.names)
    return request.plan(tables, features, dim=policy.chunk_dim)


@register(Method.MONOLITHIC_SHARED, "one table that every feature reads in full, as dim / chunk_dim chunk tables (SEO's MSE baseline)")
def _monolithic_shared(request: PlanRequest) -> EmbeddingPlan:
    chunks = max(request.dim // request.chunk_dim, 1)
    policy = ChunkPolicy(request.dim // chunks, chunks, request.dim, {n: tuple(range(chunks)) for n in request.names})
    return _chunk_plan(request, policy, "exact")


@register(Method.SEO_SEARCH, "SEO stage 1: a table search-multiplier times wider, cut into chunks with learned attention",
          budgeted=False, search=True)  # fmt: skip
def _seo_search(request: PlanRequest) -> EmbeddingPlan:
    search_dim = request.dim * request.search_multiplier
    rows = request.budget * request.dim // search_dim if request.adjust_hash_buckets else request.budget
    if rows < 1:
        raise BudgetError(f"a budget of {request.budget} rows leaves no rows for a table {request.search_multiplier}x wider")
    tables = (TablePlan("search", rows, search_dim),)
    return request.plan(tables, tuple(request.feature(n, (LookupPlan("search", n),)) for n in request.names), dim=search_dim)


def _applier(request: PlanRequest) -> EmbeddingPlan:
    if request.policy is None:
        raise SpecError(f"{request.method} needs a policy file from `uembed search` (--policy)")
    return _chunk_plan(request, request.policy, METHOD_REGISTRY[request.method].applier)


register(Method.SEO_APPLIER_EXACT, "SEO stage 2: a feature concatenates exactly the chunks its search chose",
         budgeted=False, applier="exact")(_applier)  # fmt: skip
register(Method.SEO_APPLIER_RR, "SEO stage 2: a feature keeps its number of chunks, dealt round-robin over the tables",
         budgeted=False, applier="rr")(_applier)  # fmt: skip

if set(METHOD_REGISTRY) != set(Method):  # a method added to the enum without a builder
    raise RuntimeError(f"no plan builder for {sorted(set(Method) - set(METHOD_REGISTRY))}")

METHODS = tuple(m.value for m in Method)
# Methods whose plan needs only a budget, with exactly budget_rows * dim parameters (the search
# model's are only close to it, the Appliers need a policy).
BUDGETED_METHODS = tuple(m.value for m in Method if METHOD_REGISTRY[m].budgeted)
APPLIER_METHODS = {m.value: s.applier for m, s in METHOD_REGISTRY.items() if s.applier}
SEARCH_METHOD = next(m.value for m, s in METHOD_REGISTRY.items() if s.search)
APPLIER_ALIAS = "seo-applier"  # the CLI's name for "an Applier", its variant given by --applier


def applier_method(variant: str) -> str:
    """The Applier method of a variant (``exact`` -> ``seo-applier-exact``)."""
    for name, applier in APPLIER_METHODS.items():
        if applier == variant:
            return name
    raise SpecError(f"unknown Applier variant {variant!r}; choose one of {', '.join(APPLIER_METHODS.values())}")


def column_keys(column: FeatureColumn, name: str) -> np.ndarray:
    """Sorted keys of a column's distinct non-missing values under the feature's seed."""
    values = column.present_values()
    return np.unique(hash_canonical(values, lookup_seed(name), count=len(values)))


def minimum_budget(method: str, spec: DatasetSpec) -> int:
    """The fewest rows a budget of ``method`` can have: one per table and per feature bias."""
    names = [f.name for f in spec.features]
    if Method(method) == Method.SEMANTIC_GROUP:
        tables = len({spec.group_of(n) or n for n in names})
        return max(len(names), tables + sum(1 for n in names if spec.group_of(n)))
    return len(names)


def plan_warnings(plan: EmbeddingPlan) -> list[str]:
    """What a user must hear about a plan: features whose embedding is a constant, and a
    multi-size plan that is the unified plan."""
    out = []
    for feature in plan.features:
        if not feature.vocabulary and all(plan.table(lookup.table).rows == 1 for lookup in feature.lookups):
            out.append(
                f"feature {feature.name!r} gets a single row in {plan.method} (table "
                f"{feature.lookups[0].table!r}): its embedding is a constant and it carries no information; "
                "raise the budget (--budget or --budget-rows) or use a shared table (unified)"
            )
    if plan.method == Method.MULTI_SIZE_UNIFIED and all(len(f.lookups) == 1 for f in plan.features):
        out.append(
            "multi-size-unified: every feature has one lookup (small vocabularies), so this model is identical to "
            "unified; set `lookups` per feature in the spec to give some features more"
        )
    return out


def build_plan(
    method: str,
    spec: DatasetSpec,
    train_columns,
    dim: int,
    budget_fraction: float | None = None,
    budget_rows: int | None = None,
    policy: ChunkPolicy | None = None,
    chunk_dim: int = 8,
    search_multiplier: int = 2,
    adjust_hash_buckets: bool = True,
    lookups_offset: int = 0,
    exact_features: tuple[str, ...] = (),
    head_share: float | str = 0.0,
) -> EmbeddingPlan:
    """Plan ``method`` for the features of ``spec``, sized from the training columns.

    ``train_columns`` is a mapping of feature name to :class:`FeatureColumn` (in-memory
    data), or statistics of a streamed training split (``uembed.model.data.stream.StreamStats``:
    ``vocabulary``, ``widths`` and ``keys`` per feature).

    ``policy`` is the SEO policy of the Applier methods; ``chunk_dim`` the chunk width of
    the monolithic baseline; ``search_multiplier`` and ``adjust_hash_buckets`` shape the
    SEO search table (``dim * search_multiplier`` wide, rows cut to keep the budget);
    ``lookups_offset`` moves every multi-size feature's default lookup count (a spec's own
    ``lookups`` wins). ``exact_features`` are taken out of the method's tables and looked up
    collisionless (an ablation: what a feature's collisions cost; see :func:`with_exact_features`).
    ``head_share`` gives that share of each table's rows to heads (:func:`with_heads`); a feature's own
    ``head_share`` in the spec overrides it; ``"auto"`` picks each table's head size (:func:`auto_head_size`). Heads need the values' counts: in-memory columns have them, a
    streamed split's statistics have them when the scan counted them (``StreamStats.head_counts``).
    """
    entry = method_spec(method)
    if dim <= 0:
        raise SpecError(f"embedding dim must be positive, got {dim}")
    if isinstance(train_columns, Mapping):
        vocabulary = vocabulary_sizes({f.name: train_columns[f.name] for f in spec.features})
        widths = {f.name: max(1, f.max_values or train_columns[f.name].codes.shape[1]) for f in spec.features}

        def keys(name: str) -> np.ndarray:
            return column_keys(train_columns[name], name)
    else:
        vocabulary = {f.name: int(train_columns.vocabulary[f.name]) for f in spec.features}
        widths = {f.name: int(train_columns.widths[f.name]) for f in spec.features}
        keys = train_columns.keys.__getitem__
    request = PlanRequest(
        entry.name, spec, keys, dim, vocabulary, widths, policy=policy, chunk_dim=chunk_dim,
        search_multiplier=search_multiplier, adjust_hash_buckets=adjust_hash_buckets, lookups_offset=lookups_offset,
    )  # fmt: skip
    if not entry.fixed_size:
        request.budget = resolve_budget(vocabulary, budget_fraction, budget_rows)
        minimum = minimum_budget(method, spec)
        if request.budget < minimum:
            collisionless = collisionless_rows(vocabulary)
            raise BudgetError(
                f"a budget of {request.budget} rows is smaller than the {len(request.names)} features it must serve: "
                f"{method} needs at least {minimum} rows (--budget-rows {minimum}, or --budget "
                f"{math.ceil(minimum / collisionless * 1000) / 1000:g} of the {collisionless:,} collisionless rows)"
            )
    plan = entry.build(request)
    if exact_features:
        plan = with_exact_features(plan, exact_features, request)
    overrides = {f.name: f.head_share for f in spec.features if f.head_share is not None}
    if head_share or any(overrides.values()):
        # auto or a number, checked before the counts are looked for
        if head_share != AUTO and (isinstance(head_share, str) or not (0 <= head_share < 1 and math.isfinite(head_share))):
            raise BudgetError(f"--head-share must be at least 0 and below 1, or {AUTO}, got {head_share}")
        if isinstance(train_columns, Mapping):
            counts = {f.name: column_head_counts(train_columns[f.name], f.name) for f in spec.features}
        else:
            counts = getattr(train_columns, "head_counts", None) or {}
            if not counts:
                raise SpecError("--head-share needs how often each training value occurs: these streamed statistics "
                                "were scanned without counting them; scan again (without --stats)")  # fmt: skip
        plan = with_heads(plan, head_share, counts, overrides)
    plan.warnings = [*plan.warnings, *plan_warnings(plan)]
    return plan


def with_exact_features(plan: EmbeddingPlan, names: tuple[str, ...], request: PlanRequest) -> EmbeddingPlan:
    """``plan`` with each of ``names`` reading one collisionless table of its own instead of its lookups.

    The method's tables keep their rows, so the plan grows by the exact tables; the features left
    in the shared tables collide less too. The gain over ``plan`` is what those features' collisions cost.
    """
    unknown = sorted(set(names) - set(request.names))
    if unknown:
        raise SpecError(f"unknown feature(s) {', '.join(unknown)} to look up exactly; the features are {', '.join(request.names)}")
    exact = {name: TablePlan(f"exact:{name}", request.vocabulary[name] + 1, plan.dim) for name in names}
    features = tuple(
        # Namespace = the feature, index 0: the keys the collisionless vocabulary was built with.
        request.feature(f.name, (LookupPlan(exact[f.name].name, f.name),), vocabulary=True) if f.name in exact else f
        for f in plan.features
    )
    vocabularies = {**plan.vocabularies, **{name: request.vocabulary_keys(name) for name in names}}
    return EmbeddingPlan(plan.method, plan.dim, plan.tables + tuple(exact.values()), features, plan.budget_rows, vocabularies)


def head_share_for(method: str, share: float | str) -> float | str:
    """``share`` where ``method`` can hold heads, else 0: what a study or the planner trains each method with, so
    that a --head-share given to all of them leaves the collisionless reference and the chunk methods as they are."""
    return share if Method(method) in HEAD_METHODS else 0.0


# Methods whose tables a head may share: a table read whole by one-lookup features (not the chunk tables, whose
# column blocks are one table and must agree on every row, nor the SEO search model, nor collisionless).
HEAD_METHODS = (Method.HASHING_TRICK, Method.UNIFIED, Method.MULTI_SIZE_UNIFIED, Method.SEMANTIC_GROUP, Method.SEPARATE)


@dataclass(frozen=True)
class HeadCounts:
    """A feature's training values as a head is chosen from them.

    ``keys``: uint64, each value's key under the feature's own seed (``lookup_seed(name)``, its lookup 0, the seed
    every head method gives a one-lookup feature); ``counts``: int64 > 0, their occurrences (every item of a list
    counts), in the same order. ``exact``: every distinct value is there with its true count (in-memory columns; a
    streamed feature with few values); otherwise the counts are those of the scan's heavy-hitters summary
    (``uembed/model/data/stream.py``: the most frequent values, each count a lower bound).
    """

    keys: np.ndarray
    counts: np.ndarray
    exact: bool = True
    distinct: int = -1  # the feature's distinct values, kept or not (-1: the keys kept)
    total: int = -1  # all its occurrences, kept or not (-1: the counts' sum)

    def __post_init__(self) -> None:
        if self.distinct < 0:
            object.__setattr__(self, "distinct", int(self.keys.size))
        if self.total < 0:
            object.__setattr__(self, "total", int(np.sum(self.counts)))


def value_counts(column: FeatureColumn) -> tuple[list[bytes], np.ndarray]:
    """A column's distinct non-missing values (every item of a list counts) and their occurrences (int64, > 0)."""
    counts = np.bincount(column.codes[column.codes > 0].ravel(), minlength=len(column.uniques)).astype(np.int64)
    used = np.flatnonzero(counts)
    return [column.uniques[i] for i in used], counts[used]


def column_head_counts(column: FeatureColumn, name: str) -> HeadCounts:
    values, counts = value_counts(column)
    return HeadCounts(hash_canonical(values, lookup_seed(name), count=len(values)), counts)


def with_heads(plan: EmbeddingPlan, share: float | str, counts: Mapping[str, HeadCounts],
               overrides: Mapping[str, float] | None = None) -> EmbeddingPlan:  # fmt: skip
    """``plan`` with hybrid tables: ``share`` of each table's rows become head rows.

    A table's head rows go to the values with the largest training counts among the one-lookup hashed features
    that read it (ties: the feature first in the plan, then the smaller key), until ``floor(share * rows)`` are
    given or the values run out; one row at least stays hashed. The tables keep their rows, so the budget pays
    for the heads. Each feature's head values get consecutive rows in the order of their keys, the features'
    blocks following the hashed rows in plan order.

    ``overrides`` (a spec's per-feature ``head_share``): such a feature does not compete for the table's
    ``share``; its own ``floor(head_share * rows)`` rows of the table go to its most frequent values alone (0: no
    head). A table whose heads would together take every row is an error naming it.

    A worked example: a ``unified`` table of 100 rows read by ``a`` (``head_share = 0.2`` in the spec) and ``b``,
    ``c`` with ``share`` 0.1: ``a``'s 20 most frequent values get rows of their own, and the 10 most frequent
    values of ``b`` and ``c`` together the next ones; every other value hashes into the first 70 rows.

    ``share = "auto"``: the features without a share of their own get, per table, the head size that
    :func:`auto_head_size` picks for them (the features with one keep their quota, and their tails count as
    load on the hashed rows).
    """
    if share != AUTO and (isinstance(share, str) or not (0 <= share < 1 and math.isfinite(share))):
        raise BudgetError(f"--head-share must be at least 0 and below 1, or {AUTO}, got {share}")
    overrides = dict(overrides or {})
    if not share and not any(overrides.values()):
        return plan
    if Method(plan.method) not in HEAD_METHODS:
        if share:
            raise SpecError(f"--head-share is for {', '.join(HEAD_METHODS)}, not {plan.method}")
        # A spec's head_share describes its data, not one method: a method without heads trains without them.
        plan.warnings = [*plan.warnings, f"{plan.method} has no heads: the spec's head_share of {', '.join(n for n, v in overrides.items() if v)} "
                         "is not used"]  # fmt: skip
        return plan
    tables, heads, starts, short = [], {}, {}, []
    for table in plan.tables:
        candidates = [f for f in plan.features
                      if len(f.lookups) == 1 and f.lookups[0].table == table.name and not f.vocabulary]  # fmt: skip
        # Who takes which rows: the features without a share of their own compete for the table's share.
        pooled = [f for f in candidates if f.name not in overrides]
        quotas = [([f], int(overrides[f.name] * table.rows)) for f in candidates if f.name in overrides]
        if share == AUTO:
            load = sum(counts[f.name].distinct * sum(1 for lookup in f.lookups if lookup.table == table.name)
                       for f in plan.features if f not in pooled) - sum(total for _, total in quotas)  # fmt: skip
            pooled_total = auto_head_size(table.rows - sum(total for _, total in quotas), [counts[f.name] for f in pooled], load)
        else:
            pooled_total = int(share * table.rows)
        quotas.insert(0, (pooled, pooled_total))
        asked = sum(total for group, total in quotas if group)
        if asked > table.rows - 1:
            names = ", ".join(f.name for group, total in quotas if total for f in group)
            raise BudgetError(f"table {table.name!r}: the heads of {names} would take {asked} of its {table.rows} rows; "
                              "lower head_share (a feature's share is of the whole table)")  # fmt: skip
        own = {}
        for group, total in quotas:
            if not group or total <= 0:
                continue
            chosen = _most_frequent(group, counts, total)
            own.update(chosen)
            if sum(h.size for h in chosen.values()) < total and not all(counts[f.name].exact for f in group):
                short.append(table.name)
        own = {f.name: own[f.name] for f in candidates if f.name in own and own[f.name].size}
        used = int(sum(head.size for head in own.values()))
        if not used:
            tables.append(table)
            continue
        start = table.rows - used
        for name, head in own.items():
            heads[name], starts[name] = head, start
            start += head.size
        tables.append(replace(table, head_rows=used))
    features = tuple(replace(f, head_start=starts[f.name]) if f.name in starts else f for f in plan.features)
    out = EmbeddingPlan(plan.method, plan.dim, tuple(tables), features, plan.budget_rows, plan.vocabularies, heads)
    out.warnings = [f"table {name!r}: its head got fewer rows than its share, as the streaming scan counted only "
                    "the most frequent values of its features; the rest hash" for name in dict.fromkeys(short)]  # fmt: skip
    headless = [f.name for f in plan.features if overrides.get(f.name) and (len(f.lookups) != 1 or f.vocabulary)]
    if headless:
        out.warnings.append(f"the spec's head_share of {', '.join(headless)} is not used: a head serves a feature of "
                            "one hashed lookup, not one of several lookups or with a vocabulary of its own")  # fmt: skip
    return out


AUTO = "auto"


def auto_head_size(rows: int, counts: list[HeadCounts], others: int = 0) -> int:
    """The head size ``--head-share auto`` gives a table of ``rows`` rows read by features of ``counts``
    (``others``: keys of other features that hash into it).

    A head of ``h`` values leaves ``rows - h`` hashed rows for the ``distinct - h + others`` other keys; a tail
    occurrence then shares its row with ``(keys - 1) / (rows - h)`` other values on average. The head size is the
    ``h`` (0 up to ``rows - 1`` and the values counted) with the fewest such co-occupants summed over the tail's
    occurrences, ``(total - top_h) * (keys - 1) / (rows - h)``, the smallest on a tie: a value earns a row of its
    own while its share of the tail's occurrences exceeds what one row less costs the rest, about ``1 / (rows -
    h)`` of them. Every value in a head (a table that holds them all) costs nothing. Streamed counts: ``h`` goes
    no further than the values the scan's summary kept.
    """
    if rows <= 1 or not counts:
        return 0
    top = np.sort(np.concatenate([np.asarray(c.counts, dtype=np.float64) for c in counts]))[::-1][: rows - 1]
    sizes = np.arange(top.size + 1, dtype=np.float64)
    tail = sum(c.total for c in counts) - np.concatenate([[0.0], np.cumsum(top)])
    keys = sum(c.distinct for c in counts) + others - sizes
    cost = np.maximum(tail, 0.0) * np.maximum(keys - 1, 0.0) / (rows - sizes)
    return int(np.argmin(cost))


def _most_frequent(features: list[FeaturePlan], counts: Mapping[str, HeadCounts], total: int) -> dict[str, np.ndarray]:
    """The ``total`` values with the largest counts among ``features``' values (ties: the feature first, then the
    smaller key), as each feature's sorted keys."""
    for f in features:
        if f.lookups[0].seed != lookup_seed(f.name):
            raise SpecError(f"feature {f.name!r}: a head needs its lookup under its own seed, not {f.lookups[0]}")
    keys = [np.asarray(counts[f.name].keys, dtype=np.uint64) for f in features]
    owner = np.concatenate([np.full(k.size, i, dtype=np.int64) for i, k in enumerate(keys)])
    occurrences = np.concatenate([np.asarray(counts[f.name].counts, dtype=np.int64) for f in features])
    all_keys = np.concatenate(keys)
    chosen = np.lexsort((all_keys, owner, -occurrences))[:total]
    return {f.name: np.unique(all_keys[chosen[owner[chosen] == i]]) for i, f in enumerate(features)}
