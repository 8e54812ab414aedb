"""Feature and dataset specs: what each input column is and how it becomes hashable values.

A spec file (TOML or JSON) declares the label and the features of a user's own data::

    [label]
    column = "rating"
    threshold = 3            # label = rating >= 3; without it the column must be 0/1

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
    boundaries = [18, 25, 35, 45, 50, 56]

    [groups]                 # semantic groups: features of one entity type share a table
    user = ["user_id", "age"]
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum, unique
from pathlib import Path

import numpy as np

from model.errors import SpecError
from model.hashing import MISSING, canonical_bytes



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
    0 means "derived from the vocabulary size".
    """

    name: str
    kind: FeatureKind = FeatureKind.CATEGORICAL
    column: str = ""
    pooling: Pooling = Pooling.MEAN
    separator: str = "|"
    boundaries: tuple[float, ...] = ()
    max_values: int = 0
    lookups: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("a feature needs a name")
        if self.kind not in FEATURE_KINDS:
            raise SpecError(f"feature {self.name!r}: kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise SpecError(f"feature {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        object.__setattr__(self, "kind", FeatureKind(self.kind))
        object.__setattr__(self, "pooling", Pooling(self.pooling))
        if self.kind == FeatureKind.NUMERIC and not self.boundaries:
            raise SpecError(f"feature {self.name!r}: a numeric feature needs bucket boundaries")
        if list(self.boundaries) != sorted(self.boundaries):
            raise SpecError(f"feature {self.name!r}: boundaries must be increasing")
        if not self.column:
            object.__setattr__(self, "column", self.name)

    @property
    def multivalent(self) -> bool:
        return self.kind == FeatureKind.MULTIVALENT

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
            out = [canonical_bytes(item) for item in items]
            out = [item for item in out if item != MISSING]
            if self.max_values:
                out = out[: self.max_values]
            return out or [MISSING]
        if isinstance(value, (list, tuple, dict)):
            raise TypeError(f"feature {self.name!r} takes one value, got a {type(value).__name__}")
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
        return str(int(np.searchsorted(np.asarray(self.boundaries), number, side="right"))).encode()

    @classmethod
    def from_dict(cls, raw: dict) -> FeatureSpec:
        """From a spec file's or a manifest's feature table (keys that are not settings ignored)."""
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        fields["boundaries"] = tuple(float(b) for b in fields.get("boundaries", ()))
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
        }


@dataclass(frozen=True)
class LabelSpec:
    """Binary label: ``column >= threshold`` when a threshold is given, else the 0/1 column."""

    column: str
    threshold: float | None = None

    def to_dict(self) -> dict:
        return {"column": self.column, "threshold": self.threshold}


@dataclass(frozen=True)
class DatasetSpec:
    """Features, label and semantic groups of one dataset."""

    features: tuple[FeatureSpec, ...]
    label: LabelSpec
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

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

    def to_dict(self) -> dict:
        return {
            "features": [f.to_dict() for f in self.features],
            "label": self.label.to_dict(),
            "groups": {g: list(m) for g, m in self.groups.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict, source: str = "spec") -> DatasetSpec:
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: expected a table of settings")
        unknown = set(raw) - {"features", "label", "groups"}
        if unknown:
            raise SpecError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
        label_raw = raw.get("label")
        if isinstance(label_raw, str):
            label_raw = {"column": label_raw}
        if not isinstance(label_raw, dict) or "column" not in label_raw:
            raise SpecError(f"{source}: [label] needs a column")
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
        threshold = label_raw.get("threshold")
        return cls(
            features=tuple(features),
            label=LabelSpec(column=str(label_raw["column"]), threshold=None if threshold is None else float(threshold)),
            groups=groups,
        )


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
