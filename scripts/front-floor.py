"""What a call costs the server's front alone (#39, gRPC against REST v1): a handler that does nothing, behind uvicorn,
behind grpcio's asyncio server and behind uvicorn's HTTP/2 as the service serves gRPC (``grpc_h2.py``), saturated the
way ``uembed bench --peers`` loaded the service until it took h2load for gRPC (wrk at 16 connections; the grpc.aio
client, now its ``grpc_aio`` front: 2 processes, 16 calls in flight) with the same 64-example bodies.

    .venv/bin/python scripts/front-floor.py [--seconds 8]

Prints, for each front, requests/s and the server process's CPU milliseconds a call. The no-op HTTP handler reads the
body and answers fixed JSON; the no-op gRPC one returns a fixed ModelInferResponse (grpcio still parses the request
and serialises the reply), once on grpcio's asyncio server (``UEMBED_GRPC_SERVER=grpcio``) and once on its thread-pool
server (1 and 4 threads), and once on uvicorn's HTTP/2 with the service's protocol (the gRPC framing by hand, as the
service's). Beside the service's own CPU a call in the peers phase, the difference between the two floors is what gRPC
costs more than REST v1 before any scoring work. Also the peers phase's open-loop load generator at ``--rate`` against
the no-op HTTP handler: the tail the generator itself adds at half load. Run it alone.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil

from uembed.bundle.loader import load_bundle
from uembed.loadtest.load import movielens_requests, run_load, unloaded
from uembed.loadtest.peers import grpc_load, grpc_request, wrk
from uembed.loadtest.servers import free_port, http_get, wait_until
from uembed.model.demo import demo_bundle

NOOP_HTTP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"scores":[0.5]}'})
"""

NOOP_GRPC = """
import asyncio, sys
import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

REPLY = service_pb2.ModelInferResponse(model_name="m", model_version="1", raw_output_contents=[bytes(256)])

class Noop(service_pb2_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):
        return REPLY

async def main():
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Noop(), server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


NOOP_GRPC_SYNC = """
import concurrent.futures, sys
import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

REPLY = service_pb2.ModelInferResponse(model_name="m", model_version="1", raw_output_contents=[bytes(256)])

class Noop(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ModelInfer(self, request, context):
        return REPLY

server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=int(sys.argv[2])))
service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Noop(), server)
server.add_insecure_port(sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


NOOP_GRPC_H2 = """
import asyncio, sys
import uvicorn
from tritonclient.grpc import service_pb2
from uembed.serving.protocols.http2 import RotatingHttp2

REPLY = service_pb2.ModelInferResponse(model_name="m", model_version="1", raw_output_contents=[bytes(256)])
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/grpc")], "trailers": True}
TRAILERS = {"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]}

async def app(scope, receive, send):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    service_pb2.ModelInferRequest.FromString(body[5:])  # the message after gRPC's 5-byte frame header
    reply = REPLY.SerializeToString()
    await send(START)
    await send({"type": "http.response.body", "body": b"\\0" + len(reply).to_bytes(4, "big") + reply})
    await send(TRAILERS)

async def main():
    config = uvicorn.Config(app, http="zttp", http2=True, lifespan="off", log_config=None, access_log=False)
    config.load()
    loop, state = asyncio.get_running_loop(), uvicorn.server.ServerState()
    host, port = sys.argv[1].rsplit(":", 1)
    await loop.create_server(lambda: RotatingHttp2(config=config, server_state=state, app_state={}, _loop=loop), host, int(port))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def measured(pid: int, load) -> dict:
    before = cpu_seconds(pid)
    figures = load()
    spent = cpu_seconds(pid) - before
    return {"requests_per_s": figures["requests_per_s"], "server_cpu_ms_per_call": round(spent / max(figures["requests"], 1) * 1000, 3),
            "failures": figures["failures"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=800.0, help="requests/s of the open loop against the no-op HTTP "
                        "handler (about half the service's saturated rate at 64 examples)")  # fmt: skip
    parser.add_argument("--bundle", type=Path, help="whose features the bodies carry (default: the demo bundle)")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle or demo_bundle(Path("bundles")))
    requests = movielens_requests(64)
    v1_bodies = [orjson.dumps({"examples": r}) for r in requests]
    grpc_bodies = [grpc_request(bundle.name, r, bundle.feature_specs) for r in requests]
    with tempfile.TemporaryDirectory(prefix="front-floor-") as scratch:
        print(json.dumps(measure(Path(scratch), args, v1_bodies, grpc_bodies), indent=2))


def measure(workdir: Path, args, v1_bodies: list[bytes], grpc_bodies: list[bytes]) -> dict:
    (workdir / "noop_http.py").write_text(NOOP_HTTP)
    results = {}

    port = free_port()
    http = subprocess.Popen([sys.executable, "-m", "uvicorn", "noop_http:app", "--app-dir", str(workdir), "--host", "127.0.0.1",
                             "--port", str(port), "--no-access-log", "--log-level", "warning"])  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_get(f"{url}/", timeout_s=1)[0] == 200, 30, "the no-op HTTP server")
        wrk(url, "/v1/score", v1_bodies, 2, 16, workdir)
        results["http_noop"] = measured(http.pid, lambda: wrk(url, "/v1/score", v1_bodies, args.seconds, 16, workdir))
        # The load generator's own tail: the peers phase's open loop (8 threads) at --rate against a handler that
        # does nothing, beside the same load at the service's half saturation
        alone = unloaded(url, v1_bodies, 200).summary()
        half = run_load(url, v1_bodies, args.seconds, 8, rate=args.rate).summary()
        results["http_noop_open_loop"] = {"rate": args.rate, "unloaded_p50_ms": alone["p50_ms"], "p50_ms": half["p50_ms"],
                                          "p99_ms": half["p99_ms"], "failures": half["failures"]}  # fmt: skip
    finally:
        http.terminate()
        http.wait()

    for name, code, extra in (("grpc_noop", NOOP_GRPC, []), ("grpc_sync_noop_1_thread", NOOP_GRPC_SYNC, ["1"]),
                              ("grpc_sync_noop_4_threads", NOOP_GRPC_SYNC, ["4"]), ("grpc_h2_noop", NOOP_GRPC_H2, [])):  # fmt: skip
        target = f"127.0.0.1:{free_port()}"
        server = subprocess.Popen([sys.executable, "-c", code, target, *extra], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            grpc_load(target, grpc_bodies, 2, concurrency=16)
            time.sleep(0.5)
            results[name] = measured(server.pid, lambda: grpc_load(target, grpc_bodies, args.seconds, concurrency=16))
        finally:
            server.terminate()
            server.wait()
    results["grpc_over_http_cpu_per_call"] = round(results["grpc_noop"]["server_cpu_ms_per_call"] / results["http_noop"]["server_cpu_ms_per_call"], 2)
    results["grpc_h2_over_http_cpu_per_call"] = round(results["grpc_h2_noop"]["server_cpu_ms_per_call"] / results["http_noop"]["server_cpu_ms_per_call"], 2)
    return results


if __name__ == "__main__":
    main()
