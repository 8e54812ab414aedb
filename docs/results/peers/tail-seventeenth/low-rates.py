"""The service's CPU a call and latency at a few low rates (requests at evenly spaced times, 6 s each), and its CPU
when idle:

    .venv/bin/python docs/results/peers/tail-seventeenth/low-rates.py
"""
import time, orjson, tempfile
from pathlib import Path
from uembed.loadtest.load import movielens_requests, run_load
from uembed.loadtest.peers import cpu_split, process_cpu_seconds
from uembed.loadtest.servers import UvicornProcess
bodies = [orjson.dumps({"model": "movielens100k", "examples": ex}) for ex in movielens_requests(64, 200)]
s = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": "bundles/movielens100k/1"}, Path(tempfile.mkdtemp()) / "s.log").start()
try:
    run_load(s.url, bodies, 2, 8, rate=500)
    a = process_cpu_seconds(s); time.sleep(5); b = process_cpu_seconds(s)
    print("idle: CPU s over 5 s", round(sum(b.values()) - sum(a.values()), 3))
    for rate in (50, 200, 600, 1500):
        r = cpu_split(s, lambda: run_load(s.url, bodies, 6, 8, rate=rate).summary())
        print(rate, r["server_cpu_ms_per_call"], r["p50_ms"], r["p99_ms"], r["worker_cpu_s"])
finally:
    s.stop()
