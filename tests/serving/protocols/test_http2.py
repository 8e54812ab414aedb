"""The gRPC port's HTTP/2 connections (``http2.py``) with an app of the test's own: what a connection that is ending
still owes its client. zttp is the client over a real socket, so the test decides when the client's flow-control
window opens."""

import asyncio
import threading
import time

import pytest

from tests.serving.protocols.test_grpc_lane import RawConnection
from uembed.loadtest.servers import free_port, wait_until
from uembed.serving.protocols import http2
from uembed.serving.protocols.http2 import Http2Listener
from uembed.serving.settings import load_settings

REPLY_BYTES = 300_000  # past the client's 64 KiB window: most of it leaves only after the client's WINDOW_UPDATEs


async def large_reply(scope, receive, send) -> None:
    """An app whose every reply is REPLY_BYTES long, a stream's number repeated (so a body cut short, or mixed with
    another stream's, shows)."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/grpc")]})
    await send({"type": "http.response.body", "body": reply_for(scope["path"]), "more_body": False})


def reply_for(path: str) -> bytes:
    return (path.encode() * REPLY_BYTES)[:REPLY_BYTES]


class Listening:
    """An Http2Listener serving ``app`` on an event loop of its own thread."""

    def __init__(self, app, **options) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listener = Http2Listener(app, load_settings(), "127.0.0.1", free_port(), **options)
        self.run(self.listener.start())

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)

    def close(self) -> None:
        self.run(self.listener.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def rotating_every_stream():
    listening = Listening(large_reply, streams_per_connection=1)
    yield listening
    listening.close()


def read_to_the_end(connection: RawConnection, within_s: float) -> bytes:
    """What the server sends until it closes its half of the connection (the test fails past ``within_s``)."""
    connection.sock.settimeout(within_s)
    rest = b""
    while data := connection.sock.recv(65536):
        rest += data
    return rest


def test_the_last_streams_large_reply_is_sent_whole_before_the_connection_ends(rotating_every_stream, monkeypatch):
    """A connection that serves one stream says GOAWAY when that stream opens and ends once it is answered: a reply
    held back by the client's window is still sent, as the client's WINDOW_UPDATEs arrive, and the server's half of
    the connection closes as soon as it has left (not when the close timer runs out)."""
    monkeypatch.setattr(http2, "CLOSE_WAIT_S", 60.0)
    for call in range(3):
        connection = RawConnection(rotating_every_stream.listener.port)
        try:
            stream = connection.open(f"/call/{call}")
            connection.send(stream, b"\0\0\0\0\0", end=True)
            _, body, _ = connection.reply(stream)
            read_to_the_end(connection, within_s=20)
        finally:
            connection.close()
        assert body == reply_for(f"/call/{call}")


def test_a_client_that_stops_reading_loses_its_connection_after_the_close_wait(rotating_every_stream, monkeypatch):
    """A client that never opens its window holds a reply back for good: the connection is closed after CLOSE_WAIT_S
    rather than kept open."""
    monkeypatch.setattr(http2, "CLOSE_WAIT_S", 0.5)
    connection = RawConnection(rotating_every_stream.listener.port)
    try:
        stream = connection.open("/never-read")
        connection.send(stream, b"\0\0\0\0\0", end=True)
        wait_until(lambda: not rotating_every_stream.listener.state.connections, 20, "the connection closed")
        received = read_to_the_end(connection, within_s=20)
    finally:
        connection.close()
    assert 0 < len(received) < REPLY_BYTES  # the first window's worth, then the end


def test_a_large_reply_in_flight_when_the_listener_stops_is_sent_whole():
    """A graceful stop lets a call in flight finish and its reply leave: held back by the window of a client slow to
    read, it is still sent whole."""
    started, release = threading.Event(), None

    async def slow_large_reply(scope, receive, send):
        nonlocal release
        release = asyncio.Event()
        started.set()
        await release.wait()
        await large_reply(scope, receive, send)

    listening = Listening(slow_large_reply)
    connection = RawConnection(listening.listener.port)
    try:
        stream = connection.open("/slow")
        connection.send(stream, b"\0\0\0\0\0", end=True)
        assert started.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(listening.listener.stop(), listening.loop)
        listening.loop.call_soon_threadsafe(release.set)
        time.sleep(0.5)  # a client slow to read: the stop waits for the reply to leave, not only for the call to end
        _, body, _ = connection.reply(stream)
        read_to_the_end(connection, within_s=20)
        connection.close()
        stopping.result(timeout=30)
    finally:
        connection.close()
        listening.loop.call_soon_threadsafe(listening.loop.stop)
        listening.thread.join(timeout=10)
        listening.loop.close()
    assert body == reply_for("/slow")


async def small_reply(scope, receive, send) -> None:
    """An app that answers after ``?wait=S`` seconds (none by default), with a short body."""
    while (await receive()).get("more_body"):
        pass
    if scope["path"].startswith("/wait/"):
        await asyncio.sleep(float(scope["path"].rsplit("/", 1)[1]))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/grpc")]})
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


def test_a_connection_is_closed_once_idle_for_the_keep_alive_and_never_while_it_is_used():
    """The keep-alive counts from a connection's last frame or ended stream: calls coming more often keep it open past
    several keep-alives, and so does one call that outlasts it; idle for the keep-alive, it is closed (GOAWAY, then
    the server's half of the connection)."""
    keep_alive_s = 0.6
    listening = Listening(small_reply, keep_alive_s=keep_alive_s)
    connection = RawConnection(listening.listener.port)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 3 * keep_alive_s:
            stream = connection.open("/call")
            connection.send(stream, b"\0\0\0\0\0", end=True)
            assert connection.reply(stream)[1] == b"ok"
            time.sleep(keep_alive_s / 4)
        stream = connection.open(f"/wait/{2 * keep_alive_s}")
        connection.send(stream, b"\0\0\0\0\0", end=True)
        assert connection.reply(stream)[1] == b"ok"  # a call longer than the keep-alive is answered
        last = time.monotonic()
        read_to_the_end(connection, within_s=10)
        idle = time.monotonic() - last
    finally:
        connection.close()
        listening.close()
    # the server's clock starts as the reply leaves, a little before the client reads it
    assert keep_alive_s * 0.5 <= idle < keep_alive_s * 4, idle
