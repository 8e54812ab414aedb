"""A 64-example request's way from its bytes to canonical columns, in process, stage by stage: gRPC ModelInfer (the
compiled wire reader, and protobuf's objects as without it) beside REST v1 (msgspec's lean path). Microseconds a request,
the best of several passes over 200 real MovieLens requests, all in one run. Run it alone.

    .venv/bin/python scripts/decode-stages.py [--bundle bundles/movielens100k/1] [--out stages.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402

from uembed.bundle.loader import load_bundle  # noqa: E402
from uembed.loadtest.load import movielens_requests  # noqa: E402
from uembed.loadtest.peers import grpc_request  # noqa: E402
from uembed.serving.pipeline.cpu import ModelRuntime  # noqa: E402
from uembed.serving.protocols import infer_wire, oip  # noqa: E402
from uembed.serving.protocols.lean_json import LeanBody  # noqa: E402
from uembed.serving.protocols.oip_grpc import read_inputs  # noqa: E402


def per_request_us(work, items, passes: int = 7) -> float:
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        for item in items:
            work(item)
        best = min(best, (time.perf_counter() - started) / len(items))
    return round(best * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "movielens100k" / "1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if infer_wire._infer_wire is None:
        raise SystemExit("the compiled wire reader is not built (make install), or UEMBED_PURE_PYTHON is set")
    bundle = load_bundle(args.bundle)
    runtime = ModelRuntime(bundle)
    requests = movielens_requests(64, count=200)
    calls = [grpc_request(bundle.name, request, bundle.feature_specs) for request in requests]
    bodies = [orjson.dumps({"examples": request}) for request in requests]
    lean = LeanBody(1024)
    first = next(iter(bundle.feature_specs))

    def protobuf_read(message: bytes):
        request = service_pb2.ModelInferRequest.FromString(message)
        inputs = read_inputs(request)
        oip.elements(inputs)
        return inputs

    def columns(inputs):
        oip.FirstExample(inputs)[first]  # the routing key's read, as the plane does
        examples = oip.columns_from_inputs(runtime, inputs, 1024)
        return runtime.encoder.canonicalise_columns(examples.columns, examples.count)

    def v1_canonical(body: bytes):
        request = lean.decode(body)
        return runtime.canonicalise(request.examples, request.context)

    read = [infer_wire.InferRequestReader.FromString(message).inputs for message in calls]
    one_pass = oip.raw_columns

    def checked_columns(inputs):  # the per-tensor checks alone, as without the one-pass reader
        oip.raw_columns = lambda *args: None
        try:
            return oip.columns_from_inputs(runtime, inputs, 1024)
        finally:
            oip.raw_columns = one_pass

    stages = {
        "grpc: the tensors' checks, into columns (the one-pass reader)": per_request_us(
            lambda inputs: oip.columns_from_inputs(runtime, inputs, 1024), read),
        "grpc: the tensors' checks, into columns (one tensor at a time)": per_request_us(checked_columns, read),
        "grpc: protobuf's message and its fields read (without the extension)": per_request_us(protobuf_read, calls),
        "grpc: the compiled wire reader": per_request_us(infer_wire.InferRequestReader.FromString, calls),
        "grpc: tensors to canonical columns": per_request_us(columns, read),
        "grpc: the whole way (compiled reader)": per_request_us(lambda m: columns(infer_wire.InferRequestReader.FromString(m).inputs), calls),
        "grpc: the whole way (protobuf)": per_request_us(lambda m: columns(protobuf_read(m)), calls),
        "v1: the lean path's decode (the compiled reader where built, else msgspec)": per_request_us(lean.decode, bodies),
        "v1: the whole way": per_request_us(v1_canonical, bodies),
    }
    for name, value in stages.items():
        print(f"{value:8.1f} us  {name}")
    if args.out:
        args.out.write_text(json.dumps({"microseconds_a_request": stages, "examples": 64, "requests": len(requests)}, indent=1))


if __name__ == "__main__":
    main()
