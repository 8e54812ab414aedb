"""The Kubernetes manifests (deploy/k8s), checked without a cluster.

Every object the kustomization applies is validated against the API schemas of a pinned Kubernetes version
(kubernetes-validate, strict: an unknown or misspelt field fails, offline), then cross-checked against what
it deploys: probes against the app's routes and the port the image serves on, the ConfigMap against the
service's settings, selectors against the pods' labels, the autoscaler's metrics against the
prometheus-adapter rules and the metrics uembed/serving/metrics.py exports, resources against the workers.

Each check is a function of the manifests; test_each_check_catches_a_broken_manifest breaks a copy of them,
one mistake at a time, and expects the check meant to catch it to fail: none of them passes vacuously.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from uembed.contract.errors import UembedError
from uembed.serving.app import create_app
from uembed.serving.metrics import ServiceMetrics
from uembed.serving.protocols.oip_grpc import HealthServicer
from uembed.serving.settings import ServiceSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
# The oldest Kubernetes the manifests are meant for: every API they use is GA there (autoscaling/v2,
# policy/v1 with unhealthyPodEvictionPolicy, startup probes).
K8S_VERSION = "1.33.0"
# Outside the kustomization: they configure the monitoring stack, not the service's namespace.
ADAPTER_VALUES = K8S / "monitoring/prometheus-adapter-values.yaml"
POD_MONITOR = K8S / "monitoring/podmonitor.yaml"
# The sizing rule stated in deployment.yaml (from docs/BENCHMARKS.md: 0.17-0.18 GiB of each worker's own).
SUPERVISOR_BYTES = 192 * 2**20
WORKER_BYTES = 256 * 2**20
VALID_TOKEN = "a-real-token-of-32-characters-00"
# Variables of the pods that are not service settings, and why they are there.
OTHER_VARIABLES = {"ORT_DISABLE_TELEMETRY": "ONNX Runtime's telemetry off (it writes under $HOME and uploads)"}


def render(directory: Path) -> list[dict]:
    """The objects `kubectl apply -k directory` applies, for a kustomization that only lists resources (the
    base keeps to that on purpose: no generator or patch whose output this loader would have to imitate)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources"}
    assert not unsupported, f"{directory}/kustomization.yaml: {sorted(unsupported)} (this loader renders resources only)"
    objects = []
    for entry in kustomization["resources"]:
        path = directory / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [document for document in yaml.safe_load_all(path.read_text()) if document]
    return objects


@dataclass
class Manifests:
    objects: list[dict]  # what the kustomization applies
    adapter: dict  # prometheus-adapter Helm values
    pod_monitor: dict


def load_manifests() -> Manifests:
    return Manifests(render(K8S), yaml.safe_load(ADAPTER_VALUES.read_text()), yaml.safe_load(POD_MONITOR.read_text()))


def find(m: Manifests, kind: str) -> dict:
    found = [o for o in m.objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(m: Manifests) -> dict:
    return find(m, "Deployment")["spec"]["template"]["spec"]


def container(m: Manifests) -> dict:
    containers = pod_spec(m)["containers"]
    assert len(containers) == 1, "one container: the service"
    return containers[0]


def option(command: list[str], flag: str) -> str | None:
    for index, part in enumerate(command):
        if part == flag:
            return command[index + 1]
        if part.startswith(flag + "="):
            return part.split("=", 1)[1]
    return None


def workers(m: Manifests) -> int:
    return int(option(container(m)["command"], "--workers") or 1)


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("1Gi", "500m", "60k", 2) as a number."""
    match = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|m|k|M|G|T)?", str(value))
    assert match, f"not a quantity: {value!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match.group(2)]  # fmt: skip
    return float(match.group(1)) * scale


@functools.cache
def get_routes() -> frozenset[str]:
    app = create_app(ServiceSettings())
    return frozenset(route.path for route in app.routes if "GET" in (getattr(route, "methods", None) or ()))


def image_port() -> int:
    """The HTTP port the serving images listen on: the Dockerfile's `serving` stage (EXPOSE's first and its CMD)."""
    serving = re.search(r"^FROM \S+ AS serving$(.*?)(?=^FROM )", (ROOT / "Dockerfile").read_text(), re.M | re.S).group(1)
    exposed = re.findall(r"^EXPOSE (\d+)(?: \d+)*$", serving, re.M)  # HTTP first, then gRPC
    assert len(exposed) == 1 and f'"--port", "{exposed[0]}"' in serving
    return int(exposed[0])


def container_port(m: Manifests, port: str | int) -> int:
    """A container port by number or by name, as probes and Services name it."""
    for declared in container(m).get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return declared["containerPort"]
    raise AssertionError(f"port {port!r} is not a port of the container")


def exported_series() -> dict[str, str]:
    """Series name -> metric type, as /metrics exposes them (a counter `x` as `x_total`)."""
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    series = {}
    for family in registry.collect():
        if family.type == "counter":
            series[family.name + "_total"] = "counter"
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                series[family.name + suffix] = "histogram"
        else:
            series[family.name] = family.type
    return series


def manifest_environment(m: Manifests, token: str | None) -> dict[str, str]:
    """The container's UEMBED_* environment: the ConfigMap's keys, then `env` (the reload token as given)."""
    env = dict(find(m, "ConfigMap")["data"])
    for entry in container(m).get("env", []):
        env[entry["name"]] = token if "valueFrom" in entry else entry["value"]
    return env


def settings_from(env: dict[str, str]) -> ServiceSettings:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("UEMBED_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return load_settings()


def secret_values(secret: dict) -> dict[str, str]:
    values = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    return {**values, **(secret.get("stringData") or {})}


# --- the checks -------------------------------------------------------------------------------------------


def check_schemas(m: Manifests) -> None:
    for obj in m.objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            raise AssertionError(f"{name} is not valid Kubernetes {K8S_VERSION}: {path}: {exc.message}") from None
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(f"{name}: {exc.message}") from None


def check_probes(m: Manifests) -> None:
    """Readiness asks gRPC's health service (SERVING when the service is ready, as /readyz: model loaded, row
    checks passed) for a service it serves; liveness and start-up only /healthz, which answers while the row files
    are checked, or big bundles would be restarted mid-check."""
    c = container(m)
    routes = get_routes()
    readiness = c["readinessProbe"].get("grpc")
    assert readiness is not None, "readiness should ask the gRPC health service (grpc.health.v1)"
    assert readiness.get("service", "") in HealthServicer.SERVICES, f"the health service answers NOT_FOUND for {readiness['service']!r}"
    expected = {"livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        assert probe in c, f"no {probe}"
        assert c[probe]["httpGet"]["path"] == path, f"{probe} should ask {path}"
        assert path in routes, f"{path} is not a GET route of the app"
    startup = c["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 300, f"the startup probe allows {budget} s: checking a big bundle's files takes minutes"


def check_ports(m: Manifests) -> None:
    c = container(m)
    command = c["command"]
    assert command[:2] == ["uembed", "serve"], command
    assert option(command, "--host") == "0.0.0.0", "uembed serve binds 127.0.0.1 by default: probes could not reach it"
    port = int(option(command, "--port") or 8000)
    assert port == image_port(), f"--port {port}, the image serves on {image_port()}"
    for probe in ("livenessProbe", "startupProbe"):
        assert container_port(m, c[probe]["httpGet"]["port"]) == port, f"{probe} asks another port than {port}"
    grpc_port = settings_from(manifest_environment(m, VALID_TOKEN)).grpc_port
    assert grpc_port and option(command, "--grpc-port") in (None, str(grpc_port)), "gRPC is switched off or moved"
    assert container_port(m, "grpc") == grpc_port, f"the container's grpc port is not UEMBED_GRPC_PORT ({grpc_port})"
    assert c["readinessProbe"]["grpc"]["port"] == grpc_port, f"the gRPC readiness probe asks another port than {grpc_port}"
    targets = sorted(container_port(m, service_port["targetPort"]) for service_port in find(m, "Service")["spec"]["ports"])
    assert targets == sorted([port, grpc_port]), f"the Service forwards to {targets}, not HTTP {port} and gRPC {grpc_port}"
    annotations = find(m, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true", "pods not marked for scraping"
    assert int(annotations["prometheus.io/port"]) == port, f"scraped on port {annotations['prometheus.io/port']}, served on {port}"
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics" and "/metrics" in get_routes()


def check_settings(m: Manifests) -> None:
    """Every variable set is a real setting, the whole environment loads, and the bundles are on the volume."""
    configmap, secret = find(m, "ConfigMap"), find(m, "Secret")
    c = container(m)
    sources = [source["configMapRef"]["name"] for source in c["envFrom"]]
    assert sources == [configmap["metadata"]["name"]], f"the pods read {sources}, the settings are in {configmap['metadata']['name']}"
    env = manifest_environment(m, VALID_TOKEN)
    for key in env:
        if key in OTHER_VARIABLES:
            continue
        assert key.startswith("UEMBED_"), f"{key} is not a UEMBED_ setting"
        assert key[len("UEMBED_"):].lower() in ServiceSettings.model_fields, f"{key} is not a setting of uembed/serving/settings.py"
    for entry in c.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_values(secret), f"{entry['name']}: no such secret key"
    assert "UEMBED_RELOAD_TOKEN" not in configmap["data"], "the token belongs in the Secret"
    try:
        settings = settings_from(env)
    except UembedError as exc:
        raise AssertionError(f"the pods' environment is refused by the service: {exc}") from None
    assert settings.bundles, "name the bundles: the runtime image cannot train the demo bundle"
    assert pod_spec(m).get("enableServiceLinks") is False, (
        "service links add UEMBED_PORT, UEMBED_SERVICE_HOST... (from the Service `uembed`) to the settings' namespace"
    )
    mounts = {mount["mountPath"]: mount for mount in c["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(m)["volumes"]}
    for path in [*settings.bundles, settings.bundle_store]:
        under = [mount for mount_path, mount in mounts.items() if Path(path).is_relative_to(mount_path)]
        assert under, f"{path} is on no volume"
        assert under[0].get("readOnly") is True, f"{path}: mount the bundles read-only"
        claim = volumes[under[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == find(m, "PersistentVolumeClaim")["metadata"]["name"], f"{path}: no such volume claim"


def check_placeholder_token_is_refused(m: Manifests) -> None:
    """The Secret in the repo holds a placeholder that the service refuses, so it can never be deployed as is."""
    token = secret_values(find(m, "Secret"))["token"]
    try:
        settings_from(manifest_environment(m, token))
    except UembedError as exc:
        assert "reload_token" in str(exc), exc
    else:
        raise AssertionError("the service accepts the Secret's token: the repo must not hold a usable one")
    assert "REPLACE" in token.upper(), "the placeholder should say it is one"


def check_selectors(m: Manifests) -> None:
    deployment = find(m, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict, what: str) -> None:
        assert selector and selector.items() <= labels.items(), f"{what} selects {selector}, the pods are {labels}"

    selects(deployment["spec"]["selector"]["matchLabels"], "the Deployment")
    selects(find(m, "Service")["spec"]["selector"], "the Service")
    budget = find(m, "PodDisruptionBudget")["spec"]
    selects(budget.get("selector", {}).get("matchLabels"), "the PodDisruptionBudget (policy/v1: none is every pod)")
    for constraint in pod_spec(m).get("topologySpreadConstraints", []):
        selects(constraint["labelSelector"]["matchLabels"], "a topology spread constraint")
    monitor = m.pod_monitor["spec"]
    selects(monitor["selector"]["matchLabels"], "the PodMonitor")
    for endpoint in monitor["podMetricsEndpoints"]:
        container_port(m, endpoint["port"])
        assert endpoint["path"] in get_routes()
    target = find(m, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"]), "the HPA scales another workload"  # fmt: skip
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count: `kubectl apply` would reset it"


def check_autoscaling(m: Manifests) -> None:
    """HPA metric -> adapter rule -> a series the service exports, with rate() only on counters."""
    hpa = find(m, "HorizontalPodAutoscaler")["spec"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"], "at least 2 replicas: the PDB lets one go at a time"
    series = exported_series()
    rules = {}
    for rule in m.adapter["rules"]["custom"]:
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        assert name in series, f"adapter rule on {name}: uembed/serving/metrics.py exports no such series"
        assert re.search(rule["name"]["matches"], name), f"{rule['name']['matches']} does not match {name}"
        for label in ("namespace", "pod"):
            assert f'{label}!=""' in rule["seriesQuery"], f"{name}: the rule must require the {label} label"
        assert rule["resources"]["overrides"][label] == {"resource": label}, f"{name}: map {label} to the {label} resource"
        rated = re.search(r"\b(rate|irate|increase)\(", rule["metricsQuery"]) is not None
        assert rated == (series[name] == "counter"), f"{name} is a {series[name]}: rate() a counter, and only a counter"
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]
        rules[rule["name"]["as"]] = name
    assert hpa["metrics"], "the HPA scales on nothing"
    for metric in hpa["metrics"]:
        assert metric["type"] == "Pods", "per-pod custom metrics, from the adapter's rules"
        name = metric["pods"]["metric"]["name"]
        assert name in rules, f"the HPA asks for {name}, which no adapter rule provides ({sorted(rules)})"
        assert quantity(metric["pods"]["target"]["averageValue"]) > 0


def check_resources(m: Manifests) -> None:
    """One core per worker; memory as deployment.yaml derives it, requested as limited."""
    resources = container(m)["resources"]
    assert quantity(resources["requests"]["cpu"]) == workers(m), "request one core per worker (one compute thread each)"
    assert resources["requests"]["memory"] == resources["limits"]["memory"], "memory: request what the limit allows"
    memory = quantity(resources["limits"]["memory"])
    floor = SUPERVISOR_BYTES + workers(m) * WORKER_BYTES
    assert memory >= floor, f"{resources['limits']['memory']} is below the workers' own memory ({floor / 2**20:.0f} MiB)"


def check_writable_tmp(m: Manifests) -> None:
    """With a read-only root, what the service writes must have somewhere to go: its workers' Prometheus files
    in /tmp (a volume), and ONNX Runtime's telemetry device id nowhere (turned off)."""
    c = container(m)
    if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        mounts = {mount["mountPath"]: mount for mount in c["volumeMounts"]}
        assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly"), "a read-only root needs a writable /tmp"
        env = {entry["name"]: entry.get("value") for entry in c.get("env", [])}
        assert env.get("ORT_DISABLE_TELEMETRY") == "1", "ONNX Runtime would try to write its device id under $HOME"


def check_shutdown(m: Manifests) -> None:
    """The grace period covers the preStop pause and uvicorn's own graceful shutdown."""
    source = (ROOT / "uembed/cli/service_commands.py").read_text()
    graceful = int(re.search(r"timeout_graceful_shutdown=(\d+)", source).group(1))
    pause = int(container(m)["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod_spec(m).get("terminationGracePeriodSeconds", 30)
    assert grace >= pause + graceful, f"terminationGracePeriodSeconds {grace} < preStop {pause} s + graceful {graceful} s"


CHECKS = [check_schemas, check_probes, check_ports, check_settings, check_placeholder_token_is_refused,
          check_selectors, check_autoscaling, check_resources, check_writable_tmp, check_shutdown]  # fmt: skip


# --- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_the_manifests_pass(check):
    check(load_manifests())


def check_kustomization_lists_every_manifest(directory: Path) -> None:
    listed = {(directory / entry).resolve() for entry in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]}
    on_disk = {path.resolve() for path in directory.glob("*.yaml") if path.name != "kustomization.yaml"}
    assert on_disk == listed, f"not applied: {sorted(p.name for p in on_disk - listed)}"
    assert {p.name for p in directory.glob("monitoring/*.yaml")} == {ADAPTER_VALUES.name, POD_MONITOR.name}


def test_the_kustomization_lists_every_manifest(tmp_path):
    check_kustomization_lists_every_manifest(K8S)
    copied = tmp_path / "k8s"
    shutil.copytree(K8S, copied)
    (copied / "networkpolicy.yaml").write_text("kind: NetworkPolicy\n")
    with pytest.raises(AssertionError, match="networkpolicy.yaml"):
        check_kustomization_lists_every_manifest(copied)


def test_the_loader_refuses_what_it_cannot_render(tmp_path):
    """A patch or generator added to the base must not be silently skipped by the tests' renderer."""
    copied = tmp_path / "k8s"
    shutil.copytree(K8S, copied)
    kustomization = yaml.safe_load((copied / "kustomization.yaml").read_text())
    kustomization["configMapGenerator"] = [{"name": "uembed-settings", "literals": ["UEMBED_MAX_EXAMPLES=64"]}]
    (copied / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    with pytest.raises(AssertionError, match="configMapGenerator"):
        render(copied)


def test_validation_runs_offline_and_strictly():
    """kubernetes-validate ships its schemas: a misspelt field fails with no network and no cluster."""
    deployment = copy.deepcopy(find(load_manifests(), "Deployment"))
    assert kubernetes_validate.validate(deployment, K8S_VERSION, strict=True) == K8S_VERSION.rsplit(".", 1)[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here: render() alone stands for kustomize")
def test_kubectl_kustomize_renders_the_same_objects():
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [document for document in yaml.safe_load_all(result.stdout) if document]

    def key(obj: dict) -> str:
        return f"{obj['kind']}/{obj['metadata']['name']}"

    assert sorted(rendered, key=key) == sorted(render(K8S), key=key)


DELETE = object()


def set_path(obj: dict, path: str | tuple, value) -> None:
    """Set (or with DELETE remove) a field by its dotted path; a tuple path for keys with dots (labels)."""
    *parents, last = path.split(".") if isinstance(path, str) else path
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    if value is DELETE:
        del obj[last]
    else:
        obj[last] = value


def edit_command(flag: str, value: str | None):
    def edit(m: Manifests) -> None:
        command = container(m)["command"]
        index = command.index(flag)
        if value is None:
            del command[index:index + 2]
        else:
            command[index + 1] = value

    return edit


def edit(kind: str, path: str, value):
    def apply(m: Manifests) -> None:
        set_path(find(m, kind), path, value)

    return apply


def edit_container(path: str, value):
    def apply(m: Manifests) -> None:
        set_path(container(m), path, value)

    return apply


def edit_configmap(key: str, value):
    return edit("ConfigMap", f"data.{key}", value)


def edit_adapter(index: int, path: str, value):
    def apply(m: Manifests) -> None:
        set_path(m.adapter["rules"]["custom"][index], path, value)

    return apply


def edit_pod_monitor(path: str, value):
    def apply(m: Manifests) -> None:
        set_path(m.pod_monitor, path, value)

    return apply


def both(*edits):
    def apply(m: Manifests) -> None:
        for one in edits:
            one(m)

    return apply


RATED = "sum(rate(<<.Series>>{<<.LabelMatchers>>}[2m])) by (<<.GroupBy>>)"
TEMPLATE = "spec.template.spec"
POD_META = ("spec", "template", "metadata")
NAME_LABEL = "app.kubernetes.io/name"

# (the check that must catch it, the mistake)
MISTAKES = {
    "misspelt probe field": (check_schemas, edit_container("readinessprobe", {})),
    "replicas as a string": (check_schemas, edit("Deployment", "spec.replicas", "2")),
    "an HPA of a removed API": (check_schemas, edit("HorizontalPodAutoscaler", "apiVersion", "autoscaling/v2beta2")),
    "misspelt Service field": (check_schemas, lambda m: find(m, "Service")["spec"].update(selectors={})),
    "readiness on HTTP, not gRPC health": (check_probes, lambda m: container(m).update(readinessProbe={"httpGet": {"path": "/readyz", "port": "http"}})),
    "readiness asking an unknown gRPC service": (check_probes, edit_container("readinessProbe.grpc.service", "uembed")),
    "gRPC readiness on the HTTP port": (check_ports, edit_container("readinessProbe.grpc.port", 8000)),
    "gRPC port not in the Service": (check_ports, lambda m: find(m, "Service")["spec"].update(ports=find(m, "Service")["spec"]["ports"][:1])),
    "gRPC switched off": (check_ports, edit_configmap("UEMBED_GRPC_PORT", "0")),
    "liveness waiting on the row checks": (check_probes, edit_container("livenessProbe.httpGet.path", "/readyz")),
    "startup probe too short for big bundles": (check_probes, edit_container("startupProbe.failureThreshold", 6)),
    "service on another port": (check_ports, edit_command("--port", "8080")),
    "service on loopback": (check_ports, edit_command("--host", None)),
    "probe on an unnamed port": (check_ports, edit_container("livenessProbe.httpGet.port", "metrics")),
    "probe on the wrong port number": (check_ports, edit_container("startupProbe.httpGet.port", 9000)),
    "Service forwarding elsewhere": (check_ports, edit("Service", "spec.ports.0.targetPort", 8080)),
    "scrape annotation on another port": (check_ports, edit("Deployment", (*POD_META, "annotations", "prometheus.io/port"), "9090")),
    "misspelt setting": (check_settings, edit_configmap("UEMBED_REDIS_TIMEOUT", "50")),
    "a variable without the prefix": (check_settings, edit_configmap("REDIS_URL", "redis://redis:6379/0")),
    "an invalid setting value": (check_settings, edit_configmap("UEMBED_ROW_CHECKS", "lazy")),
    "bundles off the volume": (check_settings, edit_configmap("UEMBED_BUNDLES", "/data/movielens100k/1")),
    "no bundles named": (check_settings, edit_configmap("UEMBED_BUNDLES", DELETE)),
    "bundles mounted writable": (check_settings, edit_container("volumeMounts.0.readOnly", False)),
    "service links left on": (check_settings, edit("Deployment", f"{TEMPLATE}.enableServiceLinks", DELETE)),
    "token from a missing secret key": (check_settings, edit_container("env.0.valueFrom.secretKeyRef.key", "reload-token")),
    "the ConfigMap not loaded": (check_settings, edit_container("envFrom.0.configMapRef.name", "settings")),
    "a usable token in the repo": (check_placeholder_token_is_refused, edit("Secret", "stringData.token", VALID_TOKEN)),
    "Service selecting no pod": (check_selectors, edit("Service", ("spec", "selector", NAME_LABEL), "uembed-api")),
    "PDB selecting no pod": (check_selectors, edit("PodDisruptionBudget", ("spec", "selector", "matchLabels", NAME_LABEL), "api")),
    "PDB selecting every pod": (check_selectors, edit("PodDisruptionBudget", "spec.selector", DELETE)),
    "pods relabelled": (check_selectors, edit("Deployment", (*POD_META, "labels", NAME_LABEL), "scorer")),
    "HPA scaling another workload": (check_selectors, edit("HorizontalPodAutoscaler", "spec.scaleTargetRef.name", "uembed-api")),
    "replicas fighting the HPA": (check_selectors, edit("Deployment", "spec.replicas", 3)),
    "PodMonitor on a missing port": (check_selectors, edit_pod_monitor("spec.podMetricsEndpoints.0.port", "metrics")),
    "HPA on a metric no rule provides": (check_autoscaling, edit("HorizontalPodAutoscaler", "spec.metrics.0.pods.metric.name", "uembed_rps")),
    "rule on an unexported series": (check_autoscaling, edit_adapter(0, "seriesQuery", 'uembed_scored_examples{namespace!="",pod!=""}')),
    "rate() of a gauge": (check_autoscaling, edit_adapter(1, "metricsQuery", RATED)),
    "a counter not rated": (check_autoscaling, edit_adapter(0, "metricsQuery", RATED.replace("rate(", "avg_over_time("))),
    "rule renamed": (check_autoscaling, edit_adapter(0, "name.as", "uembed_examples_per_second")),
    "rule without the pod label": (check_autoscaling, edit_adapter(1, "seriesQuery", 'uembed_queue_examples{namespace!=""}')),
    "a single replica": (check_autoscaling, edit("HorizontalPodAutoscaler", "spec.minReplicas", 1)),
    "one core for two workers": (check_resources, edit_container("resources.requests.cpu", "1")),
    "memory limit above the request": (check_resources, edit_container("resources.limits.memory", "2Gi")),
    "memory below the workers' own": (check_resources, both(edit_container("resources.requests.memory", "512Mi"),
                                                             edit_container("resources.limits.memory", "512Mi"))),
    "more workers, same memory": (check_resources, both(edit_command("--workers", "4"), edit_container("resources.requests.cpu", "4"))),
    "read-only root without /tmp": (check_writable_tmp, lambda m: container(m).update(volumeMounts=container(m)["volumeMounts"][:1])),
    "ONNX Runtime writing its device id": (check_writable_tmp, lambda m: container(m).update(env=container(m)["env"][:1])),
    "an unexplained variable": (check_settings, lambda m: container(m)["env"].append({"name": "OMP_NUM_THREADS", "value": "1"})),
    "grace period shorter than the drain": (check_shutdown, edit("Deployment", f"{TEMPLATE}.terminationGracePeriodSeconds", 10)),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_check_catches_a_broken_manifest(mistake):
    check, breaking = MISTAKES[mistake]
    manifests = load_manifests()
    check(manifests)  # passes on the manifests as they are
    broken = copy.deepcopy(manifests)
    breaking(broken)
    with pytest.raises(AssertionError):
        check(broken)


def test_every_check_has_a_mistake_it_catches():
    assert {check for check, _ in MISTAKES.values()} == set(CHECKS)
