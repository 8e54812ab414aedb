"""``uembed bench --phases gpu``: the CUDA path beside the CPU path, on one machine, from the same traffic.

A Criteo-shaped synthetic bundle (26 one-value features over ONE unified table, float16 rows;
``uembed/bundle/synthetic.py``) is scored from Zipf traffic drawn over Criteo-Kaggle's per-feature
vocabulary sizes. Both paths get the same hashed rows and the same tier-1 capacity in rows:
the CPU path's in host memory (the bundle's float16 records), the CUDA path's in device memory
(float32 rows). Figures, for each batch size:

  device   the GPU's name and memory, and the measured device-to-device copy rate (bytes read +
           written per second): the bandwidth bound the gather is held against
  gather   the gather kernel alone over the device tier (index and rows already on the device):
           rows/s, bytes moved/s (rows read + rows written + index read) and their share of the
           measured copy rate; ONNX Runtime's Gather over the same device table, for comparison
  batch    end-to-end batch latency, hashed rows in -> scores on the host out (dedupe, tier
           look-ups, misses from the row files, upload, gather, assemble, dense, download): p50,
           p99 and examples/s of each path, and the tier-1 hit rate over the measured batches

Hashing the values themselves is the same host code on both paths and is left out: the traffic
is hashed once up front (a rank mixed with the feature's seed, reduced by the contract's
``rows_of``), as the hot-tier phase of ``uembed/loadtest/bench.py`` does.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from uembed.bundle.loader import load_bundle
from uembed.bundle.synthetic import criteo_features, write_synthetic_bundle
from uembed.contract.hashing import rows_of
from uembed.loadtest.traffic import zipf_cdf, zipf_ranks
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.cuda import CudaModelRuntime, cuda_modules
from uembed.serving.pipeline.dense import onnx_session

# Distinct values of Criteo-Kaggle's 26 categorical columns (33.8 M in all), the sizes DLRM publishes.
CRITEO_KAGGLE_VOCABULARY = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip


class CriteoTraffic:
    """Hashed rows ``[B, 26]`` of Zipf(``exponent``) values per feature, over each feature's vocabulary."""

    def __init__(self, plan, exponent: float, seed: int = 0) -> None:
        self.rows_of = rows_of
        self.table_rows = plan.tables[0].rows
        self.seeds = [np.uint64(feature.lookups[0].seed) for feature in plan.features]
        self.cdfs = [zipf_cdf(size, exponent) for size in CRITEO_KAGGLE_VOCABULARY[: len(plan.features)]]
        self.rng = np.random.default_rng(seed)

    def batch(self, examples: int) -> np.ndarray:
        columns = []
        for cdf, seed in zip(self.cdfs, self.seeds):
            ranks = zipf_ranks(self.rng, cdf, examples).astype(np.uint64)
            columns.append(self.rows_of((ranks * np.uint64(0x9E3779B97F4A7C15)) ^ seed, self.table_rows))
        return np.stack(columns, axis=1).astype(np.int64)


def device_facts(cp) -> dict:
    """Name, memory and the measured device-to-device copy rate (a 1 GiB buffer, median of 10)."""
    properties = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    source = cp.random.random(2**28, dtype=cp.float32)  # 1 GiB
    target = cp.empty_like(source)
    seconds = event_median(cp, lambda: target.__setitem__(Ellipsis, source), 10)
    return {
        "name": properties["name"].decode() if isinstance(properties["name"], bytes) else properties["name"],
        "memory_gib": round(properties["totalGlobalMem"] / 2**30, 1),
        "copy_gb_per_s": round(2 * source.nbytes / seconds / 1e9, 1),
    }


def event_median(cp, work, repeats: int) -> float:
    """Median seconds of ``work`` on the current stream, timed with CUDA events after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        work()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1000)
    return float(np.median(times))


def ort_gather_session(runtime, rows: int):
    """ONNX Runtime's Gather over the device tier, bound by pointer (the alternative to the CuPy kernel)."""
    from onnx import TensorProto, helper

    dim = runtime.plan.dim
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["rows"], axis=0)],
        "device_gather",
        [helper.make_tensor_value_info("table", TensorProto.FLOAT, [rows, dim]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", dim])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = {"device_id": str(runtime.device_id), "user_compute_stream": str(runtime.stream.ptr)}
    return onnx_session(model.SerializeToString(), providers=[("CUDAExecutionProvider", options)])


def gather_figures(runtime, batch_sizes: list[int], bandwidth: float) -> list[dict]:
    """The gather kernel alone (and ORT's Gather) over the filled device tier, per batch size."""
    cp = runtime.cupy
    table = runtime.tables[0]
    filled = max(runtime.stores[0].hot.used, 1)
    dim, slots = runtime.plan.dim, runtime.slots
    session = ort_gather_session(runtime, table.rows.shape[0])
    out = []
    rng = np.random.default_rng(1)
    with runtime.cuda, runtime.stream:
        for examples in batch_sizes:
            count = examples * slots
            index = cp.asarray(rng.integers(0, filled, count).astype(np.int32))
            rows = cp.empty((examples, slots, dim), dtype=cp.float32)
            all_columns = cp.arange(slots, dtype=cp.int32)

            def kernel() -> None:
                runtime.gather(table.rows, table.rows, index, all_columns, slots, rows)

            seconds = event_median(cp, kernel, 50)
            index64 = index.astype(cp.int64)
            ort_rows = cp.empty((count, dim), dtype=cp.float32)
            binding = session.io_binding()
            binding.bind_input("table", "cuda", runtime.device_id, np.float32, list(table.rows.shape), table.rows.data.ptr)
            binding.bind_input("index", "cuda", runtime.device_id, np.int64, [count], index64.data.ptr)
            binding.bind_output("rows", "cuda", runtime.device_id, np.float32, [count, dim], ort_rows.data.ptr)
            ort_seconds = event_median(cp, lambda: session.run_with_iobinding(binding), 50)
            assert bool((ort_rows.reshape(rows.shape) == rows).all()), "ORT's Gather and the kernel disagree"
            moved = count * (2 * dim * 4 + 4)
            out.append({
                "examples": examples, "rows": count, "kernel_us": round(seconds * 1e6, 1),
                "rows_per_s": round(count / seconds), "gb_per_s": round(moved / seconds / 1e9, 1),
                "share_of_copy_rate": round(moved / seconds / bandwidth, 3),
                "ort_gather_us": round(ort_seconds * 1e6, 1), "ort_rows_per_s": round(count / ort_seconds),
            })  # fmt: skip
    return out


def time_batches(runtime, batches: list[np.ndarray]) -> dict:
    """Hashed rows -> host scores, one batch at a time; tier-1 hit rate of these batches."""
    weights = np.ones(batches[0].shape, dtype=np.float32)
    for store in runtime.stores:
        store.take_counts()
    seconds = []
    for rows in batches:
        started = time.perf_counter()
        scores = runtime.score_encoded(rows, weights)
        seconds.append(time.perf_counter() - started)
        assert scores.shape == (len(rows),)
    counts = runtime.stores[0].take_counts()
    looked_up = counts.hits["hot"] + counts.misses["hot"]
    milliseconds = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 3),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 3),
        "examples_per_s": round(len(batches) * len(batches[0]) / sum(seconds)),
        "tier1_hit_rate": round(counts.hits["hot"] / max(looked_up, 1), 4),
    }


def run_gpu_bench(workdir: Path, table_rows: int, hot_gib: float, batch_sizes: list[int], batches: int,
                  warm_batches: int, exponent: float, bundle: Path | None, report) -> None:  # fmt: skip
    """Every figure of the GPU phase, each reported as it is measured."""
    cp, ort = cuda_modules("cuda")
    if bundle is None:
        bundle = write_synthetic_bundle(workdir, "criteo-synth", criteo_features(), table_rows, dtype="float16")
    started = time.perf_counter()
    loaded = load_bundle(bundle)
    load_seconds = time.perf_counter() - started
    table = next(iter(loaded.tables.values()))
    dim = table.dim
    hot_rows = int(hot_gib * 2**30) // (dim * 4)
    cuda = CudaModelRuntime(loaded, "cuda", device_hot_rows_bytes=hot_rows * dim * 4)
    cpu = ModelRuntime(loaded, hot_rows_bytes=hot_rows * cuda.stores[0].codec.record_bytes)
    facts = device_facts(cp) | {"onnxruntime": ort.__version__, "cupy": cp.__version__}
    report("gpu_device", facts)
    report("gpu_setup", {
        "bundle": str(bundle), "table_rows": table.rows, "dim": dim, "row_dtype": table.dtype,
        "row_file_gib": round(table.nbytes / 2**30, 2), "bundle_load_s": round(load_seconds, 1),
        "tier1_rows": hot_rows, "device_tier1_gib": round(hot_rows * dim * 4 / 2**30, 2),
        "cpu_tier1_gib": round(hot_rows * cuda.stores[0].codec.record_bytes / 2**30, 2), "zipf_exponent": exponent,
        "features": len(loaded.plan.features),
    })  # fmt: skip
    traffic = CriteoTraffic(loaded.plan, exponent)
    largest = max(batch_sizes)
    warm = [traffic.batch(largest) for _ in range(warm_batches)]
    for runtime in (cuda, cpu):
        for rows in tqdm(warm, desc=f"warm-up {runtime.device}", unit="batch", leave=False):
            runtime.score_encoded(rows, np.ones(rows.shape, dtype=np.float32))
    # Both paths agree on the same batch (also proves the device tier returns the file's rows).
    check = traffic.batch(512)
    ones = np.ones(check.shape, dtype=np.float32)
    report("gpu_parity", {"examples": 512, "max_abs_diff": float(np.abs(cuda.score_encoded(check, ones) - cpu.score_encoded(check, ones)).max())})
    report("gpu_gather", {"per_batch_size": gather_figures(cuda, batch_sizes, facts["copy_gb_per_s"] * 1e9)})
    per_size = []
    for examples in tqdm(batch_sizes, desc="batch sizes", unit="size", leave=False):
        measured = [traffic.batch(examples) for _ in range(batches)]
        row = {"examples": examples, "cuda": time_batches(cuda, measured), "cpu": time_batches(cpu, measured)}
        row["cuda_speedup"] = round(row["cuda"]["examples_per_s"] / row["cpu"]["examples_per_s"], 2)
        per_size.append(row)
        print(f"  batch {examples}: {row}", flush=True)
    report("gpu_batches", {"per_batch_size": per_size, "device_tier1_rows_used": cuda.stores[0].hot.used})
