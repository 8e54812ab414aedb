"""``uembed bench --phases scale``: a 100 M-row bundle served by 1 and 2 workers, beside the naive design.

The bundle is Criteo-shaped and synthetic (``uembed/bundle/synthetic.py``): 26 one-value features over ONE
unified table of ``--scale-rows`` rows x 16, float16 by default (3.2 GB at 100 M rows). Traffic is
Zipf(``--scale-zipf``) per feature over Criteo-Kaggle's vocabulary sizes, as hex strings like the
click logs'. A ranking request is one user's context (20 features) and 500 candidates (6 item
features: the columns with the largest vocabularies, as item ids have); the same examples also go
as a flat request of 500, and independent examples as flat requests of 64. The bundle's dense network is
split by the context's features (``uembed/bundle/dense_split.py``, as ``uembed export --context-features`` writes
it): a ranking request computes the context's part of the first layer once, both forms the same floats.

Figures, for each worker count:

  start-up   seconds from the process start to ``/healthz`` (the port is up: row files mapped, their
             sha256 checks running on a thread) and to ``/readyz`` (checks passed)
  cold       unloaded latency of ranking requests right after the row file is dropped from the page
             cache (``POSIX_FADV_DONTNEED``; pages a worker already mapped stay), p50/p99, and the tiers
  warm       after the row file is read back into the page cache (the steady state the start-up check
             leaves): unloaded p50/p99 and saturated requests/s of each request shape; the candidates
             form against the flat form of the same 500 examples: the two saturated phases, and the median
             ratio of three rounds that run the two in turn (requests/s; and the workers' CPU time a request,
             which the load generator sharing the cores does not skew)
  tiers      hit rates over the warm phases (hot: tier 1, of all lookups; file: the rest)
  memory     per worker RSS and PSS (``/proc/PID/smaps_rollup``: PSS splits shared file pages between
             the processes mapping them) and the row file's resident bytes (mincore)

The naive service (``uembed/loadtest/naive_app.py``: full float32 tables in every worker, no batching) runs
the flat shapes where its tables fit in memory; where they do not, the figure says so.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from uembed.bundle.synthetic import criteo_features, write_synthetic_bundle
from uembed.loadtest.gpu_bench import CRITEO_KAGGLE_VOCABULARY
from uembed.loadtest.load import run_load, unloaded
from uembed.loadtest.servers import UvicornProcess, http_get, wait_until, worker_pids
from uembed.loadtest.traffic import zipf_cdf, zipf_ranks

FEATURES = tuple(f"C{i}" for i in range(1, 27))
ITEM_FEATURES = ("C3", "C4", "C12", "C16", "C21", "C24")  # the largest vocabularies: item-like columns
CONTEXT_FEATURES = tuple(f for f in FEATURES if f not in ITEM_FEATURES)
GiB = 2**30


class CriteoRequests:
    """Zipf values per Criteo column, as 8-digit hex strings (rank mixed with the column, so columns differ)."""

    def __init__(self, exponent: float, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.cdfs = {f: zipf_cdf(size, exponent) for f, size in zip(FEATURES, CRITEO_KAGGLE_VOCABULARY)}

    def values(self, feature: str, count: int) -> list[str]:
        ranks = zipf_ranks(self.rng, self.cdfs[feature], count).astype(np.uint64)
        mixed = (ranks * np.uint64(0x9E3779B1) + np.uint64(FEATURES.index(feature))) & np.uint64(0xFFFFFFFF)
        return [f"{v:08x}" for v in mixed.tolist()]

    def context(self) -> dict[str, str]:
        return {f: self.values(f, 1)[0] for f in CONTEXT_FEATURES}

    def items(self, count: int) -> list[dict[str, str]]:
        columns = {f: self.values(f, count) for f in ITEM_FEATURES}
        return [{f: columns[f][i] for f in ITEM_FEATURES} for i in range(count)]

    def ranking(self, candidates: int) -> tuple[dict, list[dict]]:
        return self.context(), self.items(candidates)

    def flat(self, count: int) -> list[dict]:
        contexts = {f: self.values(f, count) for f in CONTEXT_FEATURES}
        items = self.items(count)
        return [{**{f: contexts[f][i] for f in CONTEXT_FEATURES}, **items[i]} for i in range(count)]


def request_bodies(exponent: float, candidates: int, flat_examples: int, count: int) -> dict[str, list[bytes]]:
    traffic = CriteoRequests(exponent)
    ranking = [traffic.ranking(candidates) for _ in range(count)]
    return {
        "ranking": [json.dumps({"context": c, "candidates": items}).encode() for c, items in ranking],
        "flat_same_examples": [json.dumps({"examples": [{**c, **item} for item in items]}).encode() for c, items in ranking],
        f"flat_{flat_examples}": [json.dumps({"examples": traffic.flat(flat_examples)}).encode() for _ in range(count)],
    }


def scale_bundle(path: Path | None, workdir: Path, rows: int, dtype: str) -> Path:
    if path is not None:
        return path
    return write_synthetic_bundle(workdir, "criteo-scale", criteo_features(), table_rows=rows, dtype=dtype,
                                  context_features=CONTEXT_FEATURES)  # fmt: skip


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (except pages a process has mapped and touched)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def read_through(path: Path, chunk: int = 64 << 20) -> None:
    """Read a file front to back, so its pages are in the page cache."""
    with path.open("rb", buffering=0) as handle:
        while handle.read(chunk):
            pass


def hit_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Share of the row lookups between two readings of the counters that each tier answered."""
    looked_up = sum(after[t] - before.get(t, 0.0) for t in after) or 1.0
    return {t: round((after[t] - before.get(t, 0.0)) / looked_up, 4) for t in after}


def memory_of(pid: int) -> dict[str, float]:
    """RSS, PSS and their anonymous and file parts, GiB, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return {
        "rss_gib": round(fields["Rss"] / GiB, 3),
        "pss_gib": round(fields["Pss"] / GiB, 3),
        "anonymous_gib": round(fields["Anonymous"] / GiB, 3),
        "pss_file_gib": round(fields.get("Pss_File", 0) / GiB, 3),
    }


def tier_counts(server: UvicornProcess) -> dict[str, float]:
    samples = server.metrics()
    return {tier: samples.get(f'uembed_row_cache_hits_total{{tier="{tier}"}}', 0.0) for tier in ("hot", "redis", "file")}


def file_resident(server: UvicornProcess) -> float:
    samples = server.metrics()
    return next((v for k, v in samples.items() if k.startswith("uembed_table_file_bytes") and 'state="resident"' in k), 0.0)


def start_timed(server: UvicornProcess, timeout_s: float = 600) -> dict[str, float]:
    """Start ``server`` and time /healthz and /readyz from the process start, /readyz of every worker: each new
    connection reaches one worker, and a worker still checking its row files answers 503 (the cold phase would
    reach it), so the service counts as ready once each worker (``worker`` in the body: its pid) has answered 200."""
    started = time.perf_counter()
    server.ready_url = f"{server.url}/healthz"
    server.start(timeout_s)
    live = time.perf_counter() - started
    ready_workers: set[int] = set()

    def every_worker_ready() -> bool:
        status, body = http_get(f"{server.url}/readyz", timeout_s=5)
        if status == 200:
            ready_workers.add(json.loads(body)["worker"])
        return len(ready_workers) >= server.workers

    wait_until(every_worker_ready, timeout_s, "readiness of every worker")
    return {"live_s": round(live, 2), "ready_s": round(time.perf_counter() - started, 2)}


def paired_rounds(url: str, ranking: list[bytes], flat: list[bytes], seconds: float, rounds: int,
                  concurrency: int, pids: list[int] = ()) -> list[dict[str, float]]:  # fmt: skip
    """The two forms of the same examples saturated in turn, ``rounds`` times: requests/s of each and their ratio per
    round. A machine's throughput drifts between minutes (docs/BENCHMARKS.md); a ratio taken within a round is steadier
    than one of two phases a minute apart. With ``pids`` (the workers), also the workers' CPU milliseconds a
    request of each form and their ratio: what a request costs the service, whatever share of the cores the load
    generator (on the same machine) takes from it."""
    out = []
    for _ in range(rounds):
        round_figures = {}
        for form, bodies in (("ranking", ranking), ("flat", flat)):
            cpu_before = cpu_seconds(pids)
            result = run_load(url, bodies, seconds, concurrency).summary()
            round_figures[form] = result["requests_per_s"]
            round_figures["requests"] = round_figures.get("requests", 0) + result["requests"]
            round_figures["failures"] = round_figures.get("failures", 0) + result["failures"]
            if pids:
                round_figures[f"{form}_cpu_ms"] = round((cpu_seconds(pids) - cpu_before) / max(result["requests"], 1) * 1000, 3)
        round_figures["ratio"] = round(round_figures["ranking"] / round_figures["flat"], 2)
        if pids:
            round_figures["cpu_ratio"] = round(round_figures["flat_cpu_ms"] / round_figures["ranking_cpu_ms"], 2)
        out.append(round_figures)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds the processes have used so far."""
    import psutil

    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def service_figures(bundle: Path, workers: int, bodies: dict[str, list[bytes]], seconds: float, workdir: Path,
                    hot_rows_mb: float) -> dict:  # fmt: skip
    env = {"UEMBED_BUNDLES": str(bundle), "UEMBED_HOT_ROWS_BYTES": str(int(hot_rows_mb * 2**20)),
           "UEMBED_MAX_EXAMPLES": "1024", "UEMBED_MAX_BODY_BYTES": str(16 * 2**20)}  # fmt: skip
    server = UvicornProcess("uembed.serving.app:create_app", env, workdir / f"scale-service-{workers}.log", workers=workers)
    out: dict = {"workers": workers}
    try:
        out["start_up"] = start_timed(server)
        row_file = bundle / "tables" / "unified.npy"
        evict(row_file)
        out["start_counts"] = tier_counts(server)
        out["row_file_resident_gib_after_evict"] = round(file_resident(server) / GiB, 3)
        cold = unloaded(server.url, bodies["ranking"], 100)
        out["cold_ranking_unloaded"] = cold.summary()
        out["cold_tier_hit_rates"] = hit_rates(out.pop("start_counts"), tier_counts(server))
        started = time.perf_counter()
        read_through(row_file)  # the steady state: the row file in the page cache, as the start-up check left it
        out["page_cache_fill_s"] = round(time.perf_counter() - started, 2)
        before = tier_counts(server)
        for shape, shape_bodies in bodies.items():
            concurrency = 16 if shape.startswith("flat_") and "same" not in shape else 8
            run_load(server.url, shape_bodies, 1.0, concurrency)  # warm-up of this shape
            out[f"{shape}_unloaded"] = unloaded(server.url, shape_bodies, 100).summary()
            out[f"{shape}_saturated"] = run_load(server.url, shape_bodies, seconds, concurrency).summary()
        out["candidates_over_flat_rounds"] = paired_rounds(server.url, bodies["ranking"], bodies["flat_same_examples"],
                                                           seconds / 2, rounds=3, concurrency=8, pids=worker_pids(server))  # fmt: skip
        out["tier_hit_rates"] = hit_rates(before, tier_counts(server))
        out["row_file_resident_gib"] = round(file_resident(server) / GiB, 3)
        out["memory_per_worker"] = [memory_of(pid) for pid in worker_pids(server)]
    finally:
        server.stop()
    return out


def naive_figures(bundle: Path, workers: int, bodies: dict[str, list[bytes]], seconds: float, workdir: Path,
                  table_bytes_float32: int) -> dict:  # fmt: skip
    import psutil

    available = psutil.virtual_memory().available
    needed = workers * table_bytes_float32
    if needed > 0.8 * available:
        return {"workers": workers, "skipped": f"needs {needed / GiB:.1f} GiB of float32 tables ({workers} x "
                f"{table_bytes_float32 / GiB:.1f}), {available / GiB:.1f} GiB available"}  # fmt: skip
    server = UvicornProcess("uembed.loadtest.naive_app:create_app", {"NAIVE_BUNDLE": str(bundle)},
                            workdir / f"scale-naive-{workers}.log", workers=workers)  # fmt: skip
    out: dict = {"workers": workers}
    try:
        out["start_up"] = start_timed(server)
        for shape in ("flat_same_examples", *[s for s in bodies if s.startswith("flat_") and "same" not in s]):
            concurrency = 8 if "same" in shape else 16
            run_load(server.url, bodies[shape], 1.0, concurrency)
            out[f"{shape}_unloaded"] = unloaded(server.url, bodies[shape], 50).summary()
            out[f"{shape}_saturated"] = run_load(server.url, bodies[shape], seconds, concurrency).summary()
        out["memory_per_worker"] = [memory_of(pid) for pid in worker_pids(server)]
    finally:
        server.stop()
    return out


def run_scale_bench(args, workdir: Path, report) -> None:
    bundle = scale_bundle(args.scale_bundle, Path(args.scale_dir or workdir), args.scale_rows, args.scale_dtype)
    manifest = json.loads((bundle / "manifest.json").read_text())
    table = manifest["tables"][0]
    report("scale_bundle", {"path": str(bundle), "rows": table["rows"], "dim": table["dim"], "dtype": table["dtype"],
                            "row_file_gib": round(table["bytes"] / GiB, 2)})  # fmt: skip
    bodies = request_bodies(args.scale_zipf, args.scale_candidates, args.examples, count=60)
    report("scale_requests", {"context_features": list(CONTEXT_FEATURES), "item_features": list(ITEM_FEATURES),
                              "candidates": args.scale_candidates, "flat_examples": args.examples,
                              "body_kib": {k: round(np.mean([len(b) for b in v]) / 1024, 1) for k, v in bodies.items()}})  # fmt: skip
    for workers in args.scale_workers:
        figures = service_figures(bundle, workers, bodies, args.seconds, workdir, args.hot_rows_mb)
        ranking = figures["ranking_saturated"]["requests_per_s"]
        flat = figures["flat_same_examples_saturated"]["requests_per_s"]
        figures["candidates_over_flat_phases"] = round(ranking / flat, 2)
        figures["candidates_over_flat"] = float(np.median([r["ratio"] for r in figures["candidates_over_flat_rounds"]]))
        figures["candidates_over_flat_worker_cpu"] = float(np.median([r["cpu_ratio"] for r in figures["candidates_over_flat_rounds"]]))
        report(f"scale_service_{workers}_workers", figures)
        naive = naive_figures(bundle, workers, bodies, args.seconds, workdir, table["rows"] * table["dim"] * 4)
        report(f"scale_naive_{workers}_workers", naive)
