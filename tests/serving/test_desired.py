"""One desired state of versions and routing (uembed/serving/desired.py, docs/ROUTING.md): what an admin call
changed reaches every worker and replica, a respawned worker included. Real uvicorn workers over real sockets, a
real redis-server, kill -9 of a real worker."""

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from tests.scoring import post_score
from uembed.loadtest.servers import UvicornProcess, wait_until
from uembed.serving.desired import FileStates, made_primary
from uembed.serving.routing import Route

TOKEN = "desired-state-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "movielens"
RULE = {"split": {"1": 1, "2": 1}, "sticky_feature": "user_id"}


@pytest.fixture
def store(synthetic_store, tmp_path):
    root = tmp_path / "store"
    (root / MODEL).mkdir(parents=True)
    for version in ("1", "2"):
        (root / MODEL / version).symlink_to(synthetic_store / MODEL / version)
    return root


def service_env(store, **more) -> dict:
    return {"UEMBED_BUNDLES": str(store / MODEL / "1"), "UEMBED_BUNDLE_STORE": str(store), "UEMBED_RELOAD_TOKEN": TOKEN,
            "UEMBED_DESIRED_STATE_POLL_S": "0.2", **more}  # fmt: skip


def spawned_workers(service: UvicornProcess) -> set[int]:
    """The uvicorn worker processes (multiprocessing's spawned children, not its resource tracker)."""
    found = set()
    for child in psutil.Process(service.process.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:  # the killed one, until its parent reaps it (ZombieProcess is one)
            pass
    return found


def check_served_as_the_rule_says(url: str, examples: list) -> None:
    """60 requests naming version 2, each on a new connection (so both workers get some), are scored by it; 60 users
    get the version the rule gives them."""
    for i in range(60):
        response = post_score(url, examples[i % 8 : i % 8 + 1], version="2")
        assert response.status_code == 200 and response.json()["version"] == "2", (i, response.text)
    route = Route(MODEL, RULE["split"], sticky_feature="user_id")
    for user in range(60):
        answer = post_score(url, [{**examples[0], "user_id": str(user)}]).json()
        assert answer["version"] == route.choose(route.point(str(user))), (user, answer)


def converged(url: str, revision: int) -> bool:
    state = httpx.get(f"{url}/v1/models", timeout=10).json()["desired_state"]["models"].get(MODEL, {})
    return state.get("desired_revision") == revision and state.get("applied_revision") == revision


def test_a_worker_respawned_after_kill_9_serves_the_versions_and_rule_the_admin_calls_set(store, movielens_examples, tmp_path):
    service = UvicornProcess("uembed.serving.app:create_app", service_env(store), tmp_path / "workers.log", workers=2).start()
    try:
        url = service.url
        assert httpx.post(f"{url}/v1/models/{MODEL}/versions/2", headers=AUTH, timeout=60).status_code == 200
        assert httpx.put(f"{url}/v1/models/{MODEL}/routing", json=RULE, headers=AUTH, timeout=60).status_code == 200
        state = json.loads(Path(os.environ["UEMBED_DESIRED_STATE_FILE"]).read_text())["models"][MODEL]
        assert (state["revision"], state["primary"], state["versions"]) == (2, "1", ["1", "2"])
        # The other worker follows within its poll: both answer as the rule says.
        wait_until(lambda: all(converged(url, 2) for _ in range(10)), 30, "both workers at revision 2")
        check_served_as_the_rule_says(url, movielens_examples)

        workers = spawned_workers(service)
        assert len(workers) == 2
        killed = sorted(workers)[0]
        started = service.log_path.read_text().count("Application startup complete")
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: len(spawned_workers(service) - {killed}) == 2, 60, "the worker respawned")
        (respawned,) = spawned_workers(service) - workers
        # Its start (the desired state applied) is complete before it takes connections.
        wait_until(lambda: service.log_path.read_text().count("Application startup complete") > started, 60, "its start")
        assert f"[{respawned}]" in service.log_path.read_text()
        check_served_as_the_rule_says(url, movielens_examples)
        assert all(converged(url, 2) for _ in range(10))
    finally:
        service.stop()


def test_with_redis_a_second_server_follows_an_admin_call_made_on_the_first(store, redis_server, movielens_examples, tmp_path):
    env = service_env(store, UEMBED_REDIS_URL=redis_server.url, UEMBED_REDIS_PREFIX="ds", UEMBED_HOT_ROWS_BYTES="0")
    first = UvicornProcess("uembed.serving.app:create_app", env, tmp_path / "first.log").start()
    second = UvicornProcess("uembed.serving.app:create_app", env, tmp_path / "second.log").start()
    try:
        assert httpx.post(f"{first.url}/v1/models/{MODEL}/versions/2", headers=AUTH, timeout=60).status_code == 200
        assert httpx.put(f"{first.url}/v1/models/{MODEL}/routing", json=RULE, headers=AUTH, timeout=60).status_code == 200
        assert json.loads(redis_server.client().hget("ds:desired-state", MODEL))["revision"] == 2
        wait_until(lambda: converged(second.url, 2), 30, "the second server at revision 2")
        listed = httpx.get(f"{second.url}/v1/models").json()
        assert [m["version"] for m in listed["models"]] == ["1", "2"]
        assert listed["routing"][MODEL]["split"] == {"1": 0.5, "2": 0.5}
        assert listed["desired_state"]["store"] == "redis ds:desired-state" and listed["desired_state"]["error"] is None
        check_served_as_the_rule_says(second.url, movielens_examples)
        pinned = post_score(first.url, movielens_examples[:8], version="2").json()
        assert post_score(second.url, movielens_examples[:8], version="2").json() == pinned
        # Removing the rule and the version on the second: the first follows.
        assert httpx.delete(f"{second.url}/v1/models/{MODEL}/routing", headers=AUTH).status_code == 200
        assert httpx.delete(f"{second.url}/v1/models/{MODEL}/versions/2", headers=AUTH).status_code == 200
        wait_until(lambda: converged(first.url, 4), 30, "the first server at revision 4")
        assert post_score(first.url, movielens_examples[:8], version="2").status_code == 404
        assert httpx.get(f"{first.url}/v1/models").json()["routing"] == {}
    finally:
        second.stop()
        first.stop()


def test_a_version_missing_on_a_replica_is_shown_and_not_fatal(store, synthetic_store, movielens_examples, tmp_path):
    """The desired state names version 2; this replica's store lacks it: it serves version 1 and says why."""
    lacking = tmp_path / "lacking"
    (lacking / MODEL).mkdir(parents=True)
    (lacking / MODEL / "1").symlink_to(synthetic_store / MODEL / "1")
    FileStates(os.environ["UEMBED_DESIRED_STATE_FILE"]).update(
        MODEL, lambda _: {"base": "1", "primary": "1", "versions": ["1", "2"], "routing": None})
    service = UvicornProcess("uembed.serving.app:create_app", service_env(lacking), tmp_path / "lacking.log").start()
    try:
        state = httpx.get(f"{service.url}/v1/models").json()["desired_state"]["models"][MODEL]
        assert state["desired_revision"] == 1 and state["applied_revision"] is None
        assert state["error"].startswith("revision 1: no bundle movielens/2 under the bundle store")
        assert post_score(service.url, movielens_examples[:8]).status_code == 200
    finally:
        service.stop()


def test_the_state_file_is_written_whole_under_a_lock(tmp_path):
    """4 threads x 25 read-modify-writes each: no update lost, revisions count them all, and a reader beside them
    only ever sees a whole file."""
    states = FileStates(tmp_path / "state.json")
    stop, seen, bad = threading.Event(), [], []

    def read_all():
        while not stop.is_set():
            try:
                seen.append(states.read().get("m", {}).get("count", 0))
            except json.JSONDecodeError as exc:  # a torn write
                bad.append(exc)

    def write(times: int):
        for _ in range(times):
            states.update("m", lambda current: {"count": (current or {}).get("count", 0) + 1})

    reader = threading.Thread(target=read_all)
    reader.start()
    writers = [threading.Thread(target=write, args=(25,)) for _ in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert states.read()["m"] == {"count": 100, "revision": 100}
    assert not bad and seen == sorted(seen)  # counts only go up: every read was one whole state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.lock"]  # no temporary file left


def test_a_version_the_rule_gives_no_share_goes_when_another_is_made_primary():
    """As the registry does: a previous primary at share 0 is not in use, so loading a new primary drops it from the
    document too (else every worker would load it back)."""
    document = {"base": "1", "primary": "1", "versions": ["1", "2"],
                "routing": {"split": {"1": 0.0, "2": 1.0}, "sticky_feature": None, "shadow": None, "shadow_fraction": 0.0}}  # fmt: skip
    assert made_primary(document, "3")["versions"] == ["2", "3"]
    document["routing"]["split"] = {"1": 0.5, "2": 0.5}
    assert made_primary(document, "3")["versions"] == ["1", "2", "3"]
