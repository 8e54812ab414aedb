"""``uembed bench --phases ranking``: one user x N candidates as a ranking request against the same N examples flat,
on a MovieLens bundle (the demo bundle by default), over HTTP.

A ranking request is one real MovieLens-100K user's features as its context and ``--ranking-candidates`` distinct
movies (their own features) as the candidates; its flat twin sends the same examples with the user's features
copied into each. The context's features are the ones the bundle's dense network is split by
(``dense.context_split``, as ``uembed export --context-features`` and the demo bundle write it), so the ranking
form hashes and looks up the user once and computes the context's part of the first layer once; a bundle without
the split still takes ranking requests (the context is then copied into every candidate's input).

Figures, for each worker count in ``--ranking-workers``: unloaded p50/p99 of each form (one request at a time),
each form saturated, and three paired rounds that saturate the two forms in turn: requests/s of each and the
workers' CPU milliseconds a request (``uembed/loadtest/scale_bench.py``'s paired rounds); "ranking over flat" is
the median of the rounds' ratios, and the unloaded ratio is flat p50 over ranking p50.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from uembed.contract.errors import UembedError
from uembed.loadtest.load import run_load, unloaded
from uembed.loadtest.scale_bench import paired_rounds, start_timed, worker_pids
from uembed.loadtest.servers import UvicornProcess
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.model.data import movielens100k_table


def context_features_of(bundle: Path) -> list[str]:
    """The features the bundle's dense network is split by; a bundle without the split is refused, since its
    ranking requests would only save the hashing of the context, which is not what this phase measures."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    split = manifest["dense"].get("context_split")
    if not split:
        raise UembedError(f"bench ranking: {bundle} has no context split (export it with --context-features FEATURE ...)")
    served = {feature["name"] for feature in manifest["features"]}
    if not served <= set(MOVIELENS_FEATURES):
        raise UembedError(f"bench ranking: {bundle} is not a MovieLens bundle (features {', '.join(sorted(served))})")
    return list(split["features"])


def ranking_bodies(context_features: list[str], candidates: int, count: int, seed: int = 0) -> dict[str, list[bytes]]:
    """``count`` ranking requests (a real user, ``candidates`` distinct movies) and their flat twins, as JSON bodies."""
    table = movielens100k_table().select(list(MOVIELENS_FEATURES)).to_pylist()
    item_features = [f for f in MOVIELENS_FEATURES if f not in context_features]
    users = {row["user_id"]: {f: row[f] for f in context_features} for row in table}
    movies = list({row["movie_id"]: {f: row[f] for f in item_features} for row in table}.values())
    if candidates > len(movies):
        raise UembedError(f"bench ranking: --ranking-candidates {candidates} is more than the {len(movies)} movies")
    rng = np.random.default_rng(seed)
    user_ids = list(users)
    bodies: dict[str, list[bytes]] = {"ranking": [], "flat": []}
    for _ in range(count):
        context = users[user_ids[int(rng.integers(len(user_ids)))]]
        items = [movies[i] for i in rng.choice(len(movies), size=candidates, replace=False)]
        bodies["ranking"].append(json.dumps({"context": context, "candidates": items}).encode())
        bodies["flat"].append(json.dumps({"examples": [{**context, **item} for item in items]}).encode())
    return bodies


def ranking_figures(bundle: Path, workers: int, bodies: dict[str, list[bytes]], seconds: float, workdir: Path) -> dict:
    env = {"UEMBED_BUNDLES": str(bundle), "UEMBED_MAX_BODY_BYTES": str(16 * 2**20)}
    server = UvicornProcess("uembed.serving.app:create_app", env, workdir / f"ranking-{workers}.log", workers=workers)
    out: dict = {"workers": workers}
    try:
        out["start_up"] = start_timed(server)
        for form, form_bodies in bodies.items():
            run_load(server.url, form_bodies, 1.0, 8)  # warm-up of this shape on every worker
            out[f"{form}_unloaded"] = unloaded(server.url, form_bodies, 100).summary()
            out[f"{form}_saturated"] = run_load(server.url, form_bodies, seconds, 8).summary()
        out["rounds"] = paired_rounds(server.url, bodies["ranking"], bodies["flat"], seconds / 2, rounds=3,
                                      concurrency=8, pids=worker_pids(server))  # fmt: skip
    finally:
        server.stop()
    out["ranking_over_flat_unloaded_p50"] = round(out["flat_unloaded"]["p50_ms"] / out["ranking_unloaded"]["p50_ms"], 2)
    out["ranking_over_flat"] = float(np.median([r["ratio"] for r in out["rounds"]]))
    out["ranking_over_flat_worker_cpu"] = float(np.median([r["cpu_ratio"] for r in out["rounds"]]))
    return out


def run_ranking_bench(args, bundle: Path, workdir: Path, report) -> None:
    context = context_features_of(bundle)
    bodies = ranking_bodies(context, args.ranking_candidates, count=40)
    report("ranking_requests", {"bundle": str(bundle), "context_features": context, "candidates": args.ranking_candidates,
                                "body_kib": {k: round(np.mean([len(b) for b in v]) / 1024, 1) for k, v in bodies.items()}})  # fmt: skip
    for workers in args.ranking_workers:
        report(f"ranking_{workers}_workers", ranking_figures(bundle, workers, bodies, args.seconds, workdir))
