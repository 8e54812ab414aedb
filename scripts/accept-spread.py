"""How a client's connections spread over the service's workers: uvicorn's own event loop against the one `uembed
serve` gives its workers (uembed/serving/accepts.py), side by side; with ``--grpc``, the gRPC port's socket a worker
(SO_REUSEPORT: the kernel picks) against the one socket `uembed serve` hands its workers.

    .venv/bin/python scripts/accept-spread.py [--grpc] [--workers 2] [--bursts 10] [--connections 8] [--rate 4000] [--out F.json]

For each loop, taking turns for ``--rounds`` rounds, one service of ``--workers`` workers on the demo bundle:
- ``--bursts`` times, ``--connections`` connections opened at once (a pool's burst), each answered once, then
  counted by worker (psutil) and closed;
- one open-loop run at ``--rate`` requests/s (64 real MovieLens examples a request, one thread a connection, as
  ``uembed bench --peers`` runs its half load): its p50 and p99, and each worker's CPU seconds.
With ``--grpc`` the bursts open gRPC connections (an HTTP/2 preface each, answered by the server's SETTINGS), and
the open loop is ``uembed bench --peers``' grpc.aio client (two processes of two channels: four connections) at
``--rate`` calls/s; the services: plain ``uvicorn --workers`` (a gRPC socket a worker, as `uembed serve` had before)
and ``uembed serve``. Prints a line per loop and round, and the whole as JSON. Run it alone.
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

from uembed.bundle.loader import load_bundle  # noqa: E402
from uembed.loadtest.load import movielens_requests, run_load  # noqa: E402
from uembed.loadtest.peers import cpu_split, grpc_load, grpc_request  # noqa: E402
from uembed.loadtest.servers import (  # noqa: E402
    SERVICE_APP,
    SERVICE_LOOP,
    HttpProcess,
    UvicornProcess,
    free_port,
    wait_until,
    worker_pids,
)
from uembed.model.demo import demo_bundle  # noqa: E402

LOOPS = {"uvicorn": "auto", "balanced": SERVICE_LOOP}
GRPC_SERVERS = ("socket_a_worker", "uembed_serve")
# a client's HTTP/2 connection preface, and its (empty) SETTINGS frame
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def connections_by_worker(service: HttpProcess, port: int | None = None) -> list[int]:
    held = [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == (port or service.port)
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


def grpc_bursts(service: HttpProcess, port: int, count: int, connections: int) -> list[list[int]]:
    splits = []
    for _ in range(count):
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
        for client in clients:
            client.sendall(HTTP2_PREFACE)
        for client in clients:
            assert client.recv(9)[3:4] == b"\x04", "the server's SETTINGS"
        splits.append(connections_by_worker(service, port))
        for client in clients:
            client.close()
        wait_until(lambda: sum(connections_by_worker(service, port)) == 0, 10, "the burst's connections closed")
    return splits


def grpc_service(kind: str, bundle: Path, workers: int, log: Path) -> tuple[HttpProcess, int]:
    """The service of ``kind`` on the demo bundle, and its gRPC port."""
    if kind == "socket_a_worker":
        service = UvicornProcess(SERVICE_APP, {"UEMBED_BUNDLES": str(bundle)}, log, workers=workers).start()
        return service, service.grpc_port
    port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "uembed", "serve", "--bundle", str(bundle), "--port", str(port), "--grpc-port",
            str(grpc_port), "--workers", str(workers)]  # fmt: skip
    service = HttpProcess(argv, {}, log, f"http://127.0.0.1:{port}/readyz", "uembed serve").start()
    service.port = port
    return service, grpc_port


def grpc_rounds(args, bundle: Path, workdir: Path, results: dict) -> None:
    loaded = load_bundle(bundle)
    calls = [grpc_request(loaded.name, r, loaded.feature_specs) for r in movielens_requests(64, count=200)]
    for round_ in range(args.rounds):
        for kind in GRPC_SERVERS:
            service, grpc_port = grpc_service(kind, bundle, args.workers, workdir / f"{kind}.log")
            target = f"127.0.0.1:{grpc_port}"
            results["rounds"].append(measured(
                service, args.workers, {"grpc_server": kind, "round": round_},
                warm_up=lambda: grpc_load(target, calls, 1.0, rate=args.rate),
                take_bursts=lambda: grpc_bursts(service, grpc_port, args.bursts, args.connections),
                load=lambda: grpc_load(target, calls, args.seconds, rate=args.rate)))  # fmt: skip


def measured(service: HttpProcess, workers: int, labels: dict, warm_up, take_bursts, load) -> dict:
    """A started service's bursts and open loop (``load()``, with each worker's CPU), printed; the service stopped."""
    try:
        wait_until(lambda: len(worker_pids(service)) == workers, 60, "the workers")
        time.sleep(1.0)  # every worker listening (its start is complete before it accepts)
        warm_up()
        splits = take_bursts()
        loaded = cpu_split(service, load)
        figures = labels | {"bursts": splits,
                            "open_loop": {k: loaded[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "worker_cpu_s", "failures")}}  # fmt: skip
    finally:
        service.stop()
    print(json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", action="store_true", help="the gRPC port's spread (a socket a worker, or one shared)")
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
    for round_ in range(0 if args.grpc else args.rounds):
        for name, loop in LOOPS.items():
            service = UvicornProcess(SERVICE_APP, {"UEMBED_BUNDLES": str(bundle)}, workdir / f"{name}.log",
                                     workers=args.workers, loop=loop).start()  # fmt: skip
            results["rounds"].append(measured(
                service, args.workers, {"loop": name, "round": round_},
                warm_up=lambda: run_load(service.url, bodies, 1.0, args.connections),
                take_bursts=lambda: bursts(service, args.bursts, args.connections),
                load=lambda: run_load(service.url, bodies, args.seconds, args.connections, rate=args.rate).summary()))  # fmt: skip
    if args.grpc:
        grpc_rounds(args, bundle, workdir, results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
