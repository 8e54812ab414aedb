"""The canonicalise stage of a bundle's /v1/score requests, in process: microseconds a request (the best of five passes
over them, after one that fills the value cache), and how many values the checked path (a value at a time) made
anew in that first pass, its cache missing them. Run it
alone; for another checkout's code run it with ``PYTHONPATH=THAT_TREE``.

    .venv/bin/python scripts/canonicalise-requests.py --bundle B --requests R.jsonl [--out stage.json]

``R.jsonl``: a /v1/score body a line (``scripts/requests-from-data.py`` writes them from a data set).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import uembed
from uembed.bundle.loader import load_bundle
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.protocols.lean_json import LeanBody


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runtime = ModelRuntime(load_bundle(args.bundle))
    lean = LeanBody(4096)
    requests = [lean.decode(line) for line in args.requests.read_bytes().splitlines() if line.strip()]
    checked: collections.Counter = collections.Counter()  # values the checked path made anew (its cache missed), by feature
    one_value = runtime.encoder._canonical

    def counted(name, *rest, **named):
        checked[name] += 1
        return one_value(name, *rest, **named)

    runtime.encoder._canonical = counted
    for request in requests:
        runtime.canonicalise(request.examples, request.context)
    runtime.encoder._canonical = one_value
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for request in requests:
            runtime.canonicalise(request.examples, request.context)
        best = min(best, (time.perf_counter() - started) / len(requests))
    result = {"code": str(Path(uembed.__file__).parent.parent), "requests": len(requests),
              "microseconds_a_request": round(best * 1e6, 1), "checked_path_values_not_cached": sum(checked.values()),
              "by_feature": dict(checked.most_common(10))}  # fmt: skip
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
