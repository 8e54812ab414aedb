"""``uembed plan``: calibrate short runs, then write the plan that fits a byte budget at the least AUC cost, or
meets an AUC loss at the fewest bytes (uembed/model/planner.py says how)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from uembed.cli.help_format import DefaultsFormatter
from uembed.cli.model_commands import (
    DATA_OPTIONS,
    add_data_options,
    add_model_options,
    config_from_args,
    is_streaming,
    load_dataset,
    positive_list,
)
from uembed.cli.service_commands import print_next
from uembed.contract.errors import UembedError

# The network and optimiser options a plan carries, so `train --plan` trains the network that was calibrated.
NETWORK_OPTIONS = ("network", "hidden", "cross_layers", "lr", "batch_size", "embedding_weight_decay")

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
              "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes of a size such as 2GB, 50MB, 512KiB or 1000 (KB, MB, GB are powers of 1000; KiB, MiB, GiB of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    unit = match and match.group(2).lower()
    if not match or unit not in SIZE_UNITS:
        raise UembedError(f"--bytes: expected a size such as 2GB, 50MB, 512KiB or 1000, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def add_plan_parser(commands: argparse._SubParsersAction) -> None:
    from uembed.bundle.codecs import ROW_DTYPES

    parser = commands.add_parser(
        "plan",
        help="find the embedding plan that fits a byte budget, or an AUC loss, from calibration runs",
        description="Calibrate training runs across the levers (method, dim, budget rows; every row codec measured on "
        "each run's tables), fit AUC against bytes per method and dim, and write the plan of best predicted AUC within "
        "--bytes, or of fewest bytes within --max-auc-loss of collisionless float32. `uembed train --plan FILE` trains "
        "it. By default the calibration runs train as `uembed train` does (all the training split, up to 20 epochs, "
        "patience 2), so the predicted AUC is the trained plan's; `--sample 0.5 --epochs 3` is a quicker look whose "
        "predictions sit below the trained AUC (docs/results/planner-bench/).",
        formatter_class=DefaultsFormatter,
    )
    add_data_options(parser)
    target = parser.add_argument_group("target (exactly one)")
    target.add_argument("--bytes", metavar="SIZE", help="embedding bytes as served: 2GB, 50MB, 512KiB, 1000000")
    target.add_argument("--max-auc-loss", type=float, metavar="DELTA", help="AUC the plan may lose against collisionless float32")
    levers = parser.add_argument_group("levers and calibration")
    levers.add_argument("--methods", type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()),
                        default=("unified", "hashing-trick"), help="hashed methods to weigh (collisionless is the reference)")  # fmt: skip
    levers.add_argument("--dims", type=positive_list(int, "dims"), default=(8, 16, 32), help="embedding dims to weigh")
    levers.add_argument("--fractions", type=positive_list(float, "fractions"), default=(0.02, 0.05, 0.1, 0.25, 0.5),
                        help="budget fractions (of the collisionless rows) each method and dim is calibrated at")  # fmt: skip
    levers.add_argument("--codecs", type=lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
                        default=ROW_DTYPES, help="row codecs to weigh")  # fmt: skip
    levers.add_argument("--sample", type=float, default=1.0, help="share of the training split the calibration runs train on")
    levers.add_argument("--calibration", type=Path, metavar="PLAN.json",
                        help="reuse the calibration runs of an earlier plan file (the same data, network, levers and "
                        "calibration options) instead of training them: another target in seconds")  # fmt: skip
    levers.add_argument("--time-budget", type=float, default=600.0, metavar="SECONDS",
                        help="stop calibrating when a next run would end past this and fit with the runs done")  # fmt: skip
    add_model_options(parser)  # --epochs and --patience: each calibration run's; --dim: the collisionless reference's
    parser.set_defaults(epochs=20, patience=2, format=None)  # as `uembed train` trains the plan
    parser.add_argument("--out", type=Path, required=True, help="the plan file to write (JSON)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_plan, extras=("train",))


def check_levers(args: argparse.Namespace) -> None:
    from uembed.bundle.codecs import ROW_DTYPES
    from uembed.model.planner import PLANNED_METHODS

    for name, values, allowed in (("--methods", args.methods, PLANNED_METHODS), ("--codecs", args.codecs, ROW_DTYPES)):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise UembedError(f"{name}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    if not 0 < args.sample <= 1:
        raise UembedError(f"--sample must be a share in (0, 1], got {args.sample:g}")
    if not args.time_budget > 0:
        raise UembedError(f"--time-budget must be positive seconds, got {args.time_budget:g}")
    if max(args.fractions) > 1:
        raise UembedError(f"--fractions are shares of the collisionless rows, at most 1; got {max(args.fractions):g}")


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from uembed.model import planner

    torch.set_num_threads(1)
    if (args.bytes is None) == (args.max_auc_loss is None):
        raise UembedError("give exactly one target: --bytes SIZE or --max-auc-loss DELTA")
    target = planner.Target(parse_size(args.bytes) if args.bytes is not None else None, args.max_auc_loss)
    target.check()
    check_levers(args)
    if is_streaming(args):
        raise UembedError("uembed plan calibrates in memory: give movielens100k, synthetic:PRESET or a data file without --stream")
    dataset = load_dataset(args)
    train_set, val_set, _ = dataset.split(args.split_seed, args.split_fractions)
    families = [planner.Family(method, dim) for method in args.methods for dim in args.dims]
    sizer = planner.Sizer(train_set.spec, train_set.columns)
    planner.check_target(target, sizer, families, args.fractions, args.codecs)
    data_options = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items() if name in DATA_OPTIONS}
    data_options.update({name: getattr(args, name) for name in NETWORK_OPTIONS})
    settings = {"sample": args.sample, "epochs": args.epochs, "patience": args.patience, "time_budget": args.time_budget,
                "methods": list(args.methods), "dims": list(args.dims), "fractions": list(args.fractions),
                "codecs": list(args.codecs), "seed": args.seed, "reference_dim": args.dim,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    if args.calibration:
        calibration = reused_calibration(args.calibration, data_options, settings)
    else:
        calibration = planner.calibrate(config_from_args(args), train_set, val_set, families, args.fractions, args.codecs,
                                        args.time_budget, args.sample, sizer, progress=not args.quiet)  # fmt: skip
    fits = planner.fit(calibration, args.codecs)
    reference_auc = calibration.reference["auc"]["float32"]
    candidates = planner.weigh(target, fits, calibration.reference, sizer, args.codecs)
    winner, why, ranked = planner.choose(target, candidates, reference_auc)
    print(f"{'reused' if args.calibration else 'calibrated'} {len(calibration.points)} runs and the collisionless reference "
          f"(validation AUC {reference_auc:.4f}), trained in {calibration.seconds:.0f}s: {calibration.stopped}")  # fmt: skip
    print(f"candidates {target.describe()}:")
    print(planner.format_candidates(ranked, reference_auc))
    if winner is None:
        closest = ", ".join(f"{c.family.label} {c.codec} (AUC {c.predicted_auc:.4f}, loss {reference_auc - c.predicted_auc:.4f}, "
                            f"{c.bytes:,} bytes)" for c in ranked[:3])  # fmt: skip
        print(f"no plan meets the target ({target.describe()}); the closest: {closest}. Collisionless float32, the reference, "
              f"takes {sizer.bytes(planner.Family(planner.REFERENCE, args.dim), None, 'float32'):,} bytes"
              + (f"; the time budget left {calibration.skipped} of the planned runs out (calibration: "
                 f"{calibration.seconds:.0f}s): a larger --time-budget may find one" if calibration.skipped else ""),
              file=sys.stderr)  # fmt: skip
        return 1
    doc = planner.plan_document(target, winner, why, ranked, calibration, fits, data_options, settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    rows = "every training value" if winner.budget_rows is None else f"{winner.budget_rows:,} rows"
    print(f"plan: {winner.family.label}, {rows}, {winner.codec}: predicted AUC {winner.predicted_auc:.4f}, {winner.bytes:,} bytes")
    print(f"why: {why}")
    print(f"wrote {args.out}")
    print_next(f"uembed train --plan {args.out}")
    return 0


# What a calibration's runs depend on besides the data and the network: reusing them needs the same.
CALIBRATION_SETTINGS = ("sample", "epochs", "patience", "methods", "dims", "fractions", "codecs", "seed", "reference_dim")


def reused_calibration(path: Path, data_options: dict, settings: dict):
    """The calibration runs of an earlier plan file, when they were trained on this data, network and settings."""
    from uembed.model.planner import Calibration, load_plan

    doc = load_plan(path)
    calibration = doc.get("calibration") or {}
    written = {**{name: doc["train"].get(name) for name in data_options}, **{name: calibration.get(name) for name in CALIBRATION_SETTINGS}}
    wanted = json.loads(json.dumps({**data_options, **{name: settings[name] for name in CALIBRATION_SETTINGS}}))
    for name, value in wanted.items():
        if written[name] != value:
            raise UembedError(f"--calibration {path}: its runs had {name} = {written[name]!r}, this command {value!r}; "
                              "give the same options or calibrate afresh")  # fmt: skip
    if not isinstance(calibration.get("reference"), dict) or not isinstance(calibration.get("points"), list):
        raise UembedError(f"--calibration {path}: no calibration runs in it (calibration.reference and calibration.points)")
    return Calibration(reference=calibration["reference"], points=calibration["points"], seconds=float(calibration.get("seconds", 0)),
                       stopped=f"reused from {path} ({calibration.get('stopped', 'finished')})")  # fmt: skip
