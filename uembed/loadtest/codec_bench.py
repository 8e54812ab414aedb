"""``uembed bench --phases codecs`` and ``--phases hybrid``: the same model's bundles served side by side.

codecs   one model in each row codec of ``--codecs`` (the first is the reference; issue #37's goal: int4 serves at
         least 0.9 of float16's requests/s). ``--codec-models demo``: a MovieLens run (the demo bundle's
         configuration, ``--bench-epochs`` epochs, or ``--train-run``) exported once per codec, as ``uembed export
         --dtype`` does; ``scale``: the Criteo-shaped synthetic bundle (``uembed/loadtest/scale_bench.py``) written
         once per codec from the same seed (the same float32 rows and dense network, except pq, whose codebook
         sample draws rows first), ``--scale-rows`` rows, kept in ``--scale-dir`` and reused by a later run.
hybrid   a plain unified run and a hybrid one (``--head-share``: that share of the same table's rows given to the
         most frequent values) of the same total rows, exported in ``--hybrid-dtype``; issue #38's goal: a hybrid
         request costs at most 5% more.

Every bundle of a comparison is served at once, each by its own uvicorn (``--workers``), and they are saturated in
turn, ``--rounds`` rounds, each round's order shifted by one, so the machine's drift between minutes and the order
within a round both cancel. Per bundle and round: requests/s, p50/p99 and the workers' CPU milliseconds a request
(what a request costs the service, whatever share of the cores the load generator on the same machine takes).
The ratios to the first bundle are the median of the per-round ratios. After the rounds: each worker's RSS, PSS and
private bytes (``/proc/PID/smaps_rollup``), the row files' bytes and the tiers' hit rates. Tier 1 holds decoded
float32 rows, so a codec's decoding costs only on its misses: the demo model's table fits in tier 1 whole, and
``--codec-hot-rows-mb 0`` (tier 1 off) measures every lookup through the codec.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from uembed.bundle.synthetic import criteo_features, write_synthetic_bundle
from uembed.contract.errors import UembedError
from uembed.loadtest.load import movielens_requests, run_load
from uembed.loadtest.scale_bench import (
    CONTEXT_FEATURES,
    CriteoRequests,
    cpu_seconds,
    hit_rates,
    read_through,
    start_timed,
    tier_counts,
    worker_pids,
)
from uembed.loadtest.servers import UvicornProcess
from uembed.model.data import load_movielens100k
from uembed.model.demo import DEMO_CONTEXT_FEATURES
from uembed.model.export import export_run
from uembed.model.train import TrainConfig, train

GOALS = {"codecs": ("int4", "float16", "requests_per_s_ratio", ">=", 0.9),
         "hybrid": ("hybrid", "plain", "cpu_ms_per_request_ratio", "<=", 1.05)}  # fmt: skip


# --- the bundles ---------------------------------------------------------------------------------


def movielens_run(workdir: Path, epochs: int, head_share: float = 0.0, budget_fraction: float = 0.1) -> Path:
    """A MovieLens-100K unified run as the demo bundle's (``uembed/model/demo.py``) at ``epochs`` epochs, with
    ``head_share`` of its table's rows given to heads; trained once per working folder."""
    run_dir = workdir / f"movielens-run-share-{head_share:g}"
    if (run_dir / "checkpoint.pt").is_file():
        return run_dir
    import torch

    torch.set_num_threads(1)
    dataset = load_movielens100k()
    dataset.source = {"dataset": "movielens100k", "spec": None, "label_threshold": 3.0, "split_seed": 0}
    config = TrainConfig(embedding="unified", budget_fraction=budget_fraction, epochs=epochs, seed=0, head_share=head_share)
    print(f"training MovieLens-100K unified, head share {head_share:g}, {epochs} epoch(s) into {run_dir}", file=sys.stderr)
    train(config, *dataset.split(0), run_dir=run_dir, progress=False)
    return run_dir


def exported(run_dir: Path, store: Path, name: str, dtype: str) -> Path:
    return export_run(run_dir, store, name, version="1", dtype=dtype, context_features=DEMO_CONTEXT_FEATURES)


def scale_codec_bundle(root: Path, rows: int, dtype: str) -> Path:
    """``root/criteo-scale-<dtype>/1``: written unless a bundle of ``rows`` rows is there from an earlier run."""
    path = root / f"criteo-scale-{dtype}" / "1"
    if (path / "manifest.json").is_file():
        table = json.loads((path / "manifest.json").read_text())["tables"][0]
        if table["rows"] != rows or table["dtype"] != dtype:
            raise UembedError(f"--scale-dir: {path} holds {table['rows']} {table['dtype']} rows, not {rows} {dtype}; "
                              "remove it or pass another --scale-dir")  # fmt: skip
        return path
    return write_synthetic_bundle(root, f"criteo-scale-{dtype}", criteo_features(), table_rows=rows, dtype=dtype,
                                  context_features=CONTEXT_FEATURES)  # fmt: skip


def bundle_bytes(bundle: Path) -> dict[str, int]:
    """The row files (``tables/<name>.npy``), with their scale/bias and codebook files, and the whole bundle."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    tables = bundle / "tables"
    return {
        "row_file_bytes": sum((tables / f"{t['name']}.npy").stat().st_size for t in manifest["tables"]),
        "table_files_bytes": sum(p.stat().st_size for p in tables.iterdir()),
        "bundle_bytes": sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()),
        "table_rows": sum(t["rows"] for t in manifest["tables"]),
    }


# --- serving them side by side ---------------------------------------------------------------------


def memory_bytes(pid: int) -> dict[str, int]:
    """RSS, PSS, private (clean + dirty: pages no other process maps) and anonymous bytes of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return {"rss_bytes": fields["Rss"], "pss_bytes": fields["Pss"],
            "private_bytes": fields["Private_Clean"] + fields["Private_Dirty"], "anonymous_bytes": fields["Anonymous"]}  # fmt: skip


def median_ratio(rounds: list[dict[str, dict]], label: str, first: str, field: str) -> float | None:
    ratios = [r[label][field] / r[first][field] for r in rounds if r[first][field]]
    return round(statistics.median(ratios), 4) if ratios else None


def compare(rounds: list[dict[str, dict]], labels: list[str]) -> dict[str, dict]:
    """Per bundle: the median over rounds of its figures, and its ratios to the first bundle (median of the rounds'
    ratios: each ratio taken within one round, minutes apart from the next)."""
    first = labels[0]
    out = {}
    for label in labels:
        figures = {field: round(statistics.median(r[label][field] for r in rounds), 3)
                   for field in ("requests_per_s", "p50_ms", "p99_ms", "cpu_ms_per_request")}  # fmt: skip
        figures["requests_per_s_ratio"] = median_ratio(rounds, label, first, "requests_per_s")
        figures["cpu_ms_per_request_ratio"] = median_ratio(rounds, label, first, "cpu_ms_per_request")
        out[label] = figures
    return out


def side_by_side(bundles: dict[str, Path], bodies: list[bytes], env: dict[str, str], args, workdir: Path, tag: str) -> dict:
    """Serve every bundle at once and saturate them in turn for ``args.rounds`` rounds (see the module's doc)."""
    labels = list(bundles)
    servers = {label: UvicornProcess("uembed.serving.app:create_app", {**env, "UEMBED_BUNDLES": str(path)},
                                     workdir / f"{tag}-{label}.log", workers=args.workers) for label, path in bundles.items()}  # fmt: skip
    started: list[UvicornProcess] = []
    out: dict = {"hot_rows_bytes": env.get("UEMBED_HOT_ROWS_BYTES", "service default"),
                 "bundles": {label: {"path": str(path), **bundle_bytes(path)} for label, path in bundles.items()}}
    try:
        for label, server in servers.items():
            started.append(server)  # before it starts: a start that fails part-way is stopped too
            out["bundles"][label]["start_up"] = start_timed(server)
            for table in (bundles[label] / "tables").iterdir():
                read_through(table)  # the steady state: the row files in the page cache
        pids = {label: worker_pids(server) for label, server in servers.items()}
        for label, server in servers.items():
            run_load(server.url, bodies, 1.0, args.concurrency)  # warm-up: tier 1, allocator, connections
        before = {label: tier_counts(server) for label, server in servers.items()}
        rounds = []
        for index in range(args.rounds):
            figures = {}
            for label in labels[index % len(labels):] + labels[: index % len(labels)]:
                cpu_before = cpu_seconds(pids[label])
                result = run_load(servers[label].url, bodies, args.seconds, args.concurrency).summary()
                cpu_ms = (cpu_seconds(pids[label]) - cpu_before) / max(result["requests"], 1) * 1000
                figures[label] = {"requests_per_s": result["requests_per_s"], "p50_ms": result["p50_ms"],
                                  "p99_ms": result["p99_ms"], "cpu_ms_per_request": round(cpu_ms, 4),
                                  "requests": result["requests"], "failures": result["failures"]}  # fmt: skip
            rounds.append({label: figures[label] for label in labels})
        for label, server in servers.items():
            out["bundles"][label]["tier_hit_rates"] = hit_rates(before[label], tier_counts(server))
            out["bundles"][label]["memory_per_worker"] = [memory_bytes(pid) for pid in pids[label]]
    finally:
        for server in started:
            server.stop()
    out["rounds"] = rounds
    out["compared"] = compare(rounds, labels)
    return out


def goal(kind: str, compared: dict[str, dict]) -> dict | None:
    label, reference, field, sign, bound = GOALS[kind]
    if label not in compared or next(iter(compared)) != reference:
        return None
    value = compared[label][field]
    return {"figure": f"{label} {field} (to {reference})", "value": value, "goal": f"{sign} {bound}",
            "met": None if value is None else value >= bound if sign == ">=" else value <= bound}  # fmt: skip


# --- the phases ---------------------------------------------------------------------------------


def scale_bodies(args) -> list[bytes]:
    traffic = CriteoRequests(args.scale_zipf)
    return [json.dumps({"examples": traffic.flat(args.examples)}).encode() for _ in range(60)]


def check_args(args) -> None:
    """The codecs and hybrid phases' options, refused before any phase runs."""
    phases = set(args.phases)
    if not phases & {"codecs", "hybrid"}:
        return
    if args.rounds < 1:
        raise UembedError(f"--rounds: at least 1, got {args.rounds}")
    if args.bench_epochs < 1:
        raise UembedError(f"--bench-epochs: at least 1, got {args.bench_epochs}")
    if "codecs" in phases and len(set(args.codecs)) < 2:
        raise UembedError(f"--codecs: name at least two codecs to compare, got {' '.join(args.codecs)}")
    if "codecs" in phases and args.train_run is not None and not (args.train_run / "checkpoint.pt").is_file():
        raise UembedError(f"--train-run: {args.train_run} is not a training run directory (no checkpoint.pt)")
    if "hybrid" in phases and not 0 < args.head_share < 1:
        raise UembedError(f"--head-share: the hybrid run's share of head rows must be above 0 and below 1, got {args.head_share}")


def run_codec_bench(args, workdir: Path, report: Callable[[str, dict], None]) -> None:
    codecs = list(dict.fromkeys(args.codecs))
    if "demo" in args.codec_models:
        run_dir = args.train_run or movielens_run(workdir, args.bench_epochs)
        bundles = {codec: exported(run_dir, workdir / "codec-bundles", f"movielens-{codec}", codec) for codec in codecs}
        bodies = [json.dumps({"examples": r}).encode() for r in movielens_requests(args.examples)]
        env = {} if args.codec_hot_rows_mb is None else {"UEMBED_HOT_ROWS_BYTES": str(int(args.codec_hot_rows_mb * 2**20))}
        figures = side_by_side(bundles, bodies, env, args, workdir, "codecs-demo")
        figures |= {"model": "movielens100k unified 10%", "run": str(run_dir), "goal": goal("codecs", figures["compared"])}
        report("codecs_demo", figures)
    if "scale" in args.codec_models:
        root = Path(args.scale_dir or workdir)
        bundles = {codec: scale_codec_bundle(root, args.scale_rows, codec) for codec in codecs}
        hot_mb = args.hot_rows_mb if args.codec_hot_rows_mb is None else args.codec_hot_rows_mb
        env = {"UEMBED_HOT_ROWS_BYTES": str(int(hot_mb * 2**20)), "UEMBED_MAX_EXAMPLES": "1024",
               "UEMBED_MAX_BODY_BYTES": str(16 * 2**20)}  # as the scale phase serves it
        figures = side_by_side(bundles, scale_bodies(args), env, args, workdir, "codecs-scale")
        figures |= {"model": f"criteo-shaped synthetic, {args.scale_rows} rows", "zipf": args.scale_zipf,
                    "goal": goal("codecs", figures["compared"])}  # fmt: skip
        report("codecs_scale", figures)


def run_hybrid_bench(args, workdir: Path, report: Callable[[str, dict], None]) -> None:
    runs = {"plain": movielens_run(workdir, args.bench_epochs), "hybrid": movielens_run(workdir, args.bench_epochs, args.head_share)}
    bundles = {label: exported(run, workdir / "hybrid-bundles", f"movielens-{label}", args.hybrid_dtype) for label, run in runs.items()}
    manifests = {label: json.loads((path / "manifest.json").read_text()) for label, path in bundles.items()}
    rows = {label: [t["rows"] for t in m["embedding"]["tables"]] for label, m in manifests.items()}
    if rows["plain"] != rows["hybrid"]:  # the comparison is of the same budget: a difference is a bug of the plan
        raise UembedError(f"the plain and hybrid runs' tables differ in rows: {rows}")
    bodies = [json.dumps({"examples": r}).encode() for r in movielens_requests(args.examples)]
    figures = side_by_side(bundles, bodies, {}, args, workdir, "hybrid")
    head_rows = sum(t.get("head_rows", 0) for t in manifests["hybrid"]["embedding"]["tables"])
    figures |= {"head_share": args.head_share, "table_rows": sum(rows["plain"]), "head_rows": head_rows,
                "dtype": args.hybrid_dtype, "goal": goal("hybrid", figures["compared"])}  # fmt: skip
    report("hybrid", figures)

