"""np.unique of 768 random ids after sleeping (or spinning) a gap, 200 times a gap: wall and thread CPU time, and the
machine's steal ticks meanwhile (/proc/stat)."""
import time, numpy as np, os
ids = np.random.default_rng(0).integers(0, 10**6, 768)
def steal():
    f = open('/proc/stat').readline().split()
    return int(f[8])
for gap in (0, 0.0005, 0.002, 0.005, 0.02):
    walls, cpus = [], []
    s0 = steal()
    for _ in range(200):
        if gap: time.sleep(gap)
        t0 = time.perf_counter(); c0 = time.thread_time()
        np.unique(ids)
        walls.append(time.perf_counter() - t0); cpus.append(time.thread_time() - c0)
    print(f"gap {gap*1000:5.1f} ms: wall p50 {np.median(walls)*1e6:7.1f} us, thread cpu p50 {np.median(cpus)*1e6:7.1f} us, steal ticks {steal()-s0}")
# spin instead of sleep
for gap in (0.005, 0.02):
    walls = []
    for _ in range(100):
        until = time.perf_counter() + gap
        while time.perf_counter() < until: pass
        t0 = time.perf_counter(); np.unique(ids); walls.append(time.perf_counter() - t0)
    print(f"spin {gap*1000:5.1f} ms: wall p50 {np.median(walls)*1e6:7.1f} us")
