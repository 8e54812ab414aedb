"""Connections spread evenly over the workers sharing a listening socket (uembed/serving/accepts.py): real uvicorn
workers over sockets, and the table the workers publish their counts in."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time

import numpy as np
import psutil

from uembed.loadtest.servers import HttpProcess, free_port, wait_until, worker_pids
from uembed.serving import accepts
from uembed.serving.accepts import AcceptTable, shared_listening_socket
from uembed.serving.process import BALANCED_LOOP

CONNECTIONS = 8


async def hello_app(scope, receive, send) -> None:
    """The smallest ASGI app: what is measured here is which worker accepts, not what it serves."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def start_workers(tmp_path, workers: int = 2, loop: str = BALANCED_LOOP) -> HttpProcess:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "tests.serving.test_accepts:hello_app", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers), "--loop", loop, "--no-access-log"]  # fmt: skip
    server = HttpProcess(argv, {}, tmp_path / "workers.log", f"http://127.0.0.1:{port}/", "hello")
    server.port = port
    server.start()
    wait_until(lambda: len(worker_pids(server)) == workers, 30, f"{workers} workers")
    if workers > 1 and loop == BALANCED_LOOP:  # each worker listening on the balanced server: its slot in the socket's table
        wait_until(lambda: set(worker_pids(server)) <= tables_pids(), 30, "every worker in the accept table")
    return server


def tables_pids() -> set[int]:
    return {
        int(pid)
        for path in accepts.table_folder().glob(f"uembed-accepts-{os.getuid()}-*")
        for pid in np.fromfile(path, dtype=accepts.SLOT)["pid"]
    }


def open_connections(port: int, count: int, path: str = "/") -> list[socket.socket]:
    """``count`` connections opened at once (a pool's burst), each then answered once: every one was accepted."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    for client in clients:
        client.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    for client in clients:
        assert client.recv(4096).startswith(b"HTTP/1.1 200"), "every connection is answered"
    return clients


def connections_by_worker(server: HttpProcess) -> dict[int, int]:
    return {
        pid: sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port
                 for c in psutil.Process(pid).net_connections("tcp"))  # fmt: skip
        for pid in worker_pids(server)
    }


def test_a_pool_opened_at_once_spreads_evenly_over_two_workers_every_time(tmp_path):
    server = start_workers(tmp_path)
    try:
        for _ in range(4):  # each round a new pool, after the last one closed
            clients = open_connections(server.port, CONNECTIONS)
            held = connections_by_worker(server)
            assert sum(held.values()) == CONNECTIONS, held
            assert max(held.values()) - min(held.values()) <= 1, held
            for client in clients:
                client.close()
            wait_until(lambda: sum(connections_by_worker(server).values()) == 0, 10, "the pool closed")
    finally:
        server.stop()


def test_a_stopped_worker_strands_no_connection(tmp_path):
    server = start_workers(tmp_path)
    stopped = sorted(worker_pids(server))[0]
    os.kill(stopped, signal.SIGSTOP)  # alive, its heartbeat still fresh for a while, and accepting nothing
    try:
        started = time.monotonic()
        clients = open_connections(server.port, CONNECTIONS)  # the other worker takes them all, deferring briefly
        assert time.monotonic() - started < 10
        held = connections_by_worker(server)
        assert held[stopped] == 0 and sum(held.values()) == CONNECTIONS, held
        for client in clients:
            client.close()
    finally:
        os.kill(stopped, signal.SIGCONT)
        server.stop()


def test_one_worker_and_a_socket_of_its_own_accept_as_the_loop_always_does(tmp_path):
    server = start_workers(tmp_path, workers=1)
    try:
        for client in open_connections(server.port, CONNECTIONS):
            client.close()
    finally:
        server.stop()
    reuse = socket.socket()
    reuse.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the gRPC port: one socket per worker
    reuse.bind(("127.0.0.1", 0))
    shared = socket.socket()
    shared.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    try:
        assert not shared_listening_socket(reuse) and shared_listening_socket(shared) and not shared_listening_socket(unix)
        assert not shared_listening_socket(None)
    finally:
        for sock in (reuse, shared, unix):
            sock.close()


def claim_in_child(sock: socket.socket, folder, results) -> None:
    table = AcceptTable(sock, folder)
    table.publish(5, time.monotonic())
    results.put((os.getpid(), table.slot))


def claim_slot(listening: socket.socket, folder) -> tuple[int, int | None]:
    """(pid, slot) of a new process claiming a slot in ``listening``'s table."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=claim_in_child, args=(listening, folder, results))
    child.start()
    claimed = results.get(timeout=60)
    child.join(30)
    return claimed


def test_the_table_gives_each_worker_a_slot_counts_live_siblings_only_and_is_removed_by_the_last(tmp_path):
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    try:
        table = AcceptTable(listening, tmp_path)
        assert table.slot == 0 and table.fewest_elsewhere(time.monotonic()) is None  # alone: never defers
        child, slot = claim_slot(listening, tmp_path)
        assert slot == 1, "a second process sharing the socket gets a slot of its own"
        now = time.monotonic()
        assert table.fewest_elsewhere(now) == 5, "the child published 5 connections"
        assert table.fewest_elsewhere(now + accepts.STALE_S + 1) is None, "a silent sibling is not waited for"
        # The child has exited, its heartbeat still fresh: its slot stays its own until the heartbeat is stale.
        assert claim_slot(listening, tmp_path)[1] == 2
        table.slots[1]["beat"] = time.monotonic() - accepts.STALE_S - 1
        assert claim_slot(listening, tmp_path)[1] == 1, "a dead worker's stale slot is taken again"
        table.slots[1:] = (0, 0, 0.0)
        table.release()
        assert not list(tmp_path.glob("uembed-accepts-*")), "the last worker removes the table"
    finally:
        listening.close()


def test_a_full_table_leaves_a_worker_accepting_as_the_loop_always_does(tmp_path, monkeypatch):
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    try:
        first = AcceptTable(listening, tmp_path)
        first.slots["pid"] = os.getppid()  # every slot held by a live process that is not this one
        first.slots["beat"] = time.monotonic()
        crowded = AcceptTable(listening, tmp_path)
        assert crowded.slot is None and crowded.fewest_elsewhere(time.monotonic()) is None
        crowded.publish(3, time.monotonic())  # publishes nothing
        assert (first.slots["connections"] == 0).all()
    finally:
        listening.close()


def test_uembed_serve_spreads_a_pool_over_its_workers(tmp_path, synthetic_store):
    port = free_port()
    argv = [sys.executable, "-m", "uembed", "serve", "--bundle", str(synthetic_store / "movielens" / "1"), "--port",
            str(port), "--grpc-port", "0", "--workers", "2"]  # fmt: skip
    server = HttpProcess(argv, {}, tmp_path / "serve.log", f"http://127.0.0.1:{port}/readyz", "serve")
    server.port = port
    server.start()
    try:
        wait_until(lambda: len(worker_pids(server)) == 2 and set(worker_pids(server)) <= tables_pids(), 60,
                   "both workers in the accept table")  # fmt: skip
        clients = open_connections(port, CONNECTIONS, "/healthz")
        held = connections_by_worker(server)
        assert sorted(held.values()) == [CONNECTIONS // 2] * 2, held
        for client in clients:
            client.close()
    finally:
        server.stop()
