"""What training says about its data before it starts, and why it stopped when it ends.

The data summary is a few lines a user reads before the first epoch: examples per split, the positive rate, and per
feature how it was typed (its kind, from the spec: a column the spec leaves undeclared is categorical), its distinct
training values and its share of missing values. A categorical feature whose values are all numbers says so, since
that is how a column such as ``hour`` or ``price`` ends up one embedding row per value by accident."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uembed.contract.columns import Dataset, FeatureColumn
from uembed.contract.features import FeatureKind, FeatureSpec
from uembed.contract.hashing import MISSING
from uembed.model.data.stream import StreamStats, all_numbers

SPLITS = ("training", "validation", "test")


@dataclass(frozen=True)
class FeatureLine:
    """One feature's line: how it was typed and what the training split holds of it."""

    name: str
    kind: str
    distinct: int
    missing: float | None  # share of training examples without a value; None where it was not counted


def kind_of(spec: FeatureSpec, numbers_only: bool = False) -> str:
    """The feature's kind in words, with what it implies (numbers kept as categories, buckets, separators)."""
    if spec.kind == FeatureKind.NUMERIC:
        source = f"quantiles:{spec.quantiles}" if spec.quantiles else "boundaries"
        return f"numeric, {len(spec.boundaries) + 1} buckets ({source})"
    if spec.kind == FeatureKind.MULTIVALENT:
        return f"multivalent, {spec.separator!r}-separated, {spec.pooling.value} pooled"
    return "categorical (all numbers, each its own value)" if numbers_only else "categorical"


def column_line(spec: FeatureSpec, column: FeatureColumn) -> FeatureLine:
    present = [v for v in column.present_values() if v != MISSING]
    missing = float(np.mean(column.codes[:, 0] <= 0)) if len(column.codes) else 0.0
    return FeatureLine(spec.name, kind_of(spec, spec.kind == FeatureKind.CATEGORICAL and bool(present) and all_numbers(present)), len(present), missing)


def format_summary(name: str, examples: dict[str, int], positives: dict[str, int], features: list[FeatureLine]) -> str:
    total, positive = sum(examples.values()), sum(positives.values())
    splits = ", ".join(f"{examples[s]:,} {s}" for s in SPLITS)
    rates = ", ".join(f"{s} {positives[s] / examples[s]:.1%}" for s in SPLITS if examples[s])
    lines = [f"data {name}: {total:,} examples ({splits}); positive rate {positive / max(total, 1):.1%} ({rates})"]
    width = max(len("feature"), *(len(f.name) for f in features))
    kinds = max(len("kind"), *(len(f.kind) for f in features))
    lines.append(f"  {'feature':<{width}}  {'kind':<{kinds}}  {'distinct':>9}  missing")
    for f in features:
        missing = "-" if f.missing is None else f"{f.missing:.1%}"
        lines.append(f"  {f.name:<{width}}  {f.kind:<{kinds}}  {f.distinct:>9,}  {missing:>7}")
    return "\n".join(lines)


def dataset_summary(train: Dataset, validation: Dataset, test: Dataset) -> str:
    """The summary of an in-memory data set's three splits (the distinct values and missing shares: training's)."""
    parts = dict(zip(SPLITS, (train, validation, test), strict=True))
    examples = {s: len(d) for s, d in parts.items()}
    positives = {s: int(d.labels.sum()) for s, d in parts.items()}
    features = [column_line(spec, train.columns[spec.name]) for spec in train.spec.features]
    return format_summary(train.name, examples, positives, features)


def stream_summary(name: str, stats: StreamStats) -> str:
    """The summary of a streamed data set from its one-pass statistics (``StreamStats``): what the scan counted."""
    keys = {"training": "train", "validation": "validation", "test": "test"}
    examples = {s: stats.examples[k] for s, k in keys.items()}
    positives = {s: stats.positives[k] for s, k in keys.items()}
    train = max(stats.examples["train"], 1)
    features = [
        FeatureLine(f.name, kind_of(f, f.name in stats.numbers), stats.vocabulary[f.name],
                    stats.missing[f.name] / train if f.name in stats.missing else None)
        for f in stats.spec.features
    ]  # fmt: skip
    return format_summary(name, examples, positives, features)


def stop_reason(epochs_run: int, max_epochs: int, best_epoch: int, best_auc: float, patience: int) -> str:
    """Why training ended, in the words of its options."""
    if epochs_run < max_epochs:
        return (f"early stopping after epoch {epochs_run}: validation AUC did not beat epoch {best_epoch}'s {best_auc:.4f} "
                f"for {patience} epochs (--patience {patience}); kept epoch {best_epoch}")  # fmt: skip
    ran = "the only epoch" if max_epochs == 1 else f"all {max_epochs} epochs"
    return f"{ran} run (--epochs {max_epochs}); kept epoch {best_epoch}, validation AUC {best_auc:.4f}"
