"""Real servers on free loopback ports, for tests, benchmarks and the local stack: redis-server (alone or as a
Redis Cluster), uvicorn, prometheus and haproxy.

Each is a process that can be killed, paused (SIGSTOP) and started again on the same port.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: deploy/ holds the configs the local servers read


# Ports handed out lately in this process: a server may not have bound one yet, so it is not handed out again. A
# thousand: more than a test session starts at once (the draws are random, so a shorter memory let a port drawn a
# few hundred draws back come again, as one run of the tests' 300 draws found).
_recent_ports: collections.deque[int] = collections.deque(maxlen=1024)


def ephemeral_ports() -> range:
    """The kernel's range of ports for the local end of outgoing connections (Linux's ip_local_port_range)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A loopback port nothing listens on now, for a server about to start. It is drawn below the kernel's ephemeral
    range where there is room: a port from that range (what binding port 0 gives) can be taken, as the local end of
    any outgoing connection on the machine, between this check and the server's bind, which then fails with "address
    already in use" (a test once did)."""
    ephemeral = ephemeral_ports()
    low = 10000
    if ephemeral.start - low >= 4096:
        for _ in range(100):
            port = random.randrange(low, ephemeral.start)
            if port in _recent_ports:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:  # listened on, or still in use
                    continue
            _recent_ports.append(port)
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _recent_ports.append(port)
    return port


def http_get(url: str, timeout_s: float = 5) -> tuple[int, bytes]:
    """Status and body of a GET (any status, no exception for 4xx/5xx): the standard library, so a
    ``[loadtest]`` or ``[train]`` install can run the servers without an HTTP client package."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a check may raise while a server is still starting: connection errors, from the standard
    library or (where it is installed, as in the tests) from httpx, which does not subclass OSError."""
    try:
        import httpx
    except ImportError:
        return (OSError,)
    return (OSError, httpx.TransportError)


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except transient_errors():  # refused, reset or timed out (urllib's URLError is an OSError)
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not up within {timeout_s}s")


REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"


class RedisServer:
    """A redis-server of our own (never the machine's), from the stack's ``deploy/redis/redis.conf``
    (no persistence, LFU eviction, compact hashes), with its port, directory and memory cap set here."""

    name = "redis-server"

    def __init__(self, workdir: Path, maxmemory: str = "0", port: int = 0) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.maxmemory = maxmemory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; `make system-deps` installs it (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, str(REDIS_CONF), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--maxmemory", self.maxmemory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: self.client().ping(), 10, "redis-server")
        return self

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

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


class RedisClusterServers:
    """A Redis Cluster of our own on loopback: ``masters`` redis-server processes in cluster mode, each with
    ``replicas`` replicas, joined by ``redis-cli --cluster create``. Every node runs the stack's
    ``deploy/redis/redis.conf`` with no eviction (rows published to the cluster are the only copy) and a short
    ``cluster-node-timeout``, so a killed master fails over to its replica in a few seconds."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        self.bus_ports = [free_port() for _ in self.ports]  # cluster-port: port + 10000 may be past 65535
        self.processes: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """The service's ``UEMBED_REDIS_URL`` for this cluster: any one node, the client discovers the rest."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def _start_node(self, port: int, bus_port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; `make system-deps` installs it (apt-get install redis-server)")
        folder = self.workdir / f"node-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [binary, str(REDIS_CONF), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
             "--maxmemory", "0", "--maxmemory-policy", "noeviction", "--cluster-enabled", "yes",
             "--cluster-port", str(bus_port), "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--repl-diskless-sync-delay", "0",
             "--logfile", str(folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self) -> RedisClusterServers:
        for port, bus_port in zip(self.ports, self.bus_ports):
            self._start_node(port, bus_port)
        for port in self.ports:
            wait_until(lambda: self.node(port).ping(), 10, f"redis-server {port}")
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if create.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout[-2000:]}{create.stderr[-2000:]}")
        self.wait_healthy()
        return self

    def node(self, port: int):
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def roles(self) -> dict[int, str]:
        """Port -> ``master`` or ``slave`` of each running node, as the node itself says."""
        return {port: self.node(port).info("replication")["role"] for port, p in self.processes.items() if p.poll() is None}

    def masters(self) -> list[int]:
        return [port for port, role in self.roles().items() if role == "master"]

    def wait_healthy(self, timeout_s: float = 30) -> None:
        """Until every running node reports ``cluster_state:ok``, every slot is served by a running master,
        and every running replica is in sync with its master (so a master can fail over)."""

        def healthy() -> bool:
            running = {port for port, process in self.processes.items() if process.poll() is None}
            for port in running:
                node = self.node(port)
                if node.cluster("info")["cluster_state"] != "ok":
                    return False
                if any(slot[2][1] not in running for slot in node.execute_command("CLUSTER SLOTS")):
                    return False
                replication = node.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
            return True

        wait_until(healthy, timeout_s, "the Redis Cluster")

    def kill(self, port: int) -> None:
        self.processes[port].kill()
        self.processes[port].wait()

    def client(self):
        import redis.cluster

        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=5)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


class HttpProcess:
    """A server process that logs to a file, is ready once ``ready_url`` answers 200, and stops on SIGTERM."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, ready_url: str, name: str) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.ready_url = ready_url
        self.name = name
        self.process: subprocess.Popen | None = None
        self.log = None
        self.cwd = ROOT  # where it starts (`python -m` puts it first on the path: another tree serves its own code)

    def start(self, timeout_s: float = 60):
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self):
        """Start the process (again, after it exited: same command, same log) without waiting for it."""
        env = {**os.environ, **self.env}
        if self.log is None or self.log.closed:
            self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 60):
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            return http_get(self.ready_url, timeout_s=1)[0] == 200

        try:
            wait_until(ready, timeout_s, self.name)
        except BaseException:
            self.stop()
            raise
        return self

    def metrics(self) -> dict[str, float]:
        """Samples of the server's /metrics as {'name{labels}': value} (labels sorted as exposed)."""
        return parse_exposition(http_get(f"{self.url}/metrics")[1].decode())

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


SERVICE_APP = "uembed.serving.app:create_app"
SERVICE_HTTP = "uembed.serving.process:ServiceHttpProtocol"
SERVICE_LOOP = "uembed.serving.accepts:BalancedLoop"  # as `uembed serve` runs its workers


class UvicornProcess(HttpProcess):
    """``uvicorn APP --factory`` in its own process, configured by environment variables.

    The service's gRPC port is a free one unless ``env`` sets ``UEMBED_GRPC_PORT`` (never the default 8001, which
    a service started by hand may hold: with SO_REUSEPORT both would bind it and share its connections). The
    service runs with the HTTP protocol `uembed serve` gives it (``SERVICE_HTTP``), where the tree it starts in has
    one (an older tree compared side by side runs uvicorn's own), and on the event loop `uembed serve` gives its workers."""

    def __init__(self, app: str, env: dict[str, str], log_path: Path, workers: int = 1, port: int = 0,
                 ready_path: str = "/readyz", limit_concurrency: int | None = None, loop: str | None = None) -> None:  # fmt: skip
        self.app = app
        self.loop = loop  # None: the service's own (SERVICE_LOOP) where the tree has it; else uvicorn's --loop
        self.workers = workers
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"UEMBED_GRPC_PORT": str(free_port()), **env}
        if app == SERVICE_APP:
            env = summed_metrics(env, workers, log_path)
        self.grpc_port = int(env["UEMBED_GRPC_PORT"])
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        argv = [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1", "--port", str(self.port),
                "--no-access-log", "--timeout-graceful-shutdown", "10", "--workers", str(workers)]  # fmt: skip
        if limit_concurrency:
            argv += ["--limit-concurrency", str(limit_concurrency)]  # as `uembed serve` passes UEMBED_MAX_CONNECTIONS
        super().__init__(argv, env, log_path, f"{self.url}{ready_path}", app)

    def launch(self):
        if self.app == SERVICE_APP and "--http" not in self.argv:
            tree = Path(self.argv[self.argv.index("--app-dir") + 1]) if "--app-dir" in self.argv else Path(self.cwd)
            module = tree / "uembed" / "serving" / "process.py"
            if module.exists() and "class ServiceHttpProtocol" in module.read_text(errors="replace"):
                self.argv += ["--http", SERVICE_HTTP]
            if self.loop is None and (tree / "uembed" / "serving" / "accepts.py").exists():
                self.argv += ["--loop", SERVICE_LOOP]
        if self.loop is not None and "--loop" not in self.argv:
            self.argv += ["--loop", self.loop]
        return super().launch()


def summed_metrics(env: dict[str, str], workers: int, log_path: Path) -> dict[str, str]:
    """``env`` with a fresh PROMETHEUS_MULTIPROC_DIR beside the log where several workers serve and none is set, so
    that /metrics sums every worker's series, not the one's that answers (`uembed serve --workers N` makes its own
    where none is set; one named here is cleaned by the next run and read by the gRPC checks)."""
    if workers < 2 or env.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return env
    metrics_dir = log_path.parent / f"{log_path.stem}-metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    return {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}


class ServeProcess(HttpProcess):
    """``uembed serve --bundle BUNDLE --workers N`` in its own process on free ports (HTTP and gRPC): the service as
    its users start it, with its process model, the gRPC socket its workers share, and its HTTP protocol and loop.
    ``env`` adds settings (``UEMBED_*``)."""

    def __init__(self, bundle: Path, log_path: Path, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.workers = workers
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        argv = [sys.executable, "-m", "uembed", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
                "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--workers", str(workers)]  # fmt: skip
        super().__init__(argv, summed_metrics(env or {}, workers, log_path), log_path, f"{self.url}/readyz", "uembed serve")


def worker_pids(server: HttpProcess) -> list[int]:
    """The processes that serve: the server's own with one worker, its spawned children with several."""
    import psutil

    parent = psutil.Process(server.process.pid)
    workers = []
    for child in parent.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child.pid)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a worker that died, not yet reaped or respawned
            continue
    return workers or [parent.pid]


def parse_exposition(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class PrometheusServer(HttpProcess):
    """Debian's ``prometheus`` on a loopback port with its own data directory."""

    def __init__(self, config: Path, workdir: Path, log_path: Path, port: int = 0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed; `make system-deps` installs it (apt-get install prometheus)")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d", "--log.level=warn"]
        super().__init__(argv, {}, log_path, f"{self.url}/-/ready", "prometheus")


class HaproxyServer(HttpProcess):
    """Debian's ``haproxy`` in the foreground on a config file; ready once its health URL answers 200 (a replica
    is up). ``stats()`` reads its stats page (``/stats;csv``): one row per frontend, server and backend."""

    def __init__(self, config: Path, log_path: Path, stats_port: int) -> None:
        binary = shutil.which("haproxy")
        if binary is None:
            raise RuntimeError("haproxy is not installed; `make system-deps` installs it (apt-get install haproxy)")
        self.stats_url = f"http://127.0.0.1:{stats_port}"
        super().__init__([binary, "-db", "-f", str(config)], {}, log_path, f"{self.stats_url}/healthz", "haproxy")

    def stats(self) -> list[dict[str, str]]:
        return haproxy_stats(self.stats_url)


def haproxy_stats(stats_url: str) -> list[dict[str, str]]:
    """haproxy's stats CSV as rows: ``pxname`` (frontend or backend), ``svname`` (a server, FRONTEND or BACKEND),
    ``status`` (UP, DOWN, ...), ``scur`` (sessions now), ``wretr``/``wredis`` (retries, redispatches) and more."""
    import csv

    text = http_get(f"{stats_url}/stats;csv")[1].decode()
    return list(csv.DictReader(text.removeprefix("# ").splitlines()))
