"""Requests a batch at RATE requests/s at even times for 6 s (the service's uembed_batch_examples_count before and
after), with the settings given (company-hold.patch applied for UEMBED_COMPANY_HOLD_MS):

    .venv/bin/python docs/results/peers/tail-seventeenth/company-hold/batch-count-probe.py 1500 UEMBED_COMPANY_HOLD_MS=1
"""
import sys, os, time, urllib.request, re, json
from pathlib import Path
from uembed.loadtest.load import movielens_requests, run_load
from uembed.loadtest.servers import UvicornProcess
import orjson
env = {"UEMBED_BUNDLES": "bundles/movielens100k/1", **dict(kv.split('=') for kv in sys.argv[2:])}
rate = float(sys.argv[1])
bodies = [orjson.dumps({"model": "movielens100k", "examples": ex}) for ex in movielens_requests(64, 200)]
server = UvicornProcess("uembed.serving.app:create_app", env, Path("/tmp/batch-count-probe.log")).start()
try:
    run_load(server.url, bodies, 2, 8, rate=rate)
    def scrape():
        text = urllib.request.urlopen(server.url + "/metrics").read().decode()
        c = float(re.search(r'^uembed_batch_examples_count(?:\{[^}]*\})? (\S+)', text, re.M).group(1))
        return c
    c0 = scrape(); t0 = time.process_time()
    r = run_load(server.url, bodies, 6, 8, rate=rate).summary()
    c1 = scrape()
    print(sys.argv[2:], rate, 'requests', r['requests'], 'batches', c1 - c0, 'req/batch', round(r['requests'] / (c1 - c0), 2), 'p50', r['p50_ms'], 'p99', r['p99_ms'])
finally:
    server.stop()
