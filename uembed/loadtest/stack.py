"""The local stack without Docker: redis-server, the service and Prometheus from this machine's packages; with
``--replicas N``, N service processes behind haproxy.

It uses the compose stack's own configuration: ``deploy/redis/redis.conf``, ``deploy/prometheus/prometheus.yml``
and ``deploy/haproxy/haproxy.cfg``, with their addresses pointed at the loopback ports used here (the only
change). ``uembed stack`` runs it in the foreground until Ctrl-C, SIGTERM or ``--seconds``, then stops the
components in reverse order. With several replicas, one that exits is started again (haproxy routes around it
meanwhile and takes it back once its ``/readyz`` answers); any other component that exits stops the stack.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from uembed.loadtest.servers import ROOT, HaproxyServer, HttpProcess, PrometheusServer, RedisServer, free_port

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
# A replica that exits this many times within RESTART_WINDOW_S is not started again: the stack stops.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0


def local_scrape_config(targets: dict[str, list[str]]) -> dict:
    """The compose scrape config with each job's targets (static or found by DNS) replaced by the static
    ``targets[job_name]``; a job with no entry in ``targets`` is left out."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": list(targets[job["job_name"]])}]
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def local_haproxy_config(listen: str, stats_listen: str, servers: dict[str, str]) -> str:
    """``deploy/haproxy/haproxy.cfg`` for loopback: the service's frontend bound to ``listen``, haproxy's stats
    frontend to ``stats_listen``, and one ``server NAME ADDRESS`` line per replica in place of the DNS
    ``server-template`` (whose ``resolvers`` section goes). Everything else (checks, retries, timeouts) is the
    compose file's."""
    replace = {
        ("frontend uembed", "bind"): [f"    bind {listen}"],
        ("frontend lb-stats", "bind"): [f"    bind {stats_listen}"],
        ("backend uembed", "server-template"): [f"    server {name} {address}" for name, address in servers.items()],
    }
    done = set()
    out: list[str] = []
    section = ""
    for line in HAPROXY_CONFIG.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            section = line.strip()
        if section.startswith("resolvers "):
            continue
        words = line.split()
        key = (section, words[0]) if words else None
        if key in replace:
            out += replace[key]
            done.add(key)
        else:
            out.append(line)
    missing = set(replace) - done
    if missing:
        raise RuntimeError(f"{HAPROXY_CONFIG}: no {', '.join(f'`{k}` in `{s}`' for s, k in sorted(missing))} to replace")
    return "\n".join(out) + "\n"


class Replica(HttpProcess):
    """One ``uembed serve`` process of the stack, on 127.0.0.1:``port``."""

    def __init__(self, name: str, port: int, grpc_port: int | None, argv: list[str], log_path: Path) -> None:
        super().__init__(argv, {}, log_path, f"http://127.0.0.1:{port}/readyz", name)
        self.port = port
        self.grpc_port = grpc_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LocalStack:
    """redis-server, ``replicas`` processes of ``uembed serve`` (behind haproxy when more than one) and
    prometheus on loopback ports; ``up()`` starts them, ``supervise()`` restarts a replica that exited,
    ``down()`` stops them in reverse order. ``service_port`` is where clients go: haproxy's with several
    replicas, which listen on free ports."""

    def __init__(self, workdir: Path, bundles: list[Path] = (), bundle_store: Path | None = None,
                 service_port: int = 8000, redis_port: int = 6380, prometheus_port: int = 9090,
                 workers: int = 1, redis_maxmemory: str = "1gb", replicas: int = 1,
                 haproxy_stats_port: int = 8405) -> None:  # fmt: skip
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas}")
        self.workdir = Path(workdir).resolve()
        self.bundles = [Path(b).resolve() for b in bundles]
        self.bundle_store = bundle_store
        self.ports = {
            "service": service_port or free_port(),
            "redis": redis_port or free_port(),
            "prometheus": prometheus_port or free_port(),
        }
        if replicas > 1:
            self.ports["haproxy_stats"] = haproxy_stats_port or free_port()
        self.workers = workers
        self.redis_maxmemory = redis_maxmemory
        self.replica_count = replicas
        self.components: list = []
        self.replicas: list[Replica] = []
        self.haproxy: HaproxyServer | None = None
        self.restarts: dict[str, list[float]] = {}
        self.state: dict = {}

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['service']}"

    def _bundle_args(self) -> list[str]:
        bundles = self.bundles
        if not bundles and self.replica_count > 1:
            # The demo bundle, trained here once: N replicas would otherwise each train it into the same store.
            argv = [sys.executable, "-m", "uembed", "demo-bundle"]
            if self.bundle_store:
                argv += ["--bundle-store", str(Path(self.bundle_store).resolve())]
            printed = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True).stdout
            bundles = [(ROOT / printed.strip().splitlines()[-1]).resolve()]
        args = []
        for bundle in bundles:
            args += ["--bundle", str(bundle)]
        if self.bundle_store:
            args += ["--bundle-store", str(Path(self.bundle_store).resolve())]
        return args

    def _replica(self, index: int, redis_url: str, bundle_args: list[str]) -> Replica:
        """``uembed serve`` number ``index`` (from 1). A lone replica is today's service: the stack's port, the
        default gRPC port and ``service.log``. Several get free ports (HTTP and gRPC) and ``replica-N.log``."""
        if self.replica_count == 1:
            name, port, grpc_port = "service", self.ports["service"], None
        else:
            name, port, grpc_port = f"replica-{index}", free_port(), free_port()
        argv = [sys.executable, "-m", "uembed", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(self.workers), "--redis-url", redis_url, *bundle_args]  # fmt: skip
        if grpc_port:
            argv += ["--grpc-port", str(grpc_port)]
        return Replica(name, port, grpc_port, argv, self.workdir / f"{name}.log")

    def up(self, service_timeout_s: float = 900) -> dict:
        """Start Redis, the replicas (training the demo bundle first if no bundle is given), haproxy in front of
        them when there are several, and Prometheus scraping each replica (and haproxy)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            redis_dir = self.workdir / "redis"
            redis_dir.mkdir(exist_ok=True)
            redis = RedisServer(redis_dir, maxmemory=self.redis_maxmemory, port=self.ports["redis"]).start()
            self.components.append(redis)
            bundle_args = self._bundle_args()
            self.replicas = [self._replica(i, redis.url, bundle_args) for i in range(1, self.replica_count + 1)]
            for replica in self.replicas:  # all start loading at once, then each is waited for
                self.components.append(replica.launch())
            for replica in self.replicas:
                replica.wait_ready(timeout_s=service_timeout_s)
            targets = {"uembed": [f"127.0.0.1:{r.port}" for r in self.replicas]}
            if self.replica_count > 1:
                stats = f"127.0.0.1:{self.ports['haproxy_stats']}"
                config = local_haproxy_config(f"127.0.0.1:{self.ports['service']}", stats,
                                              {r.name: f"127.0.0.1:{r.port}" for r in self.replicas})  # fmt: skip
                (self.workdir / "haproxy.cfg").write_text(config)
                self.haproxy = HaproxyServer(self.workdir / "haproxy.cfg", self.workdir / "haproxy.log",
                                             self.ports["haproxy_stats"])  # fmt: skip
                self.components.append(self.haproxy.start())
                targets["haproxy"] = [stats]
            config_path = self.workdir / "prometheus.yml"
            targets["prometheus"] = [f"127.0.0.1:{self.ports['prometheus']}"]
            config_path.write_text(yaml.safe_dump(local_scrape_config(targets), sort_keys=False))
            prometheus = PrometheusServer(config_path, self.workdir / "prometheus-data", self.workdir / "prometheus.log",
                                          port=self.ports["prometheus"])  # fmt: skip
            self.components.append(prometheus.start())
        except BaseException:
            self.down()
            raise
        logs = [r.name for r in self.replicas] + (["haproxy"] if self.haproxy else []) + ["prometheus"]
        self.state = {
            "service": self.service_url,
            "redis": redis.url,
            "prometheus": prometheus.url,
            "replicas": [],
            "haproxy": None,
            "logs": {name: str(self.workdir / f"{name}.log") for name in logs},
        }
        self._write_state()
        return self.state

    def _write_state(self) -> None:
        """DIR/stack.json: URLs, and each replica's ports and pid (rewritten when a replica is restarted)."""
        self.state["replicas"] = [
            {"name": r.name, "url": r.url, "port": r.port, "grpc_port": r.grpc_port,
             "pid": r.process.pid}  # fmt: skip
            for r in self.replicas
        ]
        if self.haproxy:
            self.state["haproxy"] = {"url": self.service_url, "stats": self.haproxy.stats_url, "pid": self.haproxy.process.pid}
        (self.workdir / "stack.json").write_text(json.dumps(self.state, indent=2) + "\n")

    def supervise(self) -> str | None:
        """One look at every process. A replica that exited, when there are several, is started again (same
        command and port) unless it has exited MAX_RESTARTS times within RESTART_WINDOW_S; the name of any other
        component that exited (or of that replica) is returned: the stack should stop."""
        for component in self.components:
            code = component.process.poll()
            if code is None:
                continue
            if component in self.replicas and self.replica_count > 1:
                now = time.monotonic()
                recent = [t for t in self.restarts.get(component.name, []) if now - t < RESTART_WINDOW_S]
                if len(recent) < MAX_RESTARTS:
                    self.restarts[component.name] = [*recent, now]
                    print(f"{component.name} (port {component.port}) exited with {code}; starting it again",
                          file=sys.stderr)  # fmt: skip
                    component.launch()
                    self._write_state()
                    continue
            return component.name
        return None

    def down(self) -> None:
        while self.components:
            self.components.pop().stop()
        (self.workdir / "stack.json").unlink(missing_ok=True)


def run_stack(args) -> int:
    stack = LocalStack(args.dir, args.bundle or [], args.bundle_store, args.port, args.redis_port,
                       args.prometheus_port, args.workers, args.redis_maxmemory, args.replicas,
                       args.haproxy_stats_port)  # fmt: skip

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # while starting: stop what has started, then exit
    what = f"{args.replicas} replicas of the service behind haproxy" if args.replicas > 1 else "the service"
    print(f"starting redis-server, {what} and prometheus ...", file=sys.stderr)
    state = stack.up()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    lines = [f"  service     {state['service']}  (POST /v1/score, /metrics)"]
    if state["haproxy"]:
        lines[0] = f"  service     {state['service']}  (haproxy: POST /v1/score; its stats {state['haproxy']['stats']}/stats)"
        lines += [f"  {r['name']:<10}  {r['url']}  (/metrics, gRPC 127.0.0.1:{r['grpc_port']})" for r in state["replicas"]]
    print(
        f"stack up (state and logs in {stack.workdir}):\n" + "\n".join(lines) + "\n"
        f"  prometheus  {state['prometheus']}\n"
        f"  redis       {state['redis']}\n"
        f"load it:  uembed loadtest --url {state['service']} --seconds 60\n"
        "Ctrl-C stops everything.",
        file=sys.stderr,
    )
    deadline = time.monotonic() + args.seconds if args.seconds else None
    failed = None
    while not stop.wait(0.5):
        failed = stack.supervise()
        if failed or (deadline and time.monotonic() > deadline):
            break
    print("stopping the stack ...", file=sys.stderr)
    stack.down()
    if failed:
        print(f"error: {failed} exited; see the logs in {stack.workdir}", file=sys.stderr)
        return 1
    print("stack stopped", file=sys.stderr)
    return 0
