"""``uembed bench``: the service's speed and memory figures, measured side by side in one run.

Phases (each prints its figures; all go to a JSON file):

1. ceiling    the same canonicalise + hash + lookup + assemble + dense work per request, in a loop, no HTTP
2. service    HTTP throughput at saturation (closed loop), unloaded p50, and p50/p99 at half saturation (open loop)
3. naive      a naive FastAPI service (TorchScript once per request, no batching, no cache) at saturation
4. redis      Redis memory per cached row (INFO memory over N rows) in our hash layout, and a key per row
5. hot tier   tier-1 hit rate for Zipf(1.1) traffic over a synthetic 10M-row unified table
6. scale      (asked for by name) a 100M-row Criteo-shaped bundle on 1 and 2 workers: start-up, cold and
              warm latency, ranking (1 context x 500 candidates) against flat requests, tiers, RSS/PSS per
              worker, beside the naive design's full tables per worker: ``uembed/loadtest/scale_bench.py``
7. gpu        (asked for by name; needs a CUDA device) the CUDA path beside the CPU path over a 100M-row
              Criteo-shaped table: ``uembed/loadtest/gpu_bench.py``
8. ranking    (asked for by name) one MovieLens user x 500 movies as a ranking request against the same examples
              flat, on the demo bundle (split by the user's features): ``uembed/loadtest/ranking_bench.py``
9. peers      (asked for by name, or ``--peers``) the request path beside its peers: REST v1, REST v2 and gRPC
              against LitServe and the naive service, 1 and 2 workers, 8/64/512 examples: ``uembed/loadtest/peers.py``
10. codecs    (asked for by name) one model's bundles in several row codecs (``--codecs``), the demo model's and/or
              the 100M-row scale bundle's, served at once and saturated in turn: requests/s and CPU a request
              against the first codec's, row-file bytes, each worker's RSS/PSS/private bytes
11. hybrid    (asked for by name) a hybrid run (``--head-share``) against a plain unified run of the same rows, the
              same way: ``uembed/loadtest/codec_bench.py``

Requests carry 64 real MovieLens-100K examples. Server and load generator share this
machine over loopback (the generator is threads on keep-alive connections).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from uembed.bundle.loader import TableRows
from uembed.contract.hashing import lookup_seed, rows_of
from uembed.loadtest.codec_bench import check_args, run_codec_bench, run_hybrid_bench
from uembed.loadtest.gpu_bench import run_gpu_bench
from uembed.loadtest.load import ceiling, http_phase, movielens_requests
from uembed.loadtest.peers import run_peers
from uembed.loadtest.ranking_bench import check_ranking_args, run_ranking_bench
from uembed.loadtest.scale_bench import run_scale_bench
from uembed.loadtest.servers import RedisServer
from uembed.loadtest.traffic import zipf_cdf, zipf_ranks
from uembed.model.demo import demo_bundle
from uembed.serving.rows.redis import RedisTier
from uembed.serving.rows.store import TableStore


def redis_memory(rows: int, workdir: Path, dim: int = 16) -> dict:
    """Bytes Redis uses per cached float32 row: our hash buckets, and for contrast a key per row."""

    records = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32).view(np.uint8)
    server = RedisServer(workdir).start()
    try:
        client = server.client()
        base = client.info("memory")["used_memory"]
        tier = RedisTier(server.url, timeout_s=5, retry_s=1, bucket_rows=64, fill_queue=0)
        for start in tqdm(range(0, rows, 65536), desc="redis: hash buckets", unit="chunk", leave=False):
            ids = np.arange(start, min(start + 65536, rows))
            tier.write("bench:1:unified", ids, records[ids])
        hashed = client.info("memory")["used_memory"] - base
        encodings = {client.object("encoding", f"bench:1:unified:{b}") for b in (0, rows // 128, rows // 64 - 1)}
        client.flushall()
        base = client.info("memory")["used_memory"]
        sample = min(rows, 200_000)
        pipe = client.pipeline(transaction=False)
        for row in range(sample):
            pipe.set(f"bench:1:unified:{row}", records[row].tobytes())
            if row % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
        per_key = (client.info("memory")["used_memory"] - base) / sample
        tier.close()
    finally:
        server.stop()
    row_bytes = dim * 4
    return {
        "rows": rows, "row_bytes": row_bytes, "bucket_rows": 64, "encodings": sorted(e.decode() for e in encodings),
        "bytes_per_row": round(hashed / rows, 1), "ratio_to_row": round(hashed / rows / row_bytes, 2),
        "key_per_row_bytes_per_row": round(per_key, 1), "key_per_row_ratio": round(per_key / row_bytes, 2),
    }  # fmt: skip


def hot_tier_hit_rate(table_rows: int, hot_bytes: int, batches: int, workdir: Path, exponent: float = 1.1,
                      features: int = 8, examples: int = 64, dim: int = 16) -> dict:  # fmt: skip
    """Tier-1 hit rate of a unified table fed Zipf(exponent) values of ``features`` features, hashed by the contract."""

    path = workdir / "unified.npy"
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(table_rows, dim))
    for start in range(0, table_rows, 1 << 20):
        stop = min(start + (1 << 20), table_rows)
        table[start:stop] = np.random.default_rng(start).normal(size=(stop - start, dim))
    table.flush()
    rows = TableRows("unified", table_rows, dim, "float32", np.load(path, mmap_mode="r"))
    store = TableStore(rows, "bench", hot_bytes=hot_bytes)
    rng = np.random.default_rng(0)
    cdf = zipf_cdf(table_rows, exponent)
    seeds = [np.uint64(lookup_seed(f"f{i}")) for i in range(features)]
    warm = batches // 4
    hits = lookups = 0
    started = time.perf_counter()
    for batch in tqdm(range(batches), desc="hot tier: zipf batches", unit="batch", leave=False):
        ranks = zipf_ranks(rng, cdf, examples * features).reshape(features, examples).astype(np.uint64)
        # A value's key: a cheap stand-in for hashing its bytes (rank mixed with the feature's seed).
        keys = np.concatenate([(r * np.uint64(0x9E3779B97F4A7C15)) ^ s for r, s in zip(ranks, seeds)])
        ids = np.unique(rows_of(keys, table_rows))
        store.gather(ids)
        counts = store.take_counts()
        if batch >= warm:
            hits += counts.hits["hot"]
            lookups += len(ids)
    elapsed = time.perf_counter() - started
    return {
        "table_rows": table_rows, "hot_bytes": hot_bytes, "hot_rows": store.hot.capacity, "zipf_exponent": exponent,
        "features": features, "examples_per_batch": examples, "batches_measured": batches - warm,
        "hit_rate": round(hits / max(lookups, 1), 4), "batches_per_s": round(batches / elapsed, 1),
    }  # fmt: skip


def run_bench(args) -> dict:
    check_args(args)
    check_ranking_args(args)
    results: dict = {"examples_per_request": args.examples, "seconds_per_phase": args.seconds}
    workdir = Path(tempfile.mkdtemp(prefix="uembed-bench-"))
    phases = set(args.phases)

    def report(name: str, figures: dict) -> None:
        results[name] = figures
        print(f"{name}: {json.dumps(figures)}", flush=True)

    if "service" in phases:
        bundle = args.bundle or demo_bundle(args.bundle_store)
        results["bundle"] = str(bundle)
        requests = movielens_requests(args.examples)
        bodies = [json.dumps({"examples": r}).encode() for r in requests]
        report("ceiling", ceiling(bundle, requests, args.seconds))
        env = {"UEMBED_BUNDLES": str(bundle)}
        report("service", http_phase("uembed.serving.app:create_app", env, bodies, args.seconds, args.concurrency, workdir, True))
        if args.workers > 1:
            report(f"service_{args.workers}_workers", http_phase(
                "uembed.serving.app:create_app", env, bodies, args.seconds, args.concurrency, workdir, False, args.workers))  # fmt: skip
        report("naive", http_phase("uembed.loadtest.naive_app:create_app", {"NAIVE_BUNDLE": str(bundle)}, bodies,
                                   args.seconds, args.concurrency, workdir, False))  # fmt: skip
        service, ceiling_rps = results["service"], results["ceiling"]["requests_per_s"]
        report("ratios", {
            "service_over_ceiling": round(service["saturated"]["requests_per_s"] / ceiling_rps, 3),
            "service_over_naive": round(service["saturated"]["requests_per_s"] / results["naive"]["saturated"]["requests_per_s"], 2),
            "p99_at_half_over_unloaded_p50": round(service["half_saturation"]["p99_ms"] / service["unloaded"]["p50_ms"], 2),
        })  # fmt: skip
    if "redis" in phases:
        report("redis_memory", redis_memory(args.redis_rows, workdir))
    if "hot" in phases:
        report("hot_tier", hot_tier_hit_rate(args.table_rows, int(args.hot_rows_mb * 2**20), args.hot_batches, workdir))
    if "scale" in phases:
        run_scale_bench(args, workdir, report)
    if "ranking" in phases:
        run_ranking_bench(args, args.bundle or demo_bundle(args.bundle_store), workdir, report)
    if "peers" in phases:
        run_peers(args, workdir, report)
    if "codecs" in phases:
        run_codec_bench(args, workdir, report)
    if "hybrid" in phases:
        run_hybrid_bench(args, workdir, report)
    if "gpu" in phases:
        run_gpu_bench(workdir, args.gpu_table_rows, args.gpu_hot_gib, args.gpu_batch_sizes, args.gpu_batches,
                      args.gpu_warm_batches, args.gpu_zipf, args.gpu_bundle, report)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results
