import numpy as np
import pyarrow as pa
import pytest

from uembed.contract.features import DatasetSpec, FeatureSpec, LabelSpec
from uembed.loadtest.servers import RedisServer, UvicornProcess
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.model.data import from_table, movielens100k_table, split_indices


def tiny_table(examples: int = 400, seed: int = 0) -> pa.Table:
    """Users, items, cities and tags with a label that depends on user and item."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, examples)
    items = rng.integers(0, 40, examples)
    tags = [[f"t{t}" for t in rng.choice(8, rng.integers(0, 4), replace=False)] for _ in range(examples)]
    label = ((users % 3 == 0) ^ (items % 2 == 0)).astype(int)
    return pa.table(
        {
            "user": [f"u{u}" for u in users],
            "item": items.tolist(),
            "home_city": [f"c{c}" for c in rng.integers(0, 10, examples)],
            "work_city": [f"c{c}" for c in rng.integers(0, 10, examples)],
            "tags": tags,
            "age": rng.uniform(15, 70, examples).round(1).tolist(),
            "clicked": label.tolist(),
        }
    )


def tiny_spec() -> DatasetSpec:
    return DatasetSpec(
        features=(
            FeatureSpec("user"),
            FeatureSpec("item"),
            FeatureSpec("home_city"),
            FeatureSpec("work_city"),
            FeatureSpec("tags", kind="multivalent", pooling="sum"),
            FeatureSpec("age", kind="numeric", boundaries=(18.0, 30.0, 50.0)),
        ),
        label=LabelSpec("clicked"),
        groups={"city": ("home_city", "work_city")},
    )


@pytest.fixture
def tiny_dataset():
    return from_table(tiny_table(), tiny_spec(), name="tiny")


# --- real servers and MovieLens bundles, shared by tests/service and tests/deploy ---------
# ``RedisServer`` and ``UvicornProcess`` (``uembed/loadtest/servers.py``) are processes a test can
# kill, pause (SIGSTOP) and restart. The MovieLens bundles are trained once per session
# (2 epochs) and exported as version 1 (float32) and version 2 (float16, so the two
# versions score differently).



@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def start_service(tmp_path):
    """Factory: start_service(bundles, **settings) -> a running UvicornProcess of the service, ready (or with
    ready_path="/healthz", running, ready or not)."""
    started = []

    def start(bundles: list, ready_path: str = "/readyz", **settings) -> UvicornProcess:
        env = {"UEMBED_BUNDLES": ",".join(str(b) for b in bundles)}
        env.update({f"UEMBED_{k.upper()}": str(v) for k, v in settings.items()})
        log = tmp_path / f"service-{len(started)}.log"
        service = UvicornProcess("uembed.serving.app:create_app", env, log, ready_path=ready_path).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def movielens_examples():
    """1,000 raw MovieLens-100K test examples (feature -> value) as a client would send them."""
    table = movielens100k_table()
    _, _, test_index = split_indices(table.num_rows, 0)
    raw = table.take(test_index[:1000]).to_pylist()
    return [{name: row[name] for name in MOVIELENS_FEATURES} for row in raw]


@pytest.fixture(scope="session")
def bundle_store(tmp_path_factory):
    """A bundle store with movielens/1 (float32) and movielens/2 (float16) of one 2-epoch unified run."""
    import torch

    from uembed.model.data import load_movielens100k
    from uembed.model.export import export_run
    from uembed.model.train import TrainConfig, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bundles")
    dataset = load_movielens100k()
    train_set, val_set, test_set = dataset.split(0)
    config = TrainConfig(embedding="unified", budget_fraction=0.1, epochs=2, seed=0)
    train(config, train_set, val_set, test_set, run_dir=root / "run", progress=False)
    export_run(root / "run", root / "store", "movielens", version="1", dtype="float32")
    export_run(root / "run", root / "store", "movielens", version="2", dtype="float16")
    return root / "store"
