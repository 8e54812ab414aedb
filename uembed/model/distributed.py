"""Data-parallel training over ``torch.distributed`` (gloo on CPUs), launched by torchrun.

A process started by torchrun (``uembed train --nproc N``, or ``torchrun ... -m uembed train``) finds
``WORLD_SIZE`` and ``RANK`` in its environment; ``init_from_env`` joins the process group, and the hooks
below are what ``uembed/model/train.py`` and ``uembed/model/streaming.py`` call. With one process every
hook is the identity: a run without torchrun trains exactly as before.

* **Data.** In memory, every rank holds the examples and takes every ``world``-th one of the epoch's
  permutation (the same permutation on every rank: one seed), padded so every rank runs as many steps.
  Streamed, every rank reads its own share of the source (``shard``: blocks of Parquet rows, a byte range of
  each plain Criteo text file, or record batches of a gzip or CSV file), and ``Lockstep``
  keeps the ranks stepping together until the last one runs dry.
* **Gradients.** The dense parameters' gradients are summed over the ranks (``all_reduce``) and divided by
  the ranks that had a batch. The shared tables are replicated: every rank gathers every rank's sparse
  gradient (touched rows only), coalesces them all and applies the same update, so the tables and the
  row-wise optimiser state stay identical on every rank; the dense sum travels meanwhile.
* **Writing.** Rank 0 writes checkpoints, metrics and the run directory (``is_writer``); the run
  directory must be one every rank can read (a shared volume across machines): a restarted group resumes
  from it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from uembed.contract.errors import UembedError
from uembed.model.optim import coalesce_rows

# How long a rank waits for the others in one collective: a peer that died is noticed by torchrun's
# agent (which restarts the group) long before this, so it only bounds a hang that nothing else sees. It
# is long because one wait is legitimately long: the other ranks wait for rank 0's statistics pass.
COLLECTIVE_TIMEOUT_S = 1800
# How long a rank waits for the others to join the group (their addresses, then the connections): the
# ranks start together, so a group that has not formed by then never will, and the rank fails with one
# line instead of waiting out the collective timeout. UEMBED_JOIN_TIMEOUT_S sets another.
JOIN_TIMEOUT_S = 180
# How long a rank that has finished waits for the others at the end (rank 0 writes the run directory and its
# reports meanwhile, which at scale can take longer than any one collective).
LEAVE_TIMEOUT_S = 24 * 3600
# Set by ``launch`` for the processes it starts: the launcher's pid, which they must not outlive.
LAUNCHER_PID = "UEMBED_LAUNCHER_PID"


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the torch.distributed environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(timeout_s: float = COLLECTIVE_TIMEOUT_S, join_timeout_s: float | None = None) -> int:
    """Join the process group torchrun describes (gloo); the world size (1 without a launcher).

    Joining is bounded by ``join_timeout_s`` (default UEMBED_JOIN_TIMEOUT_S, else ``JOIN_TIMEOUT_S``; past it,
    an error naming the rank and the store), each collective after it by ``timeout_s``."""
    if not launched():
        return 1
    _GROUP_TIMEOUT_S[0] = timeout_s
    if join_timeout_s is None:
        join_timeout_s = _seconds("UEMBED_JOIN_TIMEOUT_S", JOIN_TIMEOUT_S)
    _die_with_launcher()
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
            and os.environ["RANK"] == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):  # fmt: skip
        print("warning: torchrun lends the ranks its store, which a restarted group can find stale "
              "(pytorch/pytorch#135712): set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for --max-restarts, as "
              "`uembed train --nproc` does", file=sys.stderr)  # fmt: skip
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=timedelta(seconds=min(join_timeout_s, timeout_s)))
        except (RuntimeError, TimeoutError) as exc:  # DistError is a RuntimeError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UembedError(
                f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} could not join the group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {join_timeout_s:.0f} s: {first}"
            ) from None
        if timeout_s > join_timeout_s:
            # torch's (private) way to give a formed group another timeout; without it, the joining one stays
            set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
            if set_timeout is not None:
                set_timeout(timedelta(seconds=timeout_s))
            else:
                print(f"warning: this torch cannot give a formed group a longer timeout: every collective waits at most "
                      f"{join_timeout_s:.0f} s (UEMBED_JOIN_TIMEOUT_S), rank 0's statistics pass included", file=sys.stderr)  # fmt: skip
    return dist.get_world_size()


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "")
    try:
        return float(text) if text else default
    except ValueError:
        raise UembedError(f"{variable}={text!r}: give a number of seconds") from None


def _die_with_launcher() -> None:
    """A process ``launch`` started ends when the launcher does, however it ends (SIGKILL included):
    torchrun starts each rank in a session of its own, where nothing else would stop it, and a rank left
    behind holds its share of the CPUs and its run directory (Linux; elsewhere the agent's own cleanup)."""
    launcher = os.environ.pop(LAUNCHER_PID, None)  # a process this rank starts is not a rank of the launcher's
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != int(launcher):  # it died before the request above: nothing will send the signal now
        print(f"error: rank {os.environ.get('RANK', '?')}: its launcher (pid {launcher}) has gone; stopping", file=sys.stderr, flush=True)
        os._exit(1)


def leave() -> None:
    """End this process's part in the group once its run has ended well: every rank waits for the others,
    then the group's threads stop while the interpreter is whole. A process that exits with the group
    still up can abort (``terminate called without an active exception``): gloo's threads outlive Python's
    finalisation holding work that refers to its tensors."""
    if not dist.is_initialized():
        return
    if world_size() > 1:
        # The others wait here while rank 0 writes the run (its reports can read the data again): a barrier of
        # its own timeout, not the collectives'. A rank that died meanwhile is torchrun's agent's to notice.
        dist.monitored_barrier(timeout=timedelta(seconds=LEAVE_TIMEOUT_S))
    dist.destroy_process_group()
    _DENSE_GROUP[:] = [None, None]  # nothing here keeps a destroyed group (or its threads) alive


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_writer() -> bool:
    """The one process that writes the run directory, prints progress and checkpoints."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def writer_first():
    """Rank 0 runs the block first (a scan that writes what the others then read), the others after it."""
    if not is_writer():
        barrier()
    yield
    if is_writer():
        barrier()


def rank_seed(seed: int) -> int | list[int]:
    """A seed for this rank's own randomness (its shuffle buffer): ``seed`` itself with one process."""
    return seed if world_size() == 1 else [seed, rank()]


def shard_order(order: torch.Tensor) -> torch.Tensor:
    """This rank's examples of an epoch's permutation: every world-th one, the permutation padded with
    its own first examples so every rank gets as many (and runs as many steps)."""
    world = world_size()
    if world == 1:
        return order
    padded = -(-len(order) // world) * world
    if padded > len(order):
        order = torch.cat([order, order[: padded - len(order)]])
    return order[rank() :: world]


def shard() -> tuple[int, int]:
    """(rank, world size): which share of a streamed source this process reads."""
    return rank(), world_size()


def sum_over_ranks(values: Iterable[float]) -> list[float]:
    """Each value summed over the ranks (float64)."""
    values = list(values)
    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_counts(counts: np.ndarray) -> np.ndarray:
    """An int64 array summed over the ranks (histograms of predictions)."""
    if world_size() == 1:
        return counts
    tensor = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
    dist.all_reduce(tensor)
    return tensor.numpy()


def gather_objects(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` (first dimension may differ between ranks), concatenated in rank order."""
    sizes = torch.tensor([tensor.shape[0]], dtype=torch.int64)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def gather_predictions(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's labels and predictions, concatenated: metrics over all the ranks' examples."""
    if world_size() == 1:
        return labels, probabilities
    stacked = torch.from_numpy(np.stack([labels.astype(np.float64), probabilities.astype(np.float64)], axis=1))
    both = _gather_rows(stacked).numpy()
    return both[:, 0].astype(labels.dtype), both[:, 1].astype(probabilities.dtype)


def eval_share(n: int) -> slice:
    """This rank's share of ``n`` evaluation examples (gathered again by ``gather_predictions``)."""
    return slice(rank(), n, world_size())


def table_parameter(model) -> torch.nn.Parameter:
    """The one matrix of every shared table (a search model wraps the plan embedding)."""
    return getattr(model.embedding, "base", model.embedding).weight


def use_sparse_tables(model) -> None:
    """Give the tables a sparse gradient under data parallelism: only touched rows cross the wire."""
    if world_size() > 1:
        getattr(model.embedding, "base", model.embedding).sparse = True


class Lockstep:
    """Iterate a rank's batches in step with the other ranks: yields a batch, or None once this rank has run
    dry (it still takes part in the step, with no gradient of its own). With more than one process it never
    ends by itself: the caller ends the loop when ``sync_gradients`` reports that no rank had a batch (the
    count travels in the step's header)."""

    def __init__(self, batches: Iterable) -> None:
        self.batches = iter(batches)
        self.finished = False

    def finish(self) -> None:
        """This rank takes no more batches this epoch (an example cap reached)."""
        self.finished = True

    def __iter__(self) -> Iterator:
        while True:
            batch = None if self.finished else next(self.batches, None)
            if batch is None:
                self.finished = True
                if world_size() == 1:
                    return
            yield batch


_DENSE_GROUP: list = [None, None]  # (the default group it was made beside, the dense gradients' group)
_GROUP_TIMEOUT_S = [COLLECTIVE_TIMEOUT_S]  # init_from_env's timeout of a collective, for the groups made later


def _dense_group():
    """The process group the dense gradients' all-reduce runs on: every rank of the default group, its own
    connections. Made at the first step (every rank takes part in each step, so every rank makes it there)."""
    world = dist.group.WORLD
    if _DENSE_GROUP[0] is not world:  # the first step, or a default group formed again in this process
        _DENSE_GROUP[:] = [world, dist.new_group(backend="gloo", timeout=timedelta(seconds=_GROUP_TIMEOUT_S[0]))]
    return _DENSE_GROUP[1]


def sync_gradients(model, has_batch: bool = True, dense_tables: bool = False, table_step: Callable[[], object] | None = None,
                   wire: torch.dtype | None = None) -> int:  # fmt: skip
    """Average the gradients over the ranks that had a batch; how many had one (0: the step is to be skipped,
    every rank has run dry). This rank had one unless ``has_batch`` is False (its gradients count as zero).
    ``table_step`` (the tables' optimiser step), when given, runs once the tables' gradient is in place, with one
    process too.

    Three collectives a step, whatever the model: the dense parameters' gradients, flattened together,
    all-reduced asynchronously on a group of their own, set off first; meanwhile, on the default group, an
    all_gather of each rank's header (whether it had a batch, how many distinct table rows its batch touched)
    and an all_gather of those rows (coalesced: a row looked up many times crosses the wire once), padded to
    the most any rank sends, row indices carried bit for bit in the values' dtype; every rank then coalesces
    the same rows in rank order (``coalesce_rows``: every rank holds the same update) and runs ``table_step``
    before it waits for the dense sum. ``dense_tables`` turns the table's update into a dense gradient, for a dense
    optimiser of the tables (Adam). ``wire`` (default: the parameters' dtype) is the dtype the gradients travel in:
    bfloat16 halves the bytes and rounds each rank's gradients to 8 bits of mantissa; the dense gradients are
    summed in it too (as DDP's ``bf16_compress_hook`` does), the table's rows in the parameters' dtype, and the
    update is made in the parameters' dtype.
    """
    world = world_size()
    if world == 1:
        if has_batch and table_step is not None:
            table_step()
        return int(has_batch)
    own = _own_gradients(model, has_batch, wire)
    every_count = [torch.empty((1, 2), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(every_count, torch.tensor([[int(has_batch), own.indices.shape[0]]], dtype=torch.int64))
    active = sum(int(c[0, 0]) for c in every_count)
    if active == 0:
        own.dense_work.wait()  # every rank's zeros: nothing to apply, but the group's collectives stay paired
        return 0
    sizes = [int(c[0, 1]) for c in every_count]
    packed = _pack_rows(own.indices, own.values, max(sizes), own.wire)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    indices, values = _unpack_rows([part[:size] for part, size in zip(parts, sizes)], own.wire)
    _apply(own, indices, values, active, dense_tables, table_step)
    return active


class _OwnGradients:
    """A rank's share of a step: its dense gradients flattened (their all-reduce already travelling) and its
    table gradient's distinct rows."""

    def __init__(self, table, dense, flat, dense_work, indices, values, wire) -> None:
        self.table, self.dense, self.flat, self.dense_work = table, dense, flat, dense_work
        self.indices, self.values, self.wire = indices, values, wire


def _own_gradients(model, has_batch: bool, wire: torch.dtype | None = None) -> _OwnGradients:
    table = table_parameter(model)
    wire = wire or table.dtype
    # The dense gradients set off first, on a group of their own (gloo runs each group's collectives on its own
    # connections, in order within a group): they travel while this rank coalesces its rows and the table's
    # rows are gathered on the default group.
    dense = [p for p in model.parameters() if p is not table and p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None and has_batch else torch.zeros_like(p)).reshape(-1) for p in dense]).to(wire)
    dense_work = dist.all_reduce(flat, group=_dense_group(), async_op=True)
    grad = table.grad
    if grad is None or not has_batch:
        indices, values = torch.zeros(0, dtype=torch.int64), torch.zeros((0, table.shape[1]), dtype=table.dtype)
    elif grad.is_sparse:
        grad = grad if grad.is_coalesced() else coalesce_rows(grad._indices()[0], grad._values(), table.shape)
        indices, values = grad.indices()[0], grad.values()  # a row a batch touches many times crosses the wire once
    else:  # a dense gradient: send only the rows it touches
        indices = grad.abs().sum(dim=1).nonzero().flatten()
        values = grad[indices]
    return _OwnGradients(table, dense, flat, dense_work, indices, values, wire)


def _index_columns(dtype: torch.dtype) -> int:
    """Columns of ``dtype`` that hold an int64 bit for bit."""
    return max(1, 8 // torch.empty(0, dtype=dtype).element_size())


def _pack_rows(indices: torch.Tensor, values: torch.Tensor, rows: int, dtype: torch.dtype, header_rows: int = 0) -> torch.Tensor:
    """``[header_rows + rows, columns + D]`` of ``dtype``: each row's id carried bit for bit in the first columns,
    then its values; zeros past the given rows (and in the header rows, for the caller to fill)."""
    columns = _index_columns(dtype)
    packed = torch.zeros((header_rows + rows, columns + values.shape[1]), dtype=dtype)
    n = indices.shape[0]
    packed[header_rows : header_rows + n, :columns] = indices.to(torch.int64).contiguous().view(dtype).reshape(-1, columns)
    packed[header_rows : header_rows + n, columns:] = values
    return packed


def _unpack_rows(parts: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids and values of packed rows, in the order given."""
    columns = _index_columns(dtype)
    rows = torch.cat(parts)
    return rows[:, :columns].contiguous().view(torch.int64).reshape(-1), rows[:, columns:]


def _apply(own: _OwnGradients, indices: torch.Tensor, values: torch.Tensor, active: int, dense_tables: bool,
           table_step: Callable[[], object] | None) -> None:  # fmt: skip
    """Put every rank's averaged gradients in place: the table's (coalesced in the order given, the same on every
    rank) and the dense ones once their sum has come; ``table_step`` runs before the wait for the dense sum."""
    table = own.table
    values = values.to(table.dtype)
    merged = coalesce_rows(indices, values / active if active > 1 else values, table.shape)
    table.grad = merged.to_dense() if dense_tables else merged
    if table_step is not None:
        table_step()
    own.dense_work.wait()
    flat = own.flat.to(table.dtype)
    if active > 1:
        flat.div_(active)  # in place: the dense gradients can be megabytes, every step
    offset = 0
    for parameter in own.dense:
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter)
        offset += size


class OverlappedExchange:
    """``--overlap-exchange``: each step's gradients travel while the next batch's forward and backward run, and
    are applied one step late, so the next batch's gradients are taken at weights that lack them (one step of
    staleness, as pipelined data-parallel training has). A rank that finishes a step before another goes on to
    the next instead of waiting for it. Every rank applies the same updates in the same order: the replicas stay
    identical.

    One collective of the table's rows a step instead of two: each rank's header (whether it had a batch, how
    many rows it sends) rides in the first rows, the rows padded to a capacity every rank derives alike from the
    counts it has seen (the most a rank sent in the last few steps applied, and a margin); a rank with more rows
    than that sends the rest in a second gather, which every rank knows to make from the headers (``overflows``
    counts them: each is a wait for the slowest rank). ``step`` returns how many ranks had a batch in the step it applied (None at
    an epoch's first step: nothing applied yet; 0: every rank has run dry, the loop ends); ``flush`` applies
    the step still travelling, before anything reads the weights."""

    MARGIN = 0.1  # the capacity over the most rows a rank sent in the last ``REMEMBERED`` steps applied
    MIN_MARGIN = 64
    REMEMBERED = 8

    def __init__(self, model, dense_tables: bool = False, table_step: Callable[[], object] | None = None,
                 wire: torch.dtype | None = None) -> None:  # fmt: skip
        self.model, self.dense_tables, self.table_step, self.wire = model, dense_tables, table_step, wire
        self.capacity = 0  # 0: none agreed yet (the first step gathers the counts first)
        self.recent: list[int] = []  # the most rows a rank sent, of the last steps applied
        self.travelling = None
        self.overflows = 0  # steps that needed the second gather

    def step(self, has_batch: bool) -> int | None:
        sent = self._send(has_batch)
        applied = self._apply(self.travelling) if self.travelling is not None else None
        self.travelling = sent
        return applied

    def flush(self) -> int | None:
        applied = self._apply(self.travelling) if self.travelling is not None else None
        self.travelling = None
        return applied

    def _with_margin(self, rows: int) -> int:
        return rows + max(self.MIN_MARGIN, int(rows * self.MARGIN))

    def _header_rows(self, dtype: torch.dtype, width: int) -> int:
        return -(-2 * _index_columns(dtype) // width)  # two int64: had a batch, rows

    def _send(self, has_batch: bool):
        own = _own_gradients(self.model, has_batch, self.wire)
        dtype, world = own.wire, world_size()
        if self.capacity == 0:
            counts = [torch.empty(1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(counts, torch.tensor([own.indices.shape[0]], dtype=torch.int64))
            self.capacity = self._with_margin(max(int(c) for c in counts))
        capacity = self.capacity
        header_rows = self._header_rows(dtype, _index_columns(dtype) + own.table.shape[1])
        first = min(own.indices.shape[0], capacity)
        packed = _pack_rows(own.indices[:first], own.values[:first], capacity, dtype, header_rows)
        header = torch.tensor([int(has_batch), own.indices.shape[0]], dtype=torch.int64).view(dtype)
        packed[:header_rows].view(-1)[: header.numel()] = header
        parts = [torch.empty_like(packed) for _ in range(world)]
        work = dist.all_gather(parts, packed, async_op=True)
        return own, work, parts, capacity, header_rows

    def _apply(self, travelling) -> int:
        own, work, parts, capacity, header_rows = travelling
        dtype = own.wire
        work.wait()
        headers = [part[:header_rows].reshape(-1)[: 2 * _index_columns(dtype)].contiguous().view(torch.int64) for part in parts]
        active = sum(int(h[0]) for h in headers)
        counts = [int(h[1]) for h in headers]
        if active == 0:
            own.dense_work.wait()
            return 0
        self.recent = [*self.recent[1 - self.REMEMBERED :], max(counts)]
        self.capacity = self._with_margin(max(self.recent))
        rows = [part[header_rows : header_rows + min(count, capacity)] for part, count in zip(parts, counts)]
        rest = [max(0, count - capacity) for count in counts]
        if max(rest):  # every rank sees it in the headers and makes the same second gather
            self.overflows += 1
            packed = _pack_rows(own.indices[capacity:], own.values[capacity:], max(rest), dtype)
            more = [torch.empty_like(packed) for _ in parts]
            dist.all_gather(more, packed)
            rows += [part[:size] for part, size in zip(more, rest)]
        indices, values = _unpack_rows(rows, dtype)
        _apply(own, indices, values, active, self.dense_tables, self.table_step)
        return active


def check_same_epoch(epoch: int, where: str) -> None:
    """Refuse to go on when the ranks resumed from different checkpoints (a run directory that is not shared)."""
    epochs = gather_objects(epoch)
    if len(set(epochs)) > 1:
        raise UembedError(
            f"the ranks resumed at different epochs ({epochs}) from {where}: the run directory must be one "
            "storage every rank reads (a shared volume across machines)"
        )


def replica_check(model) -> dict:
    """Each rank's digest of its model's bytes, for the run's metrics: equal when the replicas agree bit for
    bit, as the shared update promises (nothing with one process)."""
    if world_size() == 1:
        return {}
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    digests = gather_objects(digest.hexdigest())
    return {"replica_digests": digests, "replicas_identical": len(set(digests)) == 1}


def save_checkpoint(path, doc: dict) -> None:
    """Rank 0 writes ``doc`` atomically (a restart reads the old file or the new one, never half of one)."""
    if not is_writer():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    torch.save(doc, partial)
    os.replace(partial, path)


def launch(argv: list[str], nproc: int, nnodes: int = 1, endpoint: str | None = None, max_restarts: int = 0,
           rendezvous_timeout_s: int = 60, run_id: str = "uembed") -> int:  # fmt: skip
    """Run ``uembed`` with ``argv`` in ``nproc`` processes here (and ``nnodes`` machines), as torchrun would.

    One machine without ``endpoint``: a rendezvous on a free loopback port. Otherwise the c10d rendezvous at
    ``endpoint`` (HOST:PORT; the agent on HOST serves it). A group that loses a process restarts, all of it,
    up to ``max_restarts`` times (each process resumes from the run directory's checkpoint). A rendezvous
    that does not complete within ``rendezvous_timeout_s`` is an error naming the endpoint.
    """
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    # One compute thread per process: the processes are the parallelism (torchrun would set it and say so).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A store of its own for every start of the group. torchrun's agent otherwise lends the ranks its
    # rendezvous store, which outlives a restart with no prefix that changes (pytorch/pytorch#135712):
    # a restarted rank could read a dead rank's gloo address left there by the group before and wait for
    # it until the join timeout, the group never forming.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ[LAUNCHER_PID] = str(os.getpid())
    where = endpoint or "127.0.0.1:0"
    options = ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", where, "--rdzv-id", run_id,
               "--rdzv-conf", f"join_timeout={rendezvous_timeout_s},read_timeout={rendezvous_timeout_s}",
               "-m", "uembed"]  # fmt: skip
    parsed = torchrun.parse_args(options)
    parsed.training_script_args = list(argv)  # given after parsing: torchrun's parser would read uembed's options
    config, command, command_args = torchrun.config_from_args(parsed)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        elastic_launch(config, command)(*command_args)
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {r} exit code {f.exitcode}" for r, f in exc.failures.items())
        raise UembedError(f"training failed after {max_restarts} restart(s): {failures} (its output is above)") from None
    except (RendezvousError, RuntimeError, TimeoutError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UembedError(
            f"rendezvous at {where} did not complete within {rendezvous_timeout_s} s ({nnodes} node(s) expected): {first}"
        ) from None
    finally:
        sys.stdout.flush()
    return 0
