"""Instructions a request's decoding takes, counted by valgrind (callgrind), per front and per tree: a comparison
that the speed of a shared, noisy machine does not move.

    .venv/bin/python scripts/decode-instructions.py TREE [TREE ...] [--fronts grpc v1] [--calls 400]

For each tree (a checkout with its compiled extensions built, run as ``PYTHONPATH=TREE``) and each front, the front's
decoding of ten 64-example requests (the first 640 examples of MovieLens-100K) is run under callgrind twice, with no
calls and with ``--calls`` calls after the same warm-up, and the difference of the two counts over ``--calls`` is
printed: instructions a call, and each tree's over the first tree's. The decoding:

- ``grpc``: a ModelInferRequest parsed, its raw tensors read, counted and turned into columns, the columns
  canonicalised (what ``InferenceServicer.ModelInfer`` and ``InferencePlane.decode`` do before the batcher);
- ``v1``: a ``/v1/score`` body decoded by the lean path (msgspec) and its examples canonicalised.

The front's HTTP and the scoring itself are left out: they are the same code whatever the decoding. Needs valgrind
(Debian's ``valgrind``); each run takes a minute or two, most of it Python's imports under the simulator, and the
runs go one after another, so the count of one tree is not the count of another's warm caches. Counts are not
time: a change that trades instructions for memory traffic shows here only in part.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run under valgrind with PYTHONPATH=TREE: argv is TREE FRONT CALLS.
WORKLOAD = r"""
import sys
tree, front, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
import uembed
assert uembed.__file__.startswith(tree), f"uembed imported from {uembed.__file__}, not {tree}"
import orjson
from tritonclient.grpc import service_pb2
from uembed.bundle.loader import load_bundle
from uembed.loadtest.peers import grpc_request
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.model.data import movielens100k_table
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.protocols import oip, oip_grpc
from uembed.serving.protocols.lean_json import LeanBody

rows = movielens100k_table().slice(0, 640).to_pylist()
requests = [[{k: row[k] for k in MOVIELENS_FEATURES} for row in rows[i:i + 64]] for i in range(0, 640, 64)]
bundle = load_bundle(sys.argv[4])
runtime = ModelRuntime(bundle)
if front == "grpc":
    bodies = [grpc_request(bundle.name, request, bundle.feature_specs) for request in requests]

    def decode(body):
        inputs = oip_grpc.read_inputs(service_pb2.ModelInferRequest.FromString(body))
        oip.elements(inputs)
        examples = oip.columns_from_inputs(runtime, inputs, 1024)
        return runtime.encoder.canonicalise_columns(examples.columns, examples.count)
else:
    bodies = [orjson.dumps({"examples": request}) for request in requests]
    lean = LeanBody(1024)

    def decode(body):
        return runtime.canonicalise(lean.decode(body).examples)
for body in bodies * 3:  # the value caches and the interpreter's own, warmed alike in both runs
    decode(body)
for call in range(calls):
    decode(bodies[call % len(bodies)])
"""


def count(tree: Path, front: str, calls: int, bundle: Path, workdir: Path) -> int:
    """Instructions callgrind counts for the workload with ``calls`` calls."""
    script = workdir / "workload.py"
    script.write_text(WORKLOAD)
    out = workdir / f"callgrind.{front}.{calls}"
    # UEMBED_REQUIRE_EXTENSION: a tree whose extensions are missing or stale fails, rather than counting the pure path
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "UEMBED_REQUIRE_EXTENSION": "1"}
    done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, str(script),
                           str(tree), front, str(calls), str(bundle)], cwd=workdir, env=env, capture_output=True, text=True)  # fmt: skip
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind on {tree} ({front}) failed:\n{done.stderr[-3000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts to compare (the first is the base)")
    parser.add_argument("--fronts", nargs="+", choices=("grpc", "v1"), default=["grpc", "v1"])
    parser.add_argument("--calls", type=int, default=400, help="calls counted, after the warm-up")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "movielens100k" / "1",
                        help="the demo bundle (`uembed demo-bundle` makes it)")  # fmt: skip
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    if not (args.bundle / "manifest.json").exists():
        parser.error(f"no bundle at {args.bundle}: run `uembed demo-bundle` first")
    results = []
    for front in args.fronts:
        for tree in args.trees:
            with tempfile.TemporaryDirectory() as workdir:
                base = count(tree.resolve(), front, 0, args.bundle.resolve(), Path(workdir))
                counted = count(tree.resolve(), front, args.calls, args.bundle.resolve(), Path(workdir))
            per_call = (counted - base) / args.calls
            results.append({"front": front, "tree": str(tree), "instructions_per_call": round(per_call)})
            print(json.dumps(results[-1]), flush=True)
    for front in args.fronts:
        rows = [row for row in results if row["front"] == front]
        for row in rows[1:]:
            print(json.dumps({"front": front, "tree": row["tree"], "over_first_tree": round(row["instructions_per_call"] / rows[0]["instructions_per_call"], 3)}))
    if len(args.fronts) == 2:
        for tree in args.trees:
            grpc, v1 = (next(r["instructions_per_call"] for r in results if r["tree"] == str(tree) and r["front"] == f) for f in ("grpc", "v1"))
            print(json.dumps({"tree": str(tree), "grpc_over_v1": round(grpc / v1, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
