"""Triton's perf_analyzer, unchanged, as a load generator: the tool Triton and KServe users measure a server with.

The binary ships in PyPI's ``tritonclient==2.50.0`` wheel (``tritonclient-2.50.0.data/data/bin/perf_analyzer``; the
PyPI package named perf-analyzer is a placeholder). It links Debian's libb64 (``libb64-0d``, in ``make system-deps``)
and ``libcudart.so.12`` (PyPI's ``nvidia-cuda-runtime-cu12``; no GPU needed). :func:`find_perf_analyzer` installs both
wheels into a venv of their own under ``$UEMBED_CACHE/perf_analyzer`` (``~/.cache/uembed``) once, or takes
``$PERF_ANALYZER`` (a binary that runs as it is).
"""

from __future__ import annotations

import csv
import fcntl
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VERSION = "2.50.0"
PACKAGES = (f"tritonclient=={VERSION}", "nvidia-cuda-runtime-cu12")
MISSING_LIBRARY = "error while loading shared libraries"


@dataclass
class PerfAnalyzer:
    binary: str
    env: dict

    def run(self, model: str, url: str, protocol: str, batch: int, concurrency_range: str, report: Path,
            window_ms: int = 2000, trials: int = 3, timeout_s: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
        """One perf_analyzer run (its CSV report in ``report``). Any spread between windows counts as stable: on a
        shared machine windows differ, and perf_analyzer would otherwise end with "failed to obtain stable
        measurement" instead of reporting what it measured. ``concurrency_range``: perf_analyzer's START:END:STEP."""
        command = [self.binary, "-m", model, "-u", url, "-i", protocol, "-b", str(batch), "--concurrency-range", concurrency_range,
                   "--measurement-interval", str(window_ms), "--max-trials", str(trials),
                   "--stability-percentage", "10000", "-f", str(report)]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout_s)

    def measure(self, model: str, url: str, protocol: str, batch: int, concurrency: int, workdir: Path,
                seconds: float) -> dict:  # fmt: skip
        """Requests/s and latency percentiles (ms) of one concurrency level, as perf_analyzer reports them."""
        report = workdir / f"perf-analyzer-{protocol}-b{batch}-c{concurrency}.csv"
        done = self.run(model, url, protocol, batch, f"{concurrency}:{concurrency}", report, window_ms=max(int(seconds * 1000 / 3), 500))
        if done.returncode:
            raise RuntimeError(f"perf_analyzer exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
        row = next(csv.DictReader(report.read_text().splitlines()))
        return {
            "requests_per_s": round(float(row["Inferences/Second"]) / batch, 1),
            "examples_per_s": round(float(row["Inferences/Second"]), 1),
            "p50_ms": round(float(row["p50 latency"]) / 1000, 3),
            "p99_ms": round(float(row["p99 latency"]) / 1000, 3),
            "tool": f"perf_analyzer {VERSION} (its own random data, one tensor set reused)",
        }


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


def find_perf_analyzer() -> PerfAnalyzer | str:
    """perf_analyzer ready to run, installed the first time; where it cannot be had, why not."""
    env = dict(os.environ)
    binary = os.environ.get("PERF_ANALYZER")
    if not binary:
        venv = cache_dir() / f"tritonclient-{VERSION}"
        if not (venv / "bin" / "perf_analyzer").exists():
            venv.parent.mkdir(parents=True, exist_ok=True)
            with open(venv.parent / f"{venv.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process installing waits, then finds the install
                problem = None if (venv / "bin" / "perf_analyzer").exists() else install(venv)
            if problem:
                return f"perf_analyzer could not be installed ({' '.join(PACKAGES)} from PyPI): {problem}"
        binary = str(venv / "bin" / "perf_analyzer")
        libraries = sorted(venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, libraries), env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, env=env, timeout=60)
    except OSError as exc:
        return f"perf_analyzer cannot start: {exc}"
    if MISSING_LIBRARY in version.stderr:
        return (f"perf_analyzer cannot start: {version.stderr.strip()[-300:]} (libb64: apt-get install libb64-0d, as "
                "`make system-deps` does)")  # fmt: skip
    return PerfAnalyzer(binary, env)
