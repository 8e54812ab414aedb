"""The half-load client at RATE requests/s on the service for 8 s, each request timed from its scheduled time; the
slowest 1% grouped into clusters (within 5 ms of each other). NOGC=1 turns the client's collector off.

    .venv/bin/python docs/results/peers/tail-seventeenth/clients/stall-clusters.py 1500 [UEMBED_SETTING=VALUE ...]
"""
import sys, time, threading, http.client, json
from pathlib import Path
import numpy as np, orjson
from uembed.loadtest.load import movielens_requests, post, run_load
from uembed.loadtest.servers import UvicornProcess
env = {"UEMBED_BUNDLES": "bundles/movielens100k/1", **dict(kv.split('=') for kv in sys.argv[2:])}
rate = float(sys.argv[1]); seconds = 8
bodies = [orjson.dumps({"model": "movielens100k", "examples": ex}) for ex in movielens_requests(64, 200)]
server = UvicornProcess("uembed.serving.app:create_app", env, Path("/tmp/stall-clusters.log")).start()
host, port = server.url.removeprefix("http://").split(":")
try:
    run_load(server.url, bodies, 2, 8, rate=rate)
    import gc; gc.collect(); gc.freeze(); gc.disable() if "NOGC" in __import__("os").environ else None
    counter = iter(range(10**9)); lock = threading.Lock(); rec = []
    start = time.perf_counter() + 0.05; stop = start + seconds
    def worker(seed):
        c = http.client.HTTPConnection(host, int(port)); local = []
        while True:
            i = next(counter); s = start + i / rate
            d = s - time.perf_counter()
            if d > 0: time.sleep(d)
            if s >= stop: break
            post(c, bodies[i % 200]); local.append((s - start, time.perf_counter() - s))
        with lock: rec.extend(local)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    [t.start() for t in ts]; [t.join() for t in ts]
finally:
    server.stop()
rec.sort(); a = np.array(rec)
lat = a[:, 1] * 1000
print('p50 %.2f p95 %.2f p99 %.2f max %.2f' % tuple(np.percentile(lat, [50, 95, 99, 100])))
thr = np.percentile(lat, 99)
slow = a[lat >= thr]
# cluster slow requests within 5 ms
clusters = []
for t, l in slow:
    if clusters and t - clusters[-1][1] < 0.005: clusters[-1][1] = t; clusters[-1][2] += 1; clusters[-1][3] = max(clusters[-1][3], l)
    else: clusters.append([t, t, 1, l])
print(len(slow), 'slow in', len(clusters), 'clusters')
for c in clusters[:40]: print('  at %.3f s  span %.1f ms  n %d  max %.1f ms' % (c[0], (c[1]-c[0])*1000, c[2], c[3]*1000))
