"""The CUDA path (uembed/serving/pipeline/cuda.py) against the CPU path.

Tests marked ``cuda`` need a CUDA device, CuPy and onnxruntime-gpu, and are skipped without them
(CI has no GPU; they were run on a lent H100, see docs/BENCHMARKS.md). The refusal tests run
where there is no usable CUDA device, which is CI and this project's development machines.
"""

import asyncio
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.scoring import score, score_in_process
from tests.waiting import wait_until_async
from uembed.bundle.loader import load_bundle
from uembed.bundle.synthetic import write_synthetic_bundle
from uembed.contract.features import FeatureSpec
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.settings import load_settings


def cuda_problem() -> str | None:
    try:
        from uembed.serving.pipeline.cuda import cuda_modules

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
        for dtype in ("float32", "float16", "int8", "int4", "int2", "pq")
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


# --- refused where the CUDA path cannot run (CI) -------------------------------------------------


@no_cuda
def test_engine_refuses_cuda_without_a_usable_device(synthetic_bundles):
    from uembed.serving.pipeline.cuda import DeviceError

    engine = ScoringEngine(load_settings(device="cuda"))
    with pytest.raises(DeviceError, match="gpu extra|CUDA device|CuPy"):
        engine.registry.open(synthetic_bundles["float32"])


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
    from uembed.contract.errors import UembedError

    with pytest.raises(UembedError, match="UEMBED_DEVICE"):
        load_settings(device="gpu")
    with pytest.raises(UembedError, match="dense_backend=onnx"):
        load_settings(device="cuda:1", dense_backend="torchscript")
    assert load_settings(device="cuda:1").device == "cuda:1"


# --- the CUDA path scores like the CPU path ------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4", "int2", "pq"])
def test_cuda_path_scores_like_cpu_path_cold_warm_and_under_eviction(synthetic_bundles, dtype):
    from uembed.serving.pipeline.cuda import CudaModelRuntime

    bundle = load_bundle(synthetic_bundles[dtype])
    cpu = ModelRuntime(bundle, hot_rows_bytes=0)
    # A device tier of 300 rows for about 850 distinct rows: admissions evict all the time.
    device = CudaModelRuntime(bundle, "cuda", device_hot_rows_bytes=300 * 16 * 4)
    traffic = examples(1_000, seed=1)
    expected = np.concatenate([score_in_process(cpu, traffic[i : i + 100]) for i in range(0, 1_000, 100)])
    passes = []
    for sizes in ([100] * 10, [7, 250, 743], [1_000]):  # cold, then warm, in other batch shapes
        starts = np.cumsum([0, *sizes])
        passes.append(np.concatenate([score_in_process(device, traffic[a:b]) for a, b in zip(starts[:-1], starts[1:])]))
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
    from uembed.serving.pipeline.cuda import CudaModelRuntime

    bundle = load_bundle(synthetic_bundles["int8"])
    device = CudaModelRuntime(bundle, "cuda", device_hot_rows_bytes=3_000 * 16 * 4)
    for start in range(0, 2_000, 200):
        score_in_process(device, examples(200, seed=start))
    store, table = device.stores[0], device.tables[0]
    used = store.hot.used
    owners = store.hot.owner[:used]
    on_device = table.rows[:used].get()
    assert np.array_equal(on_device.view(np.uint32), store.codec.decode(store.files.read(owners)).view(np.uint32))


@cuda
def test_cuda_batches_are_invariant_and_grow_their_buffers(synthetic_bundles):
    from uembed.serving.pipeline.cuda import CudaModelRuntime

    bundle = load_bundle(synthetic_bundles["float16"])
    device = CudaModelRuntime(bundle, "cuda", device_hot_rows_bytes=2**20)
    traffic = examples(3_000, seed=7)
    alone = score_in_process(device, traffic[:1])
    small_capacity = device.capacity
    together = score_in_process(device, traffic)  # 3,000 examples: past the first buffers
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
            got = score(client, traffic[start : start + 64])
            assert np.abs(got - score_in_process(cpu, traffic[start : start + 64])).max() <= 1e-5
        for context, candidates in ranking_requests(2, 200, seed=40):
            got = score(client, candidates, context=context)
            assert np.abs(got - score_in_process(cpu, flat(context, candidates))).max() <= 1e-5
        model = client.get("/v1/models").json()["models"][0]
        assert model["device"] == "cuda:0" and model["tables"][0]["hot_rows_on_device"]
        metrics = client.get("/metrics").text
    assert 'uembed_table_memory_bytes{model="synth",table="unified",tier="device"}' in metrics
    assert 'uembed_row_cache_hits_total{tier="hot"}' in metrics


# --- ranking requests, row updates and shadow copies on CUDA ---------------------------------------

CONTEXT_FEATURES = ("user", "city", "genres")


def ranking_requests(count: int, candidates: int, seed: int) -> list[tuple[dict, list[dict]]]:
    """``count`` ranking requests: one user's context (user, city, genres) and its candidates (item, tags)."""
    out = []
    for number in range(count):
        pool = examples(candidates, seed=seed + number)
        context = {name: pool[0][name] for name in CONTEXT_FEATURES if name in pool[0]}
        out.append((context, [{name: e[name] for name in ("item", "tags")} for e in pool]))
    return out


def flat(context: dict, candidates: list[dict]) -> list[dict]:
    return [{**candidate, **context} for candidate in candidates]


def sample(engine, name: str, **labels) -> float:
    """The value of one sample of the engine's metrics: ``name`` with these labels."""
    return next(s.value for m in engine.metrics.registry.collect() for s in m.samples
                if s.name == name and labels.items() <= s.labels.items())  # fmt: skip


@cuda
def test_ranking_requests_batched_on_cuda_score_like_their_flat_examples_on_cpu(synthetic_bundles):
    """Several ranking requests in one batch on the CUDA runtime (which broadcasts contexts rather than splitting
    them) score as their flat examples do on the CPU path."""
    path = synthetic_bundles["float16"]
    requests = ranking_requests(6, 120, seed=20)
    cpu = ModelRuntime(load_bundle(path))
    expected = np.concatenate([score_in_process(cpu, flat(context, candidates)) for context, candidates in requests])

    async def main():
        engine = ScoringEngine(load_settings(device="cuda", device_hot_rows_bytes=2**20, max_wait_ms=20))
        engine.registry.load(path)
        await engine.astart()
        try:
            results = await asyncio.gather(*(engine.score(candidates, context=context) for context, candidates in requests))
        finally:
            await engine.astop()
        return engine, np.concatenate([scores for scores, _ in results])

    engine, got = asyncio.run(main())
    assert not engine.registry.runtime(None, None).splits_context
    assert np.abs(got - expected).max() <= 1e-5
    assert sample(engine, "uembed_batch_examples_count") < len(requests)  # merged into batches, not scored one by one


@cuda
@pytest.mark.parametrize("dtype", ["float16", "int8", "int4", "int2", "pq"])
def test_row_updates_reach_the_rows_held_in_gpu_memory(synthetic_bundles, dtype):
    """apply_rows on CUDA: updated rows resident in the device tier are rewritten there (decoded once), the rest are
    read from the overlay when next missed; scores then equal the CPU path's with the same updates."""
    from uembed.serving.pipeline.cuda import CudaModelRuntime

    bundle = load_bundle(synthetic_bundles[dtype])
    cpu = ModelRuntime(bundle, hot_rows_bytes=0)
    device = CudaModelRuntime(bundle, "cuda", device_hot_rows_bytes=3_000 * 16 * 4)
    traffic = examples(600, seed=5)
    before = score_in_process(device, traffic)  # warms the device tier
    store = device.stores[0]
    resident = store.hot.owner[: store.hot.used].copy()
    rng = np.random.default_rng(9)
    outside = np.setdiff1d(rng.choice(bundle.tables[store.table.name].rows, 2_000, replace=False), resident)
    ids = np.union1d(resident[::2], outside[:500])
    records = store.table.encode(rng.normal(scale=0.5, size=(len(ids), 16)).astype(np.float32))  # pq: its codebooks
    for runtime in (device, cpu):
        runtime.apply_rows(store.table.name, ids, records)

    used = store.hot.used
    owners = store.hot.owner[:used]
    expected_rows = store.codec.decode(store.files.read(owners))
    updated = np.isin(owners, ids)
    expected_rows[updated] = store.codec.decode(records[np.searchsorted(ids, owners[updated])])
    assert updated.sum() == len(resident[::2])
    assert np.array_equal(device.tables[0].rows[:used].get().view(np.uint32), expected_rows.view(np.uint32))
    after = score_in_process(device, traffic)
    assert np.abs(after - score_in_process(cpu, traffic)).max() <= 1e-5
    assert np.abs(after - before).max() > 1e-3  # the updates reached the scores


@cuda
def test_a_shadow_version_on_cuda_scores_copies_with_its_own_runtime(synthetic_bundles):
    """A shadow version on CUDA: its own CudaModelRuntime, scored on the shadow thread beside the served one on the
    compute thread (each with its own stream); served scores stay the primary's, and a row update reaches both
    copies of the shadow version."""
    from uembed.bundle.format import encode_records
    from uembed.serving.pipeline.cuda import CudaModelRuntime
    from uembed.serving.routing import Route
    from uembed.serving.rows.updates import RowDelta

    primary, shadow_path = synthetic_bundles["float32"], synthetic_bundles["int8"]
    model = primary.parent.name
    traffic = examples(256, seed=13)
    expected = score_in_process(ModelRuntime(load_bundle(primary)), traffic)

    async def main():
        engine = ScoringEngine(load_settings(device="cuda", device_hot_rows_bytes=2**20, bundle_store=primary.parent.parent))
        engine.registry.load(primary)
        await engine.astart()
        try:
            await engine.registry.add_version(model, shadow_path.name)
            await engine.registry.set_routing(Route(model, {primary.name: 1}, shadow=shadow_path.name))
            served = np.concatenate([(await engine.score(traffic[i : i + 32]))[0] for i in range(0, 256, 32)])
            copies = engine.registry.runtimes_for(model, shadow_path.name)
            shadow_requests = {"name": "uembed_shadow_requests_total", "version": shadow_path.name}
            scored = lambda: sample(engine, **shadow_requests, outcome="scored")  # noqa: E731
            await wait_until_async(lambda: scored() >= 8, 30, "the shadow copies scored")
            # A row update of the shadow version: every row the shadow copy holds in GPU memory.
            shadow_copy = copies[-1]
            store = shadow_copy.stores[0]
            ids = np.sort(store.hot.owner[: store.hot.used].copy())
            records = encode_records(np.full((len(ids), 16), 0.25, dtype=np.float32), "int8")
            await asyncio.wrap_future(engine.submit_updates(model, shadow_path.name, [((1, 0), RowDelta({store.table.name: (ids, records)}))]))
            await engine.score(traffic[:32])  # a batch for the shadow thread, which applies its deferred update first
            updated_row = store.codec.decode(records[:1])[0]
            await wait_until_async(lambda: (shadow_copy.tables[0].rows[: len(ids)].get() == updated_row).all(), 30,
                                   "the shadow copy's device rows updated")  # fmt: skip
        finally:
            await engine.astop()
        return served, copies

    served, copies = asyncio.run(main())
    assert np.abs(served - expected).max() <= 1e-5
    assert len(copies) == 2 and all(isinstance(copy, CudaModelRuntime) for copy in copies) and copies[0] is not copies[1]
