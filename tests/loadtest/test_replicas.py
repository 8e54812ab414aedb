"""`uembed stack --replicas N`: N service processes behind Debian's haproxy, sharing one redis-server, each
scraped by Prometheus; and a replica SIGKILLed under load, which must cost no more than the requests it held.

The config files are checked by haproxy itself (`haproxy -c`): the compose file's as it is and the stack's
copy. The live tests start the stack's real processes on free loopback ports (about 15 s on two cores)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.scoring import score
from uembed.loadtest.failover import ANSWERS, ReplicaKill, kill_cost, throughput_around
from uembed.loadtest.servers import haproxy_stats, wait_until
from uembed.loadtest.stack import HAPROXY_CONFIG, LocalStack, local_haproxy_config, local_scrape_config


def haproxy_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)


# --- the configuration ----------------------------------------------------------------------
def test_the_compose_haproxy_config_is_valid_and_retries_only_what_is_safe():
    check = haproxy_check(HAPROXY_CONFIG)
    assert check.returncode == 0 and "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr
    text = HAPROXY_CONFIG.read_text()
    assert "retry-on conn-failure empty-response\n" in text and "option redispatch 1" in text
    assert "option httpchk GET /readyz" in text and "http-check expect status 200" in text
    assert "server-template replica- 1-10 uembed:8000" in text, "compose: every replica of the `uembed` service"


def test_the_stack_config_has_one_server_per_replica_on_loopback(tmp_path):
    servers = {"replica-1": "127.0.0.1:7001", "replica-2": "127.0.0.1:7002", "replica-3": "127.0.0.1:7003"}
    config = local_haproxy_config("127.0.0.1:7000", "127.0.0.1:7405", servers)
    (tmp_path / "haproxy.cfg").write_text(config)
    check = haproxy_check(tmp_path / "haproxy.cfg")
    assert check.returncode == 0 and "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr
    lines = [line.strip() for line in config.splitlines()]
    assert [line for line in lines if line.startswith("server ")] == [f"server {n} {a}" for n, a in servers.items()]
    assert [line for line in lines if line.startswith("bind ")] == ["bind 127.0.0.1:7000", "bind 127.0.0.1:7405"]
    assert "resolvers" not in config and "server-template" not in config
    # Everything else is the compose file's, line for line.
    kept = [line for line in HAPROXY_CONFIG.read_text().splitlines() if line in config.splitlines()]
    assert len(kept) > 40


def test_the_stack_scrapes_each_replica_and_haproxy_with_the_compose_jobs():
    compose = yaml.safe_load((HAPROXY_CONFIG.parents[1] / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in compose["scrape_configs"]}
    assert jobs["uembed"]["dns_sd_configs"] == [{"names": ["uembed"], "type": "A", "port": 8000, "refresh_interval": "5s"}]
    assert jobs["haproxy"]["static_configs"] == [{"targets": ["haproxy:8405"]}]
    local = local_scrape_config({"uembed": ["127.0.0.1:1", "127.0.0.1:2"], "prometheus": ["127.0.0.1:3"]})
    by_name = {job["job_name"]: job for job in local["scrape_configs"]}
    assert set(by_name) == {"uembed", "prometheus"}, "a job with no target here (haproxy, one replica) is left out"
    assert by_name["uembed"]["static_configs"] == [{"targets": ["127.0.0.1:1", "127.0.0.1:2"]}]
    assert "dns_sd_configs" not in by_name["uembed"] and by_name["uembed"]["scrape_timeout"] == "4s"


def test_the_cost_of_a_kill_is_read_from_haproxys_counters():
    zero = dict.fromkeys(["scur", "stot", "wredis", *ANSWERS], "0")
    before = {**zero, "scur": "2", "stot": "520", "hrsp_2xx": "518"}
    # After: 4 more requests handed to it, 1 more answered; 3 resent elsewhere.
    after = {**zero, "stot": "524", "hrsp_2xx": "519", "wredis": "3"}
    assert kill_cost(before, after) == {"in_flight": 5, "resent": 3}
    assert kill_cost(zero, {**zero, "stot": ""}) == {"in_flight": 0, "resent": 0}


def test_throughput_around_a_kill_from_locusts_history(tmp_path):
    """100 requests a second, 40 in the second after the kill, 80 the next, then 100 again."""
    per_second = [100] * 12 + [40, 80] + [100] * 12
    history = tmp_path / "locust_stats_history.csv"
    with history.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Timestamp", "User Count", "Name", "Total Request Count"])
        writer.writerow([1000, 8, "/v1/score", 0])
        total = 0
        for second, count in enumerate(per_second, start=1001):
            total += count
            writer.writerow([second, 8, "/v1/score", total])  # not the aggregate: skipped
            writer.writerow([second, 8, "Aggregated", total])
    figures = throughput_around(history, killed_at=1012.4)
    assert figures["before_per_s"] == 100 and figures["dip_per_s"] == 40 and figures["after_per_s"] == 100
    assert figures["recovered_after_s"] == pytest.approx(1015 - 1012.4)
    assert [count for _, count in figures["per_second"]][3:8] == [100, 100, 40, 80, 100]
    assert throughput_around(history, killed_at=2000)["before_per_s"] is None


def test_loadtest_refuses_a_kill_it_cannot_do_before_loading(tmp_path):
    base = [sys.executable, "-m", "uembed", "loadtest", "--url", "http://127.0.0.1:9", "--seconds", "10",
            "--out", str(tmp_path / "out"), "--kill-replica", "replica-2"]  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([*base, "--stack-dir", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--kill-replica:" in run.stderr and "stack.json" in run.stderr, run.stderr
    run = subprocess.run([*base, "--kill-after", "10"], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--kill-after 10: kill within the run's 10 s" in run.stderr, run.stderr
    assert not (tmp_path / "out" / "locust.log").exists(), "locust never started"


# --- the live stack -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(synthetic_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("replicas")
    stack = LocalStack(workdir, [synthetic_store / "movielens" / "1"], service_port=0, redis_port=0, prometheus_port=0,
                       replicas=3, haproxy_stats_port=0)  # fmt: skip
    stack.up(service_timeout_s=180)
    yield stack
    stack.down()


def prometheus_query(prometheus: str, expr: str) -> list:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_three_replicas_behind_haproxy_score_like_each_replica_and_are_each_scraped(stack, movielens_examples):
    state = json.loads((stack.workdir / "stack.json").read_text())
    assert [r["name"] for r in state["replicas"]] == ["replica-1", "replica-2", "replica-3"]
    assert len({r["port"] for r in state["replicas"]} | {r["grpc_port"] for r in state["replicas"]}) == 6
    assert state["service"] == state["haproxy"]["url"] and all(r["url"] != state["service"] for r in state["replicas"])
    servers = {row["svname"]: row for row in haproxy_stats(state["haproxy"]["stats"]) if row["pxname"] == "uembed"}
    assert set(servers) == {"replica-1", "replica-2", "replica-3", "FRONTEND", "BACKEND"}
    # "UP" or "UP 1/2" (in rotation, one failed check of the two that take it out: a slow /readyz at start-up)
    assert all(servers[f"replica-{n}"]["status"].startswith("UP") for n in (1, 2, 3)), servers

    examples = movielens_examples[:32]
    direct = score(state["replicas"][0]["url"], examples)
    with httpx.Client(base_url=state["service"], timeout=30) as client:
        for _ in range(30):
            np.testing.assert_array_equal(score(client, examples), direct)
    served = {}
    for replica in state["replicas"]:
        metrics = httpx.get(f"{replica['url']}/metrics").text
        served[replica["name"]] = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                      if line.startswith("uembed_http_requests_total{") and '"/v1/score"' in line)  # fmt: skip
    assert all(count > 0 for count in served.values()), f"haproxy sent requests to every replica: {served}"

    def scraped() -> bool:
        up = prometheus_query(state["prometheus"], "up")
        return Counter(r["metric"]["job"] for r in up if r["value"][1] == "1") == {"uembed": 3, "haproxy": 1, "prometheus": 1}

    wait_until(scraped, 30, "Prometheus scraping 3 replicas and haproxy")
    instances = {r["metric"]["instance"] for r in prometheus_query(state["prometheus"], 'up{job="uembed"}')}
    assert instances == {f"127.0.0.1:{r['port']}" for r in state["replicas"]}
    assert prometheus_query(state["prometheus"], 'haproxy_server_status{proxy="uembed"}'), "haproxy's exporter is scraped"


def test_a_replica_killed_under_load_costs_at_most_its_requests_in_flight(stack, movielens_examples):
    """Four client threads score through haproxy; at 3 s replica-2 gets SIGKILL, and they go on until haproxy has
    the restarted replica back and 50 requests have gone out since the kill. Every failure a client sees must be a
    request haproxy had already sent to replica-2 and could not resend; new requests go to the other replicas, and
    the stack starts replica-2 again, which haproxy takes back."""
    state = json.loads((stack.workdir / "stack.json").read_text())
    results: list[tuple[float, float, int]] = []  # (sent, answered, status or 0 for a transport error)
    stop = threading.Event()

    def client(offset: int) -> None:
        with httpx.Client(base_url=state["service"], timeout=30) as http:
            i = offset
            while not stop.is_set():
                body = {"examples": movielens_examples[(i * 16) % 960 : (i * 16) % 960 + 16]}
                sent = time.time()
                try:
                    status = http.post("/v1/score", json=body).status_code
                except httpx.TransportError:
                    status = 0
                results.append((sent, time.time(), status))
                i += 4

    def supervise() -> None:  # what `uembed stack` does every half second
        while not stop.wait(0.5):
            assert stack.supervise() is None

    kill = ReplicaKill(stack.workdir, "replica-2", after_s=3.0, watch_s=40)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)] + [threading.Thread(target=supervise)]
    for thread in threads:
        thread.start()
    kill.start()
    kill.join(40)  # until haproxy has taken the restarted replica back (or 40 s)
    # (no kill: the report's assertions below say so)
    wait_until(lambda: kill.killed_at is None or sum(r[0] > kill.killed_at + 0.5 for r in results) > 50, 30, "traffic after the kill")
    stop.set()
    for thread in threads:
        thread.join(30)
    report = kill.report()
    failed = [r for r in results if r[2] != 200]
    print(f"\n{len(results)} requests, {len(failed)} failed; kill: {report}")

    assert report["killed"] and report["marked_down_after_s"] is not None and report["marked_down_after_s"] < 5
    assert report["back_up_after_s"] is not None, "the stack started replica-2 again and haproxy took it back"
    # Every failure a client saw is a request haproxy had handed to replica-2 and could not resend: at most
    # the requests in flight on it (4 clients: at most 4 at once, and one each in the instant it died).
    assert len(failed) <= report["in_flight"] <= 8, (failed, report)
    assert all(status in (0, 502) for _, _, status in failed), failed
    killed_at = report["killed_at"]
    after = [r for r in results if r[0] > killed_at + 0.5]
    assert len(after) > 50 and all(status == 200 for _, _, status in after), "traffic goes on, all answered"
    new_pid = json.loads((stack.workdir / "stack.json").read_text())["replicas"][1]["pid"]
    assert new_pid != kill.pid and stack.replicas[1].process.poll() is None
    with httpx.Client(base_url=state["service"], timeout=30) as http:
        for _ in range(30):
            score(http, movielens_examples[:8])
    metrics = httpx.get(f"{state['replicas'][1]['url']}/metrics").text
    assert any(line.startswith("uembed_http_requests_total{") and '"/v1/score"' in line for line in metrics.splitlines()), \
        "haproxy sends requests to the restarted replica again"
