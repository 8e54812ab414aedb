"""Every image target, built with podman by deploy/podman/images.py and run as a user would:
the trainer writes the demo bundle into a mounted folder, the runtime image's own command serves
it (like the host, healthy, unprivileged, draining on SIGTERM), the loadtest image loads it with
locust. runtime-cuda needs a GPU and gigabytes of CUDA wheels: its requirements are resolved and
its ONNX Runtime installed and served from in a venv instead (the closest proof here)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from deploy.podman.images import podman
from export.loader import load_bundle
from export.scorer import ReferenceScorer
from loadtest.servers import free_port, wait_until
from tests.deploy.containers import (
    UEMBED_UID,
    assert_scores_like_the_host,
    demo_bundle_path,
    healthcheck_passes,
    inspect,
)
from tests.installs import extra_requirements, pip, run_serving_probe, serving_install

pytestmark = pytest.mark.containers


@dataclass
class Container:
    name: str
    url: str


def test_the_trainer_image_builds_the_demo_bundle_into_a_mounted_folder(trainer_store):
    bundle = demo_bundle_path(trainer_store)
    load_bundle(bundle)  # checksums, hashing test vectors, files: the bundle is whole
    owners = {path.stat().st_uid for path in bundle.rglob("*")}
    assert owners == {UEMBED_UID}, f"written as {owners}, not the image's unprivileged user"


@pytest.fixture(scope="module")
def runtime(images, trainer_store):
    """The runtime image with its own command, the trainer's store mounted read-only at /bundles."""
    port = free_port()
    name = f"uembed-test-runtime-{os.getpid()}"
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-v", f"{trainer_store}:/bundles:ro",
           images["runtime"])  # fmt: skip
    container = Container(name, f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: httpx.get(f"{container.url}/readyz").status_code == 200, 60, "the runtime container")
        yield container
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_the_runtime_image_serves_the_mounted_bundle_like_the_host(runtime, trainer_store, movielens_examples):
    models = httpx.get(f"{runtime.url}/v1/models").json()
    assert [m["name"] for m in models["models"]] == ["movielens100k"], models
    assert_scores_like_the_host(runtime.url, demo_bundle_path(trainer_store), movielens_examples[:256])


def test_the_runtime_image_is_healthy_by_its_own_healthcheck(runtime):
    assert "readyz" in " ".join(inspect(runtime.name, ".Config.Healthcheck")["Test"]), "HEALTHCHECK lost (OCI format?)"
    assert healthcheck_passes(runtime.name)
    assert inspect(runtime.name, ".State.Health.Status") == "healthy"


def test_the_runtime_image_runs_as_the_unprivileged_user(runtime):
    assert inspect(runtime.name, ".Config.User") == f"{UEMBED_UID}:{UEMBED_UID}"
    processes = podman("top", runtime.name, "huser", "args").stdout.splitlines()[1:]
    assert processes and all(line.split()[0] == str(UEMBED_UID) for line in processes), processes


def test_the_loadtest_image_runs_locust_against_the_runtime_with_no_failures(images, runtime):
    result = podman("run", "--rm", "--network", "host", images["loadtest"], "locust", "-f", "locustfile.py", "--headless",
                    "--host", runtime.url, "--users", "4", "--spawn-rate", "4", "--run-time", "10s", "--only-summary",
                    "--json", check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    stats = json.loads(result.stdout)
    requests = sum(entry["num_requests"] for entry in stats)
    failures = sum(entry["num_failures"] for entry in stats)
    assert requests > 100 and failures == 0, stats


def test_sigterm_drains_requests_in_flight_and_exits_zero(runtime, movielens_examples):
    """Clients keep sending large requests; SIGTERM lands among them. Every request answered is a
    200, some are answered after the signal (they were in flight), and the container exits 0."""
    answered: list[tuple[float, int]] = []

    def client() -> None:
        with httpx.Client(base_url=runtime.url, timeout=30) as session:
            while True:
                try:
                    response = session.post("/v1/score", json={"examples": movielens_examples})
                except httpx.TransportError:
                    return  # the server stopped taking requests
                answered.append((time.monotonic(), response.status_code))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    wait_until(lambda: len(answered) >= 20, 30, "traffic before SIGTERM")
    signalled = time.monotonic()
    podman("kill", "--signal", "TERM", runtime.name)
    exit_code = int(podman("wait", runtime.name).stdout.strip())
    for thread in clients:
        thread.join(30)
    logs = podman("logs", runtime.name).stderr
    assert exit_code == 0, logs[-3000:]
    assert {status for _, status in answered} == {200}, sorted({status for _, status in answered})
    assert any(at > signalled for at, _ in answered), "no request was in flight at SIGTERM"
    assert "Finished server process" in logs


def test_runtime_cuda_requirements_resolve_and_its_onnxruntime_serves_in_a_venv(tmp_path_factory, bundle_store,
                                                                               movielens_examples):  # fmt: skip
    """What the runtime-cuda stage installs, short of a GPU: the serving install, the CPU
    onnxruntime swapped for the gpu extra of pyproject.toml. The full requirement set (CUDA and
    cuDNN wheels included) is resolved for this platform; onnxruntime-gpu itself is installed
    without those wheels (gigabytes) and serves the bundle, falling back to the CPU provider."""
    workdir = tmp_path_factory.mktemp("runtime-cuda")
    bin_dir = serving_install(workdir)
    pip(bin_dir, "uninstall", "-y", "onnxruntime")
    gpu = extra_requirements("gpu")
    pip(bin_dir, "install", "--dry-run", "--ignore-installed", "--report", str(workdir / "resolved.json"), *gpu)
    resolved = {item["metadata"]["name"] for item in json.loads((workdir / "resolved.json").read_text())["install"]}
    assert {"onnxruntime-gpu", "nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime"} <= resolved, resolved
    assert "onnxruntime" not in resolved, "the gpu extra must not bring back the CPU onnxruntime"
    pip(bin_dir, "install", *(re.sub(r"\[[^]]*\]", "", requirement) for requirement in gpu))

    bundle = bundle_store / "movielens" / "1"
    examples = movielens_examples[:64]
    probe = run_serving_probe(bin_dir, bundle, examples, workdir)
    assert probe["onnxruntime"]["version"] == re.search(r"==(\S+)", gpu[0]).group(1)
    assert "CUDAExecutionProvider" in probe["onnxruntime"]["providers"]
    assert probe["torch_modules"] == []
    expected = ReferenceScorer(load_bundle(bundle)).score(examples)
    np.testing.assert_allclose(probe["scores"], expected, rtol=0, atol=1e-6)
