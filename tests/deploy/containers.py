"""Helpers of the container tests: scoring through a published port, a container's state, and
its healthcheck run by hand (podman's healthcheck timers need systemd, which is absent here)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np

from deploy.podman.images import podman
from export.loader import load_bundle
from export.scorer import ReferenceScorer

UEMBED_UID = 10001  # the Dockerfile's unprivileged user


def demo_bundle_path(store: Path) -> Path:
    versions = sorted((store / "movielens100k").iterdir())
    assert versions, f"no demo bundle in {store}"
    return versions[-1]


def score(url: str, examples: list[dict]) -> list[float]:
    response = httpx.post(f"{url}/v1/score", json={"examples": examples}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["scores"]


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
