"""The CUDA path (``UEMBED_DEVICE=cuda``): tier 1 in GPU memory, rows gathered and assembled on the GPU,
the dense net on ONNX Runtime's CUDA provider with I/O binding.

A batch keeps the CPU path's stages (``lookup``, ``assemble``, ``dense``) and runs them on one CUDA
stream, which ONNX Runtime shares (``user_compute_stream``), so no step waits on another::

    host      per table: unique ids; each id's device slot from tier 1's index (the index stays on the
              host, so misses are known without asking the GPU); misses from Redis / the row files,
              decoded to float32; the admissions tier 1 decides for them
    upload    ONE pinned host -> device copy: per table the source of every slot (a device slot, or
              -1 - k for the k-th missed row), the admissions, and the missed rows
    gather    kernel: rows [B, S, D] from the device table (hits) or the uploaded misses
    admit     kernel: admitted misses copied into their device slots, after the gather, so a batch
              reads one consistent set of rows (a row this batch evicts was already read by it)
    assemble  kernel: pooled, concatenated, biased embeddings [B, E] (weights [B, S] go up in a second,
              small copy)
    dense     ORT run with its input and output bound to device buffers; only the scores [B] come back

CuPy owns the device memory and the kernels; ORT reads and writes that memory through raw pointers.
Buffers are allocated at load and grow (doubling) when a larger batch comes, never per batch. Device
rows are float32 whatever the bundle's row dtype: they are decoded once on the host, by the same code
as every other tier, so the device tier holds bit-identical rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uembed.bundle.loader import Bundle
from uembed.contract.errors import DeviceError
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.stages import BatchPath
from uembed.serving.pipeline.values import ValueLimits
from uembed.serving.rows.redis import RedisTier

# Rows whose dim is a multiple of 4 move as float4 (16-byte loads and stores): a 64-byte row is 4 threads, not 16.
GATHER_ROWS_VEC4 = r"""
const long long d = i % dim4;
const long long k = i / dim4;  // (example, slot of this table), example-major
const long long source = index[k];
const float4* from = source >= 0 ? reinterpret_cast<const float4*>(&table[0]) + source * dim4
                                 : reinterpret_cast<const float4*>(&misses[0]) + (-1 - source) * dim4;
reinterpret_cast<float4*>(&out[0])[((k / width) * slots + columns[k % width]) * dim4 + d] = from[d];
"""

GATHER_ROWS = r"""
const long long d = i % dim;
const long long k = i / dim;  // (example, slot of this table), example-major
const long long source = index[k];
const float value = source >= 0 ? table[source * dim + d] : misses[(-1 - source) * dim + d];
out[((k / width) * slots + columns[k % width]) * dim + d] = value;
"""

ADMIT_ROWS = r"""
const long long d = i % dim;
const long long k = i / dim;
table[(long long)slot[k] * dim + d] = misses[(long long)source[k] * dim + d];
"""

ASSEMBLE = r"""
const long long d = i % dim;
const long long g = (i / dim) % groups;
const long long b = i / (dim * groups);
float total = 0.0f;
for (long long s = first[g]; s < stop[g]; ++s) {
    total += weights[b * slots + s] * rows[(b * slots + s) * dim + d];
}
out[i] = total + bias[g * dim + d];
"""


def cuda_index(device: str) -> int:
    """``cuda`` -> 0, ``cuda:1`` -> 1."""
    return int(device.partition(":")[2] or 0)


def cuda_modules(device: str):
    """CuPy and ONNX Runtime with its CUDA provider, checked usable on ``device``; else a DeviceError."""
    import onnxruntime as ort

    install = "install the gpu extra: pip install 'uembed[gpu]' (onnxruntime-gpu replaces onnxruntime)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceError(f"device={device}: this onnxruntime {ort.__version__} has no CUDA provider; {install}")
    try:
        import cupy
    except ImportError as exc:
        raise DeviceError(f"device={device}: CuPy is not installed; {install}") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise DeviceError(f"device={device}: no usable CUDA device ({exc})") from exc
    if cuda_index(device) >= count:
        raise DeviceError(f"device={device}: this machine has {count} CUDA device(s)")
    return cupy, ort


@dataclass
class DeviceTable:
    """One table's device side: tier-1 rows float32 [capacity, D] and the batch columns its slots fill."""

    rows: object  # cupy.ndarray
    columns: object  # cupy int32 [slots of this table]: their positions among the batch's S slots
    width: int


class CudaModelRuntime(ModelRuntime):
    """A model version scored on a CUDA device; same stages and results as :class:`ModelRuntime` (up to float rounding:
    it runs ``dense.onnx`` whole, also where the CPU runs a split network's parts)."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cuda",
        device_hot_rows_bytes: int = 2**30,
        redis: RedisTier | None = None,
        redis_prefix: str = "uembed",
        threads: int = 1,
        tf32: bool = False,
        limits: ValueLimits | None = None,
        value_cache_bytes: int = 32 * 2**20,
    ) -> None:
        self.cupy, ort = cuda_modules(device)
        cp = self.cupy
        self.device = f"cuda:{cuda_index(device)}"
        self.device_id = cuda_index(device)
        self.cuda = cp.cuda.Device(self.device_id)
        with self.cuda:
            self.stream = cp.cuda.Stream(non_blocking=True)
        cuda_options = {
            "device_id": str(self.device_id),
            "user_compute_stream": str(self.stream.ptr),
            "use_tf32": "1" if tf32 else "0",  # ORT's default is on: matmuls then round inputs to 10-bit mantissas
        }
        super().__init__(
            bundle,
            hot_rows_bytes=device_hot_rows_bytes,
            redis=redis,
            redis_prefix=redis_prefix,
            threads=threads,
            providers=[("CUDAExecutionProvider", cuda_options)],
            hot_on_device=True,
            limits=limits,
            value_cache_bytes=value_cache_bytes,
        )
        self.batch_path = BatchPath.FLAT  # its lookup and assemble kernels take the broadcast [B, S] batch
        self.pools_in_one_pass = False  # its own lookup and assemble run on the device
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise DeviceError(
                f"device={device}: ONNX Runtime could not start its CUDA provider (providers: "
                f"{', '.join(self.session.get_providers())}); check the CUDA and cuDNN libraries of the gpu extra"
            )
        self.binding = self.session.io_binding()
        self.input_name = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0]
        self._kernels()
        self._constants()
        self.capacity = 0
        self._grow(64)

    # --- set-up ------------------------------------------------------------------------------
    def _kernels(self) -> None:
        cp = self.cupy
        self.vector = 4 if self.plan.dim % 4 == 0 else 1
        self.gather_kernel = cp.ElementwiseKernel(
            f"raw float32 table, raw float32 misses, raw int32 index, raw int32 columns, int64 {'dim4' if self.vector == 4 else 'dim'}, "
            "int64 width, int64 slots",
            "raw float32 out", GATHER_ROWS_VEC4 if self.vector == 4 else GATHER_ROWS, f"uembed_gather_rows_{self.vector}",
        )  # fmt: skip
        self.admit_kernel = cp.ElementwiseKernel(
            "raw float32 misses, raw int32 source, raw int32 slot, int64 dim", "raw float32 table", ADMIT_ROWS, "uembed_admit_rows"
        )
        self.assemble_kernel = cp.ElementwiseKernel(
            "raw float32 rows, raw float32 weights, raw int32 first, raw int32 stop, raw float32 bias, int64 dim, "
            "int64 groups, int64 slots",
            "raw float32 out", ASSEMBLE, "uembed_assemble",
        )  # fmt: skip

    def _constants(self) -> None:
        """Per model, once: device tables, each table's slot columns, group ranges and the bias row."""
        cp, plan = self.cupy, self.plan
        dim = plan.dim
        # Each (feature, lookup) group pools a contiguous run of slots: the pooling matrix's rows say which.
        first = self.pooling.argmax(axis=1).astype(np.int32)
        stop = first + self.pooling.sum(axis=1).astype(np.int32)
        bias = np.zeros(plan.output_dim, dtype=np.float32)
        if self.bias_columns.size:
            bias[self.bias_columns] = self.bundle.bias
        with self.cuda:
            self.tables = [
                DeviceTable(
                    cp.zeros((max(store.hot.capacity if store.hot is not None else 0, 1), dim), dtype=cp.float32),
                    cp.asarray(slots.astype(np.int32)),
                    len(slots),
                )
                for (_, slots), store in zip(self.table_slots, self.stores)
            ]
            self.group_first = cp.asarray(first)
            self.group_stop = cp.asarray(stop)
            self.bias_row = cp.asarray(bias)
        self.stream.synchronize()

    def _grow(self, examples: int) -> None:
        """Buffers for batches of up to ``examples`` (double the need, so growth is rare)."""
        if examples <= self.capacity:
            return
        import cupyx

        cp, slots, dim = self.cupy, self.slots, self.plan.dim
        capacity = max(2 * examples, 64)
        # Upload: per table its slot sources, admissions (at most one per slot), then the missed rows.
        upload_words = capacity * slots * (3 + dim) + 4
        with self.cuda:
            self.upload_host = cupyx.empty_pinned(upload_words, dtype=np.int32)
            self.upload = cp.empty(upload_words, dtype=cp.int32)
            self.weights_host = cupyx.empty_pinned(capacity * slots, dtype=np.float32)
            self.weights = cp.empty(capacity * slots, dtype=cp.float32)
            self.rows = cp.empty((capacity, slots, dim), dtype=cp.float32)
            self.embeddings = cp.empty((capacity, self.plan.output_dim), dtype=cp.float32)
            self.scores = cp.empty(capacity, dtype=cp.float32)
            self.scores_host = cupyx.empty_pinned(capacity, dtype=np.float32)
        self.capacity = capacity

    def gather(self, table, misses, index, columns, width: int, out) -> None:
        """Kernel: ``out[b, columns[j]] = table[index[b, j]]`` (or miss ``-1 - index``) for ``index.size`` items."""
        units = self.plan.dim // self.vector
        self.gather_kernel(table, misses, index, columns, units, width, self.slots, out, size=index.size * units)

    def _to_device(self, host: np.ndarray, device, words: int) -> None:
        runtime = self.cupy.cuda.runtime
        runtime.memcpyAsync(device.data.ptr, host.ctypes.data, words * 4, runtime.memcpyHostToDevice, self.stream.ptr)

    def apply_rows(self, table: str, ids: np.ndarray, records: np.ndarray) -> None:
        """Row updates: the host tiers as on the CPU, then the rows tier 1 holds in GPU memory, decoded once."""
        position = self.table_position[table]
        store = self.stores[position]
        slots = store.apply_rows(ids, records)
        resident = slots >= 0
        if not resident.any():
            return
        cp = self.cupy
        with self.cuda, self.stream:
            self.tables[position].rows[cp.asarray(slots[resident])] = cp.asarray(store.codec.decode(records[resident]))
        self.stream.synchronize()

    # --- the stages ----------------------------------------------------------------------------
    def lookup(self, rows: np.ndarray):
        """Rows of every slot, float32 [B, S, D] on the device (a view of a reused buffer)."""
        batch = len(rows)
        self._grow(batch)
        dim = self.plan.dim
        resolved = []
        misses_total = 0
        for (_, slots), store in zip(self.table_slots, self.stores):
            ids = rows[:, slots]
            unique, inverse = np.unique(ids, return_inverse=True)
            found, misses, miss_rows, admit_slots, admit_from = store.resolve(unique)
            source = found.copy()
            source[misses] = -1 - (misses_total + np.arange(len(misses)))
            resolved.append((source[inverse.reshape(ids.shape)], admit_slots, misses_total + admit_from, miss_rows))
            misses_total += len(misses)
        # Pack everything into the pinned buffer: [index t0][admit slots t0][admit sources t0] ... [missed rows].
        host = self.upload_host
        offset = 0
        layout = []
        for index, admit_slots, admit_sources, _ in resolved:
            spans = []
            for part in (index.ravel(), admit_slots, admit_sources):
                host[offset : offset + part.size] = part
                spans.append((offset, part.size))
                offset += part.size
            layout.append(spans)
        offset = miss_offset = -(-offset // 4) * 4  # 16-byte aligned: the gather reads missed rows as float4
        for *_, miss_rows in resolved:
            host[offset : offset + miss_rows.size].view(np.float32)[:] = miss_rows.ravel()
            offset += miss_rows.size
        cp = self.cupy
        out = self.rows[:batch]
        with self.cuda, self.stream:
            self._to_device(host, self.upload, offset)
            misses = self.upload[miss_offset:offset].view(cp.float32)
            if not misses.size:
                misses = self.upload[:1].view(cp.float32)  # never read: no slot points at a miss
            for table, (index, _, _) in zip(self.tables, layout):
                self.gather(table.rows, misses, self.upload[index[0] : index[0] + index[1]], table.columns, table.width, out)
            for table, (_, slots_span, sources_span) in zip(self.tables, layout):
                if slots_span[1]:
                    self.admit_kernel(
                        misses,
                        self.upload[sources_span[0] : sources_span[0] + sources_span[1]],
                        self.upload[slots_span[0] : slots_span[0] + slots_span[1]],
                        dim,
                        table.rows,
                        size=slots_span[1] * dim,
                    )
        self.stream.synchronize()  # the stage timings stay truthful, and the pinned buffer is free again
        return out

    def assemble(self, looked_up, weights: np.ndarray):
        """Pooled, concatenated, biased embeddings float32 [B, E] on the device."""
        batch = len(weights)
        size = weights.size
        self.weights_host[:size] = weights.ravel()
        out = self.embeddings[:batch]
        with self.cuda, self.stream:
            self._to_device(self.weights_host, self.weights, size)
            self.assemble_kernel(looked_up, self.weights, self.group_first, self.group_stop, self.bias_row,
                                 self.plan.dim, self.plan.groups, self.slots, out, size=out.size)  # fmt: skip
        self.stream.synchronize()
        return out

    def dense(self, embeddings) -> np.ndarray:
        """Probabilities float32 [B] on the host: ORT reads and writes device buffers bound for this batch."""
        batch = len(embeddings)
        binding = self.binding
        binding.bind_input(self.input_name, "cuda", self.device_id, np.float32, list(embeddings.shape), embeddings.data.ptr)
        shape = [batch] + [1] * (len(self.output.shape) - 1)
        binding.bind_output(self.output.name, "cuda", self.device_id, np.float32, shape, self.scores.data.ptr)
        self.session.run_with_iobinding(binding)
        runtime = self.cupy.cuda.runtime
        runtime.memcpyAsync(
            self.scores_host.ctypes.data, self.scores.data.ptr, batch * 4, runtime.memcpyDeviceToHost, self.stream.ptr
        )
        self.stream.synchronize()
        return self.scores_host[:batch].copy()
