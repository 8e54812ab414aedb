"""A tuned study's report from its stored files: summary.md and pareto.png again, and claims.md.

    python scripts/study-report.py docs/results/movielens100k-tuned

Reads runs.csv and selected.json (no training): the summary and the plot as ``uembed study
--trials`` wrote them (with the command kept from the old summary.md), and claims.md, the
papers' claims checked on the final runs. Each row of claims.md compares two (method, settings) at every budget both have: the mean of the seeds of the
first minus the mean of the seeds of the second, with Welch's p over the seeds (scipy).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from scipy.stats import ttest_ind

from uembed.model.study import read_csv
from uembed.model.tuning import write_tuned_outputs

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


def claims_table(rows: list[dict]) -> str:
    aucs = cell_aucs(rows)
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
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="folder of a tuned study (runs.csv with a settings column, selected.json)")
    args = parser.parse_args()
    rows = read_csv(args.study / "runs.csv")
    chosen = json.loads((args.study / "selected.json").read_text())
    old = (args.study / "summary.md").read_text()
    command = re.search(r"```bash\n(.*?)\n```", old, re.DOTALL).group(1)
    dataset = re.match(r"# Tuned parameter-accuracy study on (\S+)", old).group(1)
    write_tuned_outputs(chosen, rows, args.study, command, dataset)
    claims = (
        "# The papers' claims on the tuned study\n\nProduced by:\n\n```bash\n"
        f"python scripts/study-report.py {args.study}\n```\n\n"
        "Mean test AUC of the first minus the second (5 seeds each), Welch's p over the seeds (scipy). "
        "Columns: the budget as a fraction of the collisionless rows.\n\n" + claims_table(rows)
    )
    (args.study / "claims.md").write_text(claims)
    print(claims)
    return 0


if __name__ == "__main__":
    sys.exit(main())
