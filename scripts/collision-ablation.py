"""What the gap to collisionless is made of: per feature, the gain from giving it its own table.

Takes one cell of a tuned study (its selected.json), trains the selected configuration once per
seed as it is, with each feature in turn looked up collisionless (its own table, outside the
budget), and with every feature so. Writes ablation.csv and ablation.md into the study folder.

    python scripts/collision-ablation.py docs/results/movielens100k-tuned multi-size-unified@0.1 --seeds 3 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
from pathlib import Path

from uembed.model.data import load_movielens100k
from uembed.model.train import TrainConfig
from uembed.model.tuning import Cell, collision_ablation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("study", type=Path, help="folder of a tuned MovieLens-100K study (with selected.json)")
    parser.add_argument("cell", help="method@budget, as in selected.json (e.g. multi-size-unified@0.1)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant: 0..N-1")
    parser.add_argument("--jobs", type=int, default=2, help="training processes in parallel")
    parser.add_argument("--epochs", type=int, default=12, help="as the study's --epochs")
    parser.add_argument("--patience", type=int, default=2, help="as the study's --patience")
    args = parser.parse_args()
    selected = json.loads((args.study / "selected.json").read_text())
    if args.cell not in selected:
        parser.error(f"no cell {args.cell!r} in {args.study / 'selected.json'}; cells: {', '.join(k for k in selected if '@' in k)}")
    method, budget = args.cell.split("@")
    base = TrainConfig(epochs=args.epochs, patience=args.patience)
    records = collision_ablation(load_movielens100k(), Cell(method, float(budget)), selected[args.cell]["params"], base,
                                 range(args.seeds), jobs=args.jobs)  # fmt: skip
    with (args.study / "ablation.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["exact_features"], []).append(record)
    baseline = statistics.fmean(r["test_auc"] for r in groups["(none)"])
    lines = [
        f"# Collision ablation of {args.cell}",
        "",
        "```bash",
        "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "```",
        "",
        f"The cell's selected configuration ({args.seeds} seeds), with the named feature(s) taken out of the shared "
        "table and given a collisionless table of their own (outside the budget).",
        "",
        "| collisionless feature(s) | test AUC | gain over the cell | embedding params |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, runs in groups.items():
        aucs = [r["test_auc"] for r in runs]
        spread = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.fmean(aucs):.4f} ± {spread:.4f} | {statistics.fmean(aucs) - baseline:+.4f} "
                     f"| {runs[0]['embedding_parameters']:,} |")  # fmt: skip
    (args.study / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
