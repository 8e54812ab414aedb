"""Triton's perf_analyzer, unchanged, against the service over HTTP and gRPC: the tool Triton and KServe users measure
a server with. It reads the model's metadata and configuration, sizes its tensors from them (every input [-1, 1] or
[-1, W]: batchable), and sends random data at -b 1 and -b 64 from 1 and 4 concurrent clients.

The binary ships in PyPI's ``tritonclient==2.50.0`` wheel (``tritonclient-2.50.0.data/data/bin/perf_analyzer``; the
PyPI package named perf-analyzer is a placeholder). It links Debian's libb64 (``libb64-0d``, in ``make system-deps``)
and ``libcudart.so.12`` (PyPI's ``nvidia-cuda-runtime-cu12``; no GPU needed). The fixture installs both wheels into
a venv of their own under ``$UEMBED_CACHE/perf_analyzer`` (``~/.cache/uembed``) once, or takes ``$PERF_ANALYZER``
(a binary that runs as it is); where neither can be had the tests are skipped, saying why.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.protocols.test_oip import MODEL, service  # noqa: F401 - its fixture: the demo-shaped service

VERSION = "2.50.0"
PACKAGES = (f"tritonclient=={VERSION}", "nvidia-cuda-runtime-cu12")
MISSING_LIBRARY = "error while loading shared libraries"


def cache_dir() -> Path:
    return Path(os.environ.get("UEMBED_CACHE") or Path.home() / ".cache" / "uembed") / "perf_analyzer"


def install(venv: Path) -> str | None:
    """The venv with perf_analyzer and libcudart; why not, where it cannot be made."""
    steps = ([sys.executable, "-m", "venv", str(venv)], [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PACKAGES])
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(step[:4])}: {exc}"
        if done.returncode:
            return f"{' '.join(step[:4])} failed: {done.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="session")
def perf_analyzer() -> tuple[str, dict]:
    """(the perf_analyzer binary, the environment it runs in)."""
    env = dict(os.environ)
    binary = os.environ.get("PERF_ANALYZER")
    if not binary:
        venv = cache_dir() / f"tritonclient-{VERSION}"
        if not (venv / "bin" / "perf_analyzer").exists():
            problem = install(venv)
            if problem:
                pytest.skip(f"perf_analyzer could not be installed ({' '.join(PACKAGES)} from PyPI): {problem}")
        binary = str(venv / "bin" / "perf_analyzer")
        libraries = sorted(venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, libraries), env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, env=env, timeout=60)
    if MISSING_LIBRARY in version.stderr:
        pytest.skip(f"perf_analyzer cannot start: {version.stderr.strip()[-300:]} (libb64: apt-get install libb64-0d, "
                    "as `make system-deps` does)")  # fmt: skip
    return binary, env


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_unchanged(perf_analyzer, service, protocol, batch, tmp_path):  # noqa: F811 - the fixture
    binary, env = perf_analyzer
    url = service.url.removeprefix("http://") if protocol == "http" else service.grpc_target
    report = tmp_path / "report.csv"
    # Short windows, and any spread between them taken as stable: this checks that it runs, not how fast (on a
    # shared machine, windows that differ would otherwise end it with "failed to obtain stable measurement").
    command = [binary, "-m", MODEL, "-u", url, "-i", protocol, "-b", str(batch), "--concurrency-range", "1:4:3",
               "--measurement-interval", "500", "--max-trials", "3", "--stability-percentage", "10000", "-f", str(report)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "error" not in output.lower(), output[-3000:]
    rows = report.read_text().splitlines()
    assert rows[0].startswith("Concurrency,Inferences/Second") and sorted(row.split(",")[0] for row in rows[1:]) == ["1", "4"], rows
    assert all(float(row.split(",")[1]) > 0 for row in rows[1:]), rows
