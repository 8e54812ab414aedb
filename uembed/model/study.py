"""Parameter-accuracy studies: methods x budgets x seeds on one dataset.

Writes into one output folder:

* ``runs.csv``: one row per training run;
* ``summary.md``: mean and standard deviation per (method, budget), with the command;
* ``pareto.png``: test AUC against embedding bytes (log scale), one line per method.

Collisionless has one size (its own), so it is trained once per seed whatever the budgets.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from uembed.contract.plan import SEARCH_METHOD, head_share_for, method_spec
from uembed.model.data import Dataset
from uembed.model.data.stream import StreamStats
from uembed.model.streaming import reset_peak_rss, train_stream
from uembed.model.train import TrainConfig, train

CSV_COLUMNS = (
    "method", "budget_fraction", "seed", "test_auc", "test_logloss", "embedding_parameters",
    "embedding_bytes", "dense_parameters", "seconds_per_epoch", "best_epoch", "epochs_run", "policy",
    # streamed studies only
    "train_examples", "examples_per_second", "peak_rss_bytes", "wall_seconds",
)  # fmt: skip


def study_units(methods: Sequence[str], budgets: Sequence[float], seeds: Sequence[int]) -> list[list[tuple[str, float, int]]]:
    """Independent pieces of work: one run each, except SEO, whose Appliers follow their own search.

    A method of fixed size (collisionless) runs once per seed, at budget 1.0.
    """
    specs = {m: method_spec(m) for m in methods}
    units = []
    for seed in seeds:
        units.extend([(m, 1.0, seed)] for m in methods if specs[m].fixed_size)
        for budget in budgets:
            alone = [m for m in methods if not (specs[m].fixed_size or specs[m].search or specs[m].needs_policy)]
            units.extend([(m, budget, seed)] for m in alone)
            chain = [m for m in methods if specs[m].search or specs[m].needs_policy]
            if chain:
                units.append([(SEARCH_METHOD, budget, seed)] + [(m, budget, seed) for m in chain if not specs[m].search])
    return units


def run_unit(unit: list[tuple[str, float, int]], dataset: Dataset, base: TrainConfig, keep_search: bool) -> list[dict]:
    torch.set_num_threads(1)
    train_set, val_set, test_set = dataset.split(base.split_seed)
    records, policy = [], None
    for method, budget, seed in unit:
        config = replace(base, embedding=method, budget_fraction=budget, budget_rows=None, seed=seed, policy=policy,
                         head_share=head_share_for(method, base.head_share))  # fmt: skip
        metrics = train(config, train_set, val_set, test_set, progress=False).metrics
        if method_spec(method).search:
            policy = metrics["policy"]
            if not keep_search:
                continue
        record = {"method": method, "budget_fraction": budget, "seed": seed}
        record.update({k: metrics[k] for k in CSV_COLUMNS if k in metrics})
        if policy is not None:
            record["policy"] = json.dumps(policy["features"], separators=(",", ":"))
        records.append(record)
    return records


def run_study(
    dataset: Dataset,
    methods: Sequence[str],
    budgets: Sequence[float],
    seeds: Sequence[int],
    base: TrainConfig,
    jobs: int = 1,
) -> list[dict]:
    """Train every (method, budget, seed), ``jobs`` processes at a time; one record per run."""
    units = study_units(methods, budgets, seeds)
    keep_search = SEARCH_METHOD in methods
    records = []
    bar = tqdm(total=sum(len(u) for u in units), desc="study", file=sys.stderr)

    def collect(found: list[dict], unit: list) -> None:
        records.extend(found)
        bar.update(len(unit))
        for r in found:
            tqdm.write(
                f"{r['method']:>20} budget {r['budget_fraction']:<6g} seed {r['seed']}: AUC {r['test_auc']:.4f} "
                f"LogLoss {r['test_logloss']:.4f}",
                file=sys.stderr,
            )

    if jobs <= 1:
        for unit in units:
            collect(run_unit(unit, dataset, base, keep_search), unit)
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_unit, unit, dataset, base, keep_search): unit for unit in units}
            for future in as_completed(futures):
                collect(future.result(), futures[future])
    bar.close()
    order = {m: i for i, m in enumerate(methods)}
    return sorted(records, key=lambda r: (order.get(r["method"], 99), r["budget_fraction"], r["seed"]))


def run_stream_unit(
    unit: list[tuple[str, float, int]], source, stats_dir: Path, base: TrainConfig, keep_search: bool, runs_dir: Path,
    search_examples: int | None,
) -> list[dict]:  # fmt: skip
    """One unit of a streamed study in its own process: peak RSS is measured per run (VmHWM reset first)."""
    import time

    torch.set_num_threads(1)
    stats = StreamStats.load(stats_dir)
    records, policy = [], None
    for method, budget, seed in unit:
        search = method_spec(method).search
        config = replace(base, embedding=method, budget_fraction=budget, budget_rows=None, seed=seed, policy=policy,
                         max_examples=(search_examples or base.max_examples) if search else base.max_examples,
                         head_share=head_share_for(method, base.head_share))  # fmt: skip
        reset_peak_rss()
        started = time.perf_counter()
        name = f"{method}-b{budget:g}-s{seed}"
        metrics = train_stream(config, source, stats, runs_dir / name, progress=False).metrics
        wall = time.perf_counter() - started
        if search:
            policy = metrics["policy"]
            if not keep_search:
                continue
        record = {"method": method, "budget_fraction": budget, "seed": seed, "wall_seconds": wall}
        record.update({k: metrics[k] for k in CSV_COLUMNS if k in metrics})
        if policy is not None:
            record["policy"] = json.dumps(policy["features"], separators=(",", ":"))
        tqdm.write(
            f"{method:>20} budget {budget:<6g}: AUC {metrics['test_auc']:.4f} LogLoss {metrics['test_logloss']:.4f} "
            f"{metrics['examples_per_second']:,.0f} ex/s, peak RSS {metrics['peak_rss_bytes'] / 2**30:.2f} GiB, {wall:.0f}s",
            file=sys.stderr,
        )
        records.append(record)
    return records


def run_stream_study(
    source, stats, stats_dir: Path, methods: Sequence[str], budgets: Sequence[float], seeds: Sequence[int],
    base: TrainConfig, jobs: int = 1, runs_dir: Path = Path("runs"), search_examples: int | None = None,
) -> list[dict]:  # fmt: skip
    """A study on streamed data: each unit in a fresh process (``jobs`` at a time), its runs under ``runs_dir``."""
    units = study_units(methods, budgets, seeds)
    # Largest first, so the longest units do not start last.
    cost = {m: 3 if method_spec(m).search else 2 if m in ("multi-size-unified", "collisionless") else 1 for m in methods}
    units.sort(key=lambda unit: -sum(cost.get(m, 1) for m, _, _ in unit))
    keep_search = SEARCH_METHOD in methods
    records = []
    bar = tqdm(total=sum(len(u) for u in units), desc="study", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(jobs, 1), mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(run_stream_unit, unit, source, stats_dir, base, keep_search, runs_dir, search_examples): unit
            for unit in units
        }
        for future in as_completed(futures):
            records.extend(future.result())
            bar.update(len(futures[future]))
    bar.close()
    order = {m: i for i, m in enumerate(methods)}
    return sorted(records, key=lambda r: (order.get(r["method"], 99), r["budget_fraction"], r["seed"]))


def summarise(records: Sequence[dict]) -> list[dict]:
    """Mean and standard deviation per (method, budget), in first-seen order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["budget_fraction"]), []).append(record)
    out = []
    for (method, budget), runs in groups.items():

        def stats(key: str) -> tuple[float, float]:
            values = [float(r[key]) for r in runs]
            return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        out.append(
            {
                "method": method,
                "budget_fraction": budget,
                "runs": len(runs),
                "auc": stats("test_auc"),
                "logloss": stats("test_logloss"),
                "embedding_bytes": int(runs[0]["embedding_bytes"]),
                "embedding_parameters": int(runs[0]["embedding_parameters"]),
                "dense_parameters": int(float(runs[0].get("dense_parameters") or 0)),
                "seconds_per_epoch": stats("seconds_per_epoch")[0],
                **(
                    {"examples_per_second": stats("examples_per_second")[0], "train_examples": int(float(runs[0]["train_examples"]))}
                    if runs[0].get("examples_per_second") not in (None, "") else {}
                ),
                **(  # streamed runs only
                    {"peak_rss_bytes": max(int(float(r["peak_rss_bytes"])) for r in runs), "wall_seconds": stats("wall_seconds")[0]}
                    if runs[0].get("peak_rss_bytes") not in (None, "") else {}
                ),  # fmt: skip
            }
        )
    return out


def write_csv(records: Sequence[dict], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: record.get(k) for k in columns})


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["budget_fraction"] = float(row["budget_fraction"])
    return rows


def command_heading(title: str, command: str) -> list[str]:
    """A results page's first lines: its title and the command that produced it."""
    return [f"# {title}", "", "Produced by:", "", "```bash", command, "```", ""]


def markdown_table(summary: Sequence[dict], command: str, dataset: str) -> str:
    lines = [
        *command_heading(f"Parameter-accuracy study on {dataset}", command),
        "Budget: fraction of the collisionless table's rows (collisionless is its own size). "
        "Mean ± standard deviation over the seeds; seconds per training epoch on this 2-core machine.",
        "",
        "| method | budget | runs | test AUC | test LogLoss | embedding bytes | s / epoch |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    streamed = bool(summary) and all("peak_rss_bytes" in row for row in summary)  # in-memory runs measure examples/s too
    if streamed:
        lines[-4:] = [
            "Budget: fraction of the collisionless table's rows (collisionless is its own size). One pass over the "
            "training examples; examples/s of training alone (one thread per run), peak RSS of the run's process, "
            "wall time of the run including its evaluation passes.",
            "",
            "| method | budget | runs | train examples | test AUC | test LogLoss | embedding bytes | examples/s | peak RSS | wall s |",
            "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
        ]
    for row in summary:
        if streamed:
            lines.append(
                f"| {row['method']} | {row['budget_fraction']:g} | {row['runs']} | {row['train_examples']:,} "
                f"| {row['auc'][0]:.4f} ± {row['auc'][1]:.4f} | {row['logloss'][0]:.4f} ± {row['logloss'][1]:.4f} "
                f"| {row['embedding_bytes']:,} | {row['examples_per_second']:,.0f} | {row['peak_rss_bytes'] / 2**30:.2f} GiB "
                f"| {row['wall_seconds']:.0f} |"
            )
            continue
        lines.append(
            f"| {row['method']} | {row['budget_fraction']:g} | {row['runs']} "
            f"| {row['auc'][0]:.4f} ± {row['auc'][1]:.4f} | {row['logloss'][0]:.4f} ± {row['logloss'][1]:.4f} "
            f"| {row['embedding_bytes']:,} | {row['seconds_per_epoch']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def pareto_plot(summary: Sequence[dict], path: Path, title: str, ylim: tuple[float, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    methods = list(dict.fromkeys(row["method"] for row in summary))
    for method in methods:
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["embedding_bytes"])
        x = [r["embedding_bytes"] for r in rows]
        y = [r["auc"][0] for r in rows]
        err = [r["auc"][1] for r in rows]
        marker = "*" if len(rows) == 1 else "o"
        axis.errorbar(x, y, yerr=err, marker=marker, markersize=9 if marker == "*" else 4, capsize=3, label=method)
    axis.set_xscale("log")
    axis.set_xlabel("embedding bytes (float32, log scale)")
    axis.set_ylabel("test AUC")
    if ylim:
        axis.set_ylim(*ylim)
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_outputs(records: Sequence[dict], out_dir: Path, command: str, dataset: str) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(records, out_dir / "runs.csv")
    summary = summarise(records)
    (out_dir / "summary.md").write_text(markdown_table(summary, command, dataset))
    pareto_plot(summary, out_dir / "pareto.png", f"{dataset}: test AUC against embedding size")
    return summary
