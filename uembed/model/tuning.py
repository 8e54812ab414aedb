"""Tuned parameter-accuracy studies: every (method, budget) cell gets the same Optuna search.

For each cell of the study:

1. ``trials`` Optuna trials over :func:`suggest` (TPE with the same sampler seed in every cell,
   Optuna's median pruner on per-epoch validation AUC). The first trial is always the study's
   fixed settings, so a cell never selects something worse on validation than the untuned run.
   A trial trains on the training split and is scored on the validation split; it never gets
   the test split (``train(..., test_set=None)``).
2. The selected configuration (best validation AUC) is written to ``selected.json``; a later
   study into the same folder re-uses it instead of tuning that cell again.
3. Final runs, with the test split: the selected and the fixed configuration, each once per
   seed of the study. The tuned and the untuned table come from the same seeds in one run.

The budget is a number of embedding parameters: the budget fraction x the collisionless rows x
the fixed settings' dim. A trial that picks a narrower dim gets proportionally more rows
(``rows = parameters / dim``), so width is traded for rows at a fixed budget. Collisionless has
no budget: its size follows the dim a trial picks.

Files written into the study folder (besides what ``model.study.write_outputs`` writes for the
final runs): ``trials.csv`` (every trial of every cell), ``selected.json`` (per cell: the chosen
hyperparameters, their validation AUC, trial counts, tuning wall time).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from uembed.contract.errors import BudgetError, SpecError
from uembed.contract.plan import SEARCH_METHOD, Method, collisionless_rows, method_spec, vocabulary_sizes
from uembed.model.data import Dataset
from uembed.model.study import CSV_COLUMNS, command_heading, summarise, write_csv
from uembed.model.train import TrainConfig, train

# Searched for every method: the same space around the fixed settings, the same number of trials.
# With the defaults (batch 256, dim 16, hidden 192): batch 128-1024, dim 8/16/32, width 64-384.
BATCH_SCALES = (0.5, 1, 2, 4)
DIM_SCALES = (0.5, 1, 2)
WIDTH_SCALES = (1 / 3, 2 / 3, 1, 4 / 3, 2)
TRIAL_COLUMNS = ("method", "budget_fraction", "trial", "state", "val_auc", "epochs", "seconds", "params")
TUNED_RUN_COLUMNS = ("settings", "dim", "learning_rate", "batch_size")


@dataclass(frozen=True)
class Cell:
    """One (method, budget) of a tuned study; collisionless has the single budget 1.0."""

    method: str
    budget: float

    @property
    def key(self) -> str:
        return f"{self.method}@{self.budget:g}"

    @property
    def runs_search(self) -> bool:
        """An SEO Applier: every trial and every final run searches its policy first."""
        return method_spec(self.method).needs_policy


def study_cells(methods: Sequence[str], budgets: Sequence[float]) -> list[Cell]:
    """The cells to tune: fixed-size methods once, every other method at every budget."""
    out = []
    for method in methods:
        spec = method_spec(method)
        if spec.search:
            raise SpecError(f"{method} is a stage of the Appliers, not a method to tune: tune seo-applier-exact or -rr")
        out.extend([Cell(method, 1.0)] if spec.fixed_size else [Cell(method, b) for b in budgets])
    return out


def scaled(value: int, scales: Sequence[float]) -> tuple[int, ...]:
    """``value`` times each scale, rounded, at least 1, without repeats."""
    return tuple(dict.fromkeys(max(1, round(value * scale)) for scale in scales))


def suggest(trial, method: str, base: TrainConfig) -> dict:
    """One point of the search space (Optuna's define-by-run API), around the fixed settings
    ``base``. Conditional parameters: the weight decay only when decay is on, the lookup offset
    only for multi-size unified."""
    params = {
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", scaled(base.batch_size, BATCH_SCALES)),
        "dim": trial.suggest_categorical("dim", scaled(base.dim, DIM_SCALES)),
        "hidden_width": trial.suggest_categorical("hidden_width", scaled(base.hidden[0], WIDTH_SCALES)),
        "hidden_layers": trial.suggest_int("hidden_layers", 1, 3),
        "cross_layers": trial.suggest_int("cross_layers", 1, 3),
        "decay_tables": trial.suggest_categorical("decay_tables", (False, True)),
    }
    if params["decay_tables"]:
        params["embedding_weight_decay"] = trial.suggest_float("embedding_weight_decay", 1e-5, 0.3, log=True)
    if method == Method.MULTI_SIZE_UNIFIED:
        params["lookups_offset"] = trial.suggest_int("lookups_offset", -1, 1)
    return params


def fixed_params(base: TrainConfig, method: str) -> dict:
    """The fixed settings as a point of the search space (enqueued as every cell's first trial)."""
    params = {
        "learning_rate": base.learning_rate,
        "batch_size": base.batch_size,
        "dim": base.dim,
        "hidden_width": base.hidden[0],
        "hidden_layers": len(base.hidden),
        "cross_layers": base.cross_layers,
        "decay_tables": base.embedding_weight_decay > 0,
    }
    if params["decay_tables"]:
        params["embedding_weight_decay"] = base.embedding_weight_decay
    if method == Method.MULTI_SIZE_UNIFIED:
        params["lookups_offset"] = base.lookups_offset
    return params


def cell_config(cell: Cell, params: dict, base: TrainConfig, reference_rows: int) -> TrainConfig:
    """The TrainConfig of a cell at a point of the space: the budget held in parameters, not rows.

    ``reference_rows`` is the collisionless row count: the budget is ``cell.budget x reference_rows
    x base.dim`` parameters, so the fixed settings get exactly the rows a fixed-settings study gives.
    """
    dim = int(params["dim"])
    fixed_size = method_spec(cell.method).fixed_size
    rows = None if fixed_size else max(1, round(cell.budget * reference_rows * base.dim / dim))
    return replace(
        base, embedding=cell.method, budget_fraction=None if rows else base.budget_fraction, budget_rows=rows, dim=dim,
        learning_rate=float(params["learning_rate"]), batch_size=int(params["batch_size"]),
        hidden=(int(params["hidden_width"]),) * int(params["hidden_layers"]), cross_layers=int(params["cross_layers"]),
        embedding_weight_decay=float(params.get("embedding_weight_decay", 0.0)) if params["decay_tables"] else 0.0,
        lookups_offset=int(params.get("lookups_offset", 0)),
        # Chunks keep the fixed settings' chunks per dim (16 / 8: two), whatever the dim.
        chunk_dim=max(1, dim * base.chunk_dim // base.dim), policy=None,
    )  # fmt: skip


def selected_configs(selected: dict, dataset: Dataset, base: TrainConfig) -> dict[tuple[str, float], TrainConfig]:
    """The TrainConfig of every (method, budget) a tuned study selected (its ``selected.json``), on ``dataset``."""
    train_set = dataset.split(base.split_seed)[0]
    reference_rows = collisionless_rows(vocabulary_sizes(train_set.columns))
    out = {}
    for key, chosen in selected.items():
        if key.startswith("_"):
            continue
        cell = Cell(chosen["method"], float(chosen["budget_fraction"]))
        out[(cell.method, cell.budget)] = cell_config(cell, chosen["params"], base, reference_rows)
    return out


def train_arguments(config: TrainConfig) -> str:
    """The options of ``uembed train`` (or ``uembed search``) that give ``config``: how a user re-trains a selection."""
    parts = [f"--budget-rows {config.budget_rows}"] if config.budget_rows else []
    parts += [
        f"--dim {config.dim}", f"--lr {config.learning_rate:.4g}", f"--batch-size {config.batch_size}",
        f"--hidden {','.join(map(str, config.hidden))}", f"--cross-layers {config.cross_layers}",
        f"--chunk-dim {config.chunk_dim}", f"--epochs {config.epochs}", f"--patience {config.patience}",
    ]  # fmt: skip
    if config.embedding_weight_decay:
        parts.append(f"--embedding-weight-decay {config.embedding_weight_decay:.4g}")
    if config.lookups_offset:
        parts.append(f"--lookups-offset {config.lookups_offset}")
    return " ".join(parts)


def train_cell(
    cell: Cell, config: TrainConfig, train_set: Dataset, val_set: Dataset, test_set: Dataset | None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict:  # fmt: skip
    """Train one configuration of a cell (an Applier after its own search); its metrics, with the
    Applier's policy under ``policy``."""
    if cell.runs_search:
        searched = train(replace(config, embedding=SEARCH_METHOD), train_set, val_set, None, progress=False, echo_warnings=False)
        config = replace(config, policy=searched.metrics["policy"])
    metrics = train(config, train_set, val_set, test_set, progress=False, on_epoch=on_epoch, echo_warnings=False).metrics
    if config.policy:
        metrics["policy"] = config.policy
    return metrics


def tune_cell(
    cell: Cell, train_set: Dataset, val_set: Dataset, base: TrainConfig, trials: int, sampler_seed: int, reference_rows: int
) -> dict:  # fmt: skip
    """Run a cell's trials; the selected parameters, their validation AUC and every trial's record.
    ``reference_rows``: the collisionless rows of the training split (see :func:`cell_config`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=max(1, trials // 2))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=max(1, trials // 4), n_warmup_steps=2)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.enqueue_trial(fixed_params(base, cell.method))
    started = time.perf_counter()

    def objective(trial) -> float:
        config = cell_config(cell, suggest(trial, cell.method, base), base, reference_rows)
        trial_started = time.perf_counter()

        def report(epoch: int, val_auc: float) -> None:
            trial.set_user_attr("epochs", epoch)
            trial.set_user_attr("seconds", time.perf_counter() - trial_started)
            trial.report(val_auc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            metrics = train_cell(cell, config, train_set, val_set, None, on_epoch=report)
        except BudgetError as error:  # e.g. dim 32 leaves fewer rows than a method needs: not a point of this budget
            trial.set_user_attr("error", str(error))
            raise optuna.TrialPruned() from error
        return metrics["best_val_auc"]

    def log(study, trial) -> None:
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        note = trial.user_attrs.get("error") or f"{trial.user_attrs.get('epochs', 0)} epochs"
        print(f"{cell.key} trial {trial.number + 1}/{trials}: {trial.state.name.lower()} val AUC {value} ({note})", file=sys.stderr)

    study.optimize(objective, n_trials=trials, callbacks=[log])
    records = []
    for trial in study.trials:
        intermediate = trial.intermediate_values
        records.append({
            "method": cell.method, "budget_fraction": cell.budget, "trial": trial.number, "state": trial.state.name,
            "val_auc": trial.value if trial.value is not None else (max(intermediate.values()) if intermediate else None),
            "epochs": trial.user_attrs.get("epochs", 0), "seconds": round(trial.user_attrs.get("seconds", 0.0), 2),
            "params": json.dumps(trial.params, sort_keys=True),
        })  # fmt: skip
    states = [t.state.name for t in study.trials]
    return {
        "method": cell.method,
        "budget_fraction": cell.budget,
        "params": study.best_trial.params,
        "val_auc": study.best_value,
        "trials": len(states),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "fixed_val_auc": study.trials[0].value,
        "tuning_seconds": round(time.perf_counter() - started, 1),
        "trial_records": records,
    }


def run_cell(
    cell: Cell, dataset: Dataset, base: TrainConfig, trials: int, seeds: Sequence[int], sampler_seed: int,
    selected: dict | None,
) -> tuple[dict, list[dict]]:  # fmt: skip
    """A cell in its own process: tune it (unless ``selected`` is given), then the final seeded runs."""
    torch.set_num_threads(1)
    train_set, val_set, test_set = dataset.split(base.split_seed)
    reference_rows = collisionless_rows(vocabulary_sizes(train_set.columns))
    if selected is None:
        selected = tune_cell(cell, train_set, val_set, base, trials, sampler_seed, reference_rows)
        selected["train_arguments"] = train_arguments(cell_config(cell, selected["params"], base, reference_rows))
    records = []
    for settings, params in (("tuned", selected["params"]), ("fixed", fixed_params(base, cell.method))):
        config = cell_config(cell, params, base, reference_rows)
        for seed in seeds:
            metrics = train_cell(cell, replace(config, seed=seed), train_set, val_set, test_set)
            record = {"method": cell.method, "budget_fraction": cell.budget, "seed": seed, "settings": settings,
                      "dim": config.dim, "learning_rate": config.learning_rate, "batch_size": config.batch_size}  # fmt: skip
            record.update(metrics)
            if "policy" in metrics:
                record["policy"] = json.dumps(metrics["policy"]["features"], separators=(",", ":"))
            records.append(record)
    return selected, records


def run_tuned_study(
    dataset: Dataset, methods: Sequence[str], budgets: Sequence[float], seeds: Sequence[int], base: TrainConfig,
    trials: int, out_dir: Path, jobs: int = 1, sampler_seed: int = 0,
) -> tuple[dict, list[dict]]:  # fmt: skip
    """Tune every cell (``jobs`` cells at a time, one process each), then its final runs.

    ``out_dir/selected.json`` and ``out_dir/trials.csv`` grow as cells finish, so a study that
    stops part-way keeps what it tuned; run it again and those cells go straight to their
    final runs. Returns the selections and the final runs' records.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    selected_path, trials_path = out_dir / "selected.json", out_dir / "trials.csv"
    chosen: dict = json.loads(selected_path.read_text()) if selected_path.exists() else {}
    cells = study_cells(methods, budgets)
    # The costliest first (an Applier trains its search too), so no long cell starts last.
    cells.sort(key=lambda c: -(2 if c.runs_search else 1))
    started = time.perf_counter()
    records: list[dict] = []
    bar = tqdm(total=len(cells), desc="cells", file=sys.stderr)

    def collect(cell: Cell, selected: dict, found: list[dict]) -> None:
        fresh = "trial_records" in selected
        if fresh:
            append_trials(trials_path, selected.pop("trial_records"))
            chosen[cell.key] = selected
            selected_path.write_text(json.dumps(chosen, indent=2, sort_keys=True) + "\n")
        records.extend(found)
        bar.update()
        tuned = [r["test_auc"] for r in found if r["settings"] == "tuned"]
        fixed = [r["test_auc"] for r in found if r["settings"] == "fixed"]
        tqdm.write(
            f"{cell.key:>28}: {'tuned' if fresh else 're-used'} {selected['params']} val AUC {selected['val_auc']:.4f}; "
            f"test AUC tuned {sum(tuned) / len(tuned):.4f}, fixed {sum(fixed) / len(fixed):.4f}",
            file=sys.stderr,
        )

    arguments = [(cell, dataset, base, trials, tuple(seeds), sampler_seed, chosen.get(cell.key)) for cell in cells]
    if jobs <= 1:
        for args in arguments:
            collect(args[0], *run_cell(*args))
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_cell, *args): args[0] for args in arguments}
            for future in as_completed(futures):
                collect(futures[future], *future.result())
    bar.close()
    chosen["_wall_seconds"] = round(time.perf_counter() - started, 1)
    selected_path.write_text(json.dumps(chosen, indent=2, sort_keys=True) + "\n")
    order = {c.key: i for i, c in enumerate(study_cells(methods, budgets))}
    records.sort(key=lambda r: (r["settings"] != "tuned", order[Cell(r["method"], r["budget_fraction"]).key], r["seed"]))
    return chosen, records


def append_trials(path: Path, rows: Sequence[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TRIAL_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def describe_params(params: dict) -> str:
    """Selected hyperparameters, short: ``lr 2.1e-03, batch 512, dim 8, hidden 256x2, cross 2, decay 3e-04``."""
    parts = [
        f"lr {params['learning_rate']:.1e}", f"batch {params['batch_size']}", f"dim {params['dim']}",
        f"hidden {params['hidden_width']}x{params['hidden_layers']}", f"cross {params['cross_layers']}",
    ]  # fmt: skip
    if params.get("decay_tables"):
        parts.append(f"decay {params['embedding_weight_decay']:.0e}")
    if "lookups_offset" in params:
        parts.append(f"lookups {params['lookups_offset']:+d}")
    return ", ".join(parts)


def tuned_markdown(chosen: dict, tuned: Sequence[dict], fixed: Sequence[dict], command: str, dataset: str) -> str:
    fixed_by_cell = {(r["method"], r["budget_fraction"]): r for r in fixed}
    wall = chosen.get("_wall_seconds")
    lines = [
        *command_heading(f"Tuned parameter-accuracy study on {dataset}", command),
        f"Wall time of this command: {wall / 60:.1f} min." if wall else "",
        "",
        "Every (method, budget) had the same Optuna search (uembed/model/tuning.py); selection on validation AUC only. "
        "Test AUC: mean ± standard deviation over the final seeded runs of the selected (tuned) and of the fixed "
        "settings. Budget: a fraction of the collisionless rows at the fixed dim, held in parameters (a narrower "
        "dim gets more rows). Dense parameters: the network on top of the embeddings (multi-size's wider input "
        "costs here). Trials: complete / pruned (pruned includes points the budget cannot hold).",
        "",
        "| method | budget | tuned test AUC | fixed test AUC | tuned − fixed | embedding params | dense params tuned (fixed) "
        "| trials | tuning s | selected |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in tuned:
        base = fixed_by_cell[(row["method"], row["budget_fraction"])]
        cell = chosen[Cell(row["method"], row["budget_fraction"]).key]
        lines.append(
            f"| {row['method']} | {row['budget_fraction']:g} | {row['auc'][0]:.4f} ± {row['auc'][1]:.4f} "
            f"| {base['auc'][0]:.4f} ± {base['auc'][1]:.4f} | {row['auc'][0] - base['auc'][0]:+.4f} "
            f"| {row['embedding_parameters']:,} | {row['dense_parameters']:,} ({base['dense_parameters']:,}) "
            f"| {cell['complete']} / {cell['pruned']} | {cell['tuning_seconds']:.0f} | {describe_params(cell['params'])} |"
        )
    return "\n".join(lines) + "\n"


def tuned_pareto_plot(tuned: Sequence[dict], fixed: Sequence[dict], path: Path, title: str) -> None:
    """Test AUC against embedding bytes (left) and against all parameters (right); tuned solid, fixed dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=120, sharey=True)
    methods = list(dict.fromkeys(row["method"] for row in tuned))
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, strict=False))
    panels = (
        (axes[0], lambda r: r["embedding_parameters"] * 4, "embedding bytes (float32, log scale)"),
        (axes[1], lambda r: r["embedding_parameters"] + r["dense_parameters"], "embedding + dense parameters (log scale)"),
    )
    for axis, x_of, label in panels:
        for settings, rows_all, style in (("tuned", tuned, "-"), ("fixed", fixed, "--")):
            for method in methods:
                rows = sorted((r for r in rows_all if r["method"] == method), key=lambda r: r["budget_fraction"])
                marker = "*" if len(rows) == 1 else "o"
                # Left: one line per method, in budget order. Right: the dense parameters a selection picked
                # move a point anywhere along x, so points only, each marked with its budget.
                axis.errorbar(
                    [x_of(r) for r in rows], [r["auc"][0] for r in rows], yerr=[r["auc"][1] for r in rows],
                    linestyle=style if axis is axes[0] else "none", marker=marker, markersize=9 if marker == "*" else 4,
                    capsize=3, color=colours[method], alpha=1.0 if settings == "tuned" else 0.55,
                    label=f"{method} ({settings})",
                )  # fmt: skip
                if axis is axes[1] and settings == "tuned" and len(rows) > 1:
                    for r in rows:
                        axis.annotate(f"{r['budget_fraction']:.0%}", (x_of(r), r["auc"][0]), fontsize=6,
                                      xytext=(3, 3), textcoords="offset points", color=colours[method])  # fmt: skip
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test AUC")
    axes[1].legend(fontsize=7, loc="lower right", ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_tuned_outputs(chosen: dict, records: Sequence[dict], out_dir: Path, command: str, dataset: str) -> tuple[list, list]:
    """runs.csv (every final run), summary.md (tuned beside fixed) and pareto.png; the two summaries."""
    write_csv(records, out_dir / "runs.csv", (*TUNED_RUN_COLUMNS, *CSV_COLUMNS))
    tuned = summarise([r for r in records if r["settings"] == "tuned"])
    fixed = summarise([r for r in records if r["settings"] == "fixed"])
    (out_dir / "summary.md").write_text(tuned_markdown(chosen, tuned, fixed, command, dataset))
    tuned_pareto_plot(tuned, fixed, out_dir / "pareto.png", f"{dataset}: tuned (solid) and fixed (dashed) settings")
    return tuned, fixed


def ablation_runs(
    dataset: Dataset, cell: Cell, params: dict, base: TrainConfig, variant: tuple[str, ...], seeds: Sequence[int]
) -> list[dict]:
    """The cell's configuration with ``variant``'s features looked up collisionless, once per seed."""
    torch.set_num_threads(1)
    train_set, val_set, test_set = dataset.split(base.split_seed)
    config = cell_config(cell, params, base, collisionless_rows(vocabulary_sizes(train_set.columns)))
    records = []
    for seed in seeds:
        metrics = train_cell(cell, replace(config, seed=seed, exact_features=variant), train_set, val_set, test_set)
        records.append({"exact_features": "+".join(variant) or "(none)", "seed": seed, "test_auc": metrics["test_auc"],
                        "test_logloss": metrics["test_logloss"], "embedding_parameters": metrics["embedding_parameters"],
                        "dense_parameters": metrics["dense_parameters"]})  # fmt: skip
    return records


def collision_ablation(
    dataset: Dataset, cell: Cell, params: dict, base: TrainConfig, seeds: Sequence[int], jobs: int = 1
) -> list[dict]:
    """What each feature's collisions cost in one cell: its configuration as selected, then with
    each feature (and with every feature) in a collisionless table of its own beside the budget."""
    if cell.runs_search or method_spec(cell.method).fixed_size:
        raise SpecError(f"the collision ablation takes a hashed method without a search, not {cell.method}")
    names = [f.name for f in dataset.spec.features]
    variants = [(), *((name,) for name in names), tuple(names)]
    records: list[dict] = []
    with ProcessPoolExecutor(max(jobs, 1), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(ablation_runs, dataset, cell, params, base, v, tuple(seeds)) for v in variants]
        for future in tqdm(as_completed(futures), total=len(futures), desc="ablation", file=sys.stderr):
            records.extend(future.result())
    order = {"+".join(v) or "(none)": i for i, v in enumerate(variants)}
    return sorted(records, key=lambda r: (order[r["exact_features"]], r["seed"]))
