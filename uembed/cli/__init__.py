"""``uembed``: one entry point, one subcommand per job. The training side's commands are in
``model_commands.py`` (train, search, study, data, example-data, export, prune) and ``plan_command.py`` (plan), the serving side's in ``service_commands.py`` (serve,
publish, push-rows, bench, demo-bundle, stack, loadtest)."""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata

from uembed.cli.model_commands import (
    add_data_parser,
    add_example_data_parser,
    add_export_parser,
    add_prune_parser,
    add_search_parser,
    add_study_parser,
    add_train_parser,
)
from uembed.cli.plan_command import add_plan_parser
from uembed.cli.service_commands import (
    add_bench_parser,
    add_demo_bundle_parser,
    add_loadtest_parser,
    add_publish_parser,
    add_push_rows_parser,
    add_serve_parser,
    add_stack_parser,
)
from uembed.contract.errors import UembedError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uembed",
        description="Train, export and serve ranking models whose categorical features share hashed embedding tables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(commands)
    add_plan_parser(commands)
    add_search_parser(commands)
    add_study_parser(commands)
    add_data_parser(commands)
    add_example_data_parser(commands)
    add_export_parser(commands)
    add_prune_parser(commands)
    add_serve_parser(commands)
    add_publish_parser(commands)
    add_push_rows_parser(commands)
    add_bench_parser(commands)
    add_demo_bundle_parser(commands)
    add_stack_parser(commands)
    add_loadtest_parser(commands)
    return parser


def missing_distributions(extra: str) -> list[str]:
    """The distributions of ``uembed[extra]`` that are not installed, read from this install's own
    metadata (pyproject.toml's optional-dependencies), so the list cannot drift from the pins."""
    try:
        requirements = metadata.requires("uembed") or []
    except metadata.PackageNotFoundError:  # a source tree that was never installed: nothing to check against
        return []
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0)
            try:
                metadata.distribution(name)
            except metadata.PackageNotFoundError:
                missing.append(name)
    return missing


def require_extras(command: str, extras: tuple[str, ...]) -> None:
    """Refuse a command whose extra is not installed before it imports anything of it."""
    for extra in extras:
        missing = missing_distributions(extra)
        if missing:
            raise UembedError(
                f"`uembed {command}` needs the {extra} extra ({', '.join(missing)} not installed): "
                f"pip install 'uembed[{extra}]'"
            )


FIRST_STEPS = """\
uembed: train, export and serve ranking models whose categorical features share hashed embedding tables.

The path, in the order a user takes it:
  uembed serve                                 serve the demo bundle (trained the first time) on 127.0.0.1:8000
  uembed train --dataset DATA [--spec S.toml]  train a model: movielens100k, synthetic:criteo, or your Parquet/CSV
                                               (uembed example-data DIR writes one and its spec: README, Your own data)
  uembed export RUN_DIR --out bundles          write the run as a bundle: bundles/<name>/<version>
  uembed serve --bundle BUNDLE_DIR             serve it: REST /v1, the Open Inference Protocol on /v2 and gRPC
  uembed bench | loadtest | stack              measure it, load it, run it beside Redis and Prometheus

One command's options: uembed COMMAND --help. Every command: uembed --help."""


def main(argv: list[str] | None = None) -> int:
    if not (sys.argv[1:] if argv is None else argv):  # bare `uembed`: where to start, not argparse's error
        print(FIRST_STEPS)
        return 0
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher runs again in each process
    try:
        require_extras(args.command, getattr(args, "extras", ()))
        return args.handler(args)
    except UembedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
