"""``uembed serve`` (and the benchmark driver): the HTTP service on uvicorn; ``uembed publish``: a bundle's rows to Redis."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from uembed.cli.help_format import DefaultsFormatter, RawDescriptionDefaultsFormatter
from uembed.contract.errors import UembedError


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from uembed.serving.settings import describe_settings

    parser = commands.add_parser(
        "serve",
        help="serve bundles over HTTP (FastAPI on uvicorn)",
        description="Serve one or more bundles: POST /v1/score, GET /v1/models, POST /v1/models/{name}/load, "
        "/healthz, /readyz, /metrics, OpenAPI at /docs; the Open Inference Protocol (KServe v2) under /v2 and "
        "over gRPC (--grpc-port). With no --bundle and no UEMBED_BUNDLES it serves the "
        "demo bundle (MovieLens-100K, unified at 10%), training it the first time. Without --redis-url rows "
        "come from the in-process hot tier and the bundle's row files (no Redis needed).",
        epilog="Every setting can also come from the environment:\n\n" + describe_settings(),
        formatter_class=RawDescriptionDefaultsFormatter,
    )
    parser.add_argument("--bundle", action="append", type=Path, help="bundle directory (repeat for several models)")
    parser.add_argument("--host", help="address to bind (default $UEMBED_HOST, else 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, help="port (default $UEMBED_PORT, else 8000)")
    parser.add_argument("--grpc-port", type=int, help="port of the Open Inference Protocol's gRPC service, on the same "
                        "host (default 8001, as Triton; 0: none; see UEMBED_GRPC_PORT below)")  # fmt: skip
    parser.add_argument(
        "--workers", type=int,
        help="uvicorn worker processes, one compute thread each (default $UEMBED_WORKERS, else 1; use one per core)",
    )  # fmt: skip
    parser.add_argument("--redis-url", help="tier 2 Redis, e.g. redis://127.0.0.1:6379/0 (default: none)")
    parser.add_argument("--hot-rows-mb", type=float, help="tier 1 budget per model in MiB (default 64)")
    parser.add_argument("--device", help="cpu (default) or cuda[:N]: tier 1, gather, assemble and the dense net on a GPU "
                        "(needs the gpu extra; see UEMBED_DEVICE below)")  # fmt: skip
    parser.add_argument("--bundle-store", type=Path, help="root of <name>/<version>/ bundles (default ./bundles)")
    parser.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    parser.set_defaults(handler=run_serve)


def set_serve_environment(args: argparse.Namespace) -> None:
    """CLI flags (and the demo bundle) as UEMBED_* variables, so every worker builds the same settings."""
    from uembed.model.demo import demo_bundle
    from uembed.serving.settings import load_settings

    args.host = args.host or os.environ.get("UEMBED_HOST") or "127.0.0.1"
    args.port = args.port if args.port is not None else number_from_environment("UEMBED_PORT", 8000)
    args.workers = args.workers if args.workers is not None else number_from_environment("UEMBED_WORKERS", 1)
    env = {}
    if args.bundle:
        env["UEMBED_BUNDLES"] = ",".join(str(p.resolve()) for p in args.bundle)
    if args.redis_url:
        env["UEMBED_REDIS_URL"] = args.redis_url
    if args.hot_rows_mb is not None:
        env["UEMBED_HOT_ROWS_BYTES"] = str(int(args.hot_rows_mb * 2**20))
    if args.bundle_store:
        env["UEMBED_BUNDLE_STORE"] = str(args.bundle_store.resolve())
    if args.device:
        env["UEMBED_DEVICE"] = args.device
    if args.grpc_port is not None:
        env["UEMBED_GRPC_PORT"] = str(args.grpc_port)
    if "UEMBED_GRPC_HOST" not in os.environ:
        env["UEMBED_GRPC_HOST"] = args.host  # gRPC listens where HTTP does unless told otherwise
    # ONNX Runtime 1.31 otherwise writes a device id and an event database under $HOME in every worker.
    env.setdefault("ORT_DISABLE_TELEMETRY", os.environ.get("ORT_DISABLE_TELEMETRY", "1"))
    os.environ.update(env)
    settings = load_settings()  # refuses bad settings here, before any worker starts
    args.max_connections = settings.max_connections
    args.header_timeout_s = settings.header_timeout_s
    args.grpc_host, args.grpc_port, args.grpc_server = settings.grpc_host, settings.grpc_port, settings.grpc_server
    args.grpc_address = f"{settings.grpc_host}:{settings.grpc_port}" if settings.grpc_port else None
    if settings.device != "cpu":
        from uembed.serving.pipeline.cuda import cuda_modules

        cuda_modules(settings.device)  # no GPU, no CuPy or a CPU-only onnxruntime: a one-line error here
    if not settings.bundles:
        os.environ["UEMBED_BUNDLES"] = str(demo_bundle(settings.bundle_store).resolve())
    else:
        from uembed.bundle.loader import filing, load_bundle

        # A missing or corrupt bundle is a one-line error here, not a worker traceback. The row files' sha256
        # is left to the workers when they check in the background: reading gigabytes here would hold the
        # port closed for as long (each worker reads them again anyway).
        for path in settings.bundles:
            load_bundle(path, defer_row_checks=settings.row_checks == "background", row_files=settings.row_source == "files",
                        filed_as=filing(path, settings.bundle_store), verify=settings.verify_rows)  # fmt: skip


def number_from_environment(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isascii() or not value.isdigit():
        raise UembedError(f"{name}={value!r}: not a number")
    return int(value)


def run_serve(args: argparse.Namespace) -> int:
    import functools

    import uvicorn

    from uembed.serving.process import (
        BALANCED_LOOP,
        ClosingMultiprocess,
        HeadDeadlineProtocol,
        ServiceConfig,
        claim_port,
        service_log_config,
    )

    set_serve_environment(args)
    # Held until this process exits: the gRPC port is this server's and its workers' only, and with several workers
    # on the in-loop HTTP/2 server the last claim is the socket every worker accepts on (uembed/serving/process.py).
    shared_grpc = args.grpc_server == "http2" and args.workers > 1
    grpc_claim = claim_port(args.grpc_host, args.grpc_port, "give this one another --grpc-port (UEMBED_GRPC_PORT; 0: no gRPC)",
                            shared=shared_grpc) if args.grpc_port else []  # fmt: skip
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="uembed-metrics-")
    grpc = f", gRPC on {args.grpc_address}" if args.grpc_address else ""
    print(f"serving {os.environ['UEMBED_BUNDLES']} on http://{args.host}:{args.port}{grpc} "
          f"({args.workers} worker(s)); try:\n  curl -s http://{args.host}:{args.port}/v1/models", file=sys.stderr)
    config = ServiceConfig(
        "uembed.serving.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        http=functools.partial(HeadDeadlineProtocol, head_timeout_s=args.header_timeout_s),
        loop=BALANCED_LOOP,  # uvicorn's own loop, spreading connections evenly over the workers (accepts.py)
        access_log=args.access_log,
        timeout_graceful_shutdown=15,
        limit_concurrency=args.max_connections,  # per worker; beyond it uvicorn answers 503
        log_level="info",
        log_config=service_log_config(),
        grpc_socket=grpc_claim[-1] if grpc_claim and shared_grpc else None,
        grpc_address=(args.grpc_host, args.grpc_port),
    )
    if args.workers == 1:
        server = uvicorn.Server(config)
        server.run()
        return 0 if server.started else 3  # 3: uvicorn's own code for a server that failed to start
    # As uvicorn.run, but the parent stops listening as soon as it is told to stop (process.py).
    ClosingMultiprocess(config, sockets=[config.bind_socket()]).run()
    return 0


def add_publish_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "publish",
        help="load every row of a bundle into Redis or a Redis Cluster (for UEMBED_ROW_SOURCE=redis)",
        description="Writes every row of every table of BUNDLE to Redis in the service's tier-2 layout "
        "(<prefix>:<model>:<version>:<table>:<bucket> hashes of --bucket-rows rows, the rows' stored bytes), "
        "pipelined a chunk at a time, then a completion marker <prefix>:<model>:<version>:published with the "
        "tables' shapes and their row files' sha256. A service with UEMBED_ROW_SOURCE=redis serves the bundle "
        "without its row files once the marker matches its manifest. Running it again rewrites the same keys. "
        "Exits 1 when --verify finds a row that is missing or differs.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("bundle", type=Path, help="bundle directory, with its row files")
    parser.add_argument("--redis-url", required=True,
                        help="redis://host:port/db, or redis+cluster://host:port (any node of a Redis Cluster)")  # fmt: skip
    parser.add_argument("--prefix", default="uembed", help="key prefix: the service's UEMBED_REDIS_PREFIX")
    parser.add_argument("--bucket-rows", type=int, default=64, help="rows per hash: the service's UEMBED_REDIS_BUCKET_ROWS")
    parser.add_argument("--chunk-rows", type=int, default=32768, help="rows written per pipelined round (whole buckets)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per Redis call (3 retries after a failure)")
    parser.add_argument("--verify", action="store_true", help="then read every row back and compare it with the row files")
    parser.add_argument("--verify-only", action="store_true", help="only read back and compare (write nothing)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_publish)


def print_next(command: str, *then: str) -> None:
    """A long-running command's last words: the command a user runs next (and the one after it)."""
    print(f"next: {command}")
    for line in then:
        print(f"then: {line}")


def run_publish(args: argparse.Namespace) -> int:
    from uembed.serving.rows.published import publish

    if not 1 <= args.bucket_rows <= 512:
        raise UembedError(f"--bucket-rows {args.bucket_rows}: use 1 to 512, the service's UEMBED_REDIS_BUCKET_ROWS")
    report = publish(
        args.bundle, args.redis_url, prefix=args.prefix, bucket_rows=args.bucket_rows, chunk_rows=args.chunk_rows,
        timeout_s=args.timeout, write=not args.verify_only, verify=args.verify or args.verify_only, progress=not args.quiet,
    )  # fmt: skip
    name = f"{report['model']} version {report['version']}"
    if report["write_seconds"] is not None:
        print(f"published {report['rows']:,} rows of {name} to {args.redis_url} in {report['write_seconds']:.1f}s; "
              f"marker {report['marker']}")  # fmt: skip
    prefix = f"UEMBED_REDIS_PREFIX={args.prefix} " if args.prefix != "uembed" else ""
    serve = f"UEMBED_ROW_SOURCE=redis {prefix}uembed serve --bundle {args.bundle} --redis-url {args.redis_url}"
    if report["verify_seconds"] is None:
        print_next(serve)
        return 0
    for table, bad in report["bad_rows"].items():
        print(f"verify: table {table}: {bad['count']:,} rows missing or different in Redis (first: {bad['first']})")
    if report["marker_problem"]:
        print(f"verify: {report['marker_problem']}")
    if report["bad_rows"] or report["marker_problem"]:
        return 1
    print(f"verified {report['rows']:,} rows of {name} in {report['verify_seconds']:.1f}s: all match the row files")
    print_next(serve)
    return 0


def add_push_rows_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "push-rows",
        help="publish the rows that changed since a served bundle as row updates (Redis Stream)",
        description="Compares RUN_OR_DELTA's rows with what replicas of --bundle serve and publishes the rows that differ "
        "on the version's update stream <prefix>:<model>:<version>:updates, in the served tables' dtype, as deltas of "
        "at most --chunk-rows rows. Replicas started with UEMBED_ROW_UPDATES_URL apply each delta between two "
        "batches; a replica started later replays the stream (docs/UPDATES.md). RUN_OR_DELTA is a training run directory "
        "(every row of its tables; needs the train extra), a bundle directory (say a newer export of the same "
        "model), or a .npz delta file with <table>.ids (int64) and <table>.rows (float32 [ids, dim]) per table. "
        "Only rows travel: it must share the served bundle's embedding plan (checked) and be trained with its "
        "dense network (`uembed train --continue-from` keeps it frozen). Publishing again is harmless: a replica "
        "that applies a row twice holds the same row.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("source", type=Path, metavar="RUN_OR_DELTA", help="run directory, bundle directory or .npz delta file")
    add_row_update_options(parser.add_argument_group("row updates"), required=True)
    parser.add_argument("--dry-run", action="store_true", help="compare and report, publish nothing")
    parser.set_defaults(handler=run_push_rows)


def add_row_update_options(group: argparse._ArgumentGroup, required: bool) -> argparse._ArgumentGroup:
    """The options naming a served version's update stream (push-rows, train --publish-updates)."""
    group.add_argument("--bundle", type=Path, required=required, dest="served_bundle", metavar="BUNDLE",
                       help="the bundle the replicas serve: its model, version, dtypes and rows are what is compared against")  # fmt: skip
    group.add_argument("--redis-url", required=required, dest="updates_url", metavar="URL",
                       help="the Redis of the update streams: the service's UEMBED_ROW_UPDATES_URL")  # fmt: skip
    group.add_argument("--prefix", default="uembed", help="key prefix: the service's UEMBED_REDIS_PREFIX")
    group.add_argument("--chunk-rows", type=int, default=4096, help="rows per delta (one stream entry, applied whole)")
    group.add_argument("--max-entries", type=int, default=100_000,
                       help="keep about this many entries on the stream (XADD MAXLEN ~): older ones are trimmed, and a "
                       "replica started after that cannot replay them; load a bundle exported with them instead")  # fmt: skip
    return group


def row_publisher(args: argparse.Namespace):
    """The publisher for --bundle and --redis-url (the bundle fully checked: its rows are the baseline)."""
    from uembed.bundle.loader import load_bundle
    from uembed.serving.rows.push import RowPublisher
    from uembed.serving.rows.redis import redis_client
    from uembed.serving.settings import load_settings

    if args.chunk_rows < 1 or args.max_entries < 1:
        raise UembedError("--chunk-rows and --max-entries must be positive")
    load_settings(row_updates_url=args.updates_url)  # the service's own check of the URL
    return RowPublisher(load_bundle(args.served_bundle), redis_client(args.updates_url, 10.0, retries=3), args.prefix,
                        args.chunk_rows, args.max_entries)  # fmt: skip


def print_push_report(report: dict, dry_run: bool = False) -> None:
    tables = ", ".join(f"{table} {rows:,}" for table, rows in report["tables"].items()) or "none"
    verb = "would publish" if dry_run else "published"
    print(f"{verb} {report['rows_changed']:,} changed rows of {report['rows_compared']:,} compared ({tables}) as "
          f"{report['entries']} deltas on {report['stream']}" + (f", ids {report['first_id']} .. {report['last_id']}" if report["last_id"] else ""))  # fmt: skip


def load_training_run(run_dir: Path):
    """A training run's plan and model, for push-rows of a run directory: torch (the train extra) is imported only
    here, so pushing a bundle or a delta file needs none."""
    try:
        from uembed.model.train import load_run
    except ImportError as exc:
        raise UembedError("reading a run directory needs torch: pip install 'uembed[train]', or push a bundle") from exc
    return load_run(run_dir)


def run_push_rows(args: argparse.Namespace) -> int:
    from uembed.serving.rows.push import source_rows

    publisher = row_publisher(args)
    chunks = source_rows(args.source, publisher.bundle, load_training_run)
    report = publisher.publish(chunks, source=f"push-rows {args.source.name}", dry_run=args.dry_run)
    print_push_report(report, args.dry_run)
    return 0


# uembed/loadtest/peers.py's FRONTS, written out: importing the bench here would slow every command's start.
PEER_FRONTS = ("ceiling", "v1", "v2", "grpc", "grpc_aio", "perf_analyzer", "litserve", "naive")


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    from uembed.bundle.codecs import ROW_DTYPES
    parser = commands.add_parser(
        "bench",
        help="measure the service: throughput vs in-process ceiling and a naive service, latency, memory",
        description="Benchmarks of the scoring service, side by side in one run on this machine (server and "
        "load generator on loopback). Prints each phase's figures and writes them all as JSON. "
        "docs/BENCHMARKS.md records a run and its command.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: the demo bundle, built if missing)")
    parser.add_argument("--bundle-store", type=Path, default=Path("bundles"), help="where the demo bundle lives")
    parser.add_argument("--phases", nargs="+", choices=("service", "redis", "hot", "scale", "ranking", "gpu", "peers", "codecs", "hybrid"),
                        default=["service", "redis", "hot"],
                        help="scale, gpu and peers are not in the default: scale writes a 3.2 GB bundle and needs ~15 GB "
                        "of memory for its naive baseline; gpu needs a CUDA device and the gpu extra; peers takes about "
                        "15 minutes (see --peers); codecs and hybrid serve one model's bundles side by side (see their options); "
                        "ranking sends one user x N movies against the same examples flat to --bundle or the demo bundle")  # fmt: skip
    parser.add_argument("--peers", action="store_const", const=["peers"], dest="phases",
                        help="only the peers phase: this service's REST v1, REST v2 and gRPC fronts beside LitServe and "
                        "a naive FastAPI service, the same bundle and scoring code, wrk for HTTP load "
                        "(uembed/loadtest/peers.py); needs wrk (make system-deps) and the peers extra (pip install 'uembed[peers]', in dev)")  # fmt: skip
    parser.add_argument("--examples", type=int, default=64, help="examples per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per measured load phase")
    parser.add_argument("--concurrency", type=int, default=16, help="connections of the closed-loop load")
    parser.add_argument("--workers", type=int, default=1, help="also measure the service with this many workers (>1)")
    parser.add_argument("--redis-rows", type=int, default=1_000_000, help="rows cached in Redis for the memory figure")
    parser.add_argument("--table-rows", type=int, default=10_000_000, help="rows of the synthetic unified table")
    parser.add_argument("--hot-rows-mb", type=float, default=64.0, help="tier-1 budget for the hit-rate figure")
    parser.add_argument("--hot-batches", type=int, default=4000, help="batches of Zipf traffic (first quarter warms up)")
    scale = parser.add_argument_group("scale phase", "a 100 M-row bundle, 1 and 2 workers, ranking requests "
                                      "(uembed/loadtest/scale_bench.py); --examples sets the flat requests' size")  # fmt: skip
    scale.add_argument("--scale-bundle", type=Path, help="a synthetic Criteo-shaped bundle already written (skips writing one)")
    scale.add_argument("--scale-dir", type=Path, help="where to write the bundle (default: the run's temporary folder)")
    scale.add_argument("--scale-rows", type=int, default=100_000_000, help="rows of the unified table")
    scale.add_argument("--scale-dtype", choices=ROW_DTYPES, default="float16", help="row dtype")
    scale.add_argument("--scale-zipf", type=float, default=1.05, help="Zipf exponent of each feature's values")
    scale.add_argument("--scale-candidates", type=int, default=500, help="candidates per ranking request")
    scale.add_argument("--scale-workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    ranking = parser.add_argument_group("ranking phase", "one MovieLens user x N candidate movies as a ranking request "
                                        "against the same examples flat, on --bundle or the demo bundle (split by the "
                                        "user's features): unloaded, saturated, paired rounds (uembed/loadtest/ranking_bench.py)")  # fmt: skip
    ranking.add_argument("--ranking-candidates", type=int, default=500, help="candidates per ranking request")
    ranking.add_argument("--ranking-workers", type=int, nargs="+", default=[1], help="worker counts to measure")
    peers = parser.add_argument_group("peers phase", "each front closed loop at --concurrency connections for --seconds, "
                                      "then open loop at half its saturated rate (at 64 examples)")  # fmt: skip
    peers.add_argument("--peer-sizes", type=int, nargs="+", default=[8, 64, 512], help="examples per request")
    peers.add_argument("--peer-workers", type=int, nargs="+", default=[1, 2], help="worker counts of every server")
    peers.add_argument("--peer-fronts", nargs="+", choices=PEER_FRONTS, default=list(PEER_FRONTS),
                       help="what to measure (ceiling: the scoring work in-process; grpc: loaded in wrk's shape by "
                       "uembed/loadtest/grpc_frames.py, and by h2load too where installed; grpc_aio: by Python grpc.aio "
                       "clients); e.g. v1 grpc perf_analyzer for the "
                       "gRPC-over-REST ratio alone")  # fmt: skip
    gpu = parser.add_argument_group("gpu phase", "the CUDA path beside the CPU path (uembed/loadtest/gpu_bench.py)")
    gpu.add_argument("--gpu-table-rows", type=int, default=100_000_000, help="rows of the synthetic Criteo-shaped table")
    gpu.add_argument("--gpu-hot-gib", type=float, default=3.0, help="device tier-1 size, GiB of float32 rows "
                     "(the CPU path gets as many rows)")  # fmt: skip
    gpu.add_argument("--gpu-batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096, 8192], help="examples per batch")
    gpu.add_argument("--gpu-batches", type=int, default=40, help="measured batches per batch size and path")
    gpu.add_argument("--gpu-warm-batches", type=int, default=150, help="batches of the largest size that warm both tiers first")
    gpu.add_argument("--gpu-zipf", type=float, default=1.05, help="Zipf exponent of each feature's values")
    gpu.add_argument("--gpu-bundle", type=Path, help="a synthetic bundle already written (skips writing the table)")
    codecs = parser.add_argument_group(
        "codecs and hybrid phases", "bundles of one model served at once and saturated in turn, round after round "
        "(uembed/loadtest/codec_bench.py); --seconds per bundle and round, --workers per server")  # fmt: skip
    codecs.add_argument("--codecs", nargs="+", choices=ROW_DTYPES, default=["float16", "int4"],
                        help="row codecs to compare; the first is the reference of the ratios")  # fmt: skip
    codecs.add_argument("--codec-models", nargs="+", choices=("demo", "scale"), default=["demo"],
                        help="demo: a MovieLens run exported in each codec; scale: the Criteo-shaped synthetic bundle "
                        "(--scale-rows rows) written in each codec into --scale-dir, reused when already there")  # fmt: skip
    codecs.add_argument("--codec-hot-rows-mb", type=float, help="tier-1 budget of the codecs phase's servers (0: off, "
                        "every lookup decodes; default: the service's for demo, --hot-rows-mb for scale)")  # fmt: skip
    codecs.add_argument("--train-run", type=Path, help="the training run the demo codec bundles are exported from "
                        "(default: a MovieLens unified run of --bench-epochs epochs, trained in the run's folder)")  # fmt: skip
    codecs.add_argument("--bench-epochs", type=int, default=3, help="epochs of the MovieLens runs these phases train")
    codecs.add_argument("--rounds", type=int, default=3, help="rounds of saturating every bundle in turn")
    codecs.add_argument("--head-share", type=float, default=0.2, help="the hybrid run's share of head rows")
    codecs.add_argument("--hybrid-dtype", choices=ROW_DTYPES, default="float32", help="row codec of the hybrid phase's bundles")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON file of every figure")
    # The naive baseline runs TorchScript (train extra); the load side is the loadtest extra.
    parser.set_defaults(handler=run_bench_command, extras=("train", "loadtest"))


def run_bench_command(args: argparse.Namespace) -> int:
    from uembed.loadtest.bench import run_bench

    run_bench(args)
    return 0


def add_demo_bundle_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo-bundle",
        help="train and export the demo bundle if it is missing; print its path",
        description="The bundle `serve` uses when given none: MovieLens-100K, unified embedding at 10%, exported "
        "as <bundle-store>/movielens100k/<version>. Trains it (about 20 s, needs the train extra) only when no "
        "version exists yet. The compose stack runs this once to fill its bundle volume.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--bundle-store", type=Path, default=Path("bundles"), help="bundle store root")
    parser.set_defaults(handler=run_demo_bundle)


def run_demo_bundle(args: argparse.Namespace) -> int:
    from uembed.model.demo import demo_bundle

    print(demo_bundle(args.bundle_store))
    return 0


def add_stack_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "stack",
        help="run the local stack without Docker: redis-server, the service (or N replicas behind haproxy) and prometheus",
        description="Starts redis-server (deploy/redis/redis.conf), `uembed serve` with Redis as tier 2, and "
        "Prometheus (deploy/prometheus/prometheus.yml, pointed at these ports) from this machine's packages, "
        "then waits. With --replicas N, N `uembed serve` processes on free ports share the one Redis behind "
        "haproxy (deploy/haproxy/haproxy.cfg) on --port: health checks on /readyz, least-connections balancing, "
        "a request resent to another replica when its replica dies holding it; Prometheus scrapes each replica "
        "and haproxy's exporter, and a replica that exits is started again. Ctrl-C, SIGTERM or --seconds stops "
        "everything in reverse order. The state (URLs, each replica's ports and pid) is written to "
        "DIR/stack.json and each component logs to DIR. Needs redis-server, prometheus and (for replicas) "
        "haproxy: `make system-deps` installs them on Debian. Port 0 picks a free port.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--dir", type=Path, default=Path(".stack"), help="state, logs and Prometheus data")
    parser.add_argument("--bundle", action="append", type=Path, help="bundle to serve (default: the demo bundle)")
    parser.add_argument("--bundle-store", type=Path, help="root of <name>/<version>/ bundles (default ./bundles)")
    parser.add_argument("--port", type=int, default=8000, help="service port (haproxy's with --replicas above 1)")
    parser.add_argument("--replicas", type=int, default=1, help="service processes; above 1, behind haproxy")
    parser.add_argument("--haproxy-stats-port", type=int, default=8405,
                        help="haproxy's stats page, health URL and Prometheus metrics (with --replicas above 1)")  # fmt: skip
    parser.add_argument("--redis-port", type=int, default=6380, help="redis-server port")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="prometheus port")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of each service process")
    parser.add_argument("--redis-maxmemory", default="1gb", help="Redis memory cap (LFU eviction past it)")
    parser.add_argument("--seconds", type=float, default=0, help="stop by itself after this long (0: run until stopped)")
    parser.set_defaults(handler=run_stack_command, extras=("loadtest",))


def run_stack_command(args: argparse.Namespace) -> int:
    from uembed.loadtest.stack import run_stack

    if args.replicas < 1:
        raise UembedError(f"--replicas {args.replicas}: use 1 or more")

    return run_stack(args)


def add_loadtest_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "loadtest",
        help="load the service with locust (headless) and report requests/s, latency percentiles and failures",
        description="Runs locust headless (uembed/loadtest/locustfile.py) against --url for --seconds, then stops. "
        "Writes DIR/locust_stats.csv, locust_stats_history.csv, report.html and summary.json, and prints a "
        "summary; exits 1 if any request failed. --steps N runs a stepped ramp instead (uembed/loadtest/shapes.py) "
        "and --plot draws latency percentiles against offered load. Only loopback targets unless "
        "--allow-remote. Needs the loadtest extra (pip install 'uembed[loadtest]').",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    parser.add_argument("--seconds", type=float, default=60, help="run time (without --steps)")
    parser.add_argument("--users", type=int, default=16, help="concurrent users (without --steps)")
    parser.add_argument("--spawn-rate", type=float, default=4, help="users started per second (the ramp-up)")
    parser.add_argument("--scenario", choices=("zipf", "movielens"), default="zipf",
                        help="zipf: the served model's features with Zipf values; movielens: real examples")  # fmt: skip
    parser.add_argument("--examples", type=int, default=64, help="examples per request")
    parser.add_argument("--zipf-exponent", type=float, default=1.1, help="skew of the zipf values")
    parser.add_argument("--user-rate", type=float, default=0, help="requests/s per user (0: closed loop)")
    parser.add_argument("--model", help="model name (default: the service's default model)")
    parser.add_argument("--steps", type=int, default=0, help="stepped ramp: number of steps (0: constant users)")
    parser.add_argument("--step-users", type=int, default=4, help="users added per step")
    parser.add_argument("--step-seconds", type=float, default=20, help="seconds per step")
    parser.add_argument("--plot", type=Path, help="with --steps: PNG of latency percentiles against offered load")
    parser.add_argument("--out", type=Path, default=Path("loadtest-results"), help="reports directory")
    kill = parser.add_argument_group(
        "killing a replica", "against `uembed stack --replicas N`: SIGKILL one replica during the run; the summary "
        "gets the requests haproxy had in flight on it (from its counters), those it resent, the client's failures, "
        "when haproxy took the replica out and (once the stack restarted it) back, and the throughput before, during "
        "and after. Exit 1 only if more requests failed than were in flight on it (uembed/loadtest/failover.py)")  # fmt: skip
    kill.add_argument("--kill-replica", metavar="NAME", help="replica to kill, as stack.json names it (e.g. replica-2)")
    kill.add_argument("--kill-after", type=float, help="seconds into the run; none: half of it")
    kill.add_argument("--stack-dir", type=Path, default=Path(".stack"), help="the stack's --dir (its stack.json)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a target that is not loopback")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_loadtest_command, extras=("loadtest",))


def run_loadtest_command(args: argparse.Namespace) -> int:
    from uembed.loadtest.run import run_loadtest

    return run_loadtest(args)
