"""gRPC's shape on HTTP/2, as both of the gRPC port's ways through a call use it (``grpc_h2.py``'s ASGI app and
``grpc_lane.py``'s fast lane): a message framed by a flag byte (compressed or not) and a 4-byte big-endian length,
a deadline in ``grpc-timeout``, and the outcome in the trailers (``grpc-status``, ``grpc-message`` percent-encoded)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf import message as protobuf_message

from uembed.contract.errors import BodyTooLarge, DeadlineExceeded, Overloaded, TensorError, UembedError, Unsupported
from uembed.serving.metrics import outcome
from uembed.serving.protocols.render import grpc_code, table_error

FRAME_HEADER_BYTES = 5
# grpc-timeout's units (gRPC over HTTP/2: "TimeoutValue TimeoutUnit", at most 8 digits)
TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# grpc-message is percent-encoded except printable ASCII other than '%'
MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
SHUTTING_DOWN = Overloaded("the server is shutting down; retry on another")


class Uncompressed(Unsupported):
    """A compressed message: this server takes identity only (said in grpc-accept-encoding)."""


@dataclass(frozen=True)
class Method:
    name: str
    request_type: Any  # its request's reader (FromString): a protobuf message class, or InferRequestReader; None: a streaming method not served
    call: Callable[[Any], Awaitable[bytes]]  # request message -> the reply, serialised; raises the error table's rows


def grpc_content_type(value: bytes) -> bool:
    """application/grpc or application/grpc+proto (parameters allowed), not gRPC-Web's nor another codec's."""
    return value.split(b";", 1)[0].strip().lower() in (b"application/grpc", b"application/grpc+proto")


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` header; None for a malformed one (ignored, as grpcio does)."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in TIMEOUT_UNITS:
        return None
    return int(digits) * TIMEOUT_UNITS[unit]


def too_large(body: bytes | bytearray, max_message_bytes: int) -> bool:
    return len(body) > max_message_bytes + FRAME_HEADER_BYTES


def unframed(body: bytes | bytearray, encoding: bytes, max_message_bytes: int) -> bytes:
    """The one message of a unary call's body."""
    if too_large(body, max_message_bytes):
        raise BodyTooLarge(f"the request message is over {max_message_bytes} bytes (max_body_bytes)")
    if len(body) < FRAME_HEADER_BYTES:
        raise TensorError("the call carries no gRPC message")
    if body[0]:
        raise Uncompressed(f"compressed messages (grpc-encoding {encoding.decode(errors='replace')[:40]}) are not "
                           "taken; send them uncompressed")  # fmt: skip
    length = int.from_bytes(body[1:5], "big")
    if len(body) != FRAME_HEADER_BYTES + length:
        raise TensorError("a unary call carries exactly one message; this one's frames do not add up to one")
    return bytes(body[FRAME_HEADER_BYTES:])


def framed(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


def call_error(exc: Exception, name: str, method: Method | None, deadline_passed: bool = False) -> UembedError:
    """The error-table row that ends a call."""
    if isinstance(exc, TimeoutError) and deadline_passed:
        return DeadlineExceeded("the call's deadline (grpc-timeout) passed before its reply")
    if isinstance(exc, protobuf_message.DecodeError) and method is not None:
        return TensorError(f"{name}: the request is not a valid {method.request_type.DESCRIPTOR.name}: {exc}")
    return table_error(exc, name)


def status_trailers(code: grpc.StatusCode, message: str = "") -> list[tuple[bytes, bytes]]:
    trailers = [(b"grpc-status", str(code.value[0]).encode())]
    if message:
        trailers.append((b"grpc-message", quote(message, safe=MESSAGE_SAFE).encode()))
    return trailers


def outcome_trailers(error: UembedError | None) -> list[tuple[bytes, bytes]]:
    """The trailers that end a call: OK, or the status code of the error's row and its message."""
    if error is None:
        return status_trailers(grpc.StatusCode.OK)
    trailers = status_trailers(grpc_code(error), str(error))
    if isinstance(error, Uncompressed):
        trailers.append((b"grpc-accept-encoding", b"identity"))
    return trailers


class CallMetrics:
    """A call's time and count by its method and outcome (``uembed_grpc_request_duration_seconds``,
    ``uembed_grpc_requests_total``), for both gRPC servers. The series' children are kept: labels() costs more than the
    observation, and these series are never removed (methods, with "unknown" for any other path, and codes are few)."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics
        self._children: dict[tuple[str, int], tuple] = {}  # (method, HTTP status of the error's row, 200 for OK)

    def observe(self, method: str, started: float, error: UembedError | None) -> None:
        status = 200 if error is None else error.status
        children = self._children.get((method, status))
        if children is None:
            code = grpc.StatusCode.OK if error is None else grpc_code(error)
            children = self._children[(method, status)] = (self.metrics.grpc_seconds.labels(method, outcome(status)),
                                                           self.metrics.grpc_requests.labels(method, code.name))  # fmt: skip
        children[0].observe(time.perf_counter() - started)
        children[1].inc()
