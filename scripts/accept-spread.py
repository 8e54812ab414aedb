"""How a client's connections spread over the service's workers: uvicorn's own event loop against the one `uembed
serve` gives its workers (uembed/serving/accepts.py), side by side.

    .venv/bin/python scripts/accept-spread.py [--workers 2] [--bursts 10] [--connections 8] [--rate 4000] [--out F.json]

For each loop, taking turns for ``--rounds`` rounds, one service of ``--workers`` workers on the demo bundle:
- ``--bursts`` times, ``--connections`` connections opened at once (a pool's burst), each answered once, then
  counted by worker (psutil) and closed;
- one open-loop run at ``--rate`` requests/s (64 real MovieLens examples a request, one thread a connection, as
  ``uembed bench --peers`` runs its half load): its p50 and p99, and each worker's CPU seconds.
Prints a line per loop and round, and the whole as JSON. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uembed.loadtest.load import movielens_requests, run_load  # noqa: E402
from uembed.loadtest.peers import cpu_split  # noqa: E402
from uembed.loadtest.servers import SERVICE_APP, SERVICE_LOOP, UvicornProcess, wait_until, worker_pids  # noqa: E402
from uembed.model.demo import demo_bundle  # noqa: E402

LOOPS = {"uvicorn": "auto", "balanced": SERVICE_LOOP}


def connections_by_worker(service: UvicornProcess) -> list[int]:
    held = [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == service.port
                for c in psutil.Process(pid).net_connections("tcp"))  # fmt: skip
            for pid in worker_pids(service)]  # fmt: skip
    return sorted(held, reverse=True)


def bursts(service: UvicornProcess, count: int, connections: int) -> list[list[int]]:
    splits = []
    for _ in range(count):
        clients = [socket.create_connection(("127.0.0.1", service.port), timeout=10) for _ in range(connections)]
        for client in clients:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for client in clients:
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
        splits.append(connections_by_worker(service))
        for client in clients:
            client.close()
        wait_until(lambda: sum(connections_by_worker(service)) == 0, 10, "the burst's connections closed")
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bursts", type=int, default=10, help="bursts of connections a loop and round")
    parser.add_argument("--connections", type=int, default=8, help="connections a burst, and the open loop's threads")
    parser.add_argument("--rate", type=float, default=4000, help="the open loop's requests/s")
    parser.add_argument("--seconds", type=float, default=5, help="the open loop's length")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bundle = demo_bundle(ROOT / "bundles")
    bodies = [orjson.dumps({"examples": r}) for r in movielens_requests(64, count=200)]
    workdir = Path(tempfile.mkdtemp(prefix="accept-spread-"))
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": []}
    for round_ in range(args.rounds):
        for name, loop in LOOPS.items():
            service = UvicornProcess(SERVICE_APP, {"UEMBED_BUNDLES": str(bundle)}, workdir / f"{name}.log",
                                     workers=args.workers, loop=loop).start()  # fmt: skip
            try:
                wait_until(lambda: len(worker_pids(service)) == args.workers, 60, "the workers")
                time.sleep(1.0)  # every worker listening (its start is complete before it accepts)
                run_load(service.url, bodies, 1.0, args.connections)  # warm-up
                splits = bursts(service, args.bursts, args.connections)
                half = cpu_split(service, lambda: run_load(service.url, bodies, args.seconds, args.connections, rate=args.rate).summary())
                figures = {"loop": name, "round": round_, "bursts": splits,
                           "open_loop": {k: half[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "worker_cpu_s", "failures")}}  # fmt: skip
            finally:
                service.stop()
            print(json.dumps(figures), flush=True)
            results["rounds"].append(figures)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
