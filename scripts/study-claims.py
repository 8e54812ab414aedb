"""The papers' claims, checked on a tuned study's final runs: differences of mean test AUC and Welch's t-test.

    python scripts/study-claims.py docs/results/movielens100k-tuned > docs/results/movielens100k-tuned/claims.md

Each row compares two (method, settings) at every budget both have: the mean of the seeds of the
first minus the mean of the seeds of the second, with Welch's p over the seeds (scipy).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from scipy.stats import ttest_ind

# (label, first (method, settings), second (method, settings)); "*" in a budget means collisionless's one size.
CLAIMS = (
    ("unified − hashing trick (tuned; UE paper: unified wins under compression)", ("unified", "tuned"), ("hashing-trick", "tuned")),
    ("unified − hashing trick (fixed settings)", ("unified", "fixed"), ("hashing-trick", "fixed")),
    ("SEO Applier (exact) − monolithic shared (tuned; SEO paper: Applier wins)", ("seo-applier-exact", "tuned"), ("monolithic-shared", "tuned")),
    ("SEO Applier (exact) − monolithic shared (fixed settings)", ("seo-applier-exact", "fixed"), ("monolithic-shared", "fixed")),
    ("multi-size unified − unified (tuned)", ("multi-size-unified", "tuned"), ("unified", "tuned")),
    ("collisionless − best shared table (tuned)", ("collisionless", "tuned"), ("*best", "tuned")),
    ("tuned − fixed: hashing trick", ("hashing-trick", "tuned"), ("hashing-trick", "fixed")),
    ("tuned − fixed: unified", ("unified", "tuned"), ("unified", "fixed")),
    ("tuned − fixed: multi-size unified", ("multi-size-unified", "tuned"), ("multi-size-unified", "fixed")),
    ("tuned − fixed: monolithic shared", ("monolithic-shared", "tuned"), ("monolithic-shared", "fixed")),
    ("tuned − fixed: SEO Applier (exact)", ("seo-applier-exact", "tuned"), ("seo-applier-exact", "fixed")),
)


def cell_aucs(rows: list[dict]) -> dict[tuple[str, str, float], list[float]]:
    out: dict[tuple[str, str, float], list[float]] = {}
    for row in rows:
        out.setdefault((row["method"], row["settings"], float(row["budget_fraction"])), []).append(float(row["test_auc"]))
    return out


def compare(first: list[float], second: list[float]) -> str:
    difference = statistics.fmean(first) - statistics.fmean(second)
    p = ttest_ind(first, second, equal_var=False).pvalue
    return f"{difference:+.4f} ({'p<0.001' if p < 0.001 else f'p={p:.3f}'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="folder of a tuned study (runs.csv with a settings column)")
    args = parser.parse_args()
    with (args.study / "runs.csv").open() as handle:
        aucs = cell_aucs(list(csv.DictReader(handle)))
    budgets = sorted({b for (m, _, b) in aucs if m != "collisionless"})
    shared = sorted({m for (m, _, _) in aucs if m != "collisionless"})
    lines = [
        "| comparison | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "| --- | " + " | ".join("---:" for _ in budgets) + " |",
    ]
    for label, (first, first_settings), (second, second_settings) in CLAIMS:
        cells = []
        for budget in budgets:
            a = aucs.get((first, first_settings, 1.0 if first == "collisionless" else budget))
            if second == "*best":  # the shared method with the best mean at this budget
                candidates = [aucs[(m, second_settings, budget)] for m in shared if (m, second_settings, budget) in aucs]
                b = max(candidates, key=statistics.fmean) if candidates else None
            else:
                b = aucs.get((second, second_settings, budget))
            cells.append(compare(a, b) if a and b else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
