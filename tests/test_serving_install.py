"""The serving install (``pip install uembed``, no extras) in a fresh venv with no torch: every
command's help works, commands of a missing extra name it, and the service scores a bundle
like this environment without loading any torch module."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from tests.installs import run_serving_probe, serving_install
from uembed.bundle.loader import load_bundle
from uembed.serving.pipeline.reference import ReferenceScorer


@pytest.fixture(scope="module")
def venv(tmp_path_factory, uembed_wheel):
    bin_dir = serving_install(tmp_path_factory.mktemp("serving-install"), uembed_wheel)
    assert subprocess.run([str(bin_dir / "python"), "-c", "import torch"], capture_output=True).returncode != 0, (
        "torch is importable in the serving install"
    )
    return bin_dir


def uembed(venv, *args, cwd=None, env=None):
    return subprocess.run([str(venv / "uembed"), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)  # fmt: skip


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["train", "--help"], ["loadtest", "--help"]])
def test_help_works_without_torch(venv, args):
    result = uembed(venv, *args)
    assert result.returncode == 0, result.stderr
    assert "usage: uembed" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["train"], "train"),
        (["search"], "train"),
        (["study", "--out", "study"], "train"),
        (["export", "runs/x"], "train"),
        (["bench"], "train"),
        (["loadtest"], "loadtest"),
        (["stack"], "loadtest"),
    ],
)
def test_a_command_whose_extra_is_missing_names_it(venv, tmp_path, args, extra):
    result = uembed(venv, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert f"pip install 'uembed[{extra}]'" in result.stderr


def test_serve_without_a_bundle_says_the_demo_bundle_needs_the_train_extra(venv, tmp_path):
    result = uembed(venv, "serve", "--bundle-store", str(tmp_path), "--port", "1", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install 'uembed[train]'" in result.stderr


def test_the_serving_path_loads_no_torch_and_scores_like_this_environment(venv, synthetic_store, movielens_examples, tmp_path):
    bundle = synthetic_store / "movielens" / "1"
    examples = movielens_examples[:64]
    probe = run_serving_probe(venv, bundle, examples, tmp_path)
    assert probe["torch_modules"] == []
    # pip compiled the hashing extension into the install (its header from make system-deps)
    assert probe["hashing"] == ("python" if os.environ.get("UEMBED_PURE_PYTHON") == "1" else "compiled")
    # and the service's other extensions (the assemble stage, ModelInfer's wire reader)
    assert set(probe["compiled"].values()) == {os.environ.get("UEMBED_PURE_PYTHON") != "1"}, probe["compiled"]
    expected = ReferenceScorer(load_bundle(bundle)).score(examples)
    np.testing.assert_allclose(probe["scores"], expected, rtol=0, atol=1e-6)
