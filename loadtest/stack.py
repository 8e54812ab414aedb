"""The local stack without Docker: redis-server, the service and Prometheus from this machine's packages.

It uses the compose stack's own configuration: ``deploy/redis/redis.conf`` and
``deploy/prometheus/prometheus.yml``, whose targets are pointed at the loopback ports used
here (the only change). ``uembed stack`` runs it in the foreground until Ctrl-C, SIGTERM or
``--seconds``, then stops the components in reverse order.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from loadtest.servers import ROOT, HttpProcess, PrometheusServer, RedisServer, free_port

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def local_scrape_config(targets: dict[str, str]) -> dict:
    """The compose scrape config with each job's static targets replaced by ``targets[job_name]``."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            static["targets"] = [targets[job["job_name"]]]
    return config


class LocalStack:
    def __init__(self, workdir: Path, bundles: list[Path] = (), bundle_store: Path | None = None,
                 service_port: int = 8000, redis_port: int = 6380, prometheus_port: int = 9090,
                 workers: int = 1, redis_maxmemory: str = "1gb") -> None:  # fmt: skip
        self.workdir = Path(workdir).resolve()
        self.bundles = [Path(b).resolve() for b in bundles]
        self.bundle_store = bundle_store
        self.ports = {
            "service": service_port or free_port(),
            "redis": redis_port or free_port(),
            "prometheus": prometheus_port or free_port(),
        }
        self.workers = workers
        self.redis_maxmemory = redis_maxmemory
        self.components: list = []

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['service']}"

    def up(self, service_timeout_s: float = 900) -> dict:
        """Start Redis, the service (training the demo bundle first if no bundle is given) and Prometheus."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            redis_dir = self.workdir / "redis"
            redis_dir.mkdir(exist_ok=True)
            redis = RedisServer(redis_dir, maxmemory=self.redis_maxmemory, port=self.ports["redis"]).start()
            self.components.append(redis)
            argv = [sys.executable, "-m", "uembed", "serve", "--host", "127.0.0.1", "--port", str(self.ports["service"]),
                    "--workers", str(self.workers), "--redis-url", redis.url]  # fmt: skip
            for bundle in self.bundles:
                argv += ["--bundle", str(bundle)]
            if self.bundle_store:
                argv += ["--bundle-store", str(Path(self.bundle_store).resolve())]
            service = HttpProcess(argv, {}, self.workdir / "service.log", f"{self.service_url}/readyz", "uembed serve")
            self.components.append(service.start(timeout_s=service_timeout_s))
            config_path = self.workdir / "prometheus.yml"
            prometheus_address = f"127.0.0.1:{self.ports['prometheus']}"
            config = local_scrape_config({"uembed": f"127.0.0.1:{self.ports['service']}", "prometheus": prometheus_address})
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            prometheus = PrometheusServer(config_path, self.workdir / "prometheus-data", self.workdir / "prometheus.log",
                                          port=self.ports["prometheus"])  # fmt: skip
            self.components.append(prometheus.start())
        except BaseException:
            self.down()
            raise
        state = {
            "service": self.service_url,
            "redis": redis.url,
            "prometheus": prometheus.url,
            "logs": {name: str(self.workdir / f"{name}.log") for name in ("service", "prometheus")},
        }
        (self.workdir / "stack.json").write_text(json.dumps(state, indent=2) + "\n")
        return state

    def failed_component(self) -> str | None:
        for component in self.components:
            if component.process.poll() is not None:
                return component.name
        return None

    def down(self) -> None:
        while self.components:
            self.components.pop().stop()
        (self.workdir / "stack.json").unlink(missing_ok=True)


def run_stack(args) -> int:
    stack = LocalStack(args.dir, args.bundle or [], args.bundle_store, args.port, args.redis_port,
                       args.prometheus_port, args.workers, args.redis_maxmemory)  # fmt: skip

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # while starting: stop what has started, then exit
    print("starting redis-server, the service and prometheus ...", file=sys.stderr)
    state = stack.up()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"stack up (state and logs in {stack.workdir}):\n"
        f"  service     {state['service']}  (POST /v1/score, /metrics)\n"
        f"  prometheus  {state['prometheus']}\n"
        f"  redis       {state['redis']}\n"
        f"load it:  uembed loadtest --url {state['service']} --seconds 60\n"
        "Ctrl-C stops everything.",
        file=sys.stderr,
    )
    deadline = time.monotonic() + args.seconds if args.seconds else None
    failed = None
    while not stop.wait(0.5):
        failed = stack.failed_component()
        if failed or (deadline and time.monotonic() > deadline):
            break
    print("stopping the stack ...", file=sys.stderr)
    stack.down()
    if failed:
        print(f"error: {failed} exited; see the logs in {stack.workdir}", file=sys.stderr)
        return 1
    print("stack stopped", file=sys.stderr)
    return 0
