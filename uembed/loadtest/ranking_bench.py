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
workers' CPU milliseconds a request (``uembed/loadtest/scale_bench.py``'s paired rounds). The ratios: ranking
requests/s over flat requests/s (the median round), flat p50 over ranking p50 unloaded, and flat CPU milliseconds a
request over ranking's (the median round). A phase where any request failed is an error, not a figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from uembed.contract.errors import UembedError
from uembed.loadtest.load import run_load, unloaded
from uembed.loadtest.scale_bench import paired_rounds, start_timed
from uembed.loadtest.servers import UvicornProcess, worker_pids
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.model.data import movielens100k_table

MOVIE_FEATURES = ("movie_id", "genres")  # what a candidate carries: the movie's own features


def context_features_of(bundle: Path) -> list[str]:
    """The features the bundle's dense network is split by (the user's: the ranking requests' context). Refused: a
    bundle without the split (its ranking requests would save only the context's hashing, not what this phase
    measures), one that is not a MovieLens bundle, and a split that leaves user features to the candidates."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    split = manifest["dense"].get("context_split")
    if not split:
        raise UembedError(f"bench ranking: {bundle} has no context split (export it with --context-features FEATURE ...)")
    served = [feature["name"] for feature in manifest["features"]]
    if not set(served) <= set(MOVIELENS_FEATURES) or "movie_id" not in served:
        raise UembedError(f"bench ranking: {bundle} is not a MovieLens bundle with movie_id (features {', '.join(served)})")
    context = list(split["features"])
    users = [name for name in served if name not in context and name not in MOVIE_FEATURES]
    if users or "movie_id" in context:
        raise UembedError(f"bench ranking: {bundle} is split by {', '.join(context)}; the context is to be the user's "
                          f"features (the candidates carry {' and '.join(MOVIE_FEATURES)} only)")  # fmt: skip
    return context


def item_features_of(bundle: Path) -> list[str]:
    """The bundle's movie features, in the bundle's order: what a candidate carries."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    return [feature["name"] for feature in manifest["features"] if feature["name"] in MOVIE_FEATURES]


def movie_count() -> int:
    return len(set(movielens100k_table().column("movie_id").to_pylist()))


def check_ranking_args(args) -> None:
    """The ranking phase's options, refused before any phase runs."""
    if "ranking" not in args.phases:
        return
    if args.bundle is not None:
        context_features_of(args.bundle)
    movies = movie_count()
    if not 1 <= args.ranking_candidates <= movies:
        raise UembedError(f"--ranking-candidates: between 1 and the {movies} MovieLens movies, got {args.ranking_candidates}")
    if any(workers < 1 for workers in args.ranking_workers):
        raise UembedError(f"--ranking-workers: each at least 1, got {' '.join(map(str, args.ranking_workers))}")


def ranking_bodies(context_features: list[str], item_features: list[str], candidates: int, count: int,
                   seed: int = 0) -> dict[str, list[bytes]]:  # fmt: skip
    """``count`` ranking requests (a real user, ``candidates`` distinct movies) and their flat twins, as JSON bodies."""
    table = movielens100k_table().select(list(MOVIELENS_FEATURES)).to_pylist()
    users = {row["user_id"]: {f: row[f] for f in context_features} for row in table}
    movies = list({row["movie_id"]: {f: row[f] for f in item_features} for row in table}.values())
    rng = np.random.default_rng(seed)
    user_ids = list(users)
    bodies: dict[str, list[bytes]] = {"ranking": [], "flat": []}
    for _ in range(count):
        context = users[user_ids[int(rng.integers(len(user_ids)))]]
        items = [movies[i] for i in rng.choice(len(movies), size=candidates, replace=False)]
        bodies["ranking"].append(json.dumps({"context": context, "candidates": items}).encode())
        bodies["flat"].append(json.dumps({"examples": [{**context, **item} for item in items]}).encode())
    return bodies


def refuse_failures(figures: dict, where: str) -> dict:
    """``figures`` of a load phase, or an error where any request failed: a ratio of refusals is no figure."""
    if figures.get("failures"):
        raise UembedError(f"bench ranking: {figures['failures']} of {figures['requests']} requests failed in {where}; "
                          "the server's log is in the run's folder")  # fmt: skip
    return figures


def ranking_figures(bundle: Path, workers: int, bodies: dict[str, list[bytes]], seconds: float, workdir: Path,
                    candidates: int) -> dict:  # fmt: skip
    env = {"UEMBED_BUNDLES": str(bundle), "UEMBED_MAX_BODY_BYTES": str(16 * 2**20),
           "UEMBED_MAX_EXAMPLES": str(max(1024, candidates))}  # fmt: skip
    server = UvicornProcess("uembed.serving.app:create_app", env, workdir / f"ranking-{workers}.log", workers=workers)
    out: dict = {"workers": workers}
    try:
        out["start_up"] = start_timed(server)
        for form, form_bodies in bodies.items():
            refuse_failures(run_load(server.url, form_bodies, 1.0, 8).summary(), f"the {form} warm-up")
            out[f"{form}_unloaded"] = refuse_failures(unloaded(server.url, form_bodies, 100).summary(), f"{form} unloaded")
            out[f"{form}_saturated"] = refuse_failures(run_load(server.url, form_bodies, seconds, 8).summary(), f"{form} saturated")
        out["rounds"] = paired_rounds(server.url, bodies["ranking"], bodies["flat"], seconds / 2, rounds=3,
                                      concurrency=8, pids=worker_pids(server))  # fmt: skip
    finally:
        server.stop()
    for number, figures in enumerate(out["rounds"], 1):
        refuse_failures({"failures": figures["failures"], "requests": figures["requests"]}, f"paired round {number}")
    out["ranking_over_flat_requests_per_s"] = float(np.median([r["ratio"] for r in out["rounds"]]))
    out["flat_over_ranking_unloaded_p50"] = round(out["flat_unloaded"]["p50_ms"] / out["ranking_unloaded"]["p50_ms"], 2)
    out["flat_over_ranking_worker_cpu_ms"] = float(np.median([r["cpu_ratio"] for r in out["rounds"]]))
    return out


def run_ranking_bench(args, bundle: Path, workdir: Path, report) -> None:
    context = context_features_of(bundle)
    bodies = ranking_bodies(context, item_features_of(bundle), args.ranking_candidates, count=40)
    report("ranking_requests", {"bundle": str(bundle), "context_features": context, "candidates": args.ranking_candidates,
                                "body_kib": {k: round(np.mean([len(b) for b in v]) / 1024, 1) for k, v in bodies.items()}})  # fmt: skip
    for workers in args.ranking_workers:
        report(f"ranking_{workers}_workers", ranking_figures(bundle, workers, bodies, args.seconds, workdir, args.ranking_candidates))
