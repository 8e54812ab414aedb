"""Helpers of the container tests: scoring through a published port, a container's state, and
its healthcheck run by hand (podman's healthcheck timers need systemd, which is absent here)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from deploy.podman.images import podman
from tests.scoring import score
from uembed.bundle.loader import load_bundle
from uembed.loadtest.servers import free_port, wait_until
from uembed.serving.pipeline.reference import ReferenceScorer

UEMBED_UID = 10001  # the Dockerfile's unprivileged user


def demo_bundle_path(store: Path) -> Path:
    versions = sorted((store / "movielens100k").iterdir())
    assert versions, f"no demo bundle in {store}"
    return versions[-1]


def assert_scores_like_the_host(url: str, bundle: Path, examples: list[dict]) -> None:
    """The service at ``url`` scores ``examples`` as this process's reference scorer does (1e-6)."""
    expected = ReferenceScorer(load_bundle(bundle)).score(examples)
    np.testing.assert_allclose(score(url, examples), expected, rtol=0, atol=1e-6)


def healthcheck_passes(container: str) -> bool:
    """One run of the container's HEALTHCHECK command, as podman's timer would run it."""
    return podman("healthcheck", "run", container, check=False).returncode == 0


def inspect(container: str, field: str):
    """``podman inspect`` of one field (``.State.Pid``, ``.Config.User``...), decoded from JSON."""
    return json.loads(podman("inspect", "--format", "{{json " + field + "}}", container).stdout)


@dataclass
class Container:
    name: str
    url: str


@contextmanager
def serving_container(image: str, store: Path, env: dict[str, str] | None = None) -> Iterator[Container]:
    """A serving image run with its own command, ``store`` mounted read-only at /bundles and its
    port published on a free loopback port; removed afterwards."""
    port = free_port()
    name = f"uembed-test-{image.split(':')[0]}-{os.getpid()}"
    variables = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-v", f"{store}:/bundles:ro", *variables, image)
    container = Container(name, f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: httpx.get(f"{container.url}/readyz").status_code == 200, 60, f"the {image} container")
        yield container
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
