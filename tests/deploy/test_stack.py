"""The Grafana dashboard against the real service and Prometheus: `uembed stack --replicas 2` brings
up redis-server, two replicas of the service behind Debian's haproxy and Debian's prometheus; a
60-second locust run loads it; then EVERY PromQL expression of EVERY panel must return data through
Prometheus' HTTP API, with the dashboard's replica variable at All."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from uembed.loadtest.servers import wait_until
from uembed.serving.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
DATASOURCES = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
METRIC = re.compile(r"\buembed_[a-z0-9_]+")
# Grafana's built-in variables, as Grafana would expand them for a 5 s scrape interval, and the
# dashboard's own replica variable at All (its allValue).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "15m", "$instance": ".*"}
SERIES = re.compile(r"\b(uembed_[a-z0-9_]+)(\{[^}]*\})?")
TOKEN = "stack-test-reload-token"


def panels() -> list[tuple[str, dict]]:
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for nested in [panel, *panel.get("panels", [])]:
                if nested["type"] != "row":
                    out.append((f"{path.name}: {nested['title']}", nested))
    return out


def queries() -> list[tuple[str, str]]:
    return [(f"{title} [{t['refId']}]", t["expr"]) for title, panel in panels() for t in panel["targets"]]


def promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unexpanded variable in {expr}"
    return expr


def exported_series_names() -> set[str]:
    """Sample names the service exposes, from its metric definitions."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in ServiceMetrics(CollectorRegistry()).registry.collect()
        for suffix in suffixes[family.type]
    }


# --- the dashboard JSON, statically ------------------------------------------------------
def test_every_panel_has_a_unit_a_description_and_the_provisioned_datasource():
    uids = {source["uid"] for source in DATASOURCES}
    assert DASHBOARDS and panels()
    for title, panel in panels():
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel.get("description"), f"{title}: no description"
        assert panel["datasource"]["uid"] in uids, f"{title}: unknown datasource"
        assert panel["targets"] and all(t["datasource"]["uid"] in uids for t in panel["targets"]), title


def test_panels_query_only_exported_metrics_and_show_every_one():
    exported = exported_series_names()
    used = {name for _, expr in queries() for name in METRIC.findall(expr)}
    assert used <= exported, f"panels query metrics the service does not export: {sorted(used - exported)}"
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert families <= shown, f"exported but on no panel: {sorted(families - shown)}"


def test_latency_panels_show_p50_p95_p99_end_to_end_and_by_stage():
    exprs = [expr for _, expr in queries()]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}" in e and "uembed_request_duration_seconds" in e for e in exprs)
    assert any("uembed_stage_duration_seconds" in e and "stage" in e for e in exprs)


def test_the_replica_variable_filters_every_service_series_and_panels_split_by_replica():
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        instance = variables["instance"]
        assert instance["includeAll"] and instance["allValue"] == ".*" and instance["multi"]
        assert instance["query"]["query"] == 'label_values(up{job="uembed"}, instance)'
    for label, expr in queries():
        for name, labels in SERIES.findall(expr):
            assert 'instance=~"$instance"' in labels, f"{label}: {name} is not filtered by the replica variable"
    split = [label for label, expr in queries() if re.search(r"by \([^)]*\binstance\b", expr)]
    assert len(split) >= 3, f"panels split by replica: {split}"
    assert any("haproxy_" in expr for _, expr in queries()), "the load balancer's own figures are shown"


# --- the live stack -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(synthetic_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stack")
    log = open(workdir / "stack-command.log", "wb")
    command = [sys.executable, "-m", "uembed", "stack", "--dir", str(workdir), "--bundle", str(synthetic_store / "movielens" / "1"),
               "--bundle-store", str(synthetic_store), "--port", "0", "--redis-port", "0", "--prometheus-port", "0",
               "--replicas", "2", "--haproxy-stats-port", "0"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "UEMBED_RELOAD_TOKEN": TOKEN}, stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip

    def up() -> bool:
        assert process.poll() is None, (workdir / "stack-command.log").read_text()
        return (workdir / "stack.json").exists()

    wait_until(up, 180, "uembed stack")
    state = json.loads((workdir / "stack.json").read_text())
    yield {"process": process, "workdir": workdir, **state}
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    log.close()


def query(prometheus: str, expr: str) -> list:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql(expr)}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


def call_grpc_until(replicas: list[dict], deadline: float) -> None:
    """A few Open Inference Protocol calls a second on each replica's own gRPC port (gRPC is not balanced)."""
    from tritonclient.grpc import InferenceServerClient

    clients = [InferenceServerClient(f"127.0.0.1:{replica['grpc_port']}") for replica in replicas]
    while time.monotonic() < deadline:
        for client in clients:
            client.is_server_live()
            client.get_model_metadata("movielens")
        time.sleep(0.5)  # the pace of the calls (the load itself), not a wait for something
    for client in clients:
        client.close()


def test_a_60_second_locust_run_has_no_failures_and_every_panel_has_data(stack, tmp_path):
    service = stack["service"]
    for bad in ({"examples": []}, {"examples": [{"no_such_feature": "1"}]}, {"examples": "x"}):
        assert httpx.post(f"{service}/v1/score", json=bad).status_code == 422
    for replica in stack["replicas"]:  # through haproxy a reload would reach one replica only
        reload = httpx.post(f"{replica['url']}/v1/models/movielens/load", json={"version": "2"},
                            headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)  # fmt: skip
        assert reload.status_code == 200, reload.text

    grpc_calls = threading.Thread(target=call_grpc_until, args=(stack["replicas"], time.monotonic() + 50), daemon=True)
    grpc_calls.start()  # the gRPC panel's data, beside the HTTP load
    run = subprocess.run(
        [sys.executable, "-m", "uembed", "loadtest", "--url", service, "--seconds", "60", "--users", "8",
         "--spawn-rate", "4", "--out", str(tmp_path), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert run.returncode == 0, run.stdout + run.stderr
    assert summary["failures"] == 0 and summary["requests"] > 1000, summary
    assert "0 failures" in run.stdout and (tmp_path / "report.html").stat().st_size > 10_000

    names = set(httpx.get(f"{stack['prometheus']}/api/v1/label/__name__/values").json()["data"])
    missing = {name for _, expr in queries() for name in METRIC.findall(expr)} - names
    assert not missing, f"Prometheus has no series of {sorted(missing)}"
    empty = dict(queries())

    def every_panel_has_data() -> bool:
        for label, expr in list(empty.items()):
            if query(stack["prometheus"], expr):
                del empty[label]
        return not empty

    with contextlib.suppress(TimeoutError):
        wait_until(every_panel_has_data, 30, "data in every panel")  # a scrape or two after the last request
    assert not empty, f"panels with no data: {empty}"


def test_the_stack_stops_cleanly(stack):
    urls = [stack["service"], stack["prometheus"], stack["redis"], stack["haproxy"]["stats"], *(r["url"] for r in stack["replicas"])]
    ports = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in urls]
    # Precondition: the stack is up (run alone, or after the locust test), so a clean stop is really tested.
    assert stack["process"].poll() is None, "the stack had already exited: nothing to stop"
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) == 0, f"port {port} is not open before the stop"
    stack["process"].send_signal(signal.SIGTERM)
    assert stack["process"].wait(60) == 0, (stack["workdir"] / "stack-command.log").read_text()
    assert not (stack["workdir"] / "stack.json").exists()
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after the stack stopped"
