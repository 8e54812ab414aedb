"""What a request's bytes must be before a parser reads them: JSON in UTF-8, nested at most MAX_JSON_DEPTH deep,
header numbers in ASCII digits, and a compressed body (the Open Inference Protocol's) within the body limit once
decompressed.

The parsers would take more, or fail in ways that are not the client's error: the stdlib's ``json.loads`` (FastAPI's)
reads UTF-16 and UTF-32 and skips a byte-order mark, though the service promises UTF-8; the parsers recurse once per
level of nesting, so a body nested about a thousand deep ends in a RecursionError (500) instead of a 422; and
``str.isdigit`` takes digits such as "²" that ``int`` refuses, while ``int`` refuses more than 4,300 digits.
"""

from __future__ import annotations

import codecs
import re
import zlib

import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from uembed.contract.errors import BodyTooLarge, ValidationFailed

# A score request nests 4 deep, an admin call's body 3: the limit is far above any body the service takes.
MAX_JSON_DEPTH = 32
BYTE_ORDER_MARKS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # UTF-32's begin with UTF-16's
STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
NESTING = np.zeros(256, dtype=np.int8)
NESTING[list(b"[{")] = 1
NESTING[list(b"]}")] = -1
HEADER_NUMBER = re.compile(r"[0-9]{1,18}")  # a byte count; 18 digits stay within an int64


def json_depth(body: bytes) -> int:
    """How deep the lists and objects of a JSON body nest (of a body that is not JSON: a guess that may be high),
    without parsing it: brackets in strings removed, the others counted in order."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot nest past the limit: not worth measuring
    brackets = STRINGS.sub(b"", body).translate(None, NOT_BRACKETS)
    return int(np.cumsum(NESTING[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int64).max(initial=0))


def json_body_problem(body: bytes) -> str | None:
    """Why a JSON body is refused before it is parsed (a 422), or None."""
    if body.startswith(BYTE_ORDER_MARKS):
        return "not UTF-8 JSON: it starts with a byte-order mark (UTF-16, or UTF-8 with a BOM); send UTF-8 without one"
    if b"\x00" in body:  # JSON text has no NUL byte; UTF-16 and UTF-32 text has them
        return "not UTF-8 JSON: it holds NUL bytes (UTF-16 or UTF-32?); send UTF-8"
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        return f"lists and objects nested {depth} deep; at most {MAX_JSON_DEPTH}"
    return None


def header_number(value: str) -> int | None:
    """A header's non-negative integer in ASCII digits (at most 18 of them), or None."""
    return int(value) if HEADER_NUMBER.fullmatch(value) else None


class CheckedBodyRoute(APIRoute):
    """A route whose body is refused (422 naming ``body``) before FastAPI parses it when it is not UTF-8 or nests
    too deep (:func:`json_body_problem`): FastAPI's ``json.loads`` would read UTF-16, and recurse."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            body = await request.body() if request.method in ("POST", "PUT", "PATCH") else b""  # kept on the request
            problem = json_body_problem(body) if body else None
            if problem:
                raise RequestValidationError([{"type": "body_invalid", "loc": ("body",), "msg": problem}])
            return await handler(request)

        return checked


# Content-Encoding -> zlib's wbits: gzip's header, or zlib's (RFC 1950, what "deflate" means; raw deflate is tried if
# the header is not there, as some clients send that).
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
DECOMPRESS_CHUNK = 2**16


def decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """A ``Content-Encoding: gzip|deflate`` body, decompressed a chunk at a time and refused (413) once it is over
    ``limit`` bytes, so a small body that inflates to gigabytes costs no more than the limit; an encoding not
    accepted, or a body that is not what it says, is a 422 naming it."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ENCODINGS:
        raise ValidationFailed(f"Content-Encoding: {encoding[:40]!r} is not accepted; send gzip, deflate or identity")
    for wbits in (ENCODINGS[encoding], -zlib.MAX_WBITS) if encoding == "deflate" else (ENCODINGS[encoding],):
        try:
            return inflate(body, wbits, limit)
        except zlib.error as exc:
            problem = str(exc)
    raise ValidationFailed(f"body: not valid {encoding} data ({problem})")


def inflate(body: bytes, wbits: int, limit: int) -> bytes:
    """The data of every member of a compressed body (gzip allows several, RFC 1952), at most ``limit`` bytes."""
    parts, size = [], 0
    pending = body
    while True:
        inflater = zlib.decompressobj(wbits)
        while pending or not inflater.eof:
            part = inflater.decompress(pending, DECOMPRESS_CHUNK)
            pending = inflater.unconsumed_tail
            size += len(part)
            if size > limit:
                raise BodyTooLarge(f"body: over the limit of {limit} bytes once decompressed")
            parts.append(part)
            if not part and not pending:
                break  # the data ended before its stream did
        if not inflater.eof:
            raise zlib.error("the compressed data is cut short")
        pending = inflater.unused_data
        if not pending:
            return b"".join(parts)
        if wbits != ENCODINGS["gzip"]:
            raise zlib.error(f"{len(pending)} bytes after the end of the compressed data")
