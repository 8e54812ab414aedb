"""Big bundles: exports that stream their rows, row checks held off the start-up path, truthful file memory.

The export test builds a run with a 384 MB table and exports it in a child process that samples its private
memory (``RssAnon``: the heap, not the mapped checkpoint or the page cache) every 2 ms: it must stay far below
the table. (``RLIMIT_DATA`` cannot be the limit here: it counts torch's copy-on-write mapping of the
checkpoint, which never becomes private memory unless written.)
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from uembed.bundle.loader import load_bundle
from uembed.contract.errors import BundleError, NotReady

MiB = 2**20


def big_run(source, target, rows: int):
    """A copy of a trained run whose unified table has ``rows`` rows (the rest of the model as trained)."""
    import torch

    from uembed.contract.plan import EmbeddingPlan
    from uembed.model.train import build_model, load_run

    shutil.copytree(source, target)
    plan_doc = json.loads((target / "plan.json").read_text())
    assert len(plan_doc["tables"]) == 1
    plan_doc["tables"][0]["rows"] = rows
    (target / "plan.json").write_text(json.dumps(plan_doc))
    config, _, trained, _ = load_run(source)
    model = build_model(EmbeddingPlan.from_dict(plan_doc, {}), config)
    state = model.state_dict()
    for name, tensor in trained.state_dict().items():
        if state[name].shape == tensor.shape:
            state[name] = tensor
    (weights_name,) = [n for n, t in state.items() if t.shape == (rows, plan_doc["dim"])]
    torch.save(state, target / "checkpoint.pt")
    return weights_name


CHILD = textwrap.dedent(
    """
    import re, sys, threading, time
    from pathlib import Path
    import torch, onnx, onnxruntime  # imported first: what is measured is the export itself
    from uembed.model.export import export_run
    def anonymous_bytes():  # private memory (the heap); mapped files and the page cache are not in it
        return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    before, peak, done = anonymous_bytes(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_bytes())
            time.sleep(0.002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    path = export_run(Path(sys.argv[1]), Path(sys.argv[2]), "big", version="1", dtype="float16")
    done.set()
    sampler.join()
    print(peak[0] - before)
    print(path)
    """
)


@pytest.mark.slow
def test_export_streams_a_table_larger_than_the_memory_it_uses(bundle_store, tmp_path):
    rows = 6_000_000  # 384 MB of float32 rows at the trained run's dim, 16
    weights_name = big_run(bundle_store.parent / "run", tmp_path / "run", rows)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "run"), str(tmp_path / "bundles")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    grown, path = child.stdout.strip().splitlines()[-2:]
    # Private memory grew by far less than the table: no copy of it (a second copy would be 384 MB more,
    # the model built with its own tables another 384 MB); what remains is a chunk and the dense export.
    assert int(grown) < 160 * MiB, f"private memory grew by {int(grown) / MiB:.0f} MiB during the export"
    bundle = load_bundle(path)
    table = bundle.tables["unified"]
    import torch

    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True, mmap=True)[weights_name].numpy()
    picked = np.array([0, 1, 12345, rows // 2, rows - 1])
    assert np.array_equal(np.asarray(table.data[picked]), checkpoint[picked].astype(np.float16))


def corrupt_copy(bundle_path, target):
    shutil.copytree(bundle_path, target)
    row_file = target / "tables" / "unified.npy"
    data = bytearray(row_file.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    row_file.write_bytes(bytes(data))
    return target


def test_deferred_row_checks_hold_scoring_until_they_pass(synthetic_store):
    from uembed.serving.engine import ScoringEngine
    from uembed.serving.pipeline.cpu import ModelRuntime
    from uembed.serving.settings import load_settings

    bundle = load_bundle(synthetic_store / "movielens" / "1", defer_row_checks=True)
    engine = ScoringEngine(load_settings())
    engine.registry.activate(ModelRuntime(bundle))
    with pytest.raises(NotReady, match=r"row files checking: 0\.00 of"):
        engine.registry.runtime(None)
    with pytest.raises(NotReady, match="row files checking"):
        asyncio.run(engine.ready())
    bundle.row_checks.start().wait(timeout_s=30)
    assert engine.registry.runtime(None).bundle is bundle
    assert bundle.row_checks.describe() == "passed"


def test_a_row_file_that_fails_its_check_keeps_the_model_unservable(synthetic_store, tmp_path, monkeypatch):
    from tests.serving.inprocess import InProcessService
    from uembed.serving.registry import ModelRegistry

    bad = corrupt_copy(synthetic_store / "movielens" / "1", tmp_path / "movielens" / "1")
    with pytest.raises(BundleError, match="tables/unified.npy fails its sha256"):
        load_bundle(bad)  # checked at load: refused outright
    monkeypatch.setattr(ModelRegistry, "BACKGROUND_ROW_CHECKS_BYTES", 0)  # defer even this small bundle
    service = InProcessService(bundles=[bad], row_checks="background")
    try:
        service.engine.registry.models["movielens"].bundle.row_checks.done.wait(30)
        assert service.get("/healthz").status_code == 200
        # Not a 503 with Retry-After: waiting will not fix it. The detail names the file, not the server's paths.
        ready = service.get("/readyz")
        assert ready.status_code == 500 and "Retry-After" not in ready.headers
        assert "tables/unified.npy did not pass its sha256 check" in ready.json()["detail"]
        assert str(tmp_path) not in ready.text
        scored = service.score([{"user_id": "196"}])
        assert scored.status_code == 500 and scored.json()["error"] == "internal"
        assert service.get("/v1/models").json()["models"][0]["row_checks"].startswith("failed: ")
        assert service.metrics()['uembed_row_checks{model="movielens",version="1"}'] == -1
    finally:
        service.close()


def test_startup_row_checks_refuse_a_corrupt_bundle_before_serving(synthetic_store, tmp_path):
    from uembed.serving.engine import ScoringEngine
    from uembed.serving.settings import load_settings

    bad = corrupt_copy(synthetic_store / "movielens" / "1", tmp_path / "movielens" / "1")
    engine = ScoringEngine(load_settings(row_checks="startup"))
    with pytest.raises(BundleError, match="fails its sha256"):
        engine.registry.load(bad)


def evict(path) -> None:
    """Drop a file from the page cache (written out first; pages some process maps stay)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def test_file_bytes_report_what_of_a_mapped_table_is_in_memory(tmp_path):
    from uembed.bundle.synthetic import criteo_features, write_synthetic_bundle
    from uembed.serving.rows.store import TableStore

    path = write_synthetic_bundle(tmp_path, "mapped", criteo_features(4), table_rows=2_000_000, dtype="float16", progress=False)
    evict(path / "tables" / "unified.npy")
    table = load_bundle(path, defer_row_checks=True).tables["unified"]  # mapped, not read
    store = TableStore(table, "mapped")
    mapped = table.rows * table.dim * 2
    assert store.file_bytes()["mapped"] == mapped
    cold = store.file_bytes()["resident"]
    store.gather(np.arange(0, table.rows, table.rows // 100))  # 100 rows far apart: their pages and read-ahead
    some = store.file_bytes()["resident"]
    assert cold < some < mapped // 2, (cold, some, mapped)
    np.asarray(table.data).sum(dtype=np.float64)  # read it all
    assert mapped <= store.file_bytes()["resident"] <= mapped + 2 * 4096
