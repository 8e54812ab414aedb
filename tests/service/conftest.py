"""Real servers for service tests: redis-server and uvicorn on free loopback ports.

``RedisServer`` and ``UvicornProcess`` (``loadtest/servers.py``) are processes a test can
kill, pause (SIGSTOP) and restart. The MovieLens bundles are trained once per session (2 epochs) and exported
as version 1 (float32) and version 2 (float16, so the two versions score differently).
"""

from __future__ import annotations

import pytest

from loadtest.servers import RedisServer, UvicornProcess
from model.data import movielens100k_table, split_indices

FEATURES = ("user_id", "movie_id", "zip_code", "age", "occupation", "gender", "genres")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def start_service(tmp_path):
    """Factory: start_service(bundles, **settings) -> a running UvicornProcess of the service."""
    started = []

    def start(bundles: list, **settings) -> UvicornProcess:
        env = {"UEMBED_BUNDLES": ",".join(str(b) for b in bundles)}
        env.update({f"UEMBED_{k.upper()}": str(v) for k, v in settings.items()})
        service = UvicornProcess("service.app:create_app", env, tmp_path / f"service-{len(started)}.log").start()
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
    return [{name: row[name] for name in FEATURES} for row in raw]


@pytest.fixture(scope="session")
def bundle_store(tmp_path_factory):
    """A bundle store with movielens/1 (float32) and movielens/2 (float16) of one 2-epoch unified run."""
    import torch

    from export.bundle import export_run
    from model.data import load_movielens100k
    from model.train import TrainConfig, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bundles")
    dataset = load_movielens100k()
    train_set, val_set, test_set = dataset.split(0)
    config = TrainConfig(embedding="unified", budget_fraction=0.1, epochs=2, seed=0)
    train(config, train_set, val_set, test_set, run_dir=root / "run", progress=False)
    export_run(root / "run", root / "store", "movielens", version="1", dtype="float32")
    export_run(root / "run", root / "store", "movielens", version="2", dtype="float16")
    return root / "store"
