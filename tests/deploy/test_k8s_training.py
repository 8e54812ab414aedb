"""The multi-machine training manifests (deploy/k8s/training), checked without a cluster like the service's:
every object against the pinned Kubernetes API schemas (strict, offline), then against what it runs: the
command parses as `uembed train`, the Job has one pod per --nnodes, the rendezvous endpoint is pod 0's name under
the headless Service, and the run directory is on a volume every pod shares."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.deploy.test_k8s import K8S, K8S_VERSION, option, render
from uembed.cli import build_parser

TRAINING = K8S / "training"


def find(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objects: list[dict]) -> dict:
    return find(objects, "Job")["spec"]["template"]["spec"]["containers"][0]


def check_schemas(objects: list[dict]) -> None:
    import kubernetes_validate

    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']}: {'.'.join(map(str, exc.path))}: {exc.message}") from None


def check_command(objects: list[dict]) -> None:
    command = container(objects)["command"]
    assert command[:2] == ["uembed", "train"], command
    try:
        args = build_parser().parse_args(command[1:])
    except SystemExit:
        raise AssertionError(f"`{' '.join(command)}` is not a valid uembed train command") from None
    assert args.name, "every pod and every restart must write one run directory: give --name"
    assert args.nnodes > 1 and args.rdzv_endpoint
    job = find(objects, "Job")["spec"]
    assert job["completionMode"] == "Indexed", "pod 0's name must be stable: an Indexed Job"
    assert job["completions"] == job["parallelism"] == args.nnodes, "one pod per --nnodes, all running together"


def check_rendezvous(objects: list[dict]) -> None:
    job, service = find(objects, "Job"), find(objects, "Service")
    spec = job["spec"]["template"]["spec"]
    assert service["spec"].get("clusterIP") == "None", "a headless Service: pods get DNS names"
    assert spec.get("subdomain") == service["metadata"]["name"], "the pods' subdomain must be the headless Service"
    assert service["spec"].get("publishNotReadyAddresses") is True, "the name must resolve before any readiness"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects no pod"
    host, port = option(container(objects)["command"], "--rdzv-endpoint").rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}", f"{host} is not pod 0 of the Job"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert int(port) in [p["containerPort"] for p in container(objects).get("ports", [])]


def check_runs_volume(objects: list[dict]) -> None:
    c = container(objects)
    runs = option(c["command"], "--runs-dir")
    mounts = [m for m in c["volumeMounts"] if runs.startswith(m["mountPath"])]
    assert mounts and not mounts[0].get("readOnly"), f"{runs} is on no writable volume"
    volume = {v["name"]: v for v in find(objects, "Job")["spec"]["template"]["spec"]["volumes"]}[mounts[0]["name"]]
    claim = find(objects, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every pod reads the checkpoint a restarted group resumes from"
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("OMP_NUM_THREADS") == "1", "one thread per process: the processes are the parallelism"


CHECKS = (check_schemas, check_command, check_rendezvous, check_runs_volume)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_training_manifests_pass(check):
    check(render(TRAINING))


def test_every_manifest_is_applied():
    listed = set(yaml.safe_load((TRAINING / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in TRAINING.glob("*.yaml") if p.name != "kustomization.yaml"}


def command_edit(flag: str, value: str):
    def apply(objects: list[dict]) -> None:
        command = container(objects)["command"]
        command[command.index(flag) + 1] = value

    return apply


MISTAKES = {
    "misspelt Job field": (check_schemas, lambda o: find(o, "Job")["spec"].update(completionmode="Indexed")),
    "an unknown option": (check_command, lambda o: container(o)["command"].append("--nodes")),
    "more pods than nodes": (check_command, lambda o: find(o, "Job")["spec"].update(parallelism=3, completions=3)),
    "a non-indexed Job": (check_command, lambda o: find(o, "Job")["spec"].update(completionMode="NonIndexed")),
    "rendezvous on pod 1": (check_rendezvous, command_edit("--rdzv-endpoint", "uembed-train-1.uembed-train:29400")),
    "rendezvous on another port": (check_rendezvous, command_edit("--rdzv-endpoint", "uembed-train-0.uembed-train:29500")),
    "a Service with a cluster IP": (check_rendezvous, lambda o: find(o, "Service")["spec"].pop("clusterIP")),
    "pods outside the subdomain": (check_rendezvous, lambda o: find(o, "Job")["spec"]["template"]["spec"].pop("subdomain")),
    "runs on no volume": (check_runs_volume, command_edit("--runs-dir", "/tmp/runs")),
    "runs on a volume of one pod": (check_runs_volume, lambda o: find(o, "PersistentVolumeClaim")["spec"].update(accessModes=["ReadWriteOnce"])),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_check_catches_a_broken_manifest(mistake):
    check, breaking = MISTAKES[mistake]
    objects = render(TRAINING)
    check(objects)
    broken = copy.deepcopy(objects)
    breaking(broken)
    with pytest.raises(AssertionError):
        check(broken)
