"""Real servers for service tests: redis-server and uvicorn on free loopback ports.

``RedisServer`` and ``ServiceProcess`` are processes a test can kill, pause (SIGSTOP)
and restart. The MovieLens bundles are trained once per session (2 epochs) and exported
as version 1 (float32) and version 2 (float16, so the two versions score differently).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.data import movielens100k_table, split_indices

FEATURES = ("user_id", "movie_id", "zip_code", "age", "occupation", "gender", "genres")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not up within {timeout_s}s")


class RedisServer:
    """A redis-server of our own (never the machine's), configured as the service expects."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--hash-max-listpack-value", "256", "--maxmemory-policy", "allkeys-lfu"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: self.client().ping(), 10, "redis-server")
        return self

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.resume()
            self.kill()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


class ServiceProcess:
    """``uvicorn service.app:create_app --factory`` in its own process, settings from UEMBED_* variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> ServiceProcess:
        env = {**os.environ, **self.env}
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port), "--no-access-log", "--timeout-graceful-shutdown", "10"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200

        wait_until(ready, timeout_s, "the service")
        return self

    def stop(self, timeout_s: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value} (labels sorted as exposed)."""
        out = {}
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture
def start_service(tmp_path):
    """Factory: start_service(bundle_store, bundles, **settings) -> a running ServiceProcess."""
    started = []

    def start(bundles: list[Path], **settings) -> ServiceProcess:
        env = {"UEMBED_BUNDLES": ",".join(str(b) for b in bundles)}
        env.update({f"UEMBED_{k.upper()}": str(v) for k, v in settings.items()})
        service = ServiceProcess(env, tmp_path / f"service-{len(started)}.log").start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def movielens_examples():
    """1,000 raw MovieLens-100K test examples (feature -> value) as a client would send them."""
    table = movielens100k_table()
    _, _, test_index = split_indices(table.num_rows, 0)
    raw = table.take(test_index[:1000]).to_pylist()
    return [{name: row[name] for name in FEATURES} for row in raw]


@pytest.fixture(scope="session")
def bundle_store(tmp_path_factory):
    """A bundle store with movielens/1 (float32) and movielens/2 (float16) of one 2-epoch unified run."""
    import torch

    from export.bundle import export_run
    from model.data import load_movielens100k
    from model.train import TrainConfig, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bundles")
    dataset = load_movielens100k()
    train_set, val_set, test_set = dataset.split(0)
    config = TrainConfig(embedding="unified", budget_fraction=0.1, epochs=2, seed=0)
    train(config, train_set, val_set, test_set, run_dir=root / "run", progress=False)
    export_run(root / "run", root / "store", "movielens", version="1", dtype="float32")
    export_run(root / "run", root / "store", "movielens", version="2", dtype="float16")
    return root / "store"
