"""Writes of one connection coalesced a turn of the event loop: what an HTTP/1.1 response (status line and headers,
then its body: two writes in uvicorn) and an HTTP/2 gRPC reply (headers, message, trailers: three) send as one."""

from __future__ import annotations

import asyncio

# As much as a turn may hold back: past it the bytes go to the transport at once, so that its high-water mark (and
# the protocol's pause_writing, which makes a streaming response wait for a slow reader) is reached in the same turn
# rather than the whole response piling up here. uvicorn's own high-water mark for a request body.
FLUSH_AT_BYTES = 65536


class CoalescedWrites:
    """A connection's transport whose writes within one turn of the event loop leave as one send: a response's
    parts, and the responses of the requests a batch ends together. A large write goes at once, after what is
    pending (no copy of it). Everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if len(data) >= FLUSH_AT_BYTES:
            self.flush()
            if not self.transport.is_closing():
                self.transport.write(data)
            return
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= FLUSH_AT_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
            self.pending.clear()
            self.pending_bytes = 0
            if not self.transport.is_closing():
                self.transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)
