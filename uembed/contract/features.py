"""Feature and dataset specs: what each input column is and how it becomes hashable values.

A spec file (TOML or JSON) declares the label and the features of a user's own data::

    [label]
    column = "rating"
    threshold = 3            # label = rating >= 3; without it the column must be 0/1
    # or: positive = [">50K"]              the values that mean 1 (text or numbers); every other value must be
    #     one value (<=50K) or be listed:  negative = ["no", "0"]   an unexplained value is an error naming it
    # or, instead of the table: label = "income == '>50K'"   (==, !=, >=, >, <=, <, in [...])

    [split]                  # optional; default: a seeded 80/10/10 shuffle
    fractions = [0.8, 0.1]   # train and validation; the rest is test
    # column = "fold"        or a column whose values are train / validation / test

    [[features]]
    name = "user_id"         # kind defaults to "categorical"

    [[features]]
    name = "genres"
    kind = "multivalent"     # a list column, or a string split on `separator`
    separator = "|"
    pooling = "mean"         # or "sum"

    [[features]]
    name = "age"
    kind = "numeric"         # bucketised: bucket i holds boundaries[i-1] <= x < boundaries[i]
    boundaries = [18, 25, 35, 45, 50, 56]   # or "quantiles:16": 16 buckets of the training data
    missing = ["?", ""]      # any feature: values that mean "missing"

    [groups]                 # semantic groups: features of one entity type share a table
    user = ["user_id", "age"]
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from enum import StrEnum, unique
from functools import cached_property
from pathlib import Path

import numpy as np

from uembed.contract.errors import DataError, SpecError
from uembed.contract.hashing import MISSING, canonical_bytes, canonical_column


@unique
class FeatureKind(StrEnum):
    CATEGORICAL = "categorical"  # one value per example
    MULTIVALENT = "multivalent"  # a list per example, pooled
    NUMERIC = "numeric"  # a number, bucketised by boundaries


@unique
class Pooling(StrEnum):
    MEAN = "mean"
    SUM = "sum"


FEATURE_KINDS = tuple(k.value for k in FeatureKind)
POOLINGS = tuple(p.value for p in Pooling)


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    ``column`` defaults to ``name``. ``max_values`` caps a multivalent feature's list
    (longer lists are truncated); 0 means "the longest list seen in training".
    ``lookups`` is the number of concatenated lookups for multi-size unified embedding;
    0 means "derived from the vocabulary size". ``missing`` lists values that mean missing
    (compared in canonical form: ``"?"``, ``""``, ``-1``). A numeric feature takes
    ``boundaries`` or ``quantiles`` (``boundaries = "quantiles:16"`` in a spec file): that
    many buckets at quantiles of the data, computed before training (streamed data: from a
    seeded sample of the training split, ``uembed/model/data/stream.py: scan``; a file read whole:
    from its whole column); the resolved boundaries are what a run and a bundle record.
    ``head_share`` (0 to below 1; None: ``--head-share``) is this feature's own share of its table's rows for its
    most frequent values (hybrid tables, ``uembed/contract/plan.py: with_heads``).
    """

    name: str
    kind: FeatureKind = FeatureKind.CATEGORICAL
    column: str = ""
    pooling: Pooling = Pooling.MEAN
    separator: str = "|"
    boundaries: tuple[float, ...] = ()
    max_values: int = 0
    lookups: int = 0
    missing: tuple[str, ...] = ()
    quantiles: int = 0
    head_share: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("a feature needs a name")
        if self.head_share is not None:
            share = self.head_share
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
                raise SpecError(f"feature {self.name!r}: head_share must be a number at least 0 and below 1, got {share!r}")
            object.__setattr__(self, "head_share", float(share))
        if self.kind not in FEATURE_KINDS:
            raise SpecError(f"feature {self.name!r}: kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise SpecError(f"feature {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        object.__setattr__(self, "kind", FeatureKind(self.kind))
        object.__setattr__(self, "pooling", Pooling(self.pooling))
        if self.kind == FeatureKind.NUMERIC and not self.boundaries and not self.quantiles:
            raise SpecError(
                f"feature {self.name!r}: a numeric feature needs bucket boundaries (a list, or \"quantiles:16\")"
            )
        if self.max_values < 0:
            raise SpecError(f"feature {self.name!r}: max_values must be at least 0 (0: the longest list seen), got {self.max_values}")
        if self.quantiles < 0 or self.quantiles == 1:
            raise SpecError(f"feature {self.name!r}: quantiles must be at least 2 buckets, got {self.quantiles}")
        object.__setattr__(self, "missing", tuple(self.missing))
        if list(self.boundaries) != sorted(self.boundaries):
            raise SpecError(f"feature {self.name!r}: boundaries must be increasing")
        if not self.column:
            object.__setattr__(self, "column", self.name)

    @property
    def multivalent(self) -> bool:
        return self.kind == FeatureKind.MULTIVALENT

    @property
    def needs_quantiles(self) -> bool:
        """A numeric feature whose boundaries are still to be computed from the training data."""
        return self.kind == FeatureKind.NUMERIC and self.quantiles > 0 and not self.boundaries

    @cached_property
    def missing_bytes(self) -> frozenset[bytes]:
        """The declared missing markers in canonical form."""
        return frozenset(canonical_bytes(marker) for marker in self.missing)

    def with_boundaries(self, boundaries: tuple[float, ...]) -> FeatureSpec:
        """This feature with its quantile boundaries resolved."""
        return replace(self, boundaries=tuple(float(b) for b in boundaries))

    def canonical_values(self, value: object) -> list[bytes]:
        """Canonical bytes of one example's value; always a non-empty list.

        A univalent feature gives one item; a multivalent one gives its list (empty or
        missing -> ``[MISSING]``), truncated to ``max_values`` when that is set.
        """
        if self.multivalent:
            if isinstance(value, str):
                items = [part for part in value.split(self.separator) if part] if value else []
            elif value is None:
                items = []
            elif isinstance(value, (list, tuple, np.ndarray)):
                items = list(value)
            else:
                items = [value]
            out = canonical_column(items)  # one call per list: compiled where the extension is built
            out = [item for item in out if item != MISSING and item not in self.missing_bytes]
            if self.max_values:
                out = out[: self.max_values]
            return out or [MISSING]
        if isinstance(value, (list, tuple, dict)):
            raise TypeError(f"feature {self.name!r} takes one value, got a {type(value).__name__}")
        if self.missing and canonical_bytes(value) in self.missing_bytes:
            return [MISSING]
        if self.kind == FeatureKind.NUMERIC:
            return [self.bucket(value)]
        return [canonical_bytes(value)]

    def bucket(self, value: object) -> bytes:
        """Bucket index of a numeric value, as canonical bytes (missing stays missing)."""
        if value is None or (isinstance(value, str) and not value):
            return MISSING
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating, str)):
            raise TypeError(f"feature {self.name!r} takes a number, got {type(value).__name__}")
        try:
            number = float(value)
        except ValueError:
            raise TypeError(f"feature {self.name!r} takes a number, got {value!r}") from None
        if np.isnan(number):
            return MISSING
        if self.needs_quantiles:
            raise SpecError(f"feature {self.name!r}: its quantile boundaries have not been computed")
        return str(int(np.searchsorted(np.asarray(self.boundaries), number, side="right"))).encode()

    @classmethod
    def from_dict(cls, raw: dict) -> FeatureSpec:
        """From a spec file's or a manifest's feature table (keys that are not settings ignored)."""
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        boundaries = fields.get("boundaries", ())
        if isinstance(boundaries, str):
            match = re.fullmatch(r"\s*quantiles\s*:\s*(\d+)\s*", boundaries)
            if not match:
                raise SpecError(
                    f"feature {raw.get('name')!r}: boundaries must be a list of numbers or \"quantiles:N\", got {boundaries!r}"
                )
            fields["quantiles"], boundaries = int(match.group(1)), ()
        try:
            fields["boundaries"] = tuple(float(b) for b in boundaries)
        except (TypeError, ValueError):
            raise SpecError(f"feature {raw.get('name')!r}: boundaries must be numbers, got {boundaries!r}") from None
        missing = fields.get("missing", ())
        if isinstance(missing, str) or not all(isinstance(m, (str, int, float)) for m in missing):
            raise SpecError(f"feature {raw.get('name')!r}: missing must be a list of values, got {missing!r}")
        return cls(**fields)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "column": self.column,
            "pooling": self.pooling.value,
            "separator": self.separator,
            "boundaries": list(self.boundaries),
            "max_values": self.max_values,
            "lookups": self.lookups,
            "missing": list(self.missing),
            "quantiles": self.quantiles,
            # Written only when set: a spec without it reads and records as before.
            **({"head_share": self.head_share} if self.head_share is not None else {}),
        }


LABEL_OPERATORS = ("==", "!=", ">=", "<=", ">", "<", "in")
_LABEL_EXPRESSION = re.compile(r"^\s*(?P<column>[^\s=!<>]+)\s*(?P<op>==|!=|>=|<=|>|<|\bin\b)\s*(?P<value>.+?)\s*$")


@dataclass(frozen=True)
class LabelSpec:
    """Binary label from one column, by the first rule given:

    * ``positive``: the values that mean 1 (``positive = [">50K"]``). The other values must be a single value
      (``<=50K``) or be listed in ``negative``: a column holding ``yes``/``no`` and ``0``/``1`` with
      ``positive = ["yes"]`` would otherwise make ``1`` a negative without a word, so values neither positive nor
      negative are an error that lists them (``negative = ["no", "0"]`` settles it, ``positive = ["yes", "1"]`` too);
    * ``operator`` and ``value``: ``column <op> value`` (``label = "income == '>50K'"``);
    * ``threshold``: ``column >= threshold``;
    * none: the column must hold 0 and 1.
    """

    column: str
    threshold: float | None = None
    positive: tuple = ()
    operator: str | None = None
    value: object = None
    negative: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "positive", tuple(self.positive))
        object.__setattr__(self, "negative", tuple(self.negative))
        if self.negative and not self.positive:
            raise SpecError("label: negative = [...] goes with positive = [...], the values that mean 1")
        both = set(self.positive) & set(self.negative)
        if both:
            raise SpecError(f"label: {sorted(both, key=repr)!r} are in both positive and negative")
        if self.operator is not None and self.operator not in LABEL_OPERATORS:
            raise SpecError(f"label: operator must be one of {', '.join(LABEL_OPERATORS)}, got {self.operator!r}")

    @classmethod
    def parse(cls, text: str) -> LabelSpec:
        """A column name, or an expression ``column <op> literal`` (``income == '>50K'``, ``rating >= 4``)."""
        match = _LABEL_EXPRESSION.match(text)
        if not match:
            if any(op in text for op in ("=", "<", ">")):
                raise SpecError(f"label: cannot read the expression {text!r}; write e.g. \"income == '>50K'\"")
            return cls(column=text.strip())
        column, op, literal = match.group("column", "op", "value")
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            raise SpecError(
                f"label: {literal!r} in {text!r} is not a literal; quote text (\"income == '>50K'\") or write a number"
            ) from None
        if op == "in":
            if not isinstance(value, (list, tuple, set)):
                raise SpecError(f"label: `in` takes a list, as in \"{column} in ['a', 'b']\"")
            return cls(column=column, positive=tuple(value))
        return cls(column=column, operator=op, value=value)

    @property
    def rule(self) -> str:
        """The rule in words (for messages and the docs)."""
        if self.positive:
            return f"{self.column} in {list(self.positive)!r}"
        if self.operator:
            return f"{self.column} {self.operator} {self.value!r}"
        if self.threshold is not None:
            return f"{self.column} >= {self.threshold:g}"
        return f"{self.column} (0/1)"

    def binarise(self, values, source: str, check_classes: bool = True) -> np.ndarray:
        """float32 0/1 labels of an Arrow array (or chunked array) of the label column.

        Errors (DataError) name the column and say what to declare: missing values, text
        without a rule, a column that is not 0/1, a single class (``check_classes``).
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if values.null_count:
            raise DataError(f"{source}: label column {self.column!r} has missing values")
        text = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
        numeric = pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)
        if self.positive or self.operator:
            wanted = [*self.positive, *self.negative] if self.positive else [self.value]
            if text and not all(isinstance(v, str) for v in wanted) or numeric and not all(
                isinstance(v, (int, float, bool)) for v in wanted
            ):
                raise DataError(
                    f"{source}: label column {self.column!r} holds {'text' if text else values.type}, "
                    f"but the rule {self.rule} compares it with {wanted!r}"
                )
            if self.positive:
                out = pc.is_in(values, value_set=pa.array(list(self.positive)).cast(values.type))
                self.check_unexplained(values, out, source)
            else:
                compare = {"==": pc.equal, "!=": pc.not_equal, ">=": pc.greater_equal, "<=": pc.less_equal,
                           ">": pc.greater, "<": pc.less}[self.operator]  # fmt: skip
                out = compare(values, pa.scalar(self.value).cast(values.type))
            out = out.to_numpy(zero_copy_only=False).astype(np.float32)
        elif text or not numeric:
            shown = ", ".join(repr(v) for v in pc.unique(values).to_pylist()[:5])
            raise DataError(
                f"{source}: label column {self.column!r} holds text ({shown}...); declare which values are positive: "
                f"positive = [{shown.split(', ')[0]}] under [label], or label = \"{self.column} == {shown.split(', ')[0]}\""
            )
        else:
            numbers = values.to_numpy(zero_copy_only=False).astype(np.float64)
            if np.isnan(numbers).any():
                raise DataError(f"{source}: label column {self.column!r} has missing values")
            if self.threshold is not None:
                out = (numbers >= self.threshold).astype(np.float32)
            else:
                distinct = set(np.unique(numbers).tolist())
                if not distinct <= {0.0, 1.0}:
                    shown = ", ".join(f"{v:g}" for v in sorted(distinct)[:5])
                    raise DataError(
                        f"{source}: label column {self.column!r} is not binary (values {shown}...); "
                        "give a threshold to binarise it, or positive = [...]"
                    )
                out = numbers.astype(np.float32)
        if check_classes and out.size and out.min() == out.max():
            raise DataError(f"{source}: label column {self.column!r} has one class only after thresholding ({self.rule})")
        return out

    def check_unexplained(self, values, positive, source: str) -> None:
        """Refuse label values that are neither positive nor a declared (or the only other) negative value."""
        import pyarrow as pa
        import pyarrow.compute as pc

        others = pc.unique(pc.filter(values, pc.invert(positive)))
        if self.negative:
            others = pc.filter(others, pc.invert(pc.is_in(others, value_set=pa.array(list(self.negative)).cast(values.type))))
            if not len(others):
                return
        elif len(others) <= 1:
            return
        shown = sorted(others.to_pylist(), key=repr)
        listed = ", ".join(repr(v) for v in shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "")
        raise DataError(
            f"{source}: label column {self.column!r} holds {listed}, "
            + ("in neither positive nor negative" if self.negative else "values that are not positive")
            + f" ({self.rule}); say what they mean: add them to positive = [...] or list the negatives, "
            f"negative = {shown[:10]!r}"
        )

    def to_dict(self) -> dict:
        out: dict = {"column": self.column, "threshold": self.threshold}
        if self.positive:
            out["positive"] = list(self.positive)
        if self.negative:
            out["negative"] = list(self.negative)
        if self.operator:
            out["operator"], out["value"] = self.operator, self.value
        return out

    @classmethod
    def from_dict(cls, raw: dict | str, source: str = "spec") -> LabelSpec:
        if isinstance(raw, str):
            return cls.parse(raw)
        if not isinstance(raw, dict) or ("column" not in raw and "expression" not in raw):
            raise SpecError(f"{source}: [label] needs a column")
        unknown = set(raw) - {"column", "threshold", "positive", "negative", "operator", "value", "expression"}
        if unknown:
            raise SpecError(f"{source}: [label] has unknown key(s) {', '.join(sorted(unknown))}")
        if "expression" in raw:
            return cls.parse(str(raw["expression"]))
        positive, negative = (raw.get(key) or () for key in ("positive", "negative"))
        positive, negative = ((v,) if isinstance(v, (str, int, float)) else v for v in (positive, negative))
        threshold = raw.get("threshold")
        return cls(
            column=str(raw["column"]),
            threshold=None if threshold is None else float(threshold),
            positive=tuple(positive),
            negative=tuple(negative),
            operator=raw.get("operator"),
            value=raw.get("value"),
        )


@dataclass(frozen=True)
class SplitSpec:
    """How examples are split into train / validation / test.

    ``fractions``: (train, validation), the rest is test, by a seeded shuffle (in memory) or a
    seeded hash of each example's position (streaming). ``column``: a column whose values
    are ``train``, ``validation`` (or ``val``, ``valid``) and ``test``.
    """

    fractions: tuple[float, float] = (0.8, 0.1)
    column: str | None = None

    def __post_init__(self) -> None:
        fractions = tuple(float(f) for f in self.fractions)
        if len(fractions) != 2 or min(fractions) < 0 or fractions[0] <= 0 or sum(fractions) > 1.0 + 1e-9:
            raise SpecError(
                f"split fractions must be (train, validation) with train > 0 and a sum of at most 1, got {list(self.fractions)}"
            )
        object.__setattr__(self, "fractions", fractions)

    def to_dict(self) -> dict:
        return {"fractions": list(self.fractions), "column": self.column}

    @classmethod
    def from_dict(cls, raw: dict | None, source: str = "spec") -> SplitSpec:
        if not raw:
            return cls()
        unknown = set(raw) - {"fractions", "column"}
        if unknown:
            raise SpecError(f"{source}: [split] has unknown key(s) {', '.join(sorted(unknown))}")
        return cls(fractions=tuple(raw.get("fractions", (0.8, 0.1))), column=raw.get("column"))


@dataclass(frozen=True)
class DatasetSpec:
    """Features, label and semantic groups of one dataset."""

    features: tuple[FeatureSpec, ...]
    label: LabelSpec
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    split: SplitSpec | None = None  # None: the caller's default (80/10/10 by the split seed)

    def __post_init__(self) -> None:
        if not self.features:
            raise SpecError("the spec declares no features")
        names = [f.name for f in self.features]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise SpecError(f"feature names must be unique, repeated: {', '.join(duplicated)}")
        seen: dict[str, str] = {}
        for group, members in self.groups.items():
            for member in members:
                if member not in names:
                    raise SpecError(f"group {group!r} names an unknown feature {member!r}")
                if member in seen:
                    raise SpecError(f"feature {member!r} is in two groups: {seen[member]!r} and {group!r}")
                seen[member] = group

    def feature(self, name: str) -> FeatureSpec:
        for spec in self.features:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def group_of(self, name: str) -> str | None:
        for group, members in self.groups.items():
            if name in members:
                return group
        return None

    @property
    def needs_quantiles(self) -> list[str]:
        return [f.name for f in self.features if f.needs_quantiles]

    def with_boundaries(self, boundaries: dict[str, tuple[float, ...]]) -> DatasetSpec:
        """This spec with quantile boundaries resolved for the named features."""
        features = tuple(f.with_boundaries(boundaries[f.name]) if f.name in boundaries else f for f in self.features)
        return replace(self, features=features)

    def to_dict(self) -> dict:
        out = {
            "features": [f.to_dict() for f in self.features],
            "label": self.label.to_dict(),
            "groups": {g: list(m) for g, m in self.groups.items()},
        }
        if self.split is not None:
            out["split"] = self.split.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict, source: str = "spec") -> DatasetSpec:
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: expected a table of settings")
        unknown = set(raw) - {"features", "label", "groups", "split"}
        if unknown:
            raise SpecError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
        label = LabelSpec.from_dict(raw.get("label"), source)
        features = []
        allowed = set(FeatureSpec.__dataclass_fields__)
        for index, item in enumerate(raw.get("features") or []):
            if not isinstance(item, dict):
                raise SpecError(f"{source}: features[{index}] must be a table")
            extra = set(item) - allowed
            if extra:
                raise SpecError(f"{source}: features[{index}] has unknown key(s) {', '.join(sorted(extra))}")
            features.append(FeatureSpec.from_dict(item))
        groups = {str(g): tuple(m) for g, m in (raw.get("groups") or {}).items()}
        split = SplitSpec.from_dict(raw["split"], source) if raw.get("split") else None
        return cls(features=tuple(features), label=label, groups=groups, split=split)


def load_spec(path: str | Path) -> DatasetSpec:
    """Read a TOML or JSON spec file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"spec file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    return DatasetSpec.from_dict(raw, source=str(path))
