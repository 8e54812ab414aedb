"""Canonicalise + hash of 64-example MovieLens requests in process, compiled extension against pure Python.

    .venv/bin/python scripts/hash-bench.py [BUNDLE] [--seconds 2]

Prints microseconds per request side by side for two measures:

* contract: ``hash_values`` of each feature's column of the request's raw values (genres' lists flattened) under
  the feature's lookup-0 seed: the per-value work alone;
* encoder: the service's canonicalise + hash of each request (``ModelRuntime``, its value caches warm, as
  ``scripts/encode-timing.py``), and again with no value caches (``value_cache_bytes=0``: every value canonicalised
  and hashed each time), on BUNDLE or, without one, a synthetic MovieLens bundle (no torch needed).
"""

import argparse
import tempfile
import time
from pathlib import Path

from uembed.bundle.loader import load_bundle
from uembed.bundle.synthetic import write_synthetic_bundle
from uembed.contract import hashing
from uembed.contract.collisions import training_value_counts
from uembed.contract.hashing import hash_values, lookup_seed
from uembed.contract.known import KnownValues, training_keys
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.model.data import load_movielens100k, movielens100k_table
from uembed.serving.pipeline.cpu import ModelRuntime


def per_request(work, requests: list, seconds: float) -> float:
    for request in requests:  # warm up (and fill the encoder's caches)
        work(request)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for request in requests:
            work(request)
        done += len(requests)
    return (time.perf_counter() - started) / done * 1e6


def synthetic_bundle(root: Path) -> Path:
    dataset = load_movielens100k()
    training, _, _ = dataset.split(0)
    known = {name: KnownValues.build(keys) for name, keys in training_keys(training.columns).items()}
    width = max(len(genres) for genres in movielens100k_table()["genres"].to_pylist())
    write_synthetic_bundle(root, "movielens", dataset.spec.features, 350, known=known, width=width,
                           value_counts=training_value_counts(training.columns), progress=False)  # fmt: skip
    return root / "movielens" / "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    if not hashing.compiled_available():
        raise SystemExit("the compiled extension is not built: make install (or setup build_ext --inplace)")
    rows = movielens100k_table().slice(0, 6400).to_pylist()
    requests = [[{k: r[k] for k in MOVIELENS_FEATURES} for r in rows[i : i + 64]] for i in range(0, 6400, 64)]
    seeds = {name: lookup_seed(name) for name in MOVIELENS_FEATURES}
    columns = [
        {name: [v for e in request for v in (e[name] if isinstance(e[name], list) else [e[name]])] for name in seeds}
        for request in requests
    ]
    with tempfile.TemporaryDirectory() as work:
        bundle = load_bundle(args.bundle or synthetic_bundle(Path(work)))
        results = {}
        for backend in hashing.BACKENDS:
            hashing.use_backend(backend)
            runtime = ModelRuntime(bundle)
            contract = per_request(lambda c: [hash_values(c[n], seeds[n]) for n in seeds], columns, args.seconds)
            encoder = per_request(lambda r: runtime.hash([runtime.canonicalise(r)]), requests, args.seconds)
            uncached = ModelRuntime(bundle, value_cache_bytes=0)
            cold = per_request(lambda r: uncached.hash([uncached.canonicalise(r)]), requests, args.seconds)
            results[backend] = (contract, encoder, cold)
    print(f"{'us per 64-example request':<44}{'compiled':>10}{'python':>10}{'ratio':>8}")
    labels = ("contract: hash_values of every column", "encoder: canonicalise + hash (warm caches)",
              "encoder: canonicalise + hash (no value caches)")
    for index, label in enumerate(labels):
        compiled, python = results["compiled"][index], results["python"][index]
        print(f"{label:<44}{compiled:>10.1f}{python:>10.1f}{python / compiled:>7.1f}x")


if __name__ == "__main__":
    main()
