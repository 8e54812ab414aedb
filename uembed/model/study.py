"""Parameter-accuracy studies: methods x budgets x seeds on one dataset.

Writes into one output folder:

* ``runs.csv``: one row per training run;
* ``summary.md``: mean and standard deviation per (method, budget), with the command;
* ``pareto.png``: test AUC against embedding bytes (log scale), one line per method.

Collisionless has one size (its own), so it is trained once per seed whatever the budgets.

With memory levers (:class:`Levers`: row codecs, QAT, hybrid heads, dimension pruning; ``uembed/model/levers.py``)
each trained run gives one record per codec it is evaluated in, the bytes are the embedding bytes *as served*,
and ``summary.md`` adds the frontier: per byte budget, the best configuration and its compression against the
collisionless float32 table.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uembed.contract.plan import SEARCH_METHOD, head_share_for, method_spec
from uembed.model.data import Dataset
from uembed.model.data.stream import StreamStats
from uembed.model.levers import LeverError, codecs_for, served_bytes, with_codec
from uembed.model.pruning import prune_run
from uembed.model.streaming import evaluate_stream_models, reset_peak_rss, train_stream
from uembed.model.train import TrainConfig, evaluate, predict, save_run, train

CSV_COLUMNS = (
    "method", "budget_fraction", "seed", "test_auc", "test_logloss", "embedding_parameters",
    "embedding_bytes", "dense_parameters", "seconds_per_epoch", "best_epoch", "epochs_run", "policy",
    # streamed studies only
    "train_examples", "examples_per_second", "peak_rss_bytes", "wall_seconds",
)  # fmt: skip
# Studies with memory levers: the lever settings of a record and the bytes it serves.
LEVER_COLUMNS = ("codec", "qat", "head_share", "prune_keep", "dim", "served_bytes")


@dataclass(frozen=True)
class Levers:
    """The memory levers a study crosses with methods x budgets x seeds (``uembed study --codecs ...``).

    ``qat`` and ``head_shares`` are training settings (one run each); ``codecs`` are evaluated on every run (a QAT
    run in its own codec only); ``prune_keep`` narrows each in-memory run to each number of columns, with
    ``prune_epochs`` of fine-tuning, and evaluates the pruned run in each codec too. ``cell_configs`` are per
    (method, budget) settings (a tuned study's selections) that replace the base settings.
    """

    codecs: tuple[str, ...] = ("float32",)
    qat: tuple[str | None, ...] = (None,)
    head_shares: tuple[float | str, ...] = (0.0,)
    prune_keep: tuple[int, ...] = ()
    prune_epochs: int = 3
    subvectors: int | None = None
    cell_configs: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether any lever is studied (one head share for every run, as `--head-share` gives, is not a lever)."""
        return self != Levers(cell_configs=self.cell_configs, head_shares=self.head_shares[:1] if len(self.head_shares) == 1 else (0.0,))

    def variants(self) -> list[tuple[str | None, float]]:
        """The training settings each (method, budget, seed) is trained with: (qat, head share)."""
        return [(q, h) for q in self.qat for h in self.head_shares]

    def config(self, base: TrainConfig, method: str, budget: float, seed: int, variant: tuple[str | None, float]) -> TrainConfig:
        cell = self.cell_configs.get((method, budget))
        config = cell if cell is not None else replace(base, budget_fraction=budget, budget_rows=None)
        qat, head_share = variant
        # A method without heads (collisionless, the chunk methods) trains without one whatever the share.
        return replace(config, embedding=method, seed=seed, policy=None, qat=qat, head_share=head_share_for(method, head_share),
                       pq_subvectors=self.subvectors if qat == "pq" else None)  # fmt: skip


def study_units(
    methods: Sequence[str], budgets: Sequence[float], seeds: Sequence[int], variants: Sequence[tuple] = ((None, 0.0),),
) -> list[list[tuple]]:  # fmt: skip
    """Independent pieces of work: one run each, except SEO, whose Appliers follow their own search.

    A method of fixed size (collisionless) runs once per seed, at budget 1.0. Each item is (method, budget, seed),
    followed by the lever variant (qat, head share) when there is more than the plain one.
    """
    if list(variants) != [(None, 0.0)]:
        # A method that holds no heads (collisionless: a row per value already) is trained once, not once per share.
        first_share = variants[0][1]
        return [[(*item, variant) for item in unit] for variant in variants for unit in study_units(methods, budgets, seeds)
                if variant[1] == first_share or head_share_for(unit[-1][0], 0.5)]  # fmt: skip
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


def lever_records(
    run: dict, model, plan, codecs: Sequence[str], score, subvectors: int | None,
) -> list[dict]:  # fmt: skip
    """One record per codec of a trained (or pruned) model: ``score(models)`` -> {codec: metrics} of the copies."""
    models = {codec: with_codec(model, codec, subvectors) for codec in codecs}
    out = []
    for codec, found in score(models).items():
        out.append({**run, "codec": codec, "dim": plan.dim, "served_bytes": served_bytes(plan, codec, subvectors),
                    "test_auc": found["auc"], "test_logloss": found["logloss"],
                    "embedding_parameters": plan.embedding_parameters, "embedding_bytes": plan.embedding_bytes()})  # fmt: skip
    return out


def run_unit(
    unit: list[tuple], dataset: Dataset, base: TrainConfig, keep_search: bool, levers: Levers | None = None,
) -> list[dict]:  # fmt: skip
    torch.set_num_threads(1)
    levers = levers or Levers()
    train_set, val_set, test_set = dataset.split(base.split_seed)
    def score(models: dict, plan) -> dict:
        rows = plan.encode(test_set.columns)
        return {codec: evaluate(test_set.labels, predict(m, *rows)) for codec, m in models.items()}

    records, policy = [], None
    for position, (method, budget, seed, *variant) in enumerate(unit):
        variant = tuple(variant[0]) if variant else (None, 0.0)
        if method_spec(method).search and position + 1 < len(unit):  # the search trains with its Applier's settings
            config = replace(levers.config(base, unit[position + 1][0], budget, seed, variant), embedding=method)
        else:
            config = levers.config(base, method, budget, seed, variant)
        config = replace(config, policy=policy)
        result = train(config, train_set, val_set, test_set, progress=False)
        metrics = result.metrics
        if method_spec(method).search:
            policy = metrics["policy"]
            if not keep_search:
                continue
        record = {"method": method, "budget_fraction": budget, "seed": seed}
        record.update({k: metrics[k] for k in CSV_COLUMNS if k in metrics})
        if policy is not None:
            record["policy"] = json.dumps(policy["features"], separators=(",", ":"))
        if not levers.active:
            records.append(record)
            continue
        record |= {"qat": variant[0] or "", "head_share": config.head_share, "prune_keep": ""}
        codecs = codecs_for(variant[0], levers.codecs)
        records += lever_records(record, result.model, result.plan, codecs, lambda ms, p=result.plan: score(ms, p), levers.subvectors)
        if levers.prune_keep:
            with tempfile.TemporaryDirectory(prefix="uembed-study-") as scratch:
                run_dir = save_run(Path(scratch) / "run", config, result.plan, result.model, metrics, train_set, val_set, test_set)
                for keep in levers.prune_keep:
                    if keep >= result.plan.dim:
                        continue
                    pruned = prune_run(run_dir, train_set, val_set, test_set, keep, levers.prune_epochs, Path(scratch) / f"pruned{keep}",
                                       seed=seed, progress=False)  # fmt: skip
                    records += lever_records({**record, "prune_keep": keep}, pruned.model, pruned.plan, codecs,
                                             lambda ms, p=pruned.plan: score(ms, p), levers.subvectors)  # fmt: skip
    return records


def run_study(
    dataset: Dataset,
    methods: Sequence[str],
    budgets: Sequence[float],
    seeds: Sequence[int],
    base: TrainConfig,
    jobs: int = 1,
    levers: Levers | None = None,
) -> list[dict]:
    """Train every (method, budget, seed), ``jobs`` processes at a time; one record per run (per codec of a run
    with ``levers``)."""
    levers = levers or Levers()
    units = study_units(methods, budgets, seeds, levers.variants())
    keep_search = SEARCH_METHOD in methods
    records = []
    bar = tqdm(total=sum(len(u) for u in units), desc="study", file=sys.stderr)

    def collect(found: list[dict], unit: list) -> None:
        records.extend(found)
        bar.update(len(unit))
        for r in found:
            tqdm.write(
                f"{variant_label(r):>34} budget {r['budget_fraction']:<6g} seed {r['seed']}: AUC {r['test_auc']:.4f} "
                f"LogLoss {r['test_logloss']:.4f}" + (f" {int(r['served_bytes']):,} bytes served" if r.get("served_bytes") else ""),
                file=sys.stderr,
            )

    if jobs <= 1:
        for unit in units:
            collect(run_unit(unit, dataset, base, keep_search, levers), unit)
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_unit, unit, dataset, base, keep_search, levers): unit for unit in units}
            for future in as_completed(futures):
                collect(future.result(), futures[future])
    bar.close()
    return sort_records(records, methods)


def run_stream_unit(
    unit: list[tuple], source, stats_dir: Path, base: TrainConfig, keep_search: bool, runs_dir: Path,
    search_examples: int | None, levers: Levers | None = None,
) -> list[dict]:  # fmt: skip
    """One unit of a streamed study in its own process: peak RSS is measured per run (VmHWM reset first)."""
    torch.set_num_threads(1)
    levers = levers or Levers()
    stats = StreamStats.load(stats_dir)
    records, policy = [], None
    for method, budget, seed, *variant in unit:
        variant = tuple(variant[0]) if variant else (None, 0.0)
        search = method_spec(method).search
        config = replace(levers.config(base, method, budget, seed, variant), policy=policy,
                         max_examples=(search_examples or base.max_examples) if search else base.max_examples)  # fmt: skip
        reset_peak_rss()
        started = time.perf_counter()
        name = f"{method}-b{budget:g}-s{seed}" + (f"-qat{variant[0]}" if variant[0] else "") + (f"-head{config.head_share}" if config.head_share else "")
        result = train_stream(config, source, stats, runs_dir / name, progress=False)
        metrics = result.metrics
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
            f"{method:>20} budget {budget:<6g}{' qat ' + variant[0] if variant[0] else ''}: AUC {metrics['test_auc']:.4f} "
            f"LogLoss {metrics['test_logloss']:.4f} {metrics['examples_per_second']:,.0f} ex/s, "
            f"peak RSS {metrics['peak_rss_bytes'] / 2**30:.2f} GiB, {wall:.0f}s",
            file=sys.stderr,
        )  # fmt: skip
        if not levers.active:
            records.append(record)
            continue
        record |= {"qat": variant[0] or "", "head_share": config.head_share, "prune_keep": ""}

        def score(models: dict, plan=result.plan, split_seed=config.split_seed, read_rows=config.read_rows) -> dict:
            return evaluate_stream_models(models, plan, source, stats, split_seed, read_rows)

        records += lever_records(record, result.model, result.plan, codecs_for(variant[0], levers.codecs), score, levers.subvectors)
    return records


def run_stream_study(
    source, stats, stats_dir: Path, methods: Sequence[str], budgets: Sequence[float], seeds: Sequence[int],
    base: TrainConfig, jobs: int = 1, runs_dir: Path = Path("runs"), search_examples: int | None = None,
    levers: Levers | None = None,
) -> list[dict]:  # fmt: skip
    """A study on streamed data: each unit in a fresh process (``jobs`` at a time), its runs under ``runs_dir``."""
    levers = levers or Levers()
    if levers.prune_keep:
        raise LeverError("--prune-keep fine-tunes in memory: prune a streamed run with `uembed prune RUN --keep K` on an in-memory dataset")
    units = study_units(methods, budgets, seeds, levers.variants())
    # Largest first, so the longest units do not start last.
    cost = {m: 3 if method_spec(m).search else 2 if m in ("multi-size-unified", "collisionless") else 1 for m in methods}
    units.sort(key=lambda unit: -sum(cost.get(m, 1) for m, *_ in unit))
    keep_search = SEARCH_METHOD in methods
    records = []
    bar = tqdm(total=sum(len(u) for u in units), desc="study", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(jobs, 1), mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(run_stream_unit, unit, source, stats_dir, base, keep_search, runs_dir, search_examples, levers): unit
            for unit in units
        }
        for future in as_completed(futures):
            records.extend(future.result())
            bar.update(len(futures[future]))
    bar.close()
    return sort_records(records, methods)


CODEC_ORDER = {codec: i for i, codec in enumerate(("float32", "float16", "int8", "int4", "int2", "pq"))}


def lever_key(record: dict) -> tuple:
    """(qat, head share, prune keep, codec) of a record; all empty for a study without levers."""
    if record.get("codec") in (None, ""):
        return ()
    keep, head = record.get("prune_keep"), record.get("head_share") or 0.0
    return (record.get("qat") or "", head if head == "auto" else float(head), int(float(keep)) if keep not in (None, "") else 0,
            record["codec"])  # fmt: skip


def variant_label(record: dict) -> str:
    """The method and its lever settings, e.g. ``unified head0.25 qat-int4 int4`` or ``unified prune8 float16``."""
    key = lever_key(record)
    if not key:
        return record["method"]
    qat, head, keep, codec = key
    parts = [record["method"], f"head{head:g}" if isinstance(head, float) and head else "head-auto" if head else "", f"prune{keep}" if keep else "", f"qat-{qat}" if qat else "", codec]
    return " ".join(p for p in parts if p)


def sort_records(records: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    order = {m: i for i, m in enumerate(methods)}

    def key(r: dict) -> tuple:
        lever = lever_key(r)
        if lever:
            lever = (lever[0], str(lever[1]), lever[2], CODEC_ORDER.get(lever[3], 99))
        return (order.get(r["method"], 99), r["budget_fraction"], lever, r["seed"])

    return sorted(records, key=key)


def summarise(records: Sequence[dict]) -> list[dict]:
    """Mean and standard deviation per (method, budget) and lever settings, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["budget_fraction"], lever_key(record)), []).append(record)
    out = []
    for (method, budget, lever), runs in groups.items():

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
                "embedding_bytes": int(float(runs[0]["embedding_bytes"])),
                "embedding_parameters": int(float(runs[0]["embedding_parameters"])),
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
                **(
                    {"variant": variant_label(runs[0]), "codec": lever[3], "qat": lever[0], "head_share": lever[1],
                     "prune_keep": lever[2], "dim": int(float(runs[0]["dim"])),
                     "served_bytes": max(int(float(r["served_bytes"])) for r in runs)}
                    if lever else {}
                ),  # fmt: skip
            }
        )
    return out


def reference_bytes(summary: Sequence[dict]) -> int | None:
    """The collisionless float32 table's bytes (rows and biases), the baseline of every compression; None without it."""
    for row in summary:
        if method_spec(row["method"]).fixed_size and row.get("codec", "float32") == "float32" and not row.get("prune_keep"):
            return row["embedding_bytes"]
    return None


def byte_budgets(summary: Sequence[dict]) -> list[int]:
    """Budgets at 1, 2 and 5 times each power of ten, from the smallest configuration to the largest."""
    sizes = [row["served_bytes"] for row in summary]
    low, high = min(sizes), max(sizes)
    budgets = []
    for exponent in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1):
        budgets += [m * 10**exponent for m in (1, 2, 5) if low <= m * 10**exponent < high * 5]
    return budgets


def frontier(summary: Sequence[dict]) -> list[dict]:
    """Per byte budget, the configuration with the best mean test AUC among those serving within it."""
    out = []
    for budget in byte_budgets(summary):
        fits = [row for row in summary if row["served_bytes"] <= budget]
        if fits:
            best = max(fits, key=lambda row: row["auc"][0])
            if not out or best is not out[-1]["row"]:
                out.append({"budget": budget, "row": best})
    return out


def frontier_lines(summary: Sequence[dict]) -> list[str]:
    reference = reference_bytes(summary)
    best_reference = next((r["auc"][0] for r in summary if method_spec(r["method"]).fixed_size and r.get("codec") == "float32"
                           and not r.get("prune_keep") and not r.get("qat") and not r.get("head_share")), None)  # fmt: skip
    lines = [
        "", "## Frontier: the best configuration within each byte budget", "",
        "Served bytes: every table's records in the codec (values, rowwise scale and bias), pq codebooks, feature "
        "biases, and the maps some methods need (collisionless vocabularies, hybrid heads' keys). Compression: the "
        f"collisionless float32 table's bytes ({reference:,} rows and biases, its vocabulary left out)" if reference
        else "Served bytes as above (no collisionless run: no compression figure).",
        "over the configuration's served bytes. Δ AUC: against collisionless float32.", "",
        "| byte budget | best configuration | budget | dim | test AUC | Δ AUC | served bytes | compression |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]  # fmt: skip
    for entry in frontier(summary):
        row = entry["row"]
        delta = f"{row['auc'][0] - best_reference:+.4f}" if best_reference is not None else ""
        ratio = f"{reference / row['served_bytes']:,.1f}x" if reference else ""
        lines.append(f"| {entry['budget']:,} | {row['variant']} | {row['budget_fraction']:g} | {row['dim']} "
                     f"| {row['auc'][0]:.4f} ± {row['auc'][1]:.4f} | {delta} | {row['served_bytes']:,} | {ratio} |")  # fmt: skip
    return lines


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


def lever_table(summary: Sequence[dict], command: str, dataset: str) -> str:
    """summary.md of a study with memory levers: every configuration, then the frontier."""
    reference = reference_bytes(summary)
    streamed = all("peak_rss_bytes" in row for row in summary)
    lines = [
        *command_heading(f"Memory levers on {dataset}: test AUC against embedding bytes as served", command),
        "Configuration: method, then its levers: `headF` (hybrid head share), `pruneK` (pruned to K columns with "
        "fine-tuning), `qat-C` (trained quantization-aware in codec C), then the codec its rows are served in (a run "
        "without QAT in another codec than float32 is post-training quantization). Budget: fraction of the collisionless "
        "table's rows. Mean ± standard deviation over the seeds." + (" One pass over the training examples." if streamed else ""),
        "",
        "| configuration | budget | dim | runs | test AUC | test LogLoss | parameters | served bytes | compression |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]  # fmt: skip
    for row in summary:
        ratio = f"{reference / row['served_bytes']:,.1f}x" if reference else ""
        lines.append(f"| {row['variant']} | {row['budget_fraction']:g} | {row['dim']} | {row['runs']} "
                     f"| {row['auc'][0]:.4f} ± {row['auc'][1]:.4f} | {row['logloss'][0]:.4f} ± {row['logloss'][1]:.4f} "
                     f"| {row['embedding_parameters']:,} | {row['served_bytes']:,} | {ratio} |")  # fmt: skip
    return "\n".join(lines + frontier_lines(summary)) + "\n"


def markdown_table(summary: Sequence[dict], command: str, dataset: str) -> str:
    if summary and "variant" in summary[0]:
        return lever_table(summary, command, dataset)
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

    levers = bool(summary) and "variant" in summary[0]
    size = "served_bytes" if levers else "embedding_bytes"
    label = "variant" if levers else "method"
    figure, axis = plt.subplots(figsize=(9.5, 5.6) if levers else (7.5, 4.8), dpi=120)
    for name in dict.fromkeys(row[label] for row in summary):
        rows = sorted((r for r in summary if r[label] == name), key=lambda r: r[size])
        x = [r[size] for r in rows]
        y = [r["auc"][0] for r in rows]
        err = [r["auc"][1] for r in rows]
        marker = "*" if len(rows) == 1 else "o"
        axis.errorbar(x, y, yerr=err, marker=marker, markersize=9 if marker == "*" else 4, capsize=3, label=name,
                      linewidth=1 if levers else 1.5)  # fmt: skip
    if levers:
        best = [entry["row"] for entry in frontier(summary)]
        axis.step([r[size] for r in best], [r["auc"][0] for r in best], where="post", color="black", linewidth=2.5,
                  alpha=0.35, label="frontier (best within the bytes)")  # fmt: skip
    axis.set_xscale("log")
    axis.set_xlabel("embedding bytes as served (log scale)" if levers else "embedding bytes (float32, log scale)")
    axis.set_ylabel("test AUC")
    if ylim:
        axis.set_ylim(*ylim)
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    if levers:
        axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(summary) // 40)
    else:
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_outputs(records: Sequence[dict], out_dir: Path, command: str, dataset: str) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    levers = any(lever_key(r) for r in records)
    write_csv(records, out_dir / "runs.csv", CSV_COLUMNS + LEVER_COLUMNS if levers else CSV_COLUMNS)
    summary = summarise(records)
    (out_dir / "summary.md").write_text(markdown_table(summary, command, dataset))
    what = "embedding bytes as served" if levers else "embedding size"
    pareto_plot(summary, out_dir / "pareto.png", f"{dataset}: test AUC against {what}")
    return summary
