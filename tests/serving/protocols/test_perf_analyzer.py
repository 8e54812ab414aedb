"""Triton's perf_analyzer, unchanged, against the service over HTTP and gRPC: the tool Triton and KServe users measure
a server with. It reads the model's metadata and configuration, sizes its tensors from them (every input [-1, 1] or
[-1, W]: batchable), and sends random data at -b 1 and -b 64 from 1 and 4 concurrent clients.

The binary ships in PyPI's ``tritonclient==2.50.0`` wheel (``tritonclient-2.50.0.data/data/bin/perf_analyzer``; the
PyPI package named perf-analyzer is a placeholder). It links Debian's libb64 (``libb64-0d``, in ``make system-deps``)
and ``libcudart.so.12`` (PyPI's ``nvidia-cuda-runtime-cu12``; no GPU needed): ``uembed/loadtest/perf_analyzer.py``
installs them once (or takes ``$PERF_ANALYZER``); where neither can be had the tests are skipped, saying why.
"""

import pytest

from tests.serving.protocols.test_oip import MODEL, service  # noqa: F401 - its fixture: the demo-shaped service
from uembed.loadtest.perf_analyzer import PerfAnalyzer, find_perf_analyzer


@pytest.fixture(scope="session")
def perf_analyzer() -> PerfAnalyzer:
    found = find_perf_analyzer()
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_unchanged(perf_analyzer, service, protocol, batch, tmp_path):  # noqa: F811 - the fixture
    url = service.url.removeprefix("http://") if protocol == "http" else service.grpc_target
    report = tmp_path / "report.csv"
    # short windows: this checks that it runs, not how fast
    done = perf_analyzer.run(MODEL, url, protocol, batch, "1:4:3", report, window_ms=500, timeout_s=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "error" not in output.lower(), output[-3000:]
    rows = report.read_text().splitlines()
    assert rows[0].startswith("Concurrency,Inferences/Second") and sorted(row.split(",")[0] for row in rows[1:]) == ["1", "4"], rows
    assert all(float(row.split(",")[1]) > 0 for row in rows[1:]), rows
