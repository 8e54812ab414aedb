"""The error table: every failure a user or a client can cause, in one place.

Each class is one row: its ``kind`` (the ``error`` field of an HTTP error body), its HTTP
``status`` and any ``headers`` the response carries. They are class data, never changed
on an instance, so one handler maps any of them to a response and a failure that is not
in this table goes out as :class:`Internal` (500, kind ``internal``). The CLI prints
``error: <message>`` for all of them (no traceback) and exits 2.

Every HTTP error body has one shape, ``{"error": kind, "detail": message}`` plus, for
request validation, ``errors``: a list of ``{"field", "message", "type"}``.
"""

from __future__ import annotations

from typing import ClassVar


class UembedError(Exception):
    """Base of the errors a user can fix; the message names the field, file or value."""

    kind: ClassVar[str] = "error"
    status: ClassVar[int] = 400
    headers: ClassVar[dict[str, str]] = {}
    description: ClassVar[str] = "A request the service cannot take"


# --- training and specs (the CLI's errors; 400 if they ever reach HTTP) --------------------
class SpecError(UembedError):
    """A feature spec or a model configuration is inconsistent."""

    kind = "spec"


class DataError(UembedError):
    """Input data is missing, empty, or does not match the spec."""

    kind = "data"


class BudgetError(UembedError):
    """An embedding budget cannot be met (too small for the features, or not positive)."""

    kind = "budget"


# --- bundles and devices --------------------------------------------------------------------
class BundleError(UembedError):
    """A bundle cannot be served; the message names the file and why."""

    kind = "bundle"
    status = 422
    description = "The bundle asked for cannot be served (the message names the file and why)"


class DeviceError(UembedError):
    """The CUDA path cannot run here; the message says what is missing."""

    kind = "device"
    status = 503
    description = "The configured device cannot run here"


# --- requests ---------------------------------------------------------------------------------
class ValidationFailed(UembedError):
    """The body does not parse, or does not fit the request schema."""

    kind = "validation"
    status = 422
    description = "The body is not valid JSON or does not fit the schema; `errors` lists each field"


class ExampleError(UembedError):
    """An example does not fit the model's features (a feature name or a value the schema cannot state)."""

    kind = "example"
    status = 422
    description = (
        "An example does not fit the model's features; the message names examples[i].feature "
        "(context.feature or candidates[i].feature in a ranking request)"
    )


class TensorError(UembedError):
    """An Open Inference Protocol request whose tensors do not fit the model's inputs."""

    kind = "tensor"
    status = 422
    description = (
        "An Open Inference Protocol input tensor does not fit the model (its name, datatype, shape or data; "
        "the message names the tensor), or the binary-data framing is malformed"
    )


class InvalidName(UembedError):
    """A model or version name that may not become a path."""

    kind = "invalid_name"
    status = 422
    description = "A model or version name breaks the naming rule"


class Unauthorized(UembedError):
    kind = "unauthorized"
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}
    description = "A valid bearer token is required"


class NotFound(UembedError):
    kind = "not_found"
    status = 404
    description = "No such model, or no such bundle in the store, or the route is switched off"


class Unsupported(UembedError):
    """A route or method of a protocol this service does not implement (the Open Inference Protocol's optional
    parts: the model repository, shared memory, tracing, ...)."""

    kind = "unsupported"
    status = 501
    description = "A protocol route or method this service does not implement"


class Conflict(UembedError):
    """A change the model's current state does not allow: unloading its primary version, or a version its routing
    rule uses."""

    kind = "conflict"
    status = 409
    description = "The model's state does not allow it (the primary version, or a version the routing rule uses)"


class RequestTimeout(UembedError):
    kind = "request_timeout"
    status = 408
    headers = {"Connection": "close"}
    description = "The body did not arrive within body_timeout_ms"


class BodyTooLarge(UembedError):
    kind = "body_too_large"
    status = 413
    headers = {"Connection": "close"}
    description = "The body is over max_body_bytes"


class Overloaded(UembedError):
    kind = "overloaded"
    status = 503
    headers = {"Retry-After": "1"}
    description = "Too many examples waiting, or shutting down; retry after Retry-After seconds"


class NotReady(UembedError):
    kind = "not_ready"
    status = 503
    headers = {"Retry-After": "1"}
    description = (
        "No model is loaded yet, or its row files are still being checked (row_checks=background), or its rows in "
        "Redis are not published yet (row_source=redis)"
    )


class RowsUnavailable(UembedError):
    """Rows that live only in Redis (``UEMBED_ROW_SOURCE=redis``) could not be read: never served as zeros."""

    kind = "rows_unavailable"
    status = 503
    headers = {"Retry-After": "1"}
    description = (
        "With rows only in Redis (UEMBED_ROW_SOURCE=redis), a batch's rows could not be read: Redis failed or "
        "is failing over, or rows are missing; retry after Retry-After seconds"
    )


class DeadlineExceeded(UembedError):
    kind = "deadline"
    status = 504
    description = "Not scored within request_timeout_ms"


class Internal(UembedError):
    """A failure that is not the client's: the message names only the exception type; the log has the rest."""

    kind = "internal"
    status = 500
    description = "A bug or a failed dependency; the service log has the traceback"


def drop_tracebacks(exc: BaseException) -> None:
    """Clear the tracebacks of ``exc`` and of every exception it chains (causes and contexts), once what a client is
    told is known. An error kept past its ``except`` (a call's outcome, the row a handler renders) holds its
    traceback, whose frames hold the error again, and the request: a reference cycle that the service's rare GC
    passes (``gc_gen0_threshold``) would keep long after the answer. Log the traceback first where it is wanted."""
    seen, chained = set(), [exc]
    while chained:
        exc = chained.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        chained += [exc.__cause__, exc.__context__]


def internal(exc: BaseException) -> UembedError:
    """``exc`` itself if it is in the table, else an :class:`Internal` naming its type."""
    if isinstance(exc, UembedError):
        return exc
    return Internal(f"internal error ({type(exc).__name__}); see the service log")
