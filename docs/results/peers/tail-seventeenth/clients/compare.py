"""The half-load client (load.run_load: eight threads) against a one-thread open-loop client (http_open.py: a timerfd,
epoll, latency from the scheduled time), on a server that answers at once (noop) or on the service, one after the other:

    .venv/bin/python docs/results/peers/tail-seventeenth/clients/compare.py noop 1800
    .venv/bin/python docs/results/peers/tail-seventeenth/clients/compare.py service 1500 1800
"""
import subprocess, sys, time, json, tempfile
from pathlib import Path
HERE = Path(__file__).resolve().parent
import orjson
from uembed.loadtest.load import movielens_requests, run_load, unloaded
from uembed.loadtest.servers import free_port, UvicornProcess
from uembed.loadtest.grpc_frames import write_bodies
bodies = [orjson.dumps({"model": "movielens100k", "examples": ex}) for ex in movielens_requests(64, 200)]
f = Path(tempfile.mkdtemp()) / "b.bin"; write_bodies(f, bodies)
if sys.argv[1] == "noop":
    port = free_port(); p = subprocess.Popen([sys.executable, str(HERE / "noop_server.py"), str(port)]); time.sleep(1)
    url = f"http://127.0.0.1:{port}"; stop = p.kill
else:
    s = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": "bundles/movielens100k/1"}, Path(tempfile.mkdtemp()) / "service.log").start()
    url = s.url; stop = s.stop
def frames(rate, seconds):
    out = subprocess.run([sys.executable, str(HERE / "http_open.py"), "--url", url, "--bodies", str(f), "--seconds", str(seconds), "--rate", str(rate)], capture_output=True, text=True)
    if out.returncode: print(out.stderr); raise SystemExit
    return json.loads(out.stdout)
try:
    run_load(url, bodies, 1, 8, rate=1000)
    print("threads unloaded", unloaded(url, bodies, 400).summary())
    print("open    unloaded", frames(0, 1))
    for rate in [float(r) for r in sys.argv[2:]]:
        print("threads", rate, run_load(url, bodies, 6, 8, rate=rate).summary())
        print("open   ", rate, frames(rate, 6))
finally:
    stop()
