"""`compose up` for real: docker-compose.yml under podman-compose (deploy/podman/compose.py, as
`make compose-up` runs it) with the images of `make images`, Grafana left out by its profile.

The stack runs under its own project name and free loopback ports, so a developer's stack is
never touched. Its `bundles` volume starts with the demo bundle the trainer image wrote (the
trainer's training is tested in test_images.py): the stack's one-shot `bundle` job finds it and
exits 0, as on every `up` after the first."""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
from dataclasses import dataclass

import httpx
import pytest

from deploy.podman import compose
from deploy.podman.images import compose_services, podman, podman_env
from tests.deploy.containers import assert_scores_like_the_host, demo_bundle_path, healthcheck_passes, inspect
from tests.scoring import score
from uembed.loadtest.servers import free_port, wait_until

pytestmark = pytest.mark.containers
PORTS = ("UEMBED_PORT", "HAPROXY_STATS_PORT", "PROMETHEUS_PORT", "LOCUST_PORT")


@dataclass
class Stack:
    project: str
    ports: dict[str, int]
    env: dict[str, str]

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['UEMBED_PORT']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['PROMETHEUS_PORT']}"

    def container(self, service: str) -> str:
        (name,) = compose.containers(self.project, service)
        return name

    def replicas(self, service: str = "uembed") -> list[str]:
        return sorted(compose.containers(self.project, service))

    def haproxy_view(self) -> str:
        """What a failed request through haproxy came from: haproxy's account of each replica (its state, its last
        check and why), then each container's state and last log lines."""
        lines = []
        try:
            stats = httpx.get(f"http://127.0.0.1:{self.ports['HAPROXY_STATS_PORT']}/stats;csv", timeout=5).text
            for row in csv.DictReader(io.StringIO(stats.lstrip("# "))):
                resolved = row["status"] != "MAINT (resolution)"  # the template's slots no replica fills
                if row["pxname"] == "uembed" and row["svname"].startswith("replica-") and resolved:
                    lines.append(f"haproxy {row['svname']}: {row['status']}, last check {row['check_status']} "
                                 f"({row['check_desc']}), changed {row['lastchg']} s ago")  # fmt: skip
        except (httpx.HTTPError, KeyError) as error:
            lines.append(f"haproxy's stats did not answer: {error!r}")
        for container in [*self.replicas("haproxy"), *self.replicas()]:
            state = podman("inspect", "--format", "{{.State.Status}}, restarts {{.RestartCount}}", container,
                           check=False)  # fmt: skip
            logs = podman("logs", "--tail", "15", container, check=False)
            said = state.stdout.strip() or state.stderr.strip()
            lines.append(f"--- {container} ({said}):\n{logs.stdout}{logs.stderr}")
        return "\n".join(lines)

    def score(self, examples: list[dict]):
        """Scores through haproxy's published port; a failure says what haproxy saw of the replicas."""
        try:
            return score(self.service_url, examples)
        except (AssertionError, httpx.HTTPError) as error:
            raise AssertionError(f"{error!r}\n{self.haproxy_view()}") from error


def seed_volume(name: str, project: str, folder) -> None:
    """A named volume as podman-compose creates it (its labels, so `down --volumes` removes it),
    holding the files of ``folder``."""
    podman("volume", "create", "--label", f"io.podman.compose.project={project}",
           "--label", f"com.docker.compose.project={project}", name)  # fmt: skip
    with subprocess.Popen(["tar", "-C", str(folder), "-c", "."], stdout=subprocess.PIPE) as tar:
        subprocess.run(["podman", "volume", "import", name, "-"], stdin=tar.stdout, env=podman_env(), check=True)
    assert tar.returncode == 0


@pytest.fixture(scope="module")
def stack(images, trainer_store):
    project = f"uembed-test-{os.getpid()}"
    ports = {name: free_port() for name in PORTS}
    env = {name: str(port) for name, port in ports.items()}
    seed_volume(f"{project}_bundles", project, trainer_store)
    try:
        compose.up(project, env)
        yield Stack(project, ports, env)
    finally:
        compose.down(project, volumes=True, env=env)


def healthchecked_services() -> list[str]:
    return [name for name, service in compose_services().items() if "healthcheck" in service and not service.get("profiles")]


def test_every_healthcheck_passes(stack):
    assert len(stack.replicas()) >= 2, "the service runs replicated (UEMBED_REPLICAS, 2 by default)"
    for service in healthchecked_services():
        for container in stack.replicas(service):
            try:
                wait_until(lambda: healthcheck_passes(container), 120, f"{container}'s healthcheck")
            except TimeoutError as error:  # say why: the container's own last lines
                logs = podman("logs", "--tail", "30", container, check=False)
                raise TimeoutError(f"{error}; its log ends:\n{logs.stdout}{logs.stderr}") from None
            assert inspect(container, ".State.Status") == "running"
    assert "grafana" not in healthchecked_services() and not compose.containers(stack.project, "grafana")
    assert inspect(stack.container("bundle"), ".State.ExitCode") == 0


def test_the_service_scores_through_haproxy_s_published_port_like_the_host(stack, trainer_store, movielens_examples):
    wait_until(lambda: httpx.get(f"{stack.service_url}/readyz").status_code == 200, 60, "the service")
    assert_scores_like_the_host(stack.service_url, demo_bundle_path(trainer_store), movielens_examples[:256])


def prometheus_value(stack: Stack, expr: str) -> float | None:
    answer = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    results = answer["data"]["result"]
    return float(results[0]["value"][1]) if results else None


def test_prometheus_scrapes_every_replica_by_the_compose_name(stack, movielens_examples):
    stack.score(movielens_examples[:100])
    replicas = len(stack.replicas())
    wait_until(lambda: prometheus_value(stack, 'count(up{job="uembed"} == 1)') == replicas, 60,
               "a scrape of each replica, found by DNS as uembed:8000")  # fmt: skip
    wait_until(lambda: prometheus_value(stack, 'up{job="haproxy"}') == 1, 60, "a scrape of haproxy:8405")
    # Two scrapes at 5 s apart at most: the 100 examples above are counted by then.
    wait_until(lambda: (prometheus_value(stack, "sum(uembed_scored_examples_total)") or 0) >= 100, 30,
               "the scored examples in Prometheus")  # fmt: skip


def exited(pid: int) -> bool:
    """The process has exited (a zombie, or reaped): its sockets are closed."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_replica_is_routed_around_then_restarted_and_serves_again(stack, movielens_examples):
    container = stack.replicas()[0]
    restarts = inspect(container, ".RestartCount")
    pid = inspect(container, ".State.Pid")
    assert pid > 0, f"{container} is not running"  # os.kill(0, ...) would signal pytest's own process group
    os.kill(pid, signal.SIGKILL)  # a crash, not a stop: the restart policy applies
    # A SIGKILLed process closes its sockets last: until then they take connections it never answers, and one
    # reset with the request unread cannot be resent (docs/LOADTEST.md, "What can be lost"). Once it has gone,
    # haproxy sends every request to the other replica(s).
    wait_until(lambda: exited(pid), 10, "the killed replica's exit")
    for _ in range(20):
        stack.score(movielens_examples[:10])
    wait_until(lambda: inspect(container, ".RestartCount") > restarts, 60, "the restart of the killed replica")
    wait_until(lambda: healthcheck_passes(container), 120, "the restarted replica's healthcheck")
    stack.score(movielens_examples[:10])


def test_down_leaves_nothing_running(stack):
    compose.down(stack.project, volumes=True, env=stack.env)
    assert compose.containers(stack.project) == []
    volumes = podman("volume", "ls", "--filter", f"label=io.podman.compose.project={stack.project}", "--format",
                     "{{.Name}}").stdout.split()  # fmt: skip
    assert volumes == []
    assert podman("network", "exists", f"{stack.project}_default", check=False).returncode != 0
    for port in stack.ports.values():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after down"
