"""The demo bundle a new user gets: unified embedding at 10% on MovieLens-100K, trained once."""

from __future__ import annotations

import sys
from pathlib import Path

from uembed.contract.errors import UembedError

DEMO_NAME = "movielens100k"
# The user's features: a ranking request sends them once as its context, and the demo bundle's dense network is
# split by them (docs/EXPORT.md), so such a request computes their part of the first cross layer once.
DEMO_CONTEXT_FEATURES = ("user_id", "age", "gender", "occupation", "zip_code")


def latest_version(model_root: Path) -> Path | None:
    """The highest numeric version folder with a manifest, if any."""
    versions = [p for p in model_root.glob("*") if p.name.isdigit() and (p / "manifest.json").is_file()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


def demo_bundle(store: Path, epochs: int = 20) -> Path:
    """``<store>/movielens100k/<latest>``, training and exporting it the first time (needs torch), its dense network
    split by the user's features."""
    existing = latest_version(Path(store) / DEMO_NAME)
    if existing is not None:
        return existing
    try:
        import torch
    except ImportError as exc:
        raise UembedError(
            "no bundle given and no demo bundle yet: building it needs the train extra "
            "(pip install 'uembed[train]'), or pass --bundle PATH"
        ) from exc
    import tempfile

    from uembed.model.data import load_movielens100k
    from uembed.model.export import export_run
    from uembed.model.train import TrainConfig, train

    torch.set_num_threads(1)
    print(f"no bundle given: training the demo bundle (unified, 10% budget, MovieLens-100K) into {store}/{DEMO_NAME}",
          file=sys.stderr)
    dataset = load_movielens100k()
    dataset.source = {"dataset": "movielens100k", "spec": None, "label_threshold": 3.0, "split_seed": 0}
    train_set, val_set, test_set = dataset.split(0)
    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(embedding="unified", budget_fraction=0.1, epochs=epochs, seed=0)
        train(config, train_set, val_set, test_set, run_dir=Path(scratch) / "run", progress=True)
        return export_run(Path(scratch) / "run", Path(store), DEMO_NAME, version=None, dtype="float32",
                          context_features=DEMO_CONTEXT_FEATURES)
