"""The gRPC port's HTTP/2: uvicorn's HTTP/2 protocol (zttp's parser) serving an ASGI app in this worker's event loop,
with what a gRPC port needs beyond it: connections that end gracefully before zttp's lifetime cap on streams, writes
coalesced a turn of the loop, a connection that opens no stream closed, and a listener on the socket the server
hands its workers (``uembed serve``) or on one a worker binds itself."""

from __future__ import annotations

import asyncio
import socket
import time

import uvicorn
from uvicorn.protocols.http.zttp_h2_impl import ZttpH2Protocol
from zttp import H2ErrorCode

from uembed.contract.errors import UembedError
from uembed.serving.protocols.writes import CoalescedWrites

# zttp ends a connection that ever opens more than 4096 streams (its rapid-reset guard) with GOAWAY ENHANCE_YOUR_CALM,
# failing the calls in flight; a gRPC channel makes every call a stream. So a connection says GOAWAY (NO_ERROR) itself
# first, with room to spare for the streams a client may open before it reads that: its calls in flight finish, and
# the client opens a new connection for the next ones (as load balancers do after a number of requests).
STREAMS_PER_CONNECTION = 3584
CLOSE_WAIT_S = 5.0
KEEP_ALIVE_S = 3600.0  # a connection with no stream for this long is closed (gRPC channels reconnect)
SHUTDOWN_GRACE_S = 5.0
LISTEN_BACKLOG = 2048  # uvicorn's for the HTTP socket (asyncio's create_server would listen with 100)

# Listening sockets a server handed this worker, by the address they listen on (``process.ServiceConfig``): taken by
# the listener started on that address.
handed_down: dict[tuple[str, int], socket.socket] = {}


def hand_down_listener(host: str, port: int, sock: socket.socket) -> None:
    """Give this process's gRPC listener on ``host:port`` the listening socket ``sock`` instead of one of its own."""
    handed_down[(host, port)] = sock


class RotatingHttp2(ZttpH2Protocol):
    """uvicorn's HTTP/2 protocol that ends each connection gracefully after ``streams_per_connection`` streams: GOAWAY
    with NO_ERROR and the last stream it serves, that stream and those before it finish, and a stream the client
    opened after it is left unserved (the client retries it on a new connection, as the protocol allows)."""

    streams_per_connection = STREAMS_PER_CONNECTION
    first_stream_s = 10.0
    lane = None  # what may answer a stream itself (``grpc_lane.GrpcLane``: its take); else the ASGI app does

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.streams_opened = 0
        self.newest_stream = 0
        self.last_stream_served: int | None = None
        self.closing = False  # our half of the connection is closed
        self.first_stream_timer: asyncio.TimerHandle | None = None
        self.drain_timer: asyncio.TimerHandle | None = None  # a close that waits for held-back replies: its deadline
        self.close_timer: asyncio.TimerHandle | None = None  # after the half-close: the client's time to close its half
        self.last_active = 0.0  # when a frame last arrived or a stream last ended (the lazy keep-alive's clock)

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(CoalescedWrites(transport, self.loop))
        # a connection that opens no stream in time is closed, as the HTTP port closes one that sends no request
        self.first_stream_timer = self.loop.call_later(self.first_stream_s, self._close_connection)

    def handle_request(self, event) -> None:
        if self.last_stream_served is not None and event.stream_id > self.last_stream_served:
            return
        if not self.streams_opened:
            self.first_stream_timer.cancel()
        if self.lane is None or not self.lane.take(self, event):
            super().handle_request(event)
        self.streams_opened += 1
        self.newest_stream = event.stream_id
        if self.streams_opened >= self.streams_per_connection:
            self.goaway()

    # uvicorn cancels its keep-alive timer at every read and arms another whenever a connection's last stream ends:
    # with one call at a time on a connection (a channel's usual case), a timer armed and cancelled every call. Here
    # one timer is moved lazily instead: reads and ended streams note the time, and the timer, when it fires, closes
    # a connection idle for the whole keep-alive or waits out the rest of it.
    def _unset_keepalive_if_required(self) -> None:
        self.last_active = self.loop.time()

    def on_stream_closed(self) -> None:
        if self.transport.is_closing():
            return
        self.resume_reading_if_idle()  # the stream's body buffer can no longer hold the reads back
        self.last_active = self.loop.time()
        if not self.cycles:
            if self.shutdown_requested:
                self._close_connection()
                return
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self.transport.is_closing() or self.cycles:  # busy: the timer is armed again when its last stream ends
            return
        idle = self.loop.time() - self.last_active
        if idle < self.timeout_keep_alive:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive - idle, self.timeout_keep_alive_handler)
            return
        super().timeout_keep_alive_handler()

    def goaway(self) -> None:
        """Serve no stream newer than the newest one now, and say so (GOAWAY, NO_ERROR); close once they end."""
        if self.last_stream_served is not None or self.transport.is_closing():
            return
        self.last_stream_served = self.newest_stream
        self.conn.close(0, self.newest_stream)
        self.flush()
        self.shutdown_requested = True  # uvicorn closes the connection once its last stream ends
        if not self.cycles:
            self._close_connection()

    def _close_connection(self) -> None:
        """uvicorn's close, made gentle: GOAWAY (once: a second may not name a newer stream), then our half of the
        connection only, once every reply has left. A close with the client's frames unread in the socket would send
        a TCP reset, which can overtake the replies and the GOAWAY written just before it; the client closes its half
        when it has read them (or the connection is closed after CLOSE_WAIT_S)."""
        if self.transport.is_closing() or self.closing:
            return
        if self.last_stream_served is None:
            self.last_stream_served = self.newest_stream
            self.conn.close(0, self.newest_stream)
            self.flush()
        if self.conn.has_pending_send():
            # A reply the client's flow-control window holds back: the frames that open it (WINDOW_UPDATE) are still
            # read, and the half-close waits for its last bytes (data_received), or CLOSE_WAIT_S for a client that
            # stopped reading.
            if self.drain_timer is None:
                self.drain_timer = self.loop.call_later(CLOSE_WAIT_S, self.transport.close)
            return
        self.closing = True
        if self.drain_timer is not None:  # drained: the client gets its own CLOSE_WAIT_S to read the rest and close
            self.drain_timer.cancel()
        try:
            self.transport.write_eof()
        except (OSError, NotImplementedError):  # the client has gone already, or the transport cannot half-close
            self.transport.close()
        else:
            self.close_timer = self.loop.call_later(CLOSE_WAIT_S, self.transport.close)

    def on_response_complete(self, stream_id: int) -> None:
        call = self.cycles.get(stream_id)  # uvicorn's cycle, or the lane's call
        if (call is not None and call.response_complete and call.more_body and not call.disconnected
                and not call.stream.pending_bytes and not self.transport.is_closing()):  # fmt: skip
            # Answered before the client sent its whole message (one past the limit): RST_STREAM with NO_ERROR tells
            # it to stop sending, nothing failed (RFC 9113, 8.1); uvicorn leaves the stream half open. Not while
            # flow control holds part of the reply back (a reset would drop it), nor on a stream already reset.
            call.stream.reset(H2ErrorCode.NO_ERROR)
            self.flush()
        super().on_response_complete(stream_id)

    def data_received(self, data: bytes) -> None:
        if self.closing:  # frames after our half-close are of streams it will not serve
            return
        super().data_received(data)
        if self.drain_timer is not None and not self.closing and not self.conn.has_pending_send():
            self._close_connection()  # the last reply held back by flow control has left

    def connection_lost(self, exc) -> None:
        for timer in (self.first_stream_timer, self.drain_timer, self.close_timer, self.timeout_keep_alive_task):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)


class Http2Listener:
    """An ASGI app (the gRPC calls' :class:`~uembed.serving.protocols.grpc_h2.GrpcApp`) on ``host:port`` with uvicorn's
    HTTP/2 protocol in this worker's event loop. It listens on the socket the server handed down for that address, which
    every worker shares (their event loop spreads the connections, ``accepts.py``); without one it binds its own with
    SO_REUSEPORT, so every worker listens on the port and the kernel hands each connection to one of them."""

    def __init__(self, app, settings, host: str, port: int, streams_per_connection: int = STREAMS_PER_CONNECTION,
                 lane=None, keep_alive_s: float = KEEP_ALIVE_S) -> None:  # fmt: skip
        self.app, self.settings, self.host, self.port = app, settings, host, port
        self.keep_alive_s = keep_alive_s
        self.protocol = type("RotatingHttp2", (RotatingHttp2,), {"streams_per_connection": streams_per_connection,
                                                                 "first_stream_s": settings.header_timeout_s, "lane": lane})  # fmt: skip
        self.connections_made = 0
        self.server: asyncio.Server | None = None
        self.state = uvicorn.server.ServerState()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        config = uvicorn.Config(self.app, http="zttp", http2=True, lifespan="off", log_config=None, access_log=False,
                                proxy_headers=False, server_header=False, date_header=False, timeout_keep_alive=self.keep_alive_s,
                                limit_concurrency=self.settings.max_connections)  # fmt: skip
        config.load()
        sock = handed_down.pop((self.host, self.port), None)
        try:
            sock = sock or socket.create_server((self.host, self.port), family=socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                                backlog=LISTEN_BACKLOG, reuse_port=True, dualstack_ipv6=self.host == "::")  # fmt: skip
        except OSError as exc:
            raise UembedError(f"gRPC: cannot listen on {self.address} ({exc.strerror or exc}); set UEMBED_GRPC_PORT to a "
                              "free port, or 0 for no gRPC")  # fmt: skip
        loop = asyncio.get_running_loop()
        def connection():
            self.connections_made += 1
            return self.protocol(config=config, server_state=self.state, app_state={}, _loop=loop)

        self.server = await loop.create_server(connection, sock=sock, backlog=LISTEN_BACKLOG)

    async def stop(self) -> None:
        """Stop taking connections and calls (GOAWAY; a Watch ends UNAVAILABLE), let the calls in flight finish and their
        replies leave (up to SHUTDOWN_GRACE_S), then cancel the rest (UNAVAILABLE) and close what is still open."""
        if self.server is None:
            return
        self.server.close()
        if hasattr(self.app, "stopping"):  # long calls (a gRPC Watch) end when it is set
            self.app.stopping.set()
        for connection in list(self.state.connections):
            connection.goaway()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while (self.state.tasks or self._replies_held_back()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # a connection that held a reply back has just half-closed: its client reads the last of it and closes its half
        # (a close of ours now, its frames unread, could reset the connection before those bytes arrive)
        while any(connection.drain_timer for connection in self.state.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.state.tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        for connection in list(self.state.connections):
            connection.transport.close()
        self.server = None

    def _replies_held_back(self) -> bool:
        """Whether a connection still open holds reply bytes back for its client's flow-control window."""
        return any(connection.conn.has_pending_send() for connection in self.state.connections
                   if not connection.transport.is_closing())  # fmt: skip
