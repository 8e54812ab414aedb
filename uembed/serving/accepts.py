"""Connections spread evenly over the workers that share one listening socket.

With several workers uvicorn's parent binds the HTTP socket and every worker accepts on its copy. An event loop
woken by new connections accepts every one waiting then, and a client that opens its pool at once (a load balancer,
a client library's keep-alive pool) can land whole or mostly on one worker. Keep-alive keeps it there: that worker
queues while its siblings idle, and no later request moves.

:class:`BalancedLoop` (``uembed serve`` runs its workers on it; ``uvicorn --loop uembed.serving.accepts:BalancedLoop``
by hand) accepts on such a socket itself, one connection a wake-up, and leaves a waiting connection to a sibling
while this worker holds more open connections than the sibling with the fewest. The workers publish their counts
in a small table every worker of the socket maps (:class:`AcceptTable`, a file named after the socket's inode).

It never strands a connection: a sibling whose heartbeat is older than ``STALE_S`` (stopped, or its loop stuck)
does not count, and a worker defers for at most ``MAX_DEFER_S`` in a row before accepting anyway (a sibling busy
with a long batch is slow to accept). A socket bound with SO_REUSEPORT (the gRPC port: the kernel spreads its
connections over each worker's own socket) and a worker with no sibling accept as the loop always does.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

try:  # the loop uvicorn's "auto" picks
    import uvloop

    _BaseLoop = uvloop.Loop
except ImportError:  # pragma: no cover - the serving install has uvloop; this is the plain asyncio fallback
    _BaseLoop = asyncio.SelectorEventLoop

log = logging.getLogger("uembed.accepts")

SLOTS = 64  # workers a table holds; one past it accepts as the loop always does
SLOT = np.dtype([("pid", "<i8"), ("connections", "<i8"), ("beat", "<f8")])  # beat: time.monotonic(), one clock per host
BEAT_S = 0.1  # how often a worker publishes its count, closed connections included
STALE_S = 1.0  # a sibling silent this long is not waited for
RECHECK_S = 0.001  # a deferring worker looks again this soon
# The longest a waiting connection is left to siblings: a sibling that is late to accept delays one connection's
# set-up, once; accepting it here instead would load this worker on every request the connection makes.
MAX_DEFER_S = 0.02
RESOURCE_RETRY_S = 1.0  # out of file descriptors: stop accepting this long, as asyncio does


def table_folder() -> Path:
    shared_memory = Path("/dev/shm")
    return shared_memory if os.access(shared_memory, os.W_OK) else Path(tempfile.gettempdir())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AcceptTable:
    """Each worker's open connections on one listening socket: a slot per worker (pid, connections, heartbeat) in a
    file every process holding the socket maps, named after the socket's inode (unique while the socket exists)."""

    def __init__(self, sock: socket.socket, folder: Path | None = None) -> None:
        self.path = (folder or table_folder()) / f"uembed-accepts-{os.getuid()}-{os.fstat(sock.fileno()).st_ino}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one worker claims a slot at a time
            if os.fstat(fd).st_size < SLOTS * SLOT.itemsize:
                os.ftruncate(fd, SLOTS * SLOT.itemsize)
            self.map = mmap.mmap(fd, SLOTS * SLOT.itemsize)
            self.slots = np.frombuffer(self.map, dtype=SLOT)
            self.slot = self._claim(time.monotonic())
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: the map holds a copy of the descriptor, and with it the lock
            os.close(fd)

    def _claim(self, now: float) -> int | None:
        pid = os.getpid()
        for index, (holder, _, beat) in enumerate(self.slots.tolist()):
            if holder == 0 or holder == pid or (now - beat > STALE_S and not pid_alive(holder)):
                self.slots[index] = (pid, 0, now)
                return index
        return None  # a full table: this worker neither publishes nor defers

    def publish(self, connections: int, now: float) -> None:
        if self.slot is not None:
            self.slots[self.slot] = (os.getpid(), connections, now)

    def fewest_elsewhere(self, now: float) -> int | None:
        """The fewest open connections a live sibling holds; None when no sibling is live."""
        if self.slot is None:
            return None
        live = (self.slots["pid"] != 0) & (now - self.slots["beat"] <= STALE_S)
        live[self.slot] = False
        return int(self.slots["connections"][live].min()) if live.any() else None

    def release(self) -> None:
        """Give the slot back; the last live worker removes the file."""
        if self.slot is not None:
            self.slots[self.slot] = (0, 0, 0.0)
            self.slot = None
        if not (self.slots["pid"] != 0).any():
            self.path.unlink(missing_ok=True)
        del self.slots
        self.map.close()


class BalancedServer:
    """What ``loop.create_server(sock=...)`` returns, for a socket the loop accepts on itself (module docstring):
    the part of :class:`asyncio.Server` uvicorn uses."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol_factory, sock: socket.socket, table: AcceptTable,
                 ssl=None, ssl_handshake_timeout: float | None = None) -> None:  # fmt: skip
        self.loop, self.protocol_factory, self.sock, self.table = loop, protocol_factory, sock, table
        self.connect_options = {"ssl": ssl, "ssl_handshake_timeout": ssl_handshake_timeout} if ssl else {}
        self.transports: set[asyncio.BaseTransport] = set()
        self.connecting = 0  # accepted, its protocol not made yet
        self.deferring_since = self.last_deferred = 0.0  # the waiting connections' first and latest deferral
        self.resume_timer: asyncio.TimerHandle | None = None
        self.beat_timer: asyncio.TimerHandle | None = None
        self.recount_due = False
        self.serving = True
        sock.setblocking(False)
        loop.add_reader(sock, self._readable)
        self._beat()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,) if self.serving else ()

    def is_serving(self) -> bool:
        return self.serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def open_connections(self) -> int:
        return self.connecting + len(self.transports)

    def _beat(self) -> None:
        self._recount()
        self.beat_timer = self.loop.call_later(BEAT_S, self._beat)

    def _recount(self) -> None:
        self.recount_due = False
        self.transports = {t for t in self.transports if not t.is_closing()}
        self.table.publish(self.open_connections(), time.monotonic())

    def _protocol(self):
        """The server's protocol, telling this server when its connection is lost: the siblings see the count drop
        at once, not at the next heartbeat (a pool that closes and reopens its connections finds them even)."""
        protocol = self.protocol_factory()
        lost = protocol.connection_lost

        def connection_lost(exc) -> None:
            try:
                lost(exc)
            finally:
                if not self.recount_due:  # one recount for every connection closed this turn of the loop
                    self.recount_due = True
                    self.loop.call_soon(self._recount)

        protocol.connection_lost = connection_lost
        return protocol

    def _readable(self) -> None:
        now = time.monotonic()
        fewest = self.table.fewest_elsewhere(now)
        if fewest is not None and self.open_connections() > fewest:
            if now - self.last_deferred > 4 * RECHECK_S:  # not the connections deferred a moment ago: new ones
                self.deferring_since = now
            if now - self.deferring_since < MAX_DEFER_S:  # a sibling holds fewer: leave them to it
                self.last_deferred = now
                self._pause(RECHECK_S)
                return
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # a sibling took it
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            log.warning("accepting a connection: %s; accepting again in %.0f s", exc.strerror, RESOURCE_RETRY_S)
            self._pause(RESOURCE_RETRY_S)
            return
        conn.setblocking(False)
        self.connecting += 1
        self.table.publish(self.open_connections(), now)
        task = self.loop.create_task(self.loop.connect_accepted_socket(self._protocol, conn, **self.connect_options))
        task.add_done_callback(lambda done: self._connected(done, conn))

    def _connected(self, task: asyncio.Task, conn: socket.socket) -> None:
        self.connecting -= 1
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.debug("a connection failed as it was made: %r", task.exception())
            conn.close()
            return
        self.transports.add(task.result()[0])

    def _pause(self, seconds: float) -> None:
        self.loop.remove_reader(self.sock)
        self.resume_timer = self.loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self.resume_timer = None
        if self.serving:
            self.loop.add_reader(self.sock, self._readable)

    def close(self) -> None:
        if not self.serving:
            return
        self.serving = False
        for timer in (self.resume_timer, self.beat_timer):
            if timer is not None:
                timer.cancel()
        self.loop.remove_reader(self.sock)
        self.table.release()
        self.sock.close()  # this worker's copy; the others keep listening

    async def wait_closed(self) -> None:
        return None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()


def shared_listening_socket(sock: socket.socket | None) -> bool:
    """Whether ``sock`` is a listening TCP socket accepted on by every worker (not one per worker by SO_REUSEPORT)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    return not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)


class BalancedLoop(_BaseLoop):
    """The event loop uvicorn would pick, accepting on a socket its workers share by :class:`BalancedServer`."""

    async def create_server(self, protocol_factory, host=None, port=None, *, sock=None, backlog=100, ssl=None,
                            ssl_handshake_timeout=None, **kwargs):  # fmt: skip
        if not shared_listening_socket(sock) or host is not None or port is not None or kwargs.get("start_serving") is False:
            return await super().create_server(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl,
                                               ssl_handshake_timeout=ssl_handshake_timeout, **kwargs)  # fmt: skip
        try:
            table = AcceptTable(sock)
        except OSError as exc:
            log.warning("connections are not balanced over the workers (the accept table: %s)", exc)
            return await super().create_server(protocol_factory, sock=sock, backlog=backlog, ssl=ssl,
                                               ssl_handshake_timeout=ssl_handshake_timeout, **kwargs)  # fmt: skip
        sock.listen(backlog)
        return BalancedServer(self, protocol_factory, sock, table, ssl, ssl_handshake_timeout)
