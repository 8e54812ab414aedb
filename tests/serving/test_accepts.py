"""Connections spread evenly over the workers sharing a listening socket (uembed/serving/accepts.py): real uvicorn
workers over sockets, and the table the workers publish their counts in."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from uembed.loadtest.servers import HttpProcess, free_port, wait_until, worker_pids
from uembed.serving import accepts
from uembed.serving.accepts import NOT_ACCEPTING, AcceptTable, shared_listening_socket
from uembed.serving.process import BALANCED_LOOP

CONNECTIONS = 8
# A sibling on a loaded machine may take a while to run: the tests of an even spread wait for it longer than the
# default, which only bounds a connection's set-up.
PATIENT = {"UEMBED_ACCEPT_DEFER_MS": "3000"}


async def hello_app(scope, receive, send) -> None:
    """The smallest ASGI app: what is measured here is which worker accepts, not what it serves."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def start(server: HttpProcess, workers: int, balanced: bool = True) -> HttpProcess:
    server.start()
    wait_until(lambda: len(worker_pids(server)) == workers, 60, f"{workers} workers")
    if workers > 1 and balanced:  # each worker listening on the balanced server: its slot in the socket's table
        wait_until(lambda: set(worker_pids(server)) <= set(table_of(server)), 60, "every worker in the accept table")
    return server


def start_workers(tmp_path, workers: int = 2, loop: str = BALANCED_LOOP, env: dict | None = None) -> HttpProcess:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "tests.serving.test_accepts:hello_app", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers), "--loop", loop, "--no-access-log"]  # fmt: skip
    server = HttpProcess(argv, env or {}, tmp_path / "workers.log", f"http://127.0.0.1:{port}/", "hello")
    server.port = port
    return start(server, workers, balanced=loop == BALANCED_LOOP)


def table_of(server: HttpProcess) -> dict[int, int]:
    """pid -> published open connections, of every worker of ``server`` found in an accept table."""
    workers = set(worker_pids(server))
    found = {}
    for path in accepts.table_folder().glob(f"uembed-accepts-v{accepts.TABLE_VERSION}-{os.getuid()}-*"):
        for pid, connections, _ in np.fromfile(path, dtype=accepts.SLOT).tolist():
            if pid in workers:
                found[pid] = connections
    return found


def open_connections(port: int, count: int, path: str = "/") -> list[socket.socket]:
    """``count`` connections opened at once (a pool's burst), each then answered once: every one was accepted."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    for client in clients:
        client.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    for client in clients:
        assert client.recv(4096).startswith(b"HTTP/1.1 200"), "every connection is answered"
    return clients


def connections_by_worker(server: HttpProcess, port: int | None = None) -> dict[int, int]:
    return {
        pid: sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == (port or server.port)
                 for c in psutil.Process(pid).net_connections("tcp"))  # fmt: skip
        for pid in worker_pids(server)
    }


def test_a_pool_opened_at_once_spreads_evenly_over_two_workers_every_time(tmp_path):
    server = start_workers(tmp_path, env=PATIENT)
    try:
        for _ in range(4):  # each round a new pool, after the workers counted the last one closed
            clients = open_connections(server.port, CONNECTIONS)
            held = connections_by_worker(server)
            assert sorted(held.values()) == [CONNECTIONS // 2] * 2, held
            for client in clients:
                client.close()
            wait_until(lambda: sum(table_of(server).values()) == 0, 10, "the workers counted the pool closed")
    finally:
        server.stop()


def test_a_stopped_worker_delays_a_burst_by_the_deferral_limit_not_by_its_heartbeat(tmp_path):
    server = start_workers(tmp_path)
    stopped = sorted(worker_pids(server))[0]
    os.kill(stopped, signal.SIGSTOP)  # alive, its heartbeat fresh for STALE_S, and accepting nothing
    try:
        started = time.monotonic()
        clients = open_connections(server.port, CONNECTIONS)  # the other worker takes them all, once the limit passes
        took = time.monotonic() - started
        held = connections_by_worker(server)
        assert held.get(stopped, 0) == 0 and sum(held.values()) == CONNECTIONS, held
        # The waiting connections were deferred once for the limit (20 ms), not each in turn, nor until the
        # stopped worker's heartbeat went stale: well under STALE_S even on a loaded machine.
        assert took < 0.8 * accepts.STALE_S, took
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
        assert not shared_listening_socket(reuse) and not shared_listening_socket(unix)
        assert shared_listening_socket(shared) and not shared_listening_socket(None)
    finally:
        for sock in (reuse, shared, unix):
            sock.close()


def claim_in_child(sock: socket.socket, folder, results) -> None:
    table = AcceptTable(sock, folder)
    results.put((os.getpid(), table.slot))


def test_the_table_gives_each_process_a_slot_counts_live_accepting_siblings_and_is_removed_by_the_last(tmp_path):
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    try:
        table = AcceptTable(listening, tmp_path)
        now = time.monotonic()
        assert table.slot == 0 and table.fewest_elsewhere(now) is None  # alone: never defers
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        child = context.Process(target=claim_in_child, args=(listening, tmp_path, results))
        child.start()
        child_pid, slot = results.get(timeout=60)
        child.join(60)
        assert slot == 1 and table.slots[1]["pid"] == child_pid, "another process sharing the socket: a slot of its own"
        alive = os.getppid()  # a live process that is not this one, as a sibling's pid
        table.slots[1] = (alive, 5, now)
        assert table.fewest_elsewhere(now) == 5
        assert table.fewest_elsewhere(now + accepts.STALE_S + 1) is None, "a silent sibling is not waited for"
        assert table.fewest_elsewhere(now - accepts.STALE_S - 1) is None, "nor one from the future (before a reboot)"
        table.slots[1]["connections"] = NOT_ACCEPTING
        assert table.fewest_elsewhere(now) is None, "nor one that cannot accept"
        # Slots are claimed again only where their holder is gone: dead and silent.
        table.slots[1] = (child_pid, 5, now - accepts.STALE_S - 1)
        table.slots[2] = (alive, 3, now - accepts.STALE_S - 1)
        table.slots[0]["pid"] = alive  # this process claims as a newcomer would
        assert table._claim(time.monotonic()) == 1
        table.slots[0:3] = (0, 0, 0.0)
        table.slot = 0
        table.release()
        assert not list(tmp_path.glob("uembed-accepts-*")), "the last worker removes the table"
    finally:
        listening.close()


def test_a_full_table_or_a_file_not_this_users_own_leaves_the_loop_accepting_as_always(tmp_path):
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
        os.chmod(first.path, 0o666)  # another user could have written it
        try:
            AcceptTable(listening, tmp_path)
        except OSError as exc:
            assert "not a file of this user's alone" in str(exc)
        else:
            raise AssertionError("a table others may write is refused")
    finally:
        listening.close()


def test_uembed_serve_spreads_a_pool_over_its_workers(tmp_path, synthetic_store):
    port = free_port()
    argv = [sys.executable, "-m", "uembed", "serve", "--bundle", str(synthetic_store / "movielens" / "1"), "--port",
            str(port), "--grpc-port", "0", "--workers", "2"]  # fmt: skip
    server = HttpProcess(argv, PATIENT, tmp_path / "serve.log", f"http://127.0.0.1:{port}/readyz", "serve")
    server.port = port
    start(server, 2)
    try:
        clients = open_connections(port, CONNECTIONS, "/healthz")
        held = connections_by_worker(server)
        assert sorted(held.values()) == [CONNECTIONS // 2] * 2, held
        for client in clients:
            client.close()
    finally:
        server.stop()


# a client's HTTP/2 connection preface, and its (empty) SETTINGS frame
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def listening_inodes(port: int) -> list[int]:
    """The inodes of the sockets listening on a TCP port of this network namespace (state 0A is LISTEN)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.append(int(fields[9]))
    return found


def test_uembed_serve_spreads_grpc_connections_over_its_workers_on_one_socket(tmp_path, synthetic_store):
    """The gRPC port as the HTTP one: `uembed serve` listens on it and hands the socket to its workers, which spread
    a burst of connections evenly (with a socket a worker, by SO_REUSEPORT, the kernel picked a worker by each
    connection's addresses); and no other program may bind the port beside it."""
    port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "uembed", "serve", "--bundle", str(synthetic_store / "movielens" / "1"), "--port",
            str(port), "--grpc-port", str(grpc_port), "--workers", "2"]  # fmt: skip
    server = HttpProcess(argv, PATIENT, tmp_path / "serve.log", f"http://127.0.0.1:{port}/readyz", "serve")
    server.port = port
    start(server, 2)
    try:
        inodes = listening_inodes(grpc_port)
        assert len(inodes) == 1, f"one socket listens on the gRPC port, every worker's copy of it: {inodes}"
        table = accepts.table_folder() / f"uembed-accepts-v{accepts.TABLE_VERSION}-{os.getuid()}-{inodes[0]}"

        def published() -> dict[int, int]:  # pid -> open gRPC connections, as the workers publish them
            return {pid: count for pid, count, _ in np.fromfile(table, dtype=accepts.SLOT).tolist() if pid} if table.exists() else {}

        wait_until(lambda: set(worker_pids(server)) <= set(published()), 60, "both workers accepting on the gRPC socket")
        for _ in range(3):
            clients = [socket.create_connection(("127.0.0.1", grpc_port), timeout=10) for _ in range(CONNECTIONS)]
            for client in clients:
                client.sendall(HTTP2_PREFACE)
            for client in clients:
                assert client.recv(9)[3:4] == b"\x04", "each connection is answered with the server's SETTINGS"
            held = connections_by_worker(server, grpc_port)
            assert sorted(held.values()) == [CONNECTIONS // 2] * 2, held
            for client in clients:
                client.close()
            wait_until(lambda: sum(published().values()) == 0, 10, "the workers counted the burst closed")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(service_pb2.ServerReadyRequest(), timeout=30).ready
        with socket.socket() as beside:
            beside.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError):
                beside.bind(("127.0.0.1", grpc_port))
    finally:
        server.stop()


def test_a_table_whose_workers_are_all_gone_is_removed_by_the_next_server(tmp_path):
    sockets = [socket.socket() for _ in range(3)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        killed = AcceptTable(sockets[0], tmp_path)
        killed.slots[0]["pid"] = dead_pid()  # as a server killed outright leaves it: never released
        running = AcceptTable(sockets[1], tmp_path)  # a server still running: this process holds its slot
        newcomer = AcceptTable(sockets[2], tmp_path)
        assert not killed.path.exists(), "a table whose workers are all gone is removed"
        assert running.path.exists() and newcomer.path.exists(), "a table with a live worker stays"
        running.release()
        newcomer.release()
    finally:
        for sock in sockets:
            sock.close()


def dead_pid() -> int:
    child = multiprocessing.get_context("spawn").Process(target=int)
    child.start()
    child.join(60)
    return child.pid
