"""The collision report: per feature, how many of its training occurrences read a row that another value also reads.

Computed with the plan's own row mapping (``EmbeddingPlan.rows_of_values``: the hashing contract, or the
collisionless vocabulary), so it describes exactly the rows training and serving use. Numpy only: training
writes it (``collisions.json`` in the run directory), the export copies it into the manifest
(``manifest["collisions"]``), and the service reads it from there (``uembed_feature_collision_share``).

Definitions (docs/MODELS.md, "The collision report"):

- A *value* is a distinct non-missing training value of one feature; the missing value is left out (it is
  no training value). Two features' values are different values even when their bytes are equal.
- A lookup of a value *shares its row* when another value, of this feature or of any other, has a lookup
  into the same row of the same table (a value's own lookups landing on one row are not a collision).
- ``shared_share``: the share of the feature's training occurrences whose value shares its row in *every*
  lookup (it has no row of its own; for one lookup, the row it reads is shared). ``shared_share_any``: in at
  least one lookup. Both equal for one-lookup features.
- ``predicted_share`` (and ``_any``): what a uniform hash predicts for the same tables. A value's lookup
  into a table of ``m`` rows that ``K`` lookups of values read in all, ``l`` of them its own, shares its row
  with probability ``1 - (1 - 1/m) ** (K - l)``; lookups are taken as independent for all / any. Every value
  of a feature has the same prediction, so weighting by occurrences leaves it unchanged. ``None`` for a
  collisionless (exact) feature: it is not hashed. Hybrid tables: ``K`` counts only the lookups into the
  hashed rows ``m``, and a head value's share is 0 (it owns its row), so the prediction is the tail's times
  the tail's share of the occurrences.
- ``rows``: the distinct (table, row) pairs the feature's values read, over all its lookups.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uembed.contract.columns import FeatureColumn
from uembed.contract.plan import EmbeddingPlan
from uembed.contract.plan import value_counts as column_value_counts

REPORT_VERSION = 1
STREAMED = "not computed for streamed runs: the streaming scan keeps each feature's distinct keys, not how often each occurs"
NOT_RECORDED = "not recorded: the run has no collisions.json (trained before the report existed)"


@dataclass(frozen=True)
class ValueCounts:
    """A feature's distinct non-missing training values and how often each occurs (int64, > 0)."""

    values: Sequence[bytes]
    counts: np.ndarray


def value_counts(column: FeatureColumn) -> ValueCounts:
    """The values a column's examples hold (every item of a list counts), with their occurrences."""
    return ValueCounts(*column_value_counts(column))


def training_value_counts(columns: Mapping[str, FeatureColumn]) -> dict[str, ValueCounts]:
    return {name: value_counts(column) for name, column in columns.items()}


def _share(occurrences: np.ndarray, flags: np.ndarray) -> float:
    total = int(occurrences.sum())
    return float(occurrences[flags].sum() / total) if total else 0.0


def _occupants(rows: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct rows of a table and how many distinct owners read each: (row, owner) pairs deduplicated
    first, so one value's several lookups into one row count once."""
    order = np.lexsort((owners, rows))
    rows, owners = rows[order], owners[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (owners[1:] != owners[:-1])
    return np.unique(rows[first], return_counts=True)


def uniform_share(rows: int, others: int) -> float:
    """Probability that a uniformly hashed lookup shares its row of a ``rows``-row table with ``others`` lookups."""
    if others <= 0:
        return 0.0
    if rows == 1:
        return 1.0
    return -math.expm1(others * math.log1p(-1.0 / rows))


def collision_report(plan: EmbeddingPlan, counts: Mapping[str, ValueCounts]) -> dict:
    """The report (JSON-ready) of ``plan``'s features that ``counts`` holds, over all of ``plan``'s tables."""
    features = [f for f in plan.features if f.name in counts]
    sizes = [len(counts[f.name].values) for f in features]
    first_owner = np.cumsum([0, *sizes])  # value k of feature i is owner first_owner[i] + k
    # Per table, the lookups into it: (feature position, lookup position, rows of the feature's values).
    lookups: dict[str, list[tuple[int, int, np.ndarray]]] = {t.name: [] for t in plan.tables}
    for i, feature in enumerate(features):
        values = list(counts[feature.name].values)
        for j, lookup in enumerate(feature.lookups):
            lookups[lookup.table].append((i, j, plan.rows_of_values(feature, lookup, values)))
    shared: dict[tuple[int, int], np.ndarray] = {}
    tables, hashed_lookups = {}, {}
    for table in plan.tables:
        entries = lookups[table.name]
        if not entries:
            continue
        rows = np.concatenate([r for _, _, r in entries])
        owners = np.concatenate([np.arange(first_owner[i], first_owner[i] + r.size, dtype=np.int64) for i, _, r in entries])
        occupied, readers = _occupants(rows, owners)
        for i, j, r in entries:
            shared[i, j] = readers[np.searchsorted(occupied, r)] > 1
        hashed_lookups[table.name] = int((rows < table.hashed_rows).sum())  # a head row is no hash's to share
        tables[table.name] = {"rows": table.rows, "lookups": int(rows.size), "rows_read": int(occupied.size),
                              "rows_shared": int((readers > 1).sum())}  # fmt: skip
    report = {}
    for i, feature in enumerate(features):
        occurrences = np.asarray(counts[feature.name].counts, dtype=np.int64)
        flags = np.stack([shared[i, j] for j in range(len(feature.lookups))])
        predicted, per_lookup = [], []
        for j, lookup in enumerate(feature.lookups):
            own = sum(1 for other in feature.lookups if other.table == lookup.table)
            chance = None
            if not feature.vocabulary:
                # Hybrid tables: a head value never shares its row; the others hash among the other hashed lookups.
                hashed_rows = plan.table(lookup.table).hashed_rows
                tail = next(r for k, m, r in lookups[lookup.table] if (k, m) == (i, j)) < hashed_rows
                chance = uniform_share(hashed_rows, hashed_lookups[lookup.table] - own) * _share(occurrences, tail)
            predicted.append(chance)
            per_lookup.append({"table": lookup.table, "shared_share": _share(occurrences, flags[j]), "predicted_share": chance})
        exact = any(chance is None for chance in predicted)
        rows_read = sum(
            np.unique(np.concatenate([r for k, _, r in lookups[name] if k == i])).size
            for name in dict.fromkeys(lookup.table for lookup in feature.lookups)
        )
        report[feature.name] = {
            "values": int(occurrences.size),
            "occurrences": int(occurrences.sum()),
            "rows": int(rows_read),
            "lookups": len(feature.lookups),
            "shared_share": _share(occurrences, flags.all(axis=0)),
            "shared_share_any": _share(occurrences, flags.any(axis=0)),
            "predicted_share": None if exact else math.prod(predicted),
            "predicted_share_any": None if exact else 1.0 - math.prod(1.0 - chance for chance in predicted),
            "per_lookup": per_lookup,
        }
    return {"version": REPORT_VERSION, "method": str(plan.method), "features": report, "tables": tables}


def not_computed(reason: str) -> dict:
    """The report of a run that has none, saying why (it is still printed and carried, so the gap is visible)."""
    return {"version": REPORT_VERSION, "features": {}, "not_computed": reason}


def save_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2))


def run_report(run_dir: Path, streamed: bool = False) -> dict:
    """A run directory's report (``collisions.json``), or why it has none."""
    path = run_dir / "collisions.json"
    if path.is_file():
        return json.loads(path.read_text())
    return not_computed(STREAMED if streamed else NOT_RECORDED)


def feature_shares(manifest: Mapping) -> dict[str, float]:
    """Feature -> ``shared_share`` of a bundle's manifest; empty for a bundle without a report (an older export,
    a streamed run) or with one the service cannot read (a report is information, never a reason to refuse a bundle)."""
    report = manifest.get("collisions")
    features = report.get("features") if isinstance(report, Mapping) else None
    if not isinstance(features, Mapping):
        return {}
    return {
        str(name): float(entry["shared_share"])
        for name, entry in features.items()
        if isinstance(entry, Mapping) and isinstance(entry.get("shared_share"), (int, float))
    }


def _percent(share: float | None) -> str:
    return "exact" if share is None else f"{share:.1%}"


def format_report(report: dict | None) -> str:
    """The report as a small text table (what ``uembed train`` and ``uembed export`` print)."""
    if not report or report.get("not_computed"):
        reason = (report or {}).get("not_computed", NOT_RECORDED)
        return f"collisions: {reason}"
    entries = report.get("features", {})
    multi = any(entry["lookups"] > 1 for entry in entries.values())
    header = ["feature", "values", "rows", "shared", "uniform hash"] + (["lookups", "shared (any)", "uniform (any)"] if multi else [])
    lines = [header]
    for name, entry in entries.items():
        line = [name, f"{entry['values']:,}", f"{entry['rows']:,}", _percent(entry["shared_share"]), _percent(entry["predicted_share"])]
        if multi:
            line += [str(entry["lookups"]), _percent(entry["shared_share_any"]), _percent(entry["predicted_share_any"])]
        lines.append(line)
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    text = ["  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(line, widths))) for line in lines]
    title = "collisions (share of training occurrences whose row another value also reads; docs/MODELS.md):"
    return "\n".join([title, *text])
