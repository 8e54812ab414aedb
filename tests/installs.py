"""Fresh virtual environments holding this project as a user installs it (``pip install uembed``,
no extras), for the tests that must run without torch or with another ONNX Runtime.

The venv's pip reads this machine's pip configuration, as ``make install`` does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from uembed.loadtest.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROBE = Path(__file__).with_name("serving_probe.py")


def source_copy(where: Path) -> Path:
    """What the images install (.dockerignore's list): pyproject.toml, README.md and the packages.
    Built from a copy so pip's build never writes into the working tree."""
    where.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, where / name)
    shutil.copytree(ROOT / "uembed", where / "uembed", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def built_wheel(where: Path) -> Path:
    """This project's wheel, built once from a copy of what the images install (its extensions compiled with this
    environment's Cython: the images' own build, in isolation, is the container tests')."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(where),
                    str(source_copy(where / "src"))], check=True, capture_output=True)  # fmt: skip
    (wheel,) = where.glob("uembed-*.whl")
    return wheel


def serving_install(where: Path, wheel: Path) -> Path:
    """A venv at ``where/venv`` with ``pip install <this project's wheel>`` and nothing else; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True)
    bin_dir = where / "venv" / "bin"
    pip(bin_dir, "install", str(wheel))
    return bin_dir


def pip(bin_dir: Path, *args: str) -> None:
    result = subprocess.run([str(bin_dir / "python"), "-m", "pip", "-q", *args], capture_output=True, text=True)
    assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


def extra_requirements(extra: str) -> list[str]:
    """``uembed[extra]``'s requirement strings, from pyproject.toml (the one place they are pinned)."""
    return PYPROJECT["project"]["optional-dependencies"][extra]


def run_serving_probe(bin_dir: Path, bundle: Path, examples: list[dict], workdir: Path) -> dict:
    """serving_probe.py under the venv's interpreter: scores of ``examples`` from ``bundle`` through
    the installed service, its ONNX Runtime, and the torch modules it loaded."""
    (workdir / "examples.json").write_text(json.dumps(examples))
    # -I: the venv's own packages only (not this checkout, not PYTHON* variables). The gRPC server starts too,
    # on a free port (the installed service needs its packages to start at all).
    env = {**os.environ, "UEMBED_BUNDLES": str(bundle), "UEMBED_GRPC_PORT": str(free_port())}
    result = subprocess.run([str(bin_dir / "python"), "-I", str(PROBE), str(workdir / "examples.json"), str(workdir / "probe.json")],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads((workdir / "probe.json").read_text())
    assert probe["service_file"].startswith(str(bin_dir.parent)), "the probe must run the installed service"
    assert probe["onnxruntime"]["file"].startswith(str(bin_dir.parent))
    return probe
