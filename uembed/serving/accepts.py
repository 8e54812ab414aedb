"""Connections spread evenly over the workers that share one listening socket.

With several workers uvicorn's parent binds the HTTP socket and every worker accepts on its copy. An event loop
woken by new connections accepts every one waiting then, and a client that opens its pool at once (a load balancer,
a client library's keep-alive pool) can land whole or mostly on one worker. Keep-alive keeps it there: that worker
queues while its siblings idle, and no later request moves.

:class:`BalancedLoop` (``uembed serve`` runs its workers on it; ``uvicorn --loop uembed.serving.accepts:BalancedLoop``
by hand) accepts on such a socket itself and leaves a waiting connection to a sibling while this worker holds more
open connections than the sibling with the fewest. The workers publish their counts in a small table every worker
of the socket maps (:class:`AcceptTable`: a file of this user's, named after the socket's inode).

It never strands a connection: a sibling whose heartbeat is older than ``STALE_S`` (stopped, or its loop stuck)
does not count, nor one that stopped accepting (out of file descriptors); and the connections waiting are left to
siblings for at most ``UEMBED_ACCEPT_DEFER_MS`` (``accept_defer_ms``) in all before this worker takes them anyway (a sibling busy with a
long batch is slow to accept). The gRPC socket ``uembed serve`` hands its workers is balanced the same way, in a table of
its own. A socket bound with SO_REUSEPORT (each worker's own: the gRPC port under plain ``uvicorn --workers``, where
the kernel spreads the connections), and a worker with no sibling, accept as the loop always does.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import stat
import tempfile
import time
from pathlib import Path

import numpy as np

from uembed.contract.errors import UembedError
from uembed.serving.settings import load_settings

try:  # the loop uvicorn's "auto" picks
    import uvloop

    _BaseLoop = uvloop.Loop
except ImportError:  # pragma: no cover - the serving install has uvloop; this is the plain asyncio fallback
    _BaseLoop = asyncio.SelectorEventLoop

log = logging.getLogger("uembed.accepts")

TABLE_VERSION = 1  # in the file's name: a layout change never reads another's table
SLOTS = 64  # workers a table holds; one past it accepts as the loop always does
SLOT = np.dtype([("pid", "<i8"), ("connections", "<i8"), ("beat", "<f8")])  # beat: time.monotonic(), one clock per host
NOT_ACCEPTING = 1 << 62  # the count a worker publishes while it cannot accept: no sibling leaves it a connection
BEAT_S = 0.1  # how often a worker publishes its count, closed connections included
STALE_S = 1.0  # a sibling silent this long is not waited for
RECHECK_S = 0.001  # a deferring worker looks again this soon
ACCEPTS_A_WAKE = 32  # connections taken a wake-up at most, while this worker holds no more than its siblings
RESOURCE_RETRY_S = 1.0  # out of file descriptors: stop accepting this long, as asyncio does
# accept() errors of a connection that died in the backlog (Linux passes the network's errors on): skip it
GONE = {errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
        errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM}  # fmt: skip
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


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


def live(beats: np.ndarray, now: float) -> np.ndarray:
    """Heartbeats within STALE_S of ``now``; one from the future (a file from before a reboot) is stale."""
    age = now - beats
    return (age >= -STALE_S) & (age <= STALE_S)


def remove_abandoned(folder: Path, prefix: str, keep: Path) -> None:
    """Remove this user's tables whose workers are all gone: a server killed outright (SIGKILL) never removes its
    own. A table's holders are read under its lock, so one being claimed is not taken for abandoned."""
    for path in folder.glob(f"{prefix}*"):
        if path == keep:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: someone is claiming or releasing it now
            holders = np.frombuffer(os.pread(fd, SLOTS * SLOT.itemsize, 0), dtype=SLOT)["pid"].tolist()
            if os.fstat(fd).st_uid == os.getuid() and not any(pid_alive(pid) for pid in holders if pid):
                path.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass  # locked, changed or short: not ours to judge now
        finally:
            os.close(fd)


class AcceptTable:
    """Each worker's open connections on one listening socket: a slot per worker (pid, connections, heartbeat) in a
    file every process holding the socket maps, named after the socket's inode (unique while the socket exists).
    Raises OSError where the file cannot be made this user's own (then the worker accepts as the loop does)."""

    def __init__(self, sock: socket.socket, folder: Path | None = None) -> None:
        folder = folder or table_folder()
        prefix = f"uembed-accepts-v{TABLE_VERSION}-{os.getuid()}-"
        self.path = folder / f"{prefix}{os.fstat(sock.fileno()).st_ino}"
        remove_abandoned(folder, prefix, keep=self.path)
        size = SLOTS * SLOT.itemsize
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # one worker claims a slot, or removes the file, at a time
                found = os.fstat(fd)
                if not stat.S_ISREG(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
                    raise OSError(errno.EPERM, f"{self.path} is not a file of this user's alone")
                try:
                    current = os.stat(self.path, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    current = None
                if current != found.st_ino:  # the last worker of the socket removed it meanwhile: open it anew
                    continue
                if found.st_size < size:
                    os.posix_fallocate(fd, 0, size)  # a full tmpfs is ENOSPC here, not SIGBUS at the first write
                self.inode = found.st_ino
                self.map = mmap.mmap(fd, size)
                self.slots = np.frombuffer(self.map, dtype=SLOT)
                self.slot = self._claim(time.monotonic())
                return
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: the map holds a copy of the descriptor, and with it the lock
                os.close(fd)

    def _claim(self, now: float) -> int | None:
        pid = os.getpid()
        fresh = live(self.slots["beat"], now)
        for index, (holder, _, _) in enumerate(self.slots.tolist()):
            if holder == 0 or holder == pid or (not fresh[index] and not pid_alive(holder)):
                self.slots[index] = (pid, 0, now)
                return index
        return None  # a full table: this worker neither publishes nor defers

    def publish(self, connections: int, now: float) -> None:
        if self.slot is not None:
            self.slots[self.slot] = (os.getpid(), connections, now)

    def fewest_elsewhere(self, now: float) -> int | None:
        """The fewest open connections a live sibling holds; None when no sibling is live and accepting."""
        if self.slot is None:
            return None
        siblings = (self.slots["pid"] != 0) & live(self.slots["beat"], now) & (self.slots["connections"] < NOT_ACCEPTING)
        siblings[self.slot] = False
        return int(self.slots["connections"][siblings].min()) if siblings.any() else None

    def release(self) -> None:
        """Give the slot back; the last live worker removes the file (under the lock a joining worker takes)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW) if self.path.exists() else None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            if self.slot is not None:
                self.slots[self.slot] = (0, 0, 0.0)
                self.slot = None
            holders = [pid for pid in self.slots["pid"].tolist() if pid]
            if fd is not None and os.fstat(fd).st_ino == self.inode and not any(map(pid_alive, holders)):
                self.path.unlink(missing_ok=True)
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            del self.slots
            self.map.close()


class BalancedServer:
    """What ``loop.create_server(sock=...)`` returns, for a socket the loop accepts on itself (module docstring):
    the part of :class:`asyncio.Server` uvicorn uses."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol_factory, sock: socket.socket, table: AcceptTable,
                 connect_options: dict, defer_s: float) -> None:  # fmt: skip
        self.loop, self.protocol_factory, self.sock, self.table = loop, protocol_factory, sock, table
        # A sibling late to accept delays a connection's set-up, once; accepting it here instead would load this
        # worker on every request the connection makes.
        self.defer_s = defer_s
        self.connect_options = connect_options
        self.transports: set[asyncio.BaseTransport] = set()
        self.connecting: set[asyncio.Task] = set()  # accepted, the protocol not made yet
        self.deferring_since: float | None = None  # when the connections waiting were first left to siblings
        self.resume_timer: asyncio.TimerHandle | None = None
        self.beat_timer: asyncio.TimerHandle | None = None
        self.recount_due = False
        self.accepting = True  # False while out of file descriptors
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
        return len(self.connecting) + len(self.transports)

    def _beat(self) -> None:
        self._recount()
        self.beat_timer = self.loop.call_later(BEAT_S, self._beat)

    def _recount(self) -> None:
        self.recount_due = False
        self.transports = {t for t in self.transports if not t.is_closing()}
        self.table.publish(self.open_connections() if self.accepting else NOT_ACCEPTING, time.monotonic())

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

    def _over_share(self, now: float) -> bool:
        fewest = self.table.fewest_elsewhere(now)
        return fewest is not None and self.open_connections() > fewest

    def _readable(self) -> None:
        now = time.monotonic()
        late = False  # left to siblings for defer_s already: take every one waiting
        if self._over_share(now):
            if self.deferring_since is None:
                self.deferring_since = now
            if now - self.deferring_since < self.defer_s:  # a sibling holds fewer: leave the waiting ones to it
                self._pause(RECHECK_S)
                return
            late = True
        for taken in range(ACCEPTS_A_WAKE):
            if taken and not late and self._over_share(now):
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self.deferring_since = None  # none waiting: the next ones start a deferral of their own
                return
            except OSError as exc:
                if exc.errno in GONE:
                    continue
                if exc.errno not in OUT_OF_RESOURCES:
                    raise
                log.warning("accepting a connection: %s; accepting again in %.0f s", exc.strerror, RESOURCE_RETRY_S)
                self.accepting = False
                self._recount()
                self._pause(RESOURCE_RETRY_S)
                return
            if not late:
                self.deferring_since = None
            conn.setblocking(False)
            task = self.loop.create_task(self.loop.connect_accepted_socket(self._protocol, conn, **self.connect_options))
            self.connecting.add(task)
            task.add_done_callback(lambda done, conn=conn: self._connected(done, conn))
            self.table.publish(self.open_connections(), now)

    def _connected(self, task: asyncio.Task, conn: socket.socket) -> None:
        self.connecting.discard(task)
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
        if not self.serving:
            return
        if not self.accepting:
            self.accepting = True
            self._recount()
        if self.deferring_since is not None and not select.select([self.sock], [], [], 0)[0]:
            self.deferring_since = None  # a sibling took the ones waiting
        self.loop.add_reader(self.sock, self._readable)

    def close(self) -> None:
        if not self.serving:
            return
        self.serving = False
        for timer in (self.resume_timer, self.beat_timer):
            if timer is not None:
                timer.cancel()
        for task in self.connecting:  # not made yet: uvicorn's shutdown would not know to close them
            task.cancel()
        self.loop.remove_reader(self.sock)
        self.table.release()
        self.sock.close()  # this worker's copy; the others keep listening

    async def wait_closed(self) -> None:
        if self.connecting:
            await asyncio.gather(*self.connecting, return_exceptions=True)

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

    async def create_server(self, protocol_factory, host=None, port=None, *, sock=None, backlog=100, ssl=None, **kwargs):
        plain = host is not None or port is not None or kwargs.get("start_serving") is False
        if plain or not shared_listening_socket(sock):
            return await super().create_server(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs)
        try:
            defer_s = load_settings().accept_defer_ms / 1000
            table = AcceptTable(sock) if defer_s > 0 else None
        except (OSError, UembedError) as exc:
            log.warning("connections are not balanced over the workers (the accept table: %s)", exc)
            return await super().create_server(protocol_factory, sock=sock, backlog=backlog, ssl=ssl, **kwargs)
        if table is None:
            return await super().create_server(protocol_factory, sock=sock, backlog=backlog, ssl=ssl, **kwargs)
        sock.listen(backlog)
        options = {"ssl": ssl} if ssl else {}
        if ssl:
            options |= {k: kwargs[k] for k in ("ssl_handshake_timeout", "ssl_shutdown_timeout") if kwargs.get(k) is not None}
        return BalancedServer(self, protocol_factory, sock, table, options, defer_s)
