import json

import numpy as np
import pyarrow as pa
import pytest
from xdist.scheduler import LoadFileScheduling

from tests.installs import built_wheel
from uembed.contract import hashing
from uembed.contract.collisions import training_value_counts
from uembed.contract.features import DatasetSpec, FeatureSpec, LabelSpec
from uembed.contract.known import KnownValues, training_keys
from uembed.loadtest.servers import RedisServer, UvicornProcess
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.model.data import from_table, load_movielens100k, movielens100k_table, split_indices

MOVIELENS_TABLE_ROWS = 350  # the trained bundles' table: a tenth of MovieLens-100K's distinct values


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


# `make test` spreads the suite over two processes with pytest-xdist (``-n 2``; ``--dist loadfile`` is in pyproject's
# addopts), by the scheduler below: a worker runs a whole file, so a module's fixtures (a trained model, a started
# service) are built once, and the container tests' files are one unit, so one worker runs them, one compose stack at
# a time. (Not xdist's loadgroup: under pytest 9 its xdist_group marks group nothing, pytest-dev/pytest-xdist#1386.)
CONTAINER_TEST_FILES = ("tests/deploy/test_compose_up.py", "tests/deploy/test_images.py")


class FilesThenContainers(LoadFileScheduling):
    """pytest-xdist's file scheduling with the container tests' files as one unit. The units go out in the order the
    tests were collected, which puts the container tests last (tests/deploy/conftest.py), so the image builds run
    during the other tests."""

    def _split_scope(self, nodeid: str) -> str:
        path = super()._split_scope(nodeid)
        return "containers" if path in CONTAINER_TEST_FILES else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log) -> LoadFileScheduling | None:
    if config.getvalue("dist") != "loadfile":
        return None
    config.option.loadscopereorder = False  # its default hands out the files with the most tests first
    return FilesThenContainers(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The scheduler sees test ids, not marks: a container test outside CONTAINER_TEST_FILES would run beside the
    other container tests on another worker, so it is refused here."""
    for item in items:
        if item.get_closest_marker("containers"):
            path = item.path.relative_to(config.rootpath).as_posix()
            if path not in CONTAINER_TEST_FILES:
                raise pytest.UsageError(f"{item.nodeid} is marked containers: add {path} to tests/conftest.py's "
                                        "CONTAINER_TEST_FILES")  # fmt: skip


@pytest.fixture
def tiny_dataset():
    return from_table(tiny_table(), tiny_spec(), name="tiny")


# --- real servers and MovieLens bundles, shared by tests/serving, tests/loadtest and tests/deploy -------------
# ``RedisServer`` and ``UvicornProcess`` (``uembed/loadtest/servers.py``) are processes a test can
# kill, pause (SIGSTOP) and restart. Two stores hold movielens/1 (float32) and movielens/2 (float16, so
# the two versions score differently): ``synthetic_store``, random rows and a random dense net in the
# trained bundles' shape, for every test whose subject is serving (no torch); ``bundle_store``, a
# 2-epoch run trained once per session, for the tests whose subject is the training or the export.


@pytest.fixture(scope="module", autouse=True)
def module_desired_state_file(tmp_path_factory):
    """The services a module's fixtures start (before any test's own file is set) share a desired state of the
    module's: the default, a file in a session's shared bundle store, would carry one module's admin calls into
    the next module's services."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("desired-state") / "desired-state.json"
        patch.setenv("UEMBED_DESIRED_STATE_FILE", str(path))
        yield path


@pytest.fixture(autouse=True)
def desired_state_file(tmp_path, monkeypatch):
    """Each test's services (in process, and the processes it starts) share a desired state of their own: the
    default, a file in the bundle store, would carry one test's admin calls into the next test on that store."""
    path = tmp_path / "desired-state.json"
    monkeypatch.setenv("UEMBED_DESIRED_STATE_FILE", str(path))
    return path


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
def uembed_wheel(tmp_path_factory):
    """This project's wheel, built once for the session (the packaging and serving-install tests)."""
    return built_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def movielens_examples():
    """1,000 raw MovieLens-100K test examples (feature -> value) as a client would send them."""
    table = movielens100k_table()
    _, _, test_index = split_indices(table.num_rows, 0)
    raw = table.take(test_index[:1000]).to_pylist()
    return [{name: row[name] for name in MOVIELENS_FEATURES} for row in raw]


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    """A bundle store with movielens/1 (float32) and movielens/2 (float16, version 1's rows rounded) shaped as
    ``bundle_store``'s: the MovieLens features in their order, a unified table of as many rows, genres as wide,
    and the training split's values as the known values; the rows and the dense net are random. Needs no torch."""
    from uembed.bundle.synthetic import write_synthetic_bundle

    root = tmp_path_factory.mktemp("synthetic-bundles")
    dataset = load_movielens100k()
    training, _, _ = dataset.split(0)
    known = {name: KnownValues.build(keys) for name, keys in training_keys(training.columns).items()}
    counts = training_value_counts(training.columns)
    genres_width = max(len(genres) for genres in movielens100k_table()["genres"].to_pylist())
    for version, dtype in (("1", "float32"), ("2", "float16")):
        write_synthetic_bundle(root, "movielens", dataset.spec.features, MOVIELENS_TABLE_ROWS, version=version,
                               dtype=dtype, width=genres_width, known=known, value_counts=counts, progress=False)  # fmt: skip
    return root


@pytest.fixture(scope="session")
def bundle_store(tmp_path_factory):
    """A bundle store with movielens/1 (float32) and movielens/2 (float16) of one 2-epoch unified run; the tests
    that need it are skipped where torch is not installed (the serving install)."""
    torch = pytest.importorskip("torch", reason="the trained bundles need torch (the train extra)")

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
    manifest = json.loads((root / "store" / "movielens" / "1" / "manifest.json").read_text())
    assert manifest["tables"][0]["rows"] == MOVIELENS_TABLE_ROWS, "synthetic_store's table is to be this one's size"
    return root / "store"


@pytest.fixture(params=hashing.BACKENDS)
def each_hashing_backend(request):
    """Each hashing path in turn, compiled and pure Python (the compiled one skipped, saying why, where the
    extension is not built; tests/contract/test_fasthash.py fails then if UEMBED_REQUIRE_EXTENSION=1)."""
    if request.param == "compiled" and not hashing.compiled_available():
        pytest.skip("the compiled hashing extension uembed.contract._fasthash is not built (make install builds it)")
    before = hashing.hashing_backend()
    hashing.use_backend(request.param)
    yield request.param
    hashing.use_backend(before)
