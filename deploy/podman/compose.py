"""`docker compose up` with podman: docker-compose.yml run by podman-compose (the dev extra).

    .venv/bin/python deploy/podman/compose.py up     # or: make compose-up   (after make images)
    .venv/bin/python deploy/podman/compose.py down   # or: make compose-down (-v: drop the volumes too)

Up takes two steps. podman-compose turns every ``depends_on`` into a podman container dependency
(``--requires``), and podman 4.3 (Debian bookworm) restarts a crashed container only while all
its dependencies run: the one-shot ``bundle`` job has exited by then, so the service would stay
down after a crash. So the bundle job runs first, alone, to completion; then every service
starts with ``--no-deps`` (no container dependencies). podman 4.3 cannot wait on healthchecks
anyway (podman-compose says so and starts the next service); the service copes with a Redis
that is not up yet (rows come from the bundle meanwhile).

Ports and settings come from the environment as for docker compose (UEMBED_PORT and so on).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

if not __package__:  # run as a script (make compose-up): the repository root holds deploy/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from deploy.podman.images import COMPOSE_FILE, PodmanError, podman, podman_env  # noqa: E402

PROJECT = "uembed"  # docker-compose.yml's `name`


def podman_compose(project: str, *args: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([sys.executable, "-m", "podman_compose", "-f", str(COMPOSE_FILE), "-p", project, *args],
                            env={**podman_env(), **(env or {})}, capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise PodmanError(f"podman-compose {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def containers(project: str, service: str | None = None, all_states: bool = True) -> list[str]:
    """Names of the project's containers (of one service)."""
    filters = ["--filter", f"label=io.podman.compose.project={project}"]
    if service:
        filters += ["--filter", f"label=io.podman.compose.service={service}"]
    listed = podman("ps", *(["--all"] if all_states else []), *filters, "--format", "{{.Names}}").stdout
    return listed.split()


def up(project: str = PROJECT, env: dict[str, str] | None = None) -> None:
    podman_compose(project, "up", "-d", "bundle", env=env)
    for job in containers(project, "bundle"):
        code = int(podman("wait", job).stdout.strip())
        if code != 0:
            raise PodmanError(f"the bundle job {job} exited with {code}:\n{podman('logs', job).stderr[-3000:]}")
    podman_compose(project, "up", "-d", "--no-deps", env=env)


def down(project: str = PROJECT, volumes: bool = False, env: dict[str, str] | None = None) -> None:
    podman_compose(project, "down", *(["--volumes"] if volumes else []), env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("-p", "--project", default=PROJECT, help="compose project name (default: uembed)")
    parser.add_argument("-v", "--volumes", action="store_true", help="down: remove the named volumes too")
    args = parser.parse_args(argv)
    try:
        up(args.project) if args.command == "up" else down(args.project, args.volumes)
    except PodmanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
