"""The CUDA path (service/device.py) against the CPU path.

Tests marked ``cuda`` need a CUDA device, CuPy and onnxruntime-gpu, and are skipped without them
(CI has no GPU; they were run on a lent H100, see docs/BENCHMARKS.md). The refusal tests run
where there is no usable CUDA device, which is CI and this project's development machines.
"""

import subprocess
import sys

import httpx
import numpy as np
import pytest

from export.loader import load_bundle
from export.synthetic import write_synthetic_bundle
from model.features import FeatureSpec
from service.engine import ScoringEngine
from service.runtime import ModelRuntime
from service.settings import load_settings


def cuda_problem() -> str | None:
    try:
        from service.device import cuda_modules

        cuda_modules("cuda")
    except Exception as exc:  # noqa: BLE001 - any reason is a reason to skip
        return str(exc)
    return None


PROBLEM = cuda_problem()


def cuda(test):
    """A test of the CUDA path: marked ``cuda`` (select with ``-m cuda``), skipped where it cannot run."""
    return pytest.mark.cuda(pytest.mark.skipif(PROBLEM is not None, reason=f"no CUDA path here: {PROBLEM}")(test))


no_cuda = pytest.mark.skipif(PROBLEM is None, reason="a CUDA device is usable here")

FEATURES = (
    FeatureSpec("user"),
    FeatureSpec("item"),
    FeatureSpec("city"),
    FeatureSpec("tags", kind="multivalent", pooling="sum"),
    FeatureSpec("genres", kind="multivalent"),
)


@pytest.fixture(scope="module")
def synthetic_bundles(tmp_path_factory):
    """One small synthetic bundle per row dtype; multivalent features with both poolings, two biased features."""
    root = tmp_path_factory.mktemp("device-bundles")
    return {
        dtype: write_synthetic_bundle(root, "synth", FEATURES, 20_000, version=dtype, dtype=dtype,
                                      bias_features=("item", "tags"), seed=3, progress=False)  # fmt: skip
        for dtype in ("float32", "float16", "int8")
    }


def examples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    zipf = lambda n: np.minimum(rng.zipf(1.3, n), 50_000)  # noqa: E731 - repeated values, as real traffic has
    out = []
    for user, item, city in zip(zipf(count), zipf(count), rng.integers(0, 40, count)):
        example = {"user": f"u{user}", "item": int(item), "city": f"c{city}"}
        example["tags"] = [f"t{t}" for t in rng.integers(0, 300, rng.integers(0, 7))]
        if rng.random() < 0.8:  # sometimes absent: the missing value
            example["genres"] = [f"g{g}" for g in rng.integers(0, 20, rng.integers(1, 3))]
        out.append(example)
    return out


def score(runtime, batch: list[dict]) -> np.ndarray:
    return runtime.score_encoded(*runtime.hash([runtime.canonicalise(batch)]))


# --- refused where the CUDA path cannot run (CI) -------------------------------------------------


@no_cuda
def test_engine_refuses_cuda_without_a_usable_device(synthetic_bundles):
    from service.device import DeviceError

    engine = ScoringEngine(load_settings(device="cuda"))
    with pytest.raises(DeviceError, match="gpu extra|CUDA device|CuPy"):
        engine.open(synthetic_bundles["float32"])


@no_cuda
def test_serve_refuses_cuda_in_one_line(synthetic_bundles):
    result = subprocess.run(
        [sys.executable, "-m", "uembed", "serve", "--bundle", str(synthetic_bundles["float32"]), "--device", "cuda"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "device=cuda" in result.stderr and ("uembed[gpu]" in result.stderr or "CUDA device" in result.stderr)


def test_settings_refuse_unknown_devices_and_torchscript_on_cuda():
    from model.errors import UembedError

    with pytest.raises(UembedError, match="UEMBED_DEVICE"):
        load_settings(device="gpu")
    with pytest.raises(UembedError, match="dense_backend=onnx"):
        load_settings(device="cuda:1", dense_backend="torchscript")
    assert load_settings(device="cuda:1").device == "cuda:1"


# --- the CUDA path scores like the CPU path ------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cuda_path_scores_like_cpu_path_cold_warm_and_under_eviction(synthetic_bundles, dtype):
    from service.device import CudaModelRuntime

    bundle = load_bundle(synthetic_bundles[dtype])
    cpu = ModelRuntime(bundle, hot_rows_bytes=0)
    # A device tier of 300 rows for about 850 distinct rows: admissions evict all the time.
    device = CudaModelRuntime(bundle, "cuda", device_hot_rows_bytes=300 * 16 * 4)
    traffic = examples(1_000, seed=1)
    expected = np.concatenate([score(cpu, traffic[i : i + 100]) for i in range(0, 1_000, 100)])
    passes = []
    for sizes in ([100] * 10, [7, 250, 743], [1_000]):  # cold, then warm, in other batch shapes
        starts = np.cumsum([0, *sizes])
        passes.append(np.concatenate([score(device, traffic[a:b]) for a, b in zip(starts[:-1], starts[1:])]))
    for got in passes:
        assert np.abs(got - expected).max() <= 1e-5
    store = device.stores[0]
    assert store.hot.used == store.hot.capacity == 300
    counts = store.take_counts()
    assert counts.hits["hot"] > 0 and counts.misses["hot"] > 0
    assert device.memory_bytes()[store.table.name]["device"] == 300 * 16 * 4


@cuda
def test_device_tier_holds_the_row_files_rows(synthetic_bundles):
    """After traffic, every row in the device tier equals its row in the file, bit for bit (int8 decoded once)."""
    from service.device import CudaModelRuntime

    bundle = load_bundle(synthetic_bundles["int8"])
    device = CudaModelRuntime(bundle, "cuda", device_hot_rows_bytes=3_000 * 16 * 4)
    for start in range(0, 2_000, 200):
        score(device, examples(200, seed=start))
    store, table = device.stores[0], device.tables[0]
    used = store.hot.used
    owners = store.hot.owner[:used]
    on_device = table.rows[:used].get()
    assert np.array_equal(on_device.view(np.uint32), store.codec.decode(store.codec.read(owners)).view(np.uint32))


@cuda
def test_cuda_batches_are_invariant_and_grow_their_buffers(synthetic_bundles):
    from service.device import CudaModelRuntime

    bundle = load_bundle(synthetic_bundles["float16"])
    device = CudaModelRuntime(bundle, "cuda", device_hot_rows_bytes=2**20)
    traffic = examples(3_000, seed=7)
    alone = score(device, traffic[:1])
    small_capacity = device.capacity
    together = score(device, traffic)  # 3,000 examples: past the first buffers
    assert device.capacity >= 3_000 > small_capacity
    assert np.abs(together[0] - alone[0]) <= 1e-6


@cuda
def test_service_on_cuda_over_http(synthetic_bundles, start_service):
    bundle = synthetic_bundles["float16"]
    cpu = ModelRuntime(load_bundle(bundle))
    service = start_service([bundle], device="cuda", device_hot_rows_bytes=2**22)
    traffic = examples(300, seed=11)
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for start in range(0, 300, 64):
            response = client.post("/v1/score", json={"examples": traffic[start : start + 64]})
            assert response.status_code == 200, response.text
            got = np.array(response.json()["scores"], dtype=np.float32)
            assert np.abs(got - score(cpu, traffic[start : start + 64])).max() <= 1e-5
        model = client.get("/v1/models").json()["models"][0]
        assert model["device"] == "cuda:0" and model["tables"][0]["hot_rows_on_device"]
        metrics = client.get("/metrics").text
    assert 'uembed_table_memory_bytes{model="synth",table="unified",tier="device"}' in metrics
    assert 'uembed_row_cache_hits_total{tier="hot"}' in metrics
