"""An export that runs out of space (#35, item 7): checked up front against the bundle's size, and a write that
fails midway (a file-size limit in the exporting process: its writes fail as on a full disk) is one line and exit
code 2, never torch's abort, with no staging folder left behind."""

import os
import resource
import shutil
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from uembed.model.export import ExportError, export_run


@pytest.fixture(scope="module")
def run_and_sizes(tmp_path_factory):
    """A small trained run, and the size of each file of its float32 bundle (model.onnx and model.pt included)."""
    root = tmp_path_factory.mktemp("export-space")
    rows = 2000
    table = pa.table({"a": [f"v{i % 400}" for i in range(rows)], "b": [str(i % 7) for i in range(rows)], "y": [int(i % 40 < 20) for i in range(rows)]})
    pacsv.write_csv(table, root / "data.csv")
    (root / "spec.toml").write_text("label = 'y'\n[[features]]\nname = 'a'\n[[features]]\nname = 'b'\n")
    trained = subprocess.run([sys.executable, "-m", "uembed", "train", "--dataset", "data.csv", "--spec", "spec.toml", "--embedding",
                              "hashing-trick", "--epochs", "1", "--quiet", "--name", "r", "--runs-dir", "runs"],
                             capture_output=True, text=True, cwd=root)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    bundle = export_run(root / "runs" / "r", root / "reference", "c")
    return root / "runs" / "r", {str(path.relative_to(bundle)): path.stat().st_size for path in bundle.rglob("*") if path.is_file()}


def export_with_file_size_limit(run_dir, out, limit: int) -> subprocess.CompletedProcess:
    def limited():  # in the child: a write past the limit fails with EFBIG instead of killing it with SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no truncated .pyc files in the tree
    return subprocess.run([sys.executable, "-m", "uembed", "export", str(run_dir), "--out", str(out), "--name", "c"],
                          capture_output=True, text=True, preexec_fn=limited, env=env)  # fmt: skip


@pytest.mark.slow  # an export in a subprocess: torch's import and the ONNX export take seconds
@pytest.mark.parametrize("fails_at", ["tables/a.npy", "dense.onnx"])  # numpy's writer, then the ONNX exporter's
def test_a_write_that_fails_midway_is_one_line_and_leaves_no_staging_folder(run_and_sizes, tmp_path, fails_at):
    run_dir, sizes = run_and_sizes
    result = export_with_file_size_limit(run_dir, tmp_path / "out", sizes[fails_at] - 1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr
    assert errors == [f"error: writing bundle {tmp_path / 'out' / 'c' / '1'} failed: File too large (EFBIG); its staging folder was removed"]
    assert list((tmp_path / "out" / "c").iterdir()) == []  # no bundle, no hidden .1.* staging folder


def test_free_space_is_checked_before_anything_is_written(run_and_sizes, tmp_path, monkeypatch):
    run_dir, sizes = run_and_sizes
    bundle_bytes = sum(sizes.values())
    free = bundle_bytes // 2
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))
    with pytest.raises(ExportError) as refused:
        export_run(run_dir, tmp_path / "out", "c")
    message = str(refused.value)
    assert message.startswith(f"not enough space in {tmp_path / 'out' / 'c'}: the bundle needs about ") and "\n" not in message
    needed = int(message.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert needed >= bundle_bytes and f"{free:,} are free" in message
    assert list((tmp_path / "out" / "c").iterdir()) == []
