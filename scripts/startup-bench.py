"""Start-up with and without verification stamps (#39, item 5): how long N workers take to have a large synthetic
bundle loaded and its row files checked (``load_bundle(defer_row_checks=True)`` then ``row_checks.wait()``, what a
worker does before /readyz answers 200, less the ONNX session and the one warm-up score).

    PYTHONPATH=. .venv/bin/python scripts/startup-bench.py --rows 100000000 --workers 1 2 [--drop-caches] [--serve]

Rounds, each in fresh processes started together (the time of the slowest):
    cold      no stamps (deleted first): every worker reads every row file, as before stamps
    stamped   the stamps the cold round wrote: the workers map the files and read none of them

With ``--serve``, each worker count also starts the service itself (uvicorn, ``uembed.serving.app``) on the bundle,
once without stamps and once with them, and times the process start to ``/healthz`` and to every worker's
``/readyz`` (``uembed/loadtest/scale_bench.py``'s ``start_timed``): the whole restart, ONNX sessions and warm-up
score included.

"Cold" means without stamps; the page cache is another matter. Dropping it (``--drop-caches``: sync, then 3 into
/proc/sys/vm/drop_caches) needs root, and the script says when it could not: the cold round then reads the files
from wherever they are cached. Each round prints how much of the row files was in memory when it started (mincore),
so a reader sees what was measured. Run it alone on the machine: other processes' I/O and CPU move the times.
Writes the bundle once (``--rows`` x 16 float16 values: 3.2 GB at 100 M rows) under ``--out`` and reuses it.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from uembed.bundle.loader import load_bundle
from uembed.bundle.stamps import STAMP_FILE, cache_file
from uembed.bundle.synthetic import criteo_features, write_synthetic_bundle

WORKER = """
import json, sys, time
from uembed.bundle.loader import load_bundle
started = time.perf_counter()
bundle = load_bundle(sys.argv[1], defer_row_checks=True)
bundle.row_checks.wait()
print(json.dumps({"ready_s": time.perf_counter() - started, "checked_bytes": bundle.row_checks.checked_bytes}))
"""


def drop_caches() -> str:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError as exc:
        return f"not dropped ({exc.strerror}: needs root)"


def resident(bundle: Path) -> int:
    loaded = load_bundle(bundle, defer_row_checks=True)  # maps the row files, reads none of them
    return sum(table.resident_bytes() for table in loaded.tables.values())


def round_of(bundle: Path, workers: int, drop: bool) -> dict:
    cache = drop_caches() if drop else "kept"
    before = resident(bundle)
    children = [subprocess.Popen([sys.executable, "-c", WORKER, str(bundle)], stdout=subprocess.PIPE, text=True)
                for _ in range(workers)]  # fmt: skip
    results = [json.loads(child.communicate()[0]) for child in children]
    if any(child.returncode for child in children):
        raise SystemExit("a worker failed to load the bundle")
    return {"workers": workers, "page_cache": cache, "resident_before_bytes": before,
            "ready_s": max(r["ready_s"] for r in results), "each_ready_s": [round(r["ready_s"], 3) for r in results]}  # fmt: skip


def serve_round(bundle: Path, workers: int, drop: bool, log: Path) -> dict:
    from uembed.loadtest.scale_bench import start_timed
    from uembed.loadtest.servers import UvicornProcess

    cache = drop_caches() if drop else "kept"
    before = resident(bundle)
    server = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(bundle)}, log, workers=workers)
    try:
        timed = start_timed(server)
    finally:
        server.stop()
    return {"workers": workers, "page_cache": cache, "resident_before_bytes": before} | timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("startup-bench-bundles"))
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each round (root)")
    parser.add_argument("--serve", action="store_true", help="also time the service's start to every worker's /readyz")
    args = parser.parse_args()
    bundle = args.out / f"rows{args.rows}" / "1"
    if not (bundle / "manifest.json").is_file():
        started = time.perf_counter()
        write_synthetic_bundle(args.out, f"rows{args.rows}", criteo_features(), args.rows, dtype=args.dtype)
        print(f"wrote {bundle} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    row_bytes = sum(f.stat().st_size for f in (bundle / "tables").iterdir())
    for workers in args.workers:
        for place in (bundle / STAMP_FILE, cache_file(bundle)):
            place.unlink(missing_ok=True)
        cold = round_of(bundle, workers, args.drop_caches)
        stamped = round_of(bundle, workers, args.drop_caches)
        figures = {"bundle": str(bundle), "row_file_bytes": row_bytes, "cold": cold, "stamped": stamped}
        if args.serve:
            for place in (bundle / STAMP_FILE, cache_file(bundle)):
                place.unlink(missing_ok=True)
            log = args.out / f"serve-{workers}w.log"
            figures["serve_cold"] = serve_round(bundle, workers, args.drop_caches, log)
            figures["serve_stamped"] = serve_round(bundle, workers, args.drop_caches, log)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
