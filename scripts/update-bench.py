"""Row updates under load: how many rows/s a replica applies, and how long an update takes to be applied.

    flock /tmp/uembed-heavy.lock .venv/bin/python scripts/update-bench.py --rows 1M --seconds 10

Writes a synthetic bundle (Criteo's 26 features over one float16 table of --rows rows), starts redis-server and
one service replica (uvicorn, tier 2 on that Redis, UEMBED_ROW_UPDATES_URL set), and keeps --clients threads
posting requests of 64 Zipf examples throughout (after a 3-second warm-up). Then:

1. paced: one delta of --paced-rows random rows every 100 ms for --seconds: the publication -> application
   delay (the service's uembed_row_update_delay_seconds, p50 and p99) and the highest lag gauge seen;
2. burst: --burst-deltas deltas of 4,096 random rows published at once: rows applied per second, from the
   first XADD until the replica reports the last entry applied;
3. requests: count, rate, failures and p99 latency over phases 1 and 2, and over --seconds without updates before.
Prints one JSON object; docs/UPDATES.md quotes it.
"""

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from uembed.bundle.format import encode_records
from uembed.bundle.loader import load_bundle
from uembed.bundle.synthetic import criteo_features, write_synthetic_bundle
from uembed.cli.model_commands import count
from uembed.loadtest.servers import RedisServer, UvicornProcess
from uembed.loadtest.traffic import ZipfExamples, served_features
from uembed.serving.rows.updates import encode_delta, publish_entries, stream_key


def quantile_between(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float:
    """The upper bound of the histogram bucket holding quantile ``q`` of what was observed between two scrapes."""
    buckets = sorted((float(k.split('le="')[1].rstrip('"}')), v - before.get(k, 0)) for k, v in after.items() if k.startswith(f"{name}_bucket"))
    total = buckets[-1][1]
    return next(le for le, seen in buckets if seen >= q * total) if total else float("nan")


class Load:
    def __init__(self, url: str, clients: int) -> None:
        _, features = served_features(url)
        self.url, self.features = url, features
        self.stop_event = threading.Event()
        self.latencies: list[float] = []
        self.failures = 0
        self.threads = [threading.Thread(target=self.run, args=(seed,), daemon=True) for seed in range(clients)]

    def run(self, seed: int) -> None:
        traffic = ZipfExamples(self.features, seed=seed)
        with httpx.Client(timeout=10) as client:
            while not self.stop_event.is_set():
                sent = time.perf_counter()
                ok = client.post(f"{self.url}/v1/score", json={"examples": traffic.batch(64)}).status_code == 200
                self.latencies.append(time.perf_counter() - sent)
                self.failures += not ok

    def measure(self, work) -> dict:
        self.latencies, self.failures = [], 0
        started = time.perf_counter()
        for thread in self.threads:
            thread.start()
        try:
            work()
        finally:
            self.stop_event.set()
            for thread in self.threads:
                thread.join()
        seconds = time.perf_counter() - started
        return {"requests": len(self.latencies), "requests_per_s": round(len(self.latencies) / seconds, 1), "failed": self.failures, "p99_ms": round(float(np.percentile(self.latencies, 99)) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=count, default=1_000_000, help="table rows of the synthetic bundle")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced phase and of the baseline")
    parser.add_argument("--paced-rows", type=int, default=1000, help="rows per delta in the paced phase (10 deltas/s)")
    parser.add_argument("--burst-deltas", type=int, default=100, help="deltas of 4,096 rows in the burst")
    parser.add_argument("--clients", type=int, default=4, help="request threads")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        path = write_synthetic_bundle(work / "bundles", "synth", criteo_features(), args.rows, progress=False)
        bundle = load_bundle(path)
        table = bundle.tables["unified"]
        redis_server = RedisServer(work).start()
        env = {"UEMBED_BUNDLES": str(path), "UEMBED_REDIS_URL": redis_server.url, "UEMBED_ROW_UPDATES_URL": redis_server.url}
        service = UvicornProcess("uembed.serving.app:create_app", env, work / "service.log").start()
        client = redis_server.client()
        key = stream_key("uembed", "synth", "1")
        rng = np.random.default_rng(0)

        def delta(rows: int) -> dict:
            ids = np.sort(rng.choice(table.rows, size=rows, replace=False))
            records = encode_records(rng.normal(scale=0.1, size=(rows, table.dim)), table.dtype)
            return encode_delta("synth", "1", bundle.tables, {"unified": (ids, records)}, "update-bench")

        def applied(last_id: str) -> bool:
            models = httpx.get(f"{service.url}/v1/models", timeout=10).json()["models"]
            return models[0]["row_updates"]["applied_id"] == last_id

        try:
            Load(service.url, args.clients).measure(lambda: time.sleep(3))  # warm-up: tier 1 and the value caches fill
            baseline = Load(service.url, args.clients).measure(lambda: time.sleep(args.seconds))
            lag_seen = [0.0]
            burst, scrapes = {}, {}

            def updates() -> None:
                deadline = time.monotonic() + args.seconds
                while time.monotonic() < deadline:
                    publish_entries(client, key, [delta(args.paced_rows)], 100_000)
                    lag_seen[0] = max(lag_seen[0], service.metrics().get('uembed_row_update_lag_seconds{model="synth",version="1"}', 0))
                    time.sleep(0.1)
                scrapes["paced"] = service.metrics()
                entries = [delta(4096) for _ in range(args.burst_deltas)]
                started = time.perf_counter()
                last_id = publish_entries(client, key, entries, 100_000)[-1]
                while not applied(last_id):
                    time.sleep(0.005)
                seconds = time.perf_counter() - started
                burst.update(rows=4096 * args.burst_deltas, seconds=round(seconds, 3), rows_per_s=round(4096 * args.burst_deltas / seconds))

            scrapes["before"] = service.metrics()
            under_updates = Load(service.url, args.clients).measure(updates)
            metrics = service.metrics()
            delay = "uembed_row_update_delay_seconds"
            print(json.dumps({
                "rows": args.rows, "dtype": table.dtype, "clients": args.clients,
                "paced": {"deltas_per_s": 10, "rows_per_delta": args.paced_rows,
                          "delay_p50_s": quantile_between(scrapes["before"], scrapes["paced"], delay, 0.5),
                          "delay_p99_s": quantile_between(scrapes["before"], scrapes["paced"], delay, 0.99),
                          "lag_max_s": lag_seen[0]},
                "burst": burst,
                "requests_with_updates": under_updates, "requests_without_updates": baseline,
                "overlay_rows": metrics['uembed_row_overlay_rows{model="synth",table="unified"}'],
                "deltas_applied": metrics['uembed_row_updates_total{model="synth",outcome="applied",reason="",version="1"}']
                - scrapes["before"]['uembed_row_updates_total{model="synth",outcome="applied",reason="",version="1"}'],
            }, indent=2))  # fmt: skip
        finally:
            service.stop()
            redis_server.stop()


if __name__ == "__main__":
    main()
