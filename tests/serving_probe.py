"""Run by an installed interpreter (``python -I serving_probe.py EXAMPLES_JSON OUT_JSON``): the
serving path end to end in one process, then which modules it loaded.

Builds the CLI's parser, starts the service (``uembed.serving.app:create_app`` on uvicorn, bundles from
``UEMBED_BUNDLES``) on a free loopback port, scores the examples over HTTP and writes JSON to
OUT_JSON (stdout carries what the libraries print): the scores, the ONNX Runtime in use, the hashing path, which
of the service's other extensions it runs, and every loaded module of torch (there should be none)."""

import json
import socket
import sys
import threading
import time
import urllib.request

import uvicorn

from uembed.cli import build_parser

build_parser()
examples = json.loads(open(sys.argv[1]).read())
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
server = uvicorn.Server(uvicorn.Config("uembed.serving.app:create_app", factory=True, log_level="warning"))
thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
thread.start()
deadline = time.monotonic() + 60
while not server.started and thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.05)
port = sock.getsockname()[1]
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/v1/score", json.dumps({"examples": examples}).encode(), {"content-type": "application/json"}
)
scores = json.loads(urllib.request.urlopen(request, timeout=30).read())["scores"]
server.should_exit = True
thread.join(30)

import onnxruntime  # noqa: E402  (already loaded by the service; imported here only to report it)

from uembed.contract.hashing import hashing_backend  # noqa: E402
from uembed.serving.pipeline import stages  # noqa: E402
from uembed.serving.protocols import infer_wire, lean_json  # noqa: E402

with open(sys.argv[2], "w") as out:
    json.dump({
        "scores": scores,
        "onnxruntime": {"version": onnxruntime.__version__, "file": onnxruntime.__file__,
                        "providers": onnxruntime.get_available_providers()},
        "service_file": sys.modules["uembed.serving.app"].__file__,
        "hashing": hashing_backend(),
        "compiled": {"assemble": stages._pool is not None, "infer_wire": infer_wire._infer_wire is not None,
                     "score_json": lean_json._score_json is not None},
        "torch_modules": sorted(name for name in sys.modules if name.split(".")[0] == "torch"),
    }, out)
