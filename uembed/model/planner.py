"""The memory planner (``uembed plan``): the plan that fits a byte budget at the least AUC cost, or the plan of fewest
bytes within an AUC loss of collisionless float32.

**Calibration.** Short runs (:func:`uembed.model.train.train`, a few epochs) on a share of the training split, scored
on the whole validation split. Collisionless float32 is the reference, trained first. The levers come in two kinds:

- *trained* levers make a :class:`Family` of runs (today the method and the dim); a family is trained at several
  budget fractions, the axis its fit runs along. A lever that must be trained in (the head share of a hybrid table,
  QAT) is one more field of :class:`Family` and of its ``config``.
- *post-training* levers change a trained model's tables and are measured on them, with no training: today the row
  codecs (:data:`POST_LEVERS`, :func:`uembed.model.levers.codec_rows`: the export's own quantiser and PQ codebooks). Pruned
  dims would be one more entry, with its bytes in :func:`uembed.model.levers.record_bytes`.

**Fit.** Per family and codec, validation AUC against log(fraction) through the calibrated points, made
non-decreasing in the rows and joined by straight lines (for a fixed family and codec the served bytes are affine in
the rows, so this is AUC against log bytes); a codec is measured on each calibration model, so its cost may differ
with the rows. Predictions stay within the fractions calibrated: no extrapolation.

**Bytes** are the embedding bytes as served: rows x the codec's record (``uembed/bundle/codecs.py``), a pq table's
codebooks, and the float32 feature biases, computed on the full training split's plan.

The plan file is JSON for a person to read and edit; ``uembed train --plan FILE`` trains it and records the predicted
and measured AUC side by side (:func:`record_measured`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uembed.bundle.codecs import (
    ROW_DTYPES,
)
from uembed.contract.errors import BudgetError, SpecError, UembedError
from uembed.contract.plan import (
    EmbeddingPlan,
    build_plan,
    collisionless_rows,
    head_share_for,
    minimum_budget,
    vocabulary_sizes,
)
from uembed.model.data import Dataset
from uembed.model.levers import codec_rows, record_bytes  # noqa: F401 - record_bytes: the planner's sizes
from uembed.model.levers import served_bytes as lever_served_bytes
from uembed.model.train import TrainConfig, TrainResult, evaluate, predict, train

PLAN_FORMAT = "uembed-memory-plan"
PLAN_FORMAT_VERSION = 1
REFERENCE = "collisionless"
PLANNED_METHODS = ("unified", "hashing-trick", "multi-size-unified", "semantic-group", "separate")
DEFAULT_METHODS = ("unified", "hashing-trick")
DEFAULT_DIMS = (8, 16, 32)
DEFAULT_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5)
POST_LEVERS = ROW_DTYPES  # the row codecs, measured on each calibration model's tables


@dataclass(frozen=True)
class Family:
    """The trained levers of a calibration run; the budget fraction varies within a family."""

    method: str
    dim: int

    @property
    def label(self) -> str:
        return f"{self.method} dim {self.dim}"

    def config(self, base: TrainConfig, rows: int | None) -> TrainConfig:
        return replace(base, embedding=self.method, dim=self.dim, budget_fraction=None, budget_rows=rows,
                       head_share=head_share_for(self.method, base.head_share))  # fmt: skip


@dataclass
class Candidate:
    """One plan weighed: a family at a budget and a codec, with its prediction and served bytes."""

    family: Family
    codec: str
    budget_rows: int | None  # None: collisionless
    fraction: float
    predicted_auc: float
    bytes: int
    feasible: bool
    note: str = ""

    def to_dict(self, reference_auc: float) -> dict:
        return {"method": self.family.method, "dim": self.family.dim, "codec": self.codec, "budget_rows": self.budget_rows,
                "fraction": round(self.fraction, 6), "predicted_auc": round(self.predicted_auc, 6),
                "predicted_auc_loss": round(reference_auc - self.predicted_auc, 6), "bytes": self.bytes,
                "meets_target": self.feasible, "note": self.note}  # fmt: skip


@dataclass
class Fit:
    """A family's validation AUC against log(fraction), per codec: the calibrated points made non-decreasing (pooled
    where more rows measured lower: the noise of one split) and joined by straight lines; no codec above float32."""

    fractions: list[float]  # the distinct fractions calibrated, ascending
    curves: dict[str, list[float]]  # per codec, the AUC at each fraction
    points: int

    @property
    def low(self) -> float:
        return self.fractions[0]

    @property
    def high(self) -> float:
        return self.fractions[-1]

    def auc(self, fraction: float, codec: str) -> float:
        """The AUC between the calibrated fractions (the nearest end's outside them: no extrapolation)."""
        return float(np.interp(math.log(fraction), np.log(self.fractions), self.curves[codec]))

    def fewest(self, codec: str, auc: float) -> float | None:
        """The smallest fraction predicted to reach ``auc``, None when even the largest does not."""
        xs, ys = np.log(self.fractions), self.curves[codec]
        if ys[0] >= auc:
            return self.low
        for i in range(1, len(ys)):
            if ys[i] >= auc:
                return float(math.exp(xs[i - 1] + (xs[i] - xs[i - 1]) * (auc - ys[i - 1]) / (ys[i] - ys[i - 1])))
        return None

    def to_dict(self) -> dict:
        return {"fractions": self.fractions, "auc": self.curves, "points": self.points}


def non_decreasing(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing sequence (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for value, weight in zip(values, weights):
        blocks.append([float(value), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1, n1), (m2, w2, n2) = blocks[-2], blocks[-1]
            blocks[-2:] = [[(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]]
    return [m for m, _, n in blocks for _ in range(n)]


# --- bytes as served ------------------------------------------------------------------------------------------------


def served_bytes(plan: EmbeddingPlan, codec: str) -> int:
    """The plan's embedding bytes as a bundle of ``codec`` serves its tables: records, pq codebooks, float32 biases."""
    return lever_served_bytes(plan, codec, maps=False)


class Sizer:
    """Served bytes of a family's plan on the full training split, at a budget, and the largest budget within bytes.

    A budgeted family's bytes are affine in its budget rows (the tables share the rows, biases and codebooks are
    fixed), so two plans give the line; each returned figure is still the exact plan's."""

    def __init__(self, spec, columns) -> None:
        self.spec, self.columns = spec, columns
        self.collisionless = collisionless_rows(vocabulary_sizes(columns))
        self._plans: dict = {}

    def plan(self, family: Family, rows: int | None) -> EmbeddingPlan:
        key = (family, rows)
        if key not in self._plans:
            self._plans[key] = build_plan(family.method, self.spec, self.columns, family.dim, budget_rows=rows)
        return self._plans[key]

    def rows(self, family: Family, fraction: float) -> int:
        return max(round(fraction * self.collisionless), minimum_budget(family.method, self.spec))

    def bytes(self, family: Family, rows: int | None, codec: str) -> int:
        return served_bytes(self.plan(family, rows), codec)

    def rows_within(self, family: Family, codec: str, limit: int) -> int:
        """The most budget rows whose plan serves in ``limit`` bytes (the family's minimum when none does)."""
        low = minimum_budget(family.method, self.spec)
        base, slope = self.bytes(family, low, codec), self.bytes(family, low + 1, codec) - self.bytes(family, low, codec)
        rows = low + max((limit - base) // max(slope, 1), 0)
        while rows > low and self.bytes(family, rows, codec) > limit:  # rounding of a split; at most a step or two
            rows -= 1
        return rows


# --- calibration ----------------------------------------------------------------------------------------------------


def codec_auc(result: TrainResult, data: Dataset, codecs: Sequence[str]) -> dict[str, float]:
    """AUC on ``data`` of the trained model with its tables served in each codec (table by table, as exported)."""
    model, plan = result.model, result.plan
    rows, weights = plan.encode(data.columns)
    original = model.embedding.weight.data
    out = {}
    try:
        for codec in codecs:
            decoded = [codec_rows(t.detach().numpy(), codec) for t in model.embedding.table_weights().values()]
            model.embedding.weight.data = torch.from_numpy(np.concatenate(decoded).astype(np.float32))
            out[codec] = evaluate(data.labels, predict(model, rows, weights))["auc"]
    finally:
        model.embedding.weight.data = original
    return out


def calibration_order(families: Sequence[Family], fractions: Sequence[float]) -> list[tuple[Family, float]]:
    """Runs in the order that leaves every family a line soonest when time runs out: each family at its largest
    fraction, then its smallest, then the fractions between, from the middle outwards, family after family."""
    ordered = sorted(fractions)
    if len(ordered) <= 2:
        passes = [ordered[-1:], ordered[:1]] if len(ordered) == 2 else [ordered]
    else:
        middle = ordered[1:-1]
        centre = (len(middle) - 1) / 2
        passes = [[ordered[-1]], [ordered[0]]] + [[f] for f in sorted(middle, key=lambda f: abs(middle.index(f) - centre))]
    return [(family, f) for step in passes for f in step for family in families]


def sample_share(train_set: Dataset, share: float, seed: int) -> Dataset:
    if share >= 1:
        return train_set
    keep = max(round(share * len(train_set)), 1)
    return train_set.take(np.sort(np.random.default_rng(seed).choice(len(train_set), keep, replace=False)))


@dataclass
class Calibration:
    reference: dict
    points: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "every planned run finished"
    skipped: int = 0  # planned runs the time budget left out


def calibration_runs(families: Sequence[Family], fractions: Sequence[float], sizer: Sizer) -> list[tuple[Family, int]]:
    """The runs in :func:`calibration_order`, each at its fraction's rows of the full training split (as the
    candidates are weighed, and at least the family's minimum budget), a family's repeated rows run once."""
    runs, seen = [], set()
    for family, fraction in calibration_order(families, fractions):
        rows = sizer.rows(family, fraction)
        if (family, rows) not in seen:
            seen.add((family, rows))
            runs.append((family, rows))
    return runs


def calibrate(
    base: TrainConfig, train_set: Dataset, val_set: Dataset, families: Sequence[Family], fractions: Sequence[float],
    codecs: Sequence[str], time_budget: float, share: float, sizer: Sizer, progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> Calibration:  # fmt: skip
    """Train the reference, then the families across the fractions, until the runs are done or ``time_budget``
    seconds are spent: a run is not started when the runs so far say it would end past the budget. A run trains
    its fraction of the full training split's collisionless rows (on the sample), so its point sits where the
    candidates are weighed."""
    started = clock()
    sample = sample_share(train_set, share, base.split_seed)
    runs = calibration_runs(families, fractions, sizer)
    bar = tqdm(total=len(runs) + 1, desc="calibrating", unit="run", disable=not progress, file=sys.stderr)
    calibration = None
    durations = []
    for family, rows in [(Family(REFERENCE, base.dim), None), *runs]:
        elapsed = clock() - started
        if calibration is not None and elapsed + (sum(durations) / len(durations)) > time_budget:
            calibration.stopped = f"time budget of {time_budget:g}s ({len(calibration.points)} of {len(runs)} runs)"
            calibration.skipped = len(runs) - len(calibration.points)
            break
        bar.set_postfix_str(f"{family.label}" + (f" at {rows:,} rows" if rows else " (reference)"))
        run_started = clock()
        result = train(family.config(base, rows), sample, val_set, None, progress=False, echo_warnings=False)
        fraction = None if rows is None else rows / sizer.collisionless
        point = {"method": family.method, "dim": family.dim, "fraction": fraction, "rows": result.plan.budget_rows,
                 "epochs": result.metrics["epochs_run"], "auc": codec_auc(result, val_set, codecs)}  # fmt: skip
        durations.append(clock() - run_started)
        point["seconds"] = round(durations[-1], 3)
        if calibration is None:
            calibration = Calibration(reference=point)
        else:
            calibration.points.append(point)
        bar.update()
    bar.close()
    calibration.seconds = clock() - started
    return calibration


def fit_family(points: list[dict], codecs: Sequence[str]) -> Fit:
    """Each codec's AUC at each calibrated fraction (the mean of repeated ones), made non-decreasing in the rows;
    a lossy codec measured above float32 is the noise of one validation split and counts as no change."""
    fractions = sorted({p["fraction"] for p in points})
    counts = [sum(p["fraction"] == f for p in points) for f in fractions]

    def curve(codec: str) -> list[float]:
        means = [float(np.mean([p["auc"][codec] for p in points if p["fraction"] == f])) for f in fractions]
        return non_decreasing(means, counts)

    reference = curve("float32")
    curves = {c: reference if c == "float32" else [min(a, r) for a, r in zip(curve(c), reference)] for c in codecs}
    return Fit(fractions, curves, len(points))


def fit(calibration: Calibration, codecs: Sequence[str]) -> dict[Family, Fit]:
    families: dict[Family, list[dict]] = {}
    for point in calibration.points:
        families.setdefault(Family(point["method"], point["dim"]), []).append(point)
    return {family: fit_family(points, codecs) for family, points in families.items()}


# --- the choice -----------------------------------------------------------------------------------------------------


@dataclass
class Target:
    bytes: int | None = None
    max_auc_loss: float | None = None

    def describe(self) -> str:
        return f"within {self.bytes:,} bytes" if self.bytes is not None else f"within {self.max_auc_loss:g} AUC of collisionless float32"

    def to_dict(self) -> dict:
        return {"bytes": self.bytes} if self.bytes is not None else {"max_auc_loss": self.max_auc_loss}


    def check(self) -> None:
        """A one-line error for a target that is not one: neither or both, a negative loss, no bytes."""
        if (self.bytes is None) == (self.max_auc_loss is None):
            raise UembedError("give exactly one target: --bytes SIZE or --max-auc-loss DELTA")
        if self.max_auc_loss is not None and not (self.max_auc_loss >= 0 and math.isfinite(self.max_auc_loss)):
            raise UembedError(f"--max-auc-loss must be 0 or more, got {self.max_auc_loss:g}")
        if self.bytes is not None and self.bytes <= 0:
            raise UembedError(f"--bytes must be positive, got {self.bytes}")


def check_target(target: Target, sizer: Sizer, families: Sequence[Family], fractions: Sequence[float], codecs: Sequence[str]) -> None:
    """A one-line error for a target no plan considered could meet, whatever calibration says: a byte budget below
    the smallest table of the levers weighed."""
    target.check()
    if target.bytes is not None:
        smallest = min(((sizer.bytes(f, sizer.rows(f, min(fractions)), c), f, c) for f in families for c in codecs), key=lambda s: s[0])
        if target.bytes < smallest[0]:
            raise BudgetError(
                f"--bytes {target.bytes:,} is below the smallest table considered: {smallest[1].label} {smallest[2]} at "
                f"{min(fractions):g} of the rows takes {smallest[0]:,} bytes"
            )


def weigh(target: Target, fits: dict[Family, Fit], reference: dict, sizer: Sizer, codecs: Sequence[str]) -> list[Candidate]:
    """One candidate per family and codec (and collisionless per codec): at a byte budget the most rows that fit,
    at an AUC loss the fewest rows that meet it, each within the calibrated fractions."""
    ref_auc = reference["auc"]["float32"]
    candidates = []
    exact = Family(REFERENCE, reference["dim"])
    for codec in codecs:
        if target.max_auc_loss is not None and codec == "float32":
            continue  # the reference itself, against which the loss is counted
        auc = min(reference["auc"][codec], ref_auc)  # as in fit_family: no codec gains AUC
        size = sizer.bytes(exact, None, codec)
        feasible = size <= target.bytes if target.bytes is not None else ref_auc - auc <= target.max_auc_loss
        candidates.append(Candidate(exact, codec, None, 1.0, auc, size, feasible, "measured on the reference"))
    for family, line in fits.items():
        low, high = sizer.rows(family, line.low), sizer.rows(family, line.high)
        for codec in codecs:
            if target.bytes is not None:
                fit_rows = sizer.rows_within(family, codec, target.bytes)
                rows = min(fit_rows, high)
                note = "the most rows within the bytes" if rows == fit_rows else "its most calibrated rows (more would fit)"
                if rows < low:
                    rows, note = low, "its fewest calibrated rows do not fit"
            else:
                fraction = line.fewest(codec, ref_auc - target.max_auc_loss)
                rows = high if fraction is None else min(max(math.ceil(fraction * sizer.collisionless), low), high)
                note = "the fewest rows predicted to meet the loss"
            predicted = line.auc(min(max(rows / sizer.collisionless, line.low), line.high), codec)
            size = sizer.bytes(family, rows, codec)
            if target.bytes is not None:
                feasible = size <= target.bytes
            else:
                feasible = ref_auc - predicted <= target.max_auc_loss + 1e-12
                note = note if feasible else "short of the loss at its most calibrated rows"
            candidates.append(Candidate(family, codec, rows, rows / sizer.collisionless, predicted, size, feasible, note))
    return candidates


def choose(target: Target, candidates: list[Candidate], reference_auc: float) -> tuple[Candidate | None, str, list[Candidate]]:
    """The winner, why it won, and the candidates in the order a person compares them (the closest first when
    none meets the target)."""
    feasible = [c for c in candidates if c.feasible]
    if target.bytes is not None:
        ranked = sorted(candidates, key=lambda c: (not c.feasible, -c.predicted_auc, c.bytes))
    else:
        ranked = sorted(candidates, key=lambda c: (not c.feasible, c.bytes if c.feasible else 0, -c.predicted_auc))
    if not feasible:
        return None, "", ranked
    winner = ranked[0]
    runner = next((c for c in ranked[1:] if c.feasible), None)
    if target.bytes is not None:
        why = f"the highest predicted AUC ({winner.predicted_auc:.4f}) of the {len(feasible)} plans within {target.bytes:,} bytes"
        if runner:
            why += f"; next: {runner.family.label} {runner.codec} at {runner.predicted_auc:.4f} ({runner.bytes:,} bytes)"
    else:
        why = (f"the fewest bytes ({winner.bytes:,}) of the {len(feasible)} plans predicted within {target.max_auc_loss:g} AUC of "
               f"collisionless float32 ({reference_auc:.4f})")  # fmt: skip
        if runner:
            why += f"; next: {runner.family.label} {runner.codec} at {runner.bytes:,} bytes"
    return winner, why, ranked


def format_candidates(ranked: list[Candidate], reference_auc: float, limit: int = 20) -> str:
    lines = [f"{'plan':<32} {'codec':<8} {'rows':>12} {'pred. AUC':>9} {'loss':>8} {'bytes':>14}  meets"]
    for c in ranked[:limit]:
        rows = "all" if c.budget_rows is None else f"{c.budget_rows:,}"
        lines.append(f"{c.family.label:<32} {c.codec:<8} {rows:>12} {c.predicted_auc:>9.4f} {reference_auc - c.predicted_auc:>8.4f} "
                     f"{c.bytes:>14,}  {'yes' if c.feasible else 'no'}")  # fmt: skip
    if len(ranked) > limit:
        lines.append(f"... and {len(ranked) - limit} more (all of them in the plan file)")
    return "\n".join(lines)


# --- the plan file, and training it ---------------------------------------------------------------------------------

# A plan's train options and the `uembed train` options (argparse dests) that set the same thing.
PLAN_OPTIONS = {
    "embedding": ("embedding", "policy"),
    "budget_rows": ("budget_rows", "budget"),
    "dim": ("dim",),
    "dataset": ("dataset",),
    "spec": ("spec",),
    "label_threshold": ("label_threshold",),
    "synthetic_examples": ("synthetic_examples",),
    "split_seed": ("split_seed",),
    "split_fractions": ("split_fractions",),
    "split_column": ("split_column",),
    "network": ("network",),
    "hidden": ("hidden",),
    "cross_layers": ("cross_layers",),
    "lr": ("lr",),
    "batch_size": ("batch_size",),
    "embedding_weight_decay": ("embedding_weight_decay",),
}


def plan_document(target: Target, winner: Candidate, why: str, ranked: list[Candidate], calibration: Calibration,
                  fits: dict[Family, Fit], data_options: dict, settings: dict) -> dict:  # fmt: skip
    ref_auc = calibration.reference["auc"]["float32"]
    return {
        "format": PLAN_FORMAT,
        "format_version": PLAN_FORMAT_VERSION,
        "target": target.to_dict(),
        "train": {**data_options, "embedding": winner.family.method, "budget_rows": winner.budget_rows, "dim": winner.family.dim},
        "codec": winner.codec,
        "predicted": {"auc": winner.predicted_auc, "auc_loss": ref_auc - winner.predicted_auc, "bytes": winner.bytes,
                      "reference_auc": ref_auc, "fraction": winner.fraction,
                      "measure": "validation AUC of a calibration run (a share of the training split, few epochs)"},
        "why": why,
        "candidates": [c.to_dict(ref_auc) for c in ranked],
        "calibration": {**settings, "seconds": round(calibration.seconds, 3), "stopped": calibration.stopped,
                        "reference": calibration.reference, "points": calibration.points,
                        "fits": {f.label: line.to_dict() for f, line in fits.items()}},
    }


def load_plan(path: Path) -> dict:
    """A plan file, checked enough that a hand edit gone wrong is one line naming the field."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read the plan {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT or not isinstance(doc.get("train"), dict):
        raise SpecError(f"{path} is not a plan written by `uembed plan` (format {PLAN_FORMAT!r} with a 'train' object)")
    unknown = sorted(set(doc["train"]) - set(PLAN_OPTIONS))
    if unknown:
        raise SpecError(f"{path}: unknown train option(s) {', '.join(unknown)}; a plan sets {', '.join(PLAN_OPTIONS)}")
    if doc.get("codec", "float32") not in ROW_DTYPES:
        raise SpecError(f"{path}: codec must be one of {', '.join(ROW_DTYPES)}, got {doc.get('codec')!r}")
    return doc


def plan_conflicts(doc: dict, given: set[str], path: Path) -> None:
    """An error naming both when the command line sets what the plan sets."""
    for option, dests in PLAN_OPTIONS.items():
        if option in doc["train"]:
            for dest in dests:
                if dest in given:
                    flag = "--" + dest.replace("_", "-")
                    raise UembedError(
                        f"{flag} is given and the plan {path} sets {option} = {doc['train'][option]!r}: "
                        f"edit the plan or leave out {flag}"
                    )


def record_measured(result: TrainResult, doc: dict, val_set: Dataset, test_set: Dataset, path: Path) -> dict:
    """The trained plan's measured AUC beside the predicted one, at the plan's codec, in the run's metrics.json
    (and the plan itself as memory_plan.json: the export takes its codec from there)."""
    codec = doc.get("codec", "float32")
    val = codec_auc(result, val_set, [codec])[codec]
    test = codec_auc(result, test_set, [codec])[codec] if len(test_set) else None
    predicted = doc.get("predicted") or {}
    measured = {
        "plan": str(path),
        "codec": codec,
        "predicted_auc": predicted.get("auc"),
        "measured_val_auc": val,
        "measured_test_auc": test,
        "predicted_bytes": predicted.get("bytes"),
        "served_bytes": served_bytes(result.plan, codec),
    }
    result.metrics["memory_plan"] = measured
    if result.run_dir is not None:
        (result.run_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
        (result.run_dir / "memory_plan.json").write_text(json.dumps(doc, indent=2))
    return measured


def run_codec(run_dir: Path) -> str | None:
    """The codec of the plan a run was trained from, if any."""
    path = Path(run_dir) / "memory_plan.json"
    return json.loads(path.read_text()).get("codec") if path.is_file() else None
