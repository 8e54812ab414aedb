"""Data-parallel training (uembed/model/distributed.py): real processes under torchrun's launcher, gloo over
loopback, a few thousand synthetic examples. Each run is a `uembed train` subprocess, as a user starts it."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from uembed.contract.features import SplitSpec, load_spec
from uembed.loadtest.servers import free_port
from uembed.model import distributed, optim
from uembed.model.data.stream import StreamSource, split_of_rows
from uembed.model.data.synthetic import CRITEO_PRESETS, CriteoShape, write_criteo_shards
from uembed.model.optim import coalesce_rows

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--dataset", "synthetic:small", "--synthetic-examples", "4000", "--quiet", "--patience", "10"]


# Every process a test starts, and every process those start, inherits this variable with the test's own value: torchrun
# starts each rank in a session of its own, and a rank outlives a launcher killed with SIGKILL, so the value is how
# ``group_killed`` finds them all to end them.
MARK = "UEMBED_TEST_PROCESS_GROUP"


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def marked_processes(mark: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if f"{MARK}={mark}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                continue
    return found


@contextlib.contextmanager
def group_killed(command: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start ``command`` in a session of its own; whatever happens in the block, SIGKILL it and every process it
    started (torchrun's ranks included) before leaving, so nothing a test starts outlives it."""
    mark = uuid.uuid4().hex
    process = subprocess.Popen(command, cwd=ROOT, env={**(env or environment()), MARK: mark}, start_new_session=True,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    process.mark = mark
    try:
        yield process
    finally:
        for pid in [process.pid, *marked_processes(mark)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def uembed(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "uembed", *args]
    with group_killed(command, env) as process:
        out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def trained(runs: Path, name: str, *args: str) -> dict:
    result = uembed("train", *args, "--runs-dir", str(runs), "--name", name)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((runs / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def parquet_data(tmp_path_factory) -> Path:
    """Criteo-shaped Parquet in row groups of 1,000 rows."""
    folder = tmp_path_factory.mktemp("criteo")
    write_criteo_shards(folder, 12_000, CriteoShape(vocabulary=CRITEO_PRESETS["criteo-tiny"], seed=3), progress=False)
    for path in folder.glob("*.parquet"):
        pq.write_table(pq.read_table(path), path, row_group_size=1000)
    return folder


def covered_rows(batches) -> list[int]:
    return [row for first, batch in batches for row in range(first, first + batch.num_rows)]


def test_ranks_read_disjoint_shares_that_cover_the_source(parquet_data):
    source, spec = StreamSource.open(parquet_data), load_spec(parquet_data / "spec.toml")
    whole = covered_rows(source.record_batches(spec, 500))
    shares = [covered_rows(source.record_batches(spec, 500, shard=(r, 2))) for r in (0, 1)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert shares[0] + shares[1] == whole  # contiguous blocks, in rank order
    # more ranks than row groups: still disjoint blocks that cover the rows
    many = [covered_rows(source.record_batches(spec, 500, shard=(r, 30))) for r in range(30)]
    assert sum(many, []) == whole and {len(share) for share in many} == {len(whole) // 30}


def regrouped(dataset: Path, folder: Path, row_group_size: int) -> tuple[StreamSource, object]:
    """``dataset`` written again into ``folder`` in row groups of ``row_group_size`` rows: its source and spec."""
    for path in dataset.iterdir():
        if path.suffix == ".parquet":
            pq.write_table(pq.read_table(path), folder / path.name, row_group_size=row_group_size)
        else:
            shutil.copy(path, folder / path.name)
    return StreamSource.open(folder), load_spec(folder / "spec.toml")


def test_ranks_get_equal_shares_of_uneven_row_groups(parquet_data, tmp_path):
    """Row groups of 700 rows (the last one short): dealing whole groups would give one rank 600 rows more, which
    every step of its share the other rank would wait for; blocks of rows are equal."""
    source, spec = regrouped(parquet_data, tmp_path, row_group_size=700)
    whole = covered_rows(source.record_batches(spec, 500))
    shares = [covered_rows(source.record_batches(spec, 500, shard=(r, 2))) for r in (0, 1)]
    assert shares[0] + shares[1] == whole and abs(len(shares[0]) - len(shares[1])) <= 1
    # a rank's block from a resume point inside it
    resumed = covered_rows(source.record_batches(spec, 500, start_row=shares[1][100], shard=(1, 2)))
    assert resumed == shares[1][100:]


def test_many_row_groups_are_dealt_in_equal_blocks_spread_over_the_source(parquet_data, tmp_path):
    """With many row groups a rank's share is several blocks across the source, not one end of it: a split column
    that puts validation and test last must still leave every rank training rows."""
    source, spec = regrouped(parquet_data, tmp_path, row_group_size=70)
    whole = covered_rows(source.record_batches(spec, 500))
    shares = [covered_rows(source.record_batches(spec, 500, shard=(r, 3))) for r in range(3)]
    assert sorted(sum(shares, [])) == whole and len(set(sum(shares, []))) == len(whole)
    assert max(map(len, shares)) - min(map(len, shares)) <= len(whole) // 100
    for share in shares:  # each rank holds rows of the first and the last tenth of the source
        assert min(share) < len(whole) // 10 and max(share) > len(whole) * 9 // 10
    resumed = covered_rows(source.record_batches(spec, 500, start_row=shares[2][len(shares[2]) // 2], shard=(2, 3)))
    assert resumed == shares[2][len(shares[2]) // 2 :]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """A Criteo-format text file (train.txt), which ranks share by byte range."""
    folder = tmp_path_factory.mktemp("criteo-text")
    write_criteo_shards(folder, 6_000, CriteoShape(vocabulary=CRITEO_PRESETS["criteo-tiny"], seed=3), text_format=True,
                        progress=False)  # fmt: skip
    return folder


def rows_by_position(spec, batches) -> dict[int, tuple]:
    """Stream position -> (the row's values, its split label), as a rank reads them."""
    rows = {}
    for first, batch in batches:
        codes = split_of_rows(first, batch, spec.split or SplitSpec(), 0, "criteo")
        for index, row in enumerate(batch.to_pylist()):
            rows[first + index] = (tuple(row.values()), int(codes[index]))
    return rows


def test_ranks_read_byte_ranges_of_a_text_file_with_the_rows_and_splits_of_one_reader(text_data, tmp_path):
    """Each rank parses only its byte range (a contiguous block of rows, the blocks in rank order), and each row keeps
    the position, so the split label, it has when one process reads the file."""
    spec = load_spec(text_data / "spec.toml")
    lines = (text_data / "train.txt").read_bytes().split(b"\n")[:9]
    # blank lines (the reader skips them) and no newline at the end: positions still count rows only
    odd = tmp_path / "odd.txt"
    odd.write_bytes(b"\n" + b"\n".join(lines[:3]) + b"\n\n\n" + b"\n".join(lines[3:]))
    folder = tmp_path / "files"  # a folder of files: each rank takes its byte range of each, rows numbered across them
    folder.mkdir()
    (folder / "a.txt").write_bytes(odd.read_bytes())
    (folder / "b.txt").write_bytes(b"\n".join(lines) + b"\n")
    for path, ranks, batch_rows, rows in ((text_data / "train.txt", 2, 500, 6_000), (odd, 3, 2, 9), (odd, 12, 2, 9),
                                          (folder, 2, 4, 18)):  # fmt: skip
        source = StreamSource.open(path)
        whole = rows_by_position(spec, source.record_batches(spec, batch_rows))
        shares = [rows_by_position(spec, source.record_batches(spec, batch_rows, shard=(r, ranks))) for r in range(ranks)]
        assert sum(map(len, shares)) == len(whole) == rows
        assert {position: row for share in shares for position, row in share.items()} == whole
        blocks = [sorted(share) for share in shares if share]
        assert len(blocks) >= 2
        if path != folder:  # one file: contiguous blocks, in rank order
            assert [position for block in blocks for position in block] == list(range(rows))
    # gzip cannot be split: its ranks take every world-th record batch, as before
    gz = tmp_path / "train.gz"
    gz.write_bytes(gzip.compress((text_data / "train.txt").read_bytes()))
    source = StreamSource.open(gz)
    shares = [rows_by_position(spec, source.record_batches(spec, 500, shard=(r, 2))) for r in (0, 1)]
    assert sorted(shares[1])[:2] == [500, 501] and len(shares[0]) + len(shares[1]) == 6_000


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_coalescing_rows_sums_each_rows_repeats_in_their_order_as_torch_coalesce_does(compiled, monkeypatch):
    if compiled and optim._rows is None:
        if os.environ.get("UEMBED_REQUIRE_EXTENSION") == "1":
            raise AssertionError("uembed.model._rows is not importable: make install builds it")
        pytest.skip("the compiled coalesce is not built (UEMBED_REQUIRE_EXTENSION=1 makes this a failure)")
    if not compiled:
        monkeypatch.setattr(optim, "_rows", None)
    generator = torch.Generator().manual_seed(0)
    shape = torch.Size([500, 8])
    scattered = torch.randint(0, 500, (3_000,), generator=generator)  # one rank's lookups: repeats in any order
    runs = torch.cat([torch.unique(scattered[:1_000]), torch.unique(scattered[1_000:])])  # two ranks' coalesced rows
    for indices in (scattered, runs):
        values = torch.randn(len(indices), 8, generator=generator)
        got = coalesce_rows(indices, values, shape)
        expected = torch.sparse_coo_tensor(indices.unsqueeze(0), values, shape, check_invariants=True).coalesce()
        assert got.is_coalesced() and torch.equal(got.indices(), expected.indices())
        torch.testing.assert_close(got.values(), expected.values())
        in_order = np.zeros((500, 8), dtype=np.float32)
        np.add.at(in_order, indices.numpy(), values.numpy())  # repeats added in their order: the same bits
        np.testing.assert_array_equal(got.to_dense().numpy(), in_order)
    empty = coalesce_rows(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 8), shape)
    assert empty.is_coalesced() and empty._nnz() == 0
    with pytest.raises(IndexError, match="500"):
        coalesce_rows(torch.tensor([3, 500]), torch.zeros(2, 8), shape)
    # the scratch is left clean: the next call, of another table, sums from zero
    again = coalesce_rows(torch.tensor([7, 3, 7]), torch.ones(3, 8), torch.Size([10, 8]))
    assert again.indices().tolist() == [[3, 7]] and again.values()[:, 0].tolist() == [1.0, 2.0]


@pytest.fixture
def group_of_one():
    """A gloo group of this process alone: the exchange's collectives run for real, with one rank."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    distributed.leave()


def test_the_overlapped_exchange_applies_each_step_one_step_late_and_sends_rows_past_its_capacity(group_of_one):
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 4, sparse=True)
    model = torch.nn.Module()
    model.embedding, model.head = table, torch.nn.Linear(4, 1)
    applied = []
    exchange = distributed.OverlappedExchange(model, table_step=lambda: applied.append(table.weight.grad.to_dense().clone()))
    exchange.MARGIN, exchange.MIN_MARGIN = 0.0, 0  # a capacity of exactly the most rows seen
    # the batches touch 3, 5, then 12 distinct rows: the capacity learnt from one step is short of the next's
    batches = [torch.tensor([1, 2, 2, 3]), torch.tensor([4, 5, 6, 7, 8, 4]), torch.arange(20, 32)]
    local, results = [], []
    for rows in batches:
        model.zero_grad(set_to_none=True)
        model.head(table(rows)).sum().backward()
        local.append((table.weight.grad.to_dense().clone(), model.head.weight.grad.clone()))
        results.append(exchange.step(True))
        if results[-1]:
            assert torch.equal(model.head.weight.grad, local[-2][1])  # the dense gradient of the step before
    results.append(exchange.flush())
    assert results == [None, 1, 1, 1] and exchange.flush() is None
    assert len(applied) == 3 and all(torch.equal(a, b[0]) for a, b in zip(applied, local))
    assert exchange.overflows == 2  # 5 rows, then 12, sent at the capacity the first step set: 3
    assert exchange.capacity == 12  # the most of the steps it remembers


OVERLAP_RANK = """
import sys, torch, torch.distributed as dist
from uembed.model import distributed
rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
torch.manual_seed(0)  # the same replica on both ranks
model = torch.nn.Module()
model.embedding, model.head = torch.nn.Embedding(60, 4, sparse=True), torch.nn.Linear(4, 1)
applied = []
exchange = distributed.OverlappedExchange(model, table_step=lambda: applied.append(model.embedding.weight.grad.to_dense().clone()))
exchange.MARGIN, exchange.MIN_MARGIN = 0.0, 0  # a capacity of exactly the most rows seen: rows overflow it
batches = {0: [[1, 2, 2, 3], [4, 5, 6, 7, 8], list(range(20, 32))], 1: [[1, 9], list(range(40, 50))]}[rank]
local, results, heads, step = [], [], [], 0
while True:
    model.zero_grad(set_to_none=True)
    rows = batches[step] if step < len(batches) else None  # then dry, as a rank whose share has ended
    if rows is not None:
        torch.manual_seed(100 + 10 * step + rank)
        (model.head(model.embedding(torch.tensor(rows))) * torch.randn(len(rows), 1)).sum().backward()
        local.append((model.embedding.weight.grad.to_dense().clone(), model.head.weight.grad.clone()))
    else:
        local.append((torch.zeros(60, 4), torch.zeros(1, 4)))
    results.append(exchange.step(rows is not None))
    if results[-1]:
        heads.append(model.head.weight.grad.clone())
    step += 1
    if results[-1] == 0:
        break
results.append(exchange.flush())
torch.save({"applied": applied, "local": local, "results": results, "heads": heads, "overflows": exchange.overflows}, out)
distributed.leave()
"""


def test_two_ranks_overlapping_their_exchange_apply_the_same_average_one_step_late_through_overflows(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(OVERLAP_RANK)
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store"), str(tmp_path / f"{rank}.pt")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]  # fmt: skip
    for process in ranks:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
    done = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1)]
    # steps 0-2 had 2, 2 and 1 ranks with a batch, step 3 none: applied one step late, the loop ends at step 4
    assert done[0]["results"] == done[1]["results"] == [None, 2, 2, 1, 0, 0]
    assert done[0]["overflows"] == done[1]["overflows"] > 0
    for step, active in enumerate([2, 2, 1]):
        table = (done[0]["local"][step][0] + done[1]["local"][step][0]) / active
        head = (done[0]["local"][step][1] + done[1]["local"][step][1]) / active
        for rank in (0, 1):
            torch.testing.assert_close(done[rank]["applied"][step], table, rtol=0, atol=1e-6)
            torch.testing.assert_close(done[rank]["heads"][step], head, rtol=0, atol=1e-6)
        assert torch.equal(done[0]["applied"][step], done[1]["applied"][step])  # the replicas get the same bits
        assert torch.equal(done[0]["heads"][step], done[1]["heads"][step])


def test_bfloat16_on_the_wire_rounds_each_ranks_gradients_and_updates_in_float32(group_of_one):
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embedding, model.head = torch.nn.Embedding(20, 4, sparse=True), torch.nn.Linear(4, 1)
    model.head(model.embedding(torch.tensor([3, 7, 7]))).sum().backward()
    table_grad, head_grad = model.embedding.weight.grad.coalesce(), model.head.weight.grad.clone()
    exchange = distributed.OverlappedExchange(model, wire=torch.bfloat16)  # sync_gradients leaves one rank's alone
    assert exchange.step(True) is None and exchange.flush() == 1
    got = model.embedding.weight.grad
    assert got.dtype == model.head.weight.grad.dtype == torch.float32
    assert torch.equal(got.indices(), table_grad.indices())
    assert torch.equal(got.values(), table_grad.values().to(torch.bfloat16).float())
    assert torch.equal(model.head.weight.grad, head_grad.to(torch.bfloat16).float())


def test_the_exchange_options_warn_that_one_process_has_no_exchange(tmp_path):
    result = uembed("train", "--dataset", "synthetic:small", "--synthetic-examples", "600", "--epochs", "1", "--quiet",
                    "--overlap-exchange", "--runs-dir", str(tmp_path), "--name", "one")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "with one process there is none (give --nproc N)" in result.stderr


@pytest.mark.slow
def test_two_processes_overlapping_their_exchange_in_memory_keep_identical_replicas(tmp_path):
    one = trained(tmp_path, "one", *SMALL, "--epochs", "3", "--batch-size", "256")
    two = trained(tmp_path, "two", *SMALL, "--epochs", "3", "--batch-size", "128", "--nproc", "2", "--overlap-exchange")
    assert two["replicas_identical"] is True and len(two["replica_digests"]) == 2
    assert [h["examples"] for h in two["history"]] == [h["examples"] for h in one["history"]]
    assert abs(two["test_auc"] - one["test_auc"]) < 0.01, (two["test_auc"], one["test_auc"])


@pytest.mark.slow
def test_two_processes_overlapping_their_exchange_keep_identical_replicas(tmp_path, parquet_data):
    stream = ["--dataset", str(parquet_data), "--epochs", "2", "--quiet", "--shuffle-buffer", "2048", "--read-rows", "500"]
    one = trained(tmp_path, "one", *stream, "--batch-size", "256")
    two = trained(tmp_path, "two", *stream, "--batch-size", "128", "--nproc", "2", "--overlap-exchange", "--exchange-dtype", "bfloat16")
    assert two["world_size"] == 2 and two["replicas_identical"] is True and two["exchange_overflows"] >= 0
    assert [h["examples"] for h in two["history"]] == [h["examples"] for h in one["history"]]
    assert abs(two["test_auc"] - one["test_auc"]) < 0.02, (two["test_auc"], one["test_auc"])


@pytest.mark.slow
def test_two_processes_keep_identical_replicas_and_match_one_process(tmp_path):
    # 2 ranks x 128 examples per step is the 1-process step of 256: the same examples, averaged the same way.
    one = trained(tmp_path, "one", *SMALL, "--epochs", "3", "--batch-size", "256")
    two = trained(tmp_path, "two", *SMALL, "--epochs", "3", "--batch-size", "128", "--nproc", "2")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["replicas_identical"] is True and len(set(two["replica_digests"])) == 1 and len(two["replica_digests"]) == 2
    assert len(two["examples_per_second_per_rank"]) == 2 and min(two["examples_per_second_per_rank"]) > 0
    assert [h["examples"] for h in two["history"]] == [h["examples"] for h in one["history"]]
    assert abs(two["test_auc"] - one["test_auc"]) < 0.01, (two["test_auc"], one["test_auc"])
    assert not (tmp_path / "two" / "resume.pt").exists()  # the finished run leaves no checkpoint behind


@pytest.mark.slow
@pytest.mark.parametrize("data", ["parquet_data", "text_data"])
def test_two_ranks_stream_disjoint_row_groups(tmp_path, data, request):
    stream = ["--dataset", str(request.getfixturevalue(data)), "--epochs", "2", "--quiet", "--shuffle-buffer", "2048", "--read-rows", "500"]
    one = trained(tmp_path, "one", *stream, "--batch-size", "256")
    two = trained(tmp_path, "two", *stream, "--batch-size", "128", "--nproc", "2")
    assert two["world_size"] == 2 and two["replicas_identical"] is True
    # every training example once per epoch, over both ranks; evaluation over every rank's share
    assert [h["examples"] for h in two["history"]] == [h["examples"] for h in one["history"]]
    assert two["test_examples"] == one["test_examples"]
    assert abs(two["test_auc"] - one["test_auc"]) < 0.02, (two["test_auc"], one["test_auc"])


def rank_processes(rank: int, mark: str) -> list[int]:
    """The processes a test started (``mark``) whose environment says they are torchrun's worker of ``rank``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"{MARK}={mark}".encode() in env and b"uembed" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_from_its_last_checkpoint(tmp_path):
    args = [*SMALL, "--synthetic-examples", "20000", "--epochs", "4", "--batch-size", "64", "--nproc", "2"]
    reference = trained(tmp_path, "reference", *args)
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "uembed", "train", *args, "--max-restarts", "2", "--runs-dir", str(runs), "--name", "killtest"]
    checkpoint = runs / "killtest" / "resume.pt"
    with group_killed(command) as launcher:
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victims = rank_processes(1, launcher.mark)
        assert checkpoint.exists() and victims, "the run should be in its second epoch"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert "resuming from" in err
    metrics = json.loads((runs / "killtest" / "metrics.json").read_text())
    # each epoch once in the final accounting (the interrupted one trained again from its start, not twice)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert metrics["train_examples"] == reference["train_examples"]
    assert metrics["replicas_identical"] is True
    assert abs(metrics["test_auc"] - reference["test_auc"]) < 0.002, (metrics["test_auc"], reference["test_auc"])


def running(pid: int) -> bool:
    """The process exists and is not a zombie (one nobody has reaped yet has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_the_ranks_end_with_a_launcher_killed_outright(tmp_path):
    # SIGKILL leaves torchrun's agent no chance to stop its ranks, which it started in sessions of their own
    # (a run far longer than the test waits: the ranks must end because the launcher did, not because they finished)
    command = [sys.executable, "-m", "uembed", "train", *SMALL, "--synthetic-examples", "20000", "--epochs", "1000",
               "--patience", "1000", "--batch-size", "32", "--nproc", "2", "--runs-dir", str(tmp_path), "--name", "orphans"]  # fmt: skip
    with group_killed(command) as launcher:
        deadline = time.monotonic() + 120
        while not (ranks := rank_processes(0, launcher.mark) + rank_processes(1, launcher.mark)) or len(ranks) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, "the launcher should have started two ranks"
            time.sleep(0.05)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 60
        while any(map(running, ranks)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in ranks if running(pid)], "a rank outlived its launcher"


@pytest.mark.slow
def test_two_torchrun_agents_train_together_over_a_loopback_rendezvous(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "agents",
               "-m", "uembed", "train", *SMALL, "--epochs", "2", "--batch-size", "128",
               "--runs-dir", str(tmp_path), "--name", "agents"]  # fmt: skip
    with group_killed(command) as first, group_killed(command) as second:
        agents = [first, second]
        outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    metrics = json.loads((tmp_path / "agents" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["replicas_identical"] is True
    single = trained(tmp_path, "single", *SMALL, "--epochs", "2", "--batch-size", "256")
    assert abs(metrics["test_auc"] - single["test_auc"]) < 0.01


def test_a_rendezvous_that_cannot_complete_fails_with_one_line_naming_it(tmp_path):
    endpoint = "192.0.2.1:29400"  # TEST-NET-1: nothing answers there
    result = uembed("train", *SMALL, "--runs-dir", str(tmp_path), "--name", "lonely", "--nnodes", "2",
                    "--rdzv-endpoint", endpoint, "--rdzv-timeout", "2", timeout=120)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rendezvous at") and endpoint in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "lonely").exists()


def test_a_rank_whose_group_never_forms_fails_with_one_line_naming_it(tmp_path):
    port = free_port()
    env = {**environment(), "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "UEMBED_JOIN_TIMEOUT_S": "2"}  # fmt: skip
    result = uembed("train", *SMALL, "--runs-dir", str(tmp_path), "--name", "alone", timeout=120, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 of 2 could not join") and f":{port} " in lines[0], result.stderr[-2000:]


def test_a_data_parallel_run_under_torchrun_needs_a_name(tmp_path):
    env = {**environment(), "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # A group of one that never completes would hang: the check comes before the group is joined.
    result = uembed("train", *SMALL, "--runs-dir", str(tmp_path), timeout=60, env=env)
    assert result.returncode == 2 and "--name" in result.stderr

