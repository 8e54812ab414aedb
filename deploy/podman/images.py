"""Build every image of docker-compose.yml with podman, on a machine with no image registry.

    .venv/bin/python deploy/podman/images.py           # or: make images
    .venv/bin/python deploy/podman/images.py runtime   # only some targets

Images, with the names docker-compose.yml gives them:
- the project's Dockerfile targets that compose builds (runtime, trainer, loadtest);
- the upstream services compose pulls (redis, prometheus, haproxy): where no image of that name exists
  locally, a stand-in built from Debian's packages (``*.Containerfile`` beside this file);
- their base, the Dockerfile's ``FROM`` (python:3.11-slim-bookworm): where it does not exist
  locally, a stand-in made with debootstrap from the Debian mirror apt uses. It is built once
  and kept in podman's store (delete it with ``podman rmi`` to rebuild it).
Stand-ins carry the label ``uembed.stand-in`` saying what they really are.

pip inside the builds is configured like this machine's pip (``pip config list``): its
configuration file is regenerated for the build and every local path it names (wheel folders,
file:// indexes, constraint files, the CA bundle) is mounted read-only at the same path; a
setting naming a path this machine lacks is left out, with a warning. The trainer's torch
therefore comes from wherever this machine's pip finds torch (as for ``make install``) unless
``--torch-index-url`` names an index, as the Dockerfile's default (PyTorch's CPU index) does.

Podman runs with deploy/podman/containers.conf unless CONTAINERS_CONF is set: runc, cgroupfs,
file events and ulimits this kind of host allows (``podman_env``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
LOGGER = logging.getLogger(__name__)
STAND_IN_LABEL = "uembed.stand-in"
# What the base stand-in must hold for the Dockerfile's stages: python with venv and pip, and CA
# certificates for pip. Debian bookworm's python3.11 is the closest to the official image's.
BASE_PACKAGES = ("python3.11", "python3-venv", "python3-pip", "ca-certificates")
APT_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""
# Dockerfile targets compose does not use, built only when named: target -> image name.
OTHER_TARGETS = {"runtime-cuda": "uembed-cuda:local"}
# docker-compose.yml service -> the Containerfile of its stand-in (for services that pull an image).
UPSTREAM_STAND_INS = {"redis": "redis.Containerfile", "prometheus": "prometheus.Containerfile",
                      "haproxy": "haproxy.Containerfile"}


class PodmanError(RuntimeError):
    """A missing tool or a failed podman step, with what to do about it."""


def podman_env() -> dict[str, str]:
    """The environment every podman (and podman-compose) command here runs with."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(HERE / "containers.conf"))}


def podman(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("podman") is None:
        raise PodmanError("podman is not installed: `make system-deps` installs it (Debian)")
    return subprocess.run(["podman", *args], env=podman_env(), check=check, text=True,
                          capture_output=capture)  # fmt: skip


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def image_label(name: str, label: str) -> str | None:
    labels = json.loads(podman("image", "inspect", "--format", "{{json .Labels}}", name).stdout) or {}
    return labels.get(label)


def image_size_bytes(name: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout)


# --- what docker-compose.yml and the Dockerfile name ----------------------------------------
def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def project_images() -> dict[str, str]:
    """Dockerfile target -> image name, for every compose service built from the Dockerfile."""
    return {s["build"]["target"]: s["image"] for s in compose_services().values() if "build" in s}


def upstream_images() -> dict[str, str]:
    """Compose service -> the image it pulls, for the services that have a stand-in here."""
    return {name: compose_services()[name]["image"] for name in UPSTREAM_STAND_INS}


def base_image() -> str:
    """The Dockerfile's default ``PYTHON_IMAGE`` (what its stages are built ``FROM``)."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            return line.split("=", 1)[1].strip()
    raise PodmanError("Dockerfile has no `ARG PYTHON_IMAGE=` line")


# --- pip configured like this machine's -------------------------------------------------------
def host_pip_config() -> dict[str, str]:
    """This machine's effective pip settings (files and PIP_* variables), as ``pip config list`` says."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    # Lines like "global.find-links='/opt/wheels'" or ":env:.cert='...'" (a PIP_CERT variable). For
    # `pip install`, a variable wins over the [install] section, which wins over [global]; within
    # one section, files are listed in the order pip reads them, so a later line wins.
    # config-file (PIP_CONFIG_FILE) says where settings came from: the build gets them, not it.
    precedence = {"global": 1, "install": 2, ":env:": 3}
    settings: dict[str, tuple[int, str]] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        section, _, option = key.partition(".")
        rank = precedence.get(section, 0)
        if rank and option != "config-file" and rank >= settings.get(option, (0, ""))[0]:
            settings[option] = (rank, value.strip().strip("'\""))
    return {option: value for option, (_, value) in settings.items()}


# Options whose values are URLs of package indexes: a file:// one is a local "simple" folder.
INDEX_OPTIONS = ("index-url", "extra-index-url")


def local_path(option: str, item: str) -> Path | None:
    """The local file or folder one item of a pip setting names, or None when it names none (an
    http URL, a number, a flag). The path may not exist: the caller decides what that means."""
    url = urlparse(item)
    if url.scheme == "file":
        path = Path(unquote(url.path))
        # A file:// simple index links to its files beside the simple/ folder: the build needs its parent.
        return path.parent if option in INDEX_OPTIONS and path.exists() else path
    if url.scheme or option in INDEX_OPTIONS:
        return None
    path = Path(item).expanduser()
    # Any other option's value is a path when it exists (a relative one is taken from here, as pip
    # here would) or when it is written as one; a bare word ("180", "true") is not.
    if path.exists() or item.startswith(("/", "~", "./", "../")):
        return path.absolute()
    return None


def build_pip_settings(settings: dict[str, str]) -> tuple[dict[str, str], list[Path]]:
    """The settings a build's pip gets, and the local paths it must see at the same paths.

    Every item of every setting that names a local file or folder (find-links, file:// indexes,
    constraint and requirement files, certificates, ...) is mounted; a relative path is made
    absolute. An item naming a path this machine lacks is left out with a warning: pip inside
    the build would fail on it (a missing constraint file stops every install) where pip here
    may never read it."""
    kept: dict[str, str] = {}
    paths: list[Path] = []
    for option, value in settings.items():
        items = []
        for item in value.split():
            path = local_path(option, item)
            if path is None:
                items.append(item)
            elif path.exists():
                items.append(str(path) if urlparse(item).scheme == "" else item)
                paths.append(path)
            else:
                LOGGER.warning("pip setting %s names %s, which does not exist here: left out of the image builds' "
                               "pip configuration", option, item)  # fmt: skip
        if items:
            kept[option] = " ".join(items)
    return kept, list(dict.fromkeys(paths))


def pip_mounts(workdir: Path) -> list[str]:
    """``-v`` options giving a container this machine's pip configuration, at /etc/pip.conf, and
    every local path that configuration names, read-only at the same path."""
    settings, paths = build_pip_settings(host_pip_config())
    conf = workdir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    mounts = [f"{conf}:/etc/pip.conf:ro", *(f"{path}:{path}:ro" for path in paths)]
    return [arg for mount in mounts for arg in ("-v", mount)]


# --- the base image ---------------------------------------------------------------------------
def debian_repositories() -> list[tuple[str, str]]:
    """(URI, suite) of the bookworm repositories apt uses on this machine (mirror, updates, security)."""
    out = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)", "Created-By: Packages"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    repositories = sorted({tuple(line.split()) for line in out.splitlines() if line.split()[1].startswith("bookworm")})
    if not any(suite == "bookworm" for _, suite in repositories):
        raise PodmanError("apt has no bookworm repository to debootstrap from")
    return repositories


def build_base_stand_in(name: str) -> None:
    """debootstrap a minimal bookworm with python, then ``podman import`` it as ``name``."""
    if shutil.which("debootstrap") is None:
        raise PodmanError("debootstrap is not installed: `make system-deps` installs it (Debian)")
    repositories = debian_repositories()
    mirror = next(uri for uri, suite in repositories if suite == "bookworm")
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="uembed-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), "bookworm",
                        str(rootfs), mirror], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        # Updates and security fixes reach images built on it (apt-get in the stand-ins of redis and prometheus).
        (rootfs / "etc/apt/sources.list").write_text("".join(f"deb {uri} {suite} main\n" for uri, suite in repositories))
        # As in Debian's official images: packages never start services during a build, apt keeps
        # no downloaded packages, and dpkg installs no documentation or translations.
        policy = rootfs / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN)
        (rootfs / "etc/dpkg/dpkg.cfg.d/docker-excludes").write_text(
            "path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n"
        )
        for link in ("python", "python3"):  # where the official image has them
            (rootfs / "usr/local/bin" / link).symlink_to("/usr/bin/python3.11")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file() or entry.is_symlink():
                    entry.unlink()
                elif entry.is_dir():
                    shutil.rmtree(entry)
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            subprocess.run(
                ["podman", "import",
                 "--change", f"LABEL {STAND_IN_LABEL}=\"debootstrap bookworm minbase with Debian's python3.11, standing in for {name}\"",
                 "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", name],
                stdin=tar.stdout, env=podman_env(), check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        if tar.returncode != 0:
            raise PodmanError("tar of the debootstrapped root failed")


# --- builds -----------------------------------------------------------------------------------
def build(tag: str, containerfile: Path, target: str | None, mounts: list[str], build_args: dict[str, str]) -> None:
    # --format docker keeps HEALTHCHECK (OCI images drop it); --network host reaches the package
    # indexes as this machine does; --pull never: the base is local (there may be no registry).
    args = ["build", "--format", "docker", "--network", "host", "--pull=never", "-f", str(containerfile),
            "-t", tag, *mounts]  # fmt: skip
    if target:
        args += ["--target", target]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    result = podman(*args, str(ROOT), check=False)
    if result.returncode != 0:
        raise PodmanError(f"podman build of {tag} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    try:
        return build_images(argv)
    except PodmanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_images(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help=f"Dockerfile targets to build (default: {' '.join(project_images())}; "
                        f"also {' '.join(OTHER_TARGETS)})")  # fmt: skip
    parser.add_argument("--torch-index-url", default="",
                        help="extra index for the trainer's torch (default none: found as this machine's pip finds it)")  # fmt: skip
    parser.add_argument("--no-upstream", action="store_true", help="skip the redis and prometheus stand-ins")
    args = parser.parse_args(argv)
    known = {**project_images(), **OTHER_TARGETS}
    unknown = set(args.targets) - set(known)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    targets = {t: known[t] for t in args.targets} if args.targets else project_images()

    built: list[tuple[str, str, float]] = []
    base = base_image()
    if not image_exists(base):
        started = time.monotonic()
        print(f"{base}: not in podman's store; building a stand-in with debootstrap (about a minute, once)", flush=True)
        build_base_stand_in(base)
        built.append((base, "debootstrap stand-in", time.monotonic() - started))
    with tempfile.TemporaryDirectory(prefix="uembed-images-") as scratch:
        mounts = pip_mounts(Path(scratch))
        for target, image in targets.items():
            started = time.monotonic()
            build(image, ROOT / "Dockerfile", target, mounts, {"TORCH_INDEX_URL": args.torch_index_url})
            built.append((image, f"Dockerfile target {target}", time.monotonic() - started))
    for service, image in ({} if args.no_upstream else upstream_images()).items():
        if image_exists(image) and not image_label(image, STAND_IN_LABEL):
            print(f"{image}: using the image already in podman's store", flush=True)
            continue
        started = time.monotonic()
        build(image, HERE / UPSTREAM_STAND_INS[service], None, [], {"BASE_IMAGE": base})
        built.append((image, f"stand-in ({UPSTREAM_STAND_INS[service]})", time.monotonic() - started))
    for image, what, seconds in built:
        print(f"{image:<34} {image_size_bytes(image) / 1e6:>8.0f} MB  {seconds:>5.0f} s  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
