"""Benchmark of the memory planner (issue #38): predicted against trained AUC, and the plan against the studies.

For each data set (MovieLens-100K, a Criteo-shaped sample of ``uembed data synth --preset criteo-kaggle`` loaded in
memory, the Adult census data as a user's CSV with a spec) and each byte budget (shares of the collisionless float32
bytes at the reference dim), runs ``uembed plan --bytes B``, then ``uembed train --plan`` once per seed, and writes
``results.json``, ``results.md``, the plans and a log into ``--out`` (the data and the runs go under ``--work``): the
predicted AUC (a calibration run's validation AUC), the measured validation and test AUC at the plan's codec (mean and
spread over the seeds), their difference, the plan chosen and the wall seconds of planning and training. For MovieLens it also puts the plan beside the best
configuration of each committed study whose served bytes fit the budget (``--studies``).

    python scripts/planner-bench.py --out docs/results/planner-bench            # the full benchmark
    python scripts/planner-bench.py --out /tmp/pb --work /tmp/pb/work --smoke   # tiny sizes: the code path only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from uembed.cli import build_parser
from uembed.cli.model_commands import load_dataset
from uembed.model import planner

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ("docs/results/movielens100k-tuned", "docs/results/movielens100k-levers")
# Per data set: budgets (a float: a share of collisionless float32 bytes; an int: bytes), and the calibration it gets.
# MovieLens's budgets are the served bytes of its tuned study's 0.1 and 0.03 cells (every cell's embedding bytes
# with its feature biases, the widest being dim 8's), and it also weighs multi-size-unified, the study's best method
# there. Criteo-shaped data has 26 large
# vocabularies: its collisionless reference trains slowly in memory, so it weighs fewer dims and has a longer time
# budget.
DATASETS = {
    "movielens100k": {"budgets": (25_200, 7_560), "plan": ["--time-budget", "600", "--methods", "unified,hashing-trick,multi-size-unified"]},
    "criteo": {"budgets": (0.1, 0.01), "plan": ["--time-budget", "900", "--dims", "8,16"]},
    "adult": {"budgets": (0.3, 0.1), "plan": ["--time-budget", "600"]},
}
# How the calibration runs train. `quick`: a few epochs on half the training split (the planner's default before
# 2026-12-04), whose AUC sits below a fully trained run's; `as-trained`: the epochs, patience and data `uembed train
# --plan` uses (the planner's default since).
CALIBRATIONS = {"quick": ["--sample", "0.5", "--epochs", "3", "--patience", "3"], "as-trained": ["--sample", "1", "--epochs", "20", "--patience", "2"]}
SMOKE_PLAN = ["--time-budget", "30", "--dims", "8", "--fractions", "0.1,0.5", "--epochs", "1"]


def uembed(*args: str) -> list[str]:
    return [sys.executable, "-m", "uembed", *args]


def run(command: list[str], log: Path) -> float:
    """Run a command (its output appended to ``log``); its wall seconds. A failure ends the benchmark naming the log."""
    started = time.perf_counter()
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ).returncode
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(command)}; see {log}")
    return time.perf_counter() - started


def data_args(name: str, work: Path, criteo_examples: int, log: Path) -> list[str]:
    if name == "movielens100k":
        return ["--dataset", "movielens100k"]
    if name == "criteo":
        folder = work / "data" / f"criteo-kaggle-{criteo_examples}"
        if not (folder / "part-00000.parquet").is_file():
            run(uembed("data", "synth", "--preset", "criteo-kaggle", "--examples", str(criteo_examples),
                       "--shard-rows", str(criteo_examples), "--out", str(folder)), log)  # fmt: skip
        return ["--dataset", str(folder / "part-00000.parquet"), "--spec", str(folder / "spec.toml")]
    folder = work / "data" / "adult"
    if not (folder / "adult.csv").is_file():
        run([sys.executable, str(ROOT / "scripts" / "adult-csv.py"), "--out", str(folder)], log)
    return ["--dataset", str(folder / "adult.csv"), "--spec", str(folder / "adult-spec.toml")]


def collisionless_bytes(args: list[str]) -> int:
    """Collisionless float32 served bytes on the training split at the plan's reference dim."""
    parsed = build_parser().parse_args(["plan", *args, "--bytes", "1", "--out", os.devnull])
    train_set, _, _ = load_dataset(parsed).split(parsed.split_seed, parsed.split_fractions)
    return planner.Sizer(train_set.spec, train_set.columns).bytes(planner.Family(planner.REFERENCE, parsed.dim), None, "float32")


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def study_best(study: Path, budget: int) -> dict | None:
    """The configuration of a study (its runs.csv) of best mean test AUC whose served bytes fit ``budget``.

    A study written before served bytes were recorded has float32 embedding bytes only: a row's feature bias
    (one float32 per row) is added, as the planner counts it."""
    path = ROOT / study / "runs.csv"
    if not path.is_file():
        return None
    groups: dict[tuple, list[dict]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            key = tuple(row.get(k, "") for k in ("settings", "method", "budget_fraction", "codec", "qat", "head_share", "prune_keep", "dim"))
            groups.setdefault(key, []).append(row)
    best = None
    for key, rows in groups.items():
        if rows[0].get("served_bytes"):
            size = max(int(float(r["served_bytes"])) for r in rows)
        else:
            dim = int(rows[0]["dim"])
            size = max(int(float(r["embedding_bytes"])) + 4 * int(r["embedding_parameters"]) // dim for r in rows)
        if size > budget:
            continue
        mean, std = spread([float(r["test_auc"]) for r in rows])
        if best is None or mean > best["test_auc"]:
            label = ", ".join(f"{name} {value}" for name, value in zip(("settings", "method", "budget", "codec", "qat", "head share",
                              "prune keep", "dim"), key) if value not in ("", "None"))  # fmt: skip
            best = {"study": str(study), "config": label, "bytes": size, "test_auc": mean, "test_auc_std": std, "seeds": len(rows)}
    return best


def bench(name: str, calibration: str, given: float | int, data: list[str], reference_bytes: int, out: Path, work: Path,
          seeds: int, plan_extra: list[str], train_extra: list[str], log: Path, reuse: Path | None) -> dict:  # fmt: skip
    """Plan at one budget (reusing the calibration of ``reuse``, a plan of the same data and options, when given)
    and train the plan once per seed."""
    budget = given if isinstance(given, int) else int(given * reference_bytes)
    tag = f"{name}-{calibration}-{budget}"
    plan_path = out / "plans" / f"{tag}.json"
    reused = ["--calibration", str(reuse)] if reuse else []
    plan_seconds = run(uembed("plan", *data, "--bytes", str(budget), "--out", str(plan_path), "--quiet", *plan_extra, *reused), log)
    doc = json.loads(plan_path.read_text())
    runs, train_seconds = [], []
    for seed in range(seeds):
        run_name = f"{tag}-s{seed}"
        train_seconds.append(run(uembed("train", "--plan", str(plan_path), "--seed", str(seed), "--runs-dir", str(work / "runs"),
                                        "--name", run_name, "--quiet", *train_extra), log))  # fmt: skip
        runs.append(json.loads((work / "runs" / run_name / "metrics.json").read_text())["memory_plan"])
    val_mean, val_std = spread([r["measured_val_auc"] for r in runs])
    test_mean, test_std = spread([r["measured_test_auc"] for r in runs])
    train = doc["train"]
    rows = "all" if train["budget_rows"] is None else f"{train['budget_rows']:,} rows"
    return {
        "dataset": name, "calibration": calibration, "budget_share": budget / reference_bytes, "target_bytes": budget, "reference_float32_bytes": reference_bytes,
        "plan": f"{train['embedding']} dim {train['dim']}, {rows}, {doc['codec']}", "plan_bytes": doc["predicted"]["bytes"],
        "predicted_auc": doc["predicted"]["auc"], "calibrated_reference_auc": doc["predicted"]["reference_auc"],
        "measured_val_auc": val_mean, "measured_val_auc_std": val_std, "measured_test_auc": test_mean,
        "measured_test_auc_std": test_std, "difference_val": val_mean - doc["predicted"]["auc"],
        "difference_test": test_mean - doc["predicted"]["auc"], "seeds": seeds, "plan_seconds": plan_seconds,
        "calibration_seconds": doc["calibration"]["seconds"], "calibration_reused": bool(reuse),
        "train_seconds": statistics.mean(train_seconds), "calibration_runs": len(doc["calibration"]["points"]),
        "calibration_stopped": doc["calibration"]["stopped"], "plan_file": str(plan_path),
    }  # fmt: skip


def markdown(results: list[dict], comparisons: list[dict], command: str, wall: float) -> str:
    lines = ["# Planner benchmark (issue #38)", "", "Produced by:", "", "```bash", command, "```", "",
             f"Wall time: {wall / 60:.1f} min. Predicted: the plan's AUC (validation AUC of its calibration fit). Measured: "
             "`uembed train --plan` at the plan's codec, mean ± standard deviation over the seeds. Difference: measured "
             "validation AUC − predicted (the goal: within 0.003).", "",
             "| data set | calibration | target bytes (share of collisionless float32) | plan | plan bytes | predicted AUC | measured val AUC "
             "| measured test AUC | val − predicted | plan s (calibration s) | train s (per seed) | calibration runs |",
             "| --- | --- | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['dataset']} | {r['calibration']} | {r['target_bytes']:,} ({r['budget_share']:.3g}) | {r['plan']} | {r['plan_bytes']:,} "
                     f"| {r['predicted_auc']:.4f} | {r['measured_val_auc']:.4f} ± {r['measured_val_auc_std']:.4f} "
                     f"| {r['measured_test_auc']:.4f} ± {r['measured_test_auc_std']:.4f} | {r['difference_val']:+.4f} "
                     f"| {r['plan_seconds']:.0f} ({'reused' if r['calibration_reused'] else round(r['calibration_seconds'])}) | {r['train_seconds']:.0f} | {r['calibration_runs']} |")  # fmt: skip
    if comparisons:
        lines += ["", "## The plan against the committed studies at the same bytes", "",
                  "The study's best configuration within the budget (served bytes; float32 study rows counted with their "
                  "feature biases), test AUC over its seeds, beside the plan's measured test AUC. No worse: the plan's mean "
                  "at most two standard errors of the difference below the study's.", "",
                  "| data set | calibration | target bytes | study | best configuration | its bytes | its test AUC | plan's test AUC | plan − study | no worse |",
                  "| --- | --- | ---: | --- | --- | ---: | --- | --- | ---: | --- |"]  # fmt: skip
        for c in comparisons:
            noise = 2 * (c["test_auc_std"] ** 2 / c["seeds"] + c["plan_test_auc_std"] ** 2 / c["plan_seeds"]) ** 0.5
            lines.append(f"| {c['dataset']} | {c['calibration']} | {c['target_bytes']:,} | {c['study']} | {c['config']} | {c['bytes']:,} "
                         f"| {c['test_auc']:.4f} ± {c['test_auc_std']:.4f} ({c['seeds']} seeds) "
                         f"| {c['plan_test_auc']:.4f} ± {c['plan_test_auc_std']:.4f} | {c['plan_test_auc'] - c['test_auc']:+.4f} "
                         f"| {'yes' if c['plan_test_auc'] >= c['test_auc'] - noise else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder of results.json, results.md, the plan files and bench.log")
    parser.add_argument("--work", type=Path, default=Path("runs/planner-bench"), help="folder of the data and the trained runs")
    parser.add_argument("--datasets", default="movielens100k,criteo,adult", help=f"some of {', '.join(DATASETS)}")
    parser.add_argument("--calibrations", default=",".join(CALIBRATIONS), help=f"some of {', '.join(CALIBRATIONS)}")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per plan")
    parser.add_argument("--criteo-examples", type=int, default=100_000, help="examples of the Criteo-shaped sample")
    parser.add_argument("--studies", default=",".join(STUDIES), help="MovieLens study folders to compare plans with (absent ones are skipped)")
    parser.add_argument("--plan-args", default="", help="more `uembed plan` options for every data set (after the defaults)")
    parser.add_argument("--smoke", action="store_true", help="tiny calibration, one seed, one epoch: the code path only")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    log = args.out / "bench.log"
    seeds = 1 if args.smoke else args.seeds
    train_extra = ["--epochs", "1"] if args.smoke else []
    criteo_examples = min(args.criteo_examples, 5000) if args.smoke else args.criteo_examples
    started = time.perf_counter()
    results, comparisons = [], []
    for name in [n.strip() for n in args.datasets.split(",") if n.strip()]:
        if name not in DATASETS:
            sys.exit(f"--datasets: unknown {name!r}; choose from {', '.join(DATASETS)}")
        data = data_args(name, args.work, criteo_examples, log)
        reference = collisionless_bytes(data)
        first_plans: dict[str, Path] = {}  # a calibration's first plan: the data set's other budgets reuse its runs
        for calibration, share in [(c.strip(), s) for c in args.calibrations.split(",") if c.strip() for s in DATASETS[name]["budgets"]]:
            if calibration not in CALIBRATIONS:
                sys.exit(f"--calibrations: unknown {calibration!r}; choose from {', '.join(CALIBRATIONS)}")
            plan_extra = DATASETS[name]["plan"] + CALIBRATIONS[calibration] + (SMOKE_PLAN if args.smoke else []) + args.plan_args.split()
            result = bench(name, calibration, share, data, reference, args.out, args.work, seeds, plan_extra, train_extra, log,
                           first_plans.get(calibration))  # fmt: skip
            first_plans.setdefault(calibration, Path(result["plan_file"]))
            results.append(result)
            print(f"{name} ({calibration} calibration) at {result['target_bytes']:,} bytes: {result['plan']}, predicted {result['predicted_auc']:.4f}, "
                  f"measured val {result['measured_val_auc']:.4f} test {result['measured_test_auc']:.4f}", flush=True)  # fmt: skip
            if name == "movielens100k":
                for study in [s.strip() for s in args.studies.split(",") if s.strip()]:
                    best = study_best(Path(study), result["target_bytes"])
                    if best:
                        comparisons.append({**best, "dataset": name, "calibration": calibration, "target_bytes": result["target_bytes"],
                                            "plan_test_auc": result["measured_test_auc"], "plan_test_auc_std": result["measured_test_auc_std"], "plan_seeds": seeds})  # fmt: skip
            (args.out / "results.json").write_text(json.dumps({"results": results, "studies": comparisons}, indent=2))
    command = "python scripts/planner-bench.py " + " ".join(sys.argv[1:])
    (args.out / "results.md").write_text(markdown(results, comparisons, command, time.perf_counter() - started))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
