"""Every image target, built with podman by deploy/podman/images.py and run as a user would:
the trainer writes the demo bundle into a mounted folder, the runtime image's own command serves
it (like the host, healthy, unprivileged, draining on SIGTERM), the loadtest image loads it with
locust. runtime-cuda is built and serves too; with no GPU here its CUDA provider cannot start,
so it scores on the CPU, and the test checks that only the GPU driver is missing."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from deploy.podman.images import ROOT, image_size_bytes, podman
from tests.deploy.containers import (
    UEMBED_UID,
    assert_scores_like_the_host,
    demo_bundle_path,
    healthcheck_passes,
    inspect,
    serving_container,
)
from tests.installs import extra_requirements
from uembed.bundle.loader import load_bundle
from uembed.bundle.stamps import STAMP_FILE
from uembed.loadtest.servers import wait_until

pytestmark = pytest.mark.containers


def test_the_trainer_image_builds_the_demo_bundle_into_a_mounted_folder(trainer_store):
    bundle = demo_bundle_path(trainer_store)
    load_bundle(bundle)  # checksums, hashing test vectors, files: the bundle is whole
    # what the image wrote; the verification stamp is rewritten by whoever loads the bundle (this test's host
    # process and others on the shared store, as root)
    owners = {path.stat().st_uid for path in bundle.rglob("*") if path.name != STAMP_FILE}
    assert owners == {UEMBED_UID}, f"written as {owners}, not the image's unprivileged user"


@pytest.fixture(scope="module")
def runtime(images, trainer_store):
    """The runtime image with its own command, the trainer's store mounted read-only at /bundles."""
    with serving_container(images["runtime"], trainer_store) as container:
        yield container


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


def test_the_runtime_cuda_image_serves_on_the_gpu_by_default_and_says_what_is_missing(cuda_image, trainer_store):
    result = podman("run", "--rm", "-v", f"{trainer_store}:/bundles:ro", cuda_image, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "device=cuda: no usable CUDA device" in result.stderr.strip().splitlines()[-1]


def test_the_runtime_cuda_image_on_the_cpu_scores_like_the_host_and_lacks_only_the_gpu_driver(cuda_image, trainer_store,
                                                                                            movielens_examples):  # fmt: skip
    """Short of a GPU, what the runtime-cuda image can show here: with UEMBED_DEVICE=cpu it serves
    like the host; it carries the gpu extra's onnxruntime-gpu and CuPy at their pins (and not the
    CPU onnxruntime); its CUDA and cuDNN libraries load; and both ONNX Runtime's CUDA provider and
    CuPy fail only for want of the GPU driver (libcuda.so.1, which `--gpus all` brings)."""
    bundle = demo_bundle_path(trainer_store)
    with serving_container(cuda_image, trainer_store, env={"UEMBED_DEVICE": "cpu"}) as container:
        assert_scores_like_the_host(container.url, bundle, movielens_examples[:256])
        assert healthcheck_passes(container.name)
        probe = podman("exec", container.name, "python", "-c", CUDA_PROBE, f"/bundles/{bundle.relative_to(trainer_store)}/dense.onnx")
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    pins = dict(re.match(r"([\w-]+)(?:\[[^]]*\])?==(\S+)", r).groups() for r in extra_requirements("gpu"))
    assert report["onnxruntime"] == pins["onnxruntime-gpu"] and report["cupy"] == pins["cupy-cuda13x"], report
    assert report["cpu_onnxruntime_installed"] is False
    assert "CUDAExecutionProvider" in report["providers"]
    assert report["loaded"] == ["libcublas.so.13", "libcudart.so.13", "libcudnn.so.9"], report
    assert report["session_providers"] == ["CPUExecutionProvider"]  # the CUDA provider could not start...
    cuda_failure = re.search(r"Failed to load library \S*libonnxruntime_providers_cuda\.so with error: (\S+):", probe.stderr)
    assert cuda_failure and cuda_failure.group(1) == "libcuda.so.1", probe.stderr[-3000:]  # ...for want of the driver
    assert "driver" in report["cupy_error"].lower(), report


# Run inside the runtime-cuda image (argument: a dense.onnx): the ONNX Runtime and CuPy it carries,
# the CUDA libraries preload_dlls() loads from the nvidia wheels (as the service's CUDA path does),
# and what becomes of a CUDA session and of CuPy with no GPU driver.
CUDA_PROBE = """
import ctypes, importlib.metadata as metadata, json, os, sys
import onnxruntime as ort
ort.preload_dlls()
loaded = []
for library in ("libcublas.so.13", "libcudart.so.13", "libcudnn.so.9"):
    try:
        ctypes.CDLL(library, mode=os.RTLD_NOLOAD)  # succeeds only if already loaded
        loaded.append(library)
    except OSError:
        pass
session = ort.InferenceSession(sys.argv[1], providers=["CUDAExecutionProvider"])  # logs why CUDA fails, falls back
import cupy
try:
    cupy.cuda.runtime.getDeviceCount()
    cupy_error = None
except cupy.cuda.runtime.CUDARuntimeError as exc:
    cupy_error = str(exc)
try:
    metadata.distribution("onnxruntime")
    cpu_onnxruntime = True
except metadata.PackageNotFoundError:
    cpu_onnxruntime = False
print(json.dumps({"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "loaded": loaded,
                  "session_providers": session.get_providers(), "cupy": cupy.__version__, "cupy_error": cupy_error,
                  "cpu_onnxruntime_installed": cpu_onnxruntime}))
"""


def readme_image_table() -> dict[str, tuple[str, float]]:
    """README's image table: target -> (image name, size in bytes)."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([\w-]+)`[^|]*\| `([^`]+)` \| ([\d.]+) (MB|GB) \|", readme, re.MULTILINE)
    return {target: (image, float(size) * (1e9 if unit == "GB" else 1e6)) for target, image, size, unit in rows}


def test_the_readme_image_table_names_every_target_with_its_size(images, cuda_image):
    table = readme_image_table()
    assert {target: image for target, (image, _) in table.items()} == {**images, "runtime-cuda": cuda_image}
    for target, (image, documented) in table.items():
        measured = image_size_bytes(image)
        # Within 10 %: another base image (the official one rather than the stand-in) moves them a little.
        assert abs(measured - documented) <= 0.1 * documented, (
            f"{target}: README says {documented / 1e6:.0f} MB, podman measures {measured / 1e6:.0f} MB"
        )
