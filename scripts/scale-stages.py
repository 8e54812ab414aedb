"""Per-stage time of one ranking request and of the same examples flat, in process, on a scale bundle or a
MovieLens bundle split by its user's features (the demo bundle).

    .venv/bin/python scripts/scale-stages.py scale-work/criteo-scale/1
    .venv/bin/python scripts/scale-stages.py bundles/movielens100k/1

Each stage of ``/v1/score`` timed alone over 20 requests of each shape (the traffic of
``uembed bench --phases scale``, or of ``--phases ranking`` on a MovieLens bundle: 1 context x 500 candidates), after one warm pass: decoding
and checking the body as the lean path does (msgspec, ``uembed/serving/protocols/lean_json.py``),
canonicalise, hash, lookup, assemble, dense, and writing the response. BENCHMARKS.md quotes
its output.
"""

import gc
import json
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import orjson

from uembed.loadtest.ranking_bench import context_features_of, item_features_of, ranking_bodies
from uembed.loadtest.scale_bench import request_bodies
from uembed.serving.engine import ScoringEngine
from uembed.serving.protocols.lean_json import names_fit, score_body_type
from uembed.serving.protocols.render import form_problem
from uembed.serving.settings import load_settings


def per_call_ms(work, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        work(i)
    return (time.perf_counter() - started) / count * 1000


def main(bundle: str) -> None:
    settings = load_settings(max_examples=1024)
    runtime = ScoringEngine(settings).registry.open(bundle)
    decoder = msgspec.json.Decoder(score_body_type(settings.max_examples))
    served = {f["name"] for f in json.loads((Path(bundle) / "manifest.json").read_text())["features"]}
    if "movie_id" in served:  # a MovieLens bundle split by its user's features: the ranking phase's traffic
        ranking = ranking_bodies(context_features_of(Path(bundle)), item_features_of(Path(bundle)), 500, 20)
        bodies = {"ranking": ranking["ranking"], "flat_same_examples": ranking["flat"]}
    else:  # a scale bundle: the scale phase's
        bodies = request_bodies(1.05, 500, 64, 20)
    gc.freeze()
    for _ in range(2):  # the first pass fills caches and pages; the second is reported
        figures = {}
        for shape in ("ranking", "flat_same_examples"):
            raw = bodies[shape]
            docs = [json.loads(b) for b in raw]
            n = len(raw)

            def decode(i):
                request = decoder.decode(raw[i])
                assert form_problem(request.examples, request.context, request.candidates) is None and names_fit(request)

            timing = {"decode": per_call_ms(decode, n)}

            def canonicalise(i):
                return runtime.canonicalise(docs[i].get("candidates") or docs[i]["examples"], context=docs[i].get("context"))

            timing["canonicalise"] = per_call_ms(canonicalise, n)
            canonical = [canonicalise(i) for i in range(n)]
            if shape == "ranking":  # the engine's path for a batch of ranking requests: the context's rows once
                timing["hash"] = per_call_ms(lambda i: runtime.hash_split([canonical[i]]), n)
                split = [runtime.hash_split([c]) for c in canonical]
                timing["lookup"] = per_call_ms(lambda i: runtime.lookup_split(split[i]), n)
                looked_up = [runtime.lookup_split(s) for s in split]
                # the engine's choice: the context split's inputs where the bundle's network has one (the context's
                # part of the first layer once a request), else every candidate's whole input
                def assemble(s, rows):
                    inputs = runtime.factored_inputs(s, *rows)
                    return runtime.assemble_split(s, *rows) if inputs is None else inputs

                timing["assemble"] = per_call_ms(lambda i: assemble(split[i], looked_up[i]), n)
                embeddings = [assemble(s, rows) for s, rows in zip(split, looked_up)]
            else:
                timing["hash"] = per_call_ms(lambda i: runtime.hash([canonical[i]]), n)
                hashed = [runtime.hash([c]) for c in canonical]
                if runtime.lookup_factored(*hashed[0]) is not None:  # a context-split network: lookup and assemble in one
                    timing["lookup"] = per_call_ms(lambda i: runtime.lookup_factored(*hashed[i]), n)
                    timing["assemble"] = 0.0
                    embeddings = [runtime.lookup_factored(*h) for h in hashed]
                else:
                    timing["lookup"] = per_call_ms(lambda i: runtime.lookup(hashed[i][0]), n)
                    looked_up = [runtime.lookup(rows) for rows, _ in hashed]
                    timing["assemble"] = per_call_ms(lambda i: runtime.assemble(looked_up[i], hashed[i][1]), n)
                    embeddings = [runtime.assemble(rows, h[1]) for rows, h in zip(looked_up, hashed)]
            timing["dense"] = per_call_ms(lambda i: runtime.dense(embeddings[i]), n)
            scores = [runtime.dense(e) for e in embeddings]
            timing["response"] = per_call_ms(
                lambda i: orjson.dumps({"scores": np.asarray(scores[i], dtype=np.float64)}, option=orjson.OPT_SERIALIZE_NUMPY), n
            )
            figures[shape] = {k: round(v, 3) for k, v in timing.items()} | {"total": round(sum(timing.values()), 3)}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
