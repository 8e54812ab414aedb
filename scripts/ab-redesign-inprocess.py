"""The scale bench's requests through a tree's whole ASGI app in this process, one at a time, no HTTP server: the
service's CPU milliseconds a request (ranking 1 x 500 candidates, and the same 500 examples flat), for a tree
before the one package (service/, loadtest/) or after it (uembed/serving/). Run each tree in turn, several times:

    PYTHONPATH=TREE .venv/bin/python scripts/ab-redesign-inprocess.py TREE SCALE_BUNDLE
"""

import asyncio
import json
import os
import sys
import time
from pathlib import Path

tree, bundle_path = sys.argv[1], sys.argv[2]
new = Path(tree, "uembed/serving").exists()
os.environ["UEMBED_BUNDLES"] = bundle_path
os.environ["UEMBED_GRPC_PORT"] = "0"
if new:  # noqa: SIM108 - the two layouts' imports
    from uembed.loadtest.scale_bench import request_bodies
    from uembed.serving.app import create_app
else:
    from loadtest.scale_bench import request_bodies
    from service.app import create_app
bodies = request_bodies(1.05, 500, 500, count=20)
app = create_app()

async def call(body: bytes):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    sent = False
    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
    status = []
    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
    await app(scope, receive, send)
    return status[0]

async def main():
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 240
        while await call(bodies["ranking"][0]) != 200:  # the row files' checks run in the background first
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
        out = {}
        for kind in ("ranking", "flat_same_examples", "ranking", "flat_same_examples"):
            for body in bodies[kind] * 10:
                await call(body)
            started = time.process_time()
            n = 0
            for body in bodies[kind] * 20:
                await call(body); n += 1
            out[kind] = round((time.process_time() - started) / n * 1000, 3)
        print(json.dumps({"tree": "after" if new else "before", "cpu_ms_per_request": out}))
asyncio.run(main())
