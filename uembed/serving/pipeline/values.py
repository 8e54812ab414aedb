"""What a feature value may be over the wire (:class:`ValueLimits`), and the bounded caches the encoder keeps of
values it has canonicalised or hashed (:class:`ValueCache`)."""

from __future__ import annotations

import math
import re
import sys
import threading
from dataclasses import dataclass

from uembed.contract.features import FeatureSpec

# A numeric feature's value sent as a string: a finite decimal number, blanks around it allowed, or "" (missing).
# Written as a regular expression so the OpenAPI schema can carry it; float() alone would also take "NaN",
# "inf" and "1_0".
NUMERIC_STRING = r"^(\s*[-+]?([0-9]{1,20}(\.[0-9]{0,20})?|\.[0-9]{1,20})([eE][-+]?[0-9]{1,2})?\s*)?$"


@dataclass(frozen=True)
class ValueLimits:
    """What a feature value may be. ``None`` turns a limit off (the export check, on training values).
    ``require_features``: whether an example must give every feature (else one left out is the missing value)."""

    max_chars: int | None = 256
    max_list: int | None = 256
    finite_only: bool = True
    require_features: bool = False

    def check(self, value: object, spec: FeatureSpec) -> None:
        if isinstance(value, list):
            if not spec.multivalent:
                raise TypeError("takes one value, got a list")
            if self.max_list is not None and len(value) > self.max_list:
                raise ValueError(f"a list of {len(value)} values is longer than the limit of {self.max_list}")
            for item in value:
                self._scalar(item, spec)
        else:
            self._scalar(value, spec)

    def _scalar(self, value: object, spec: FeatureSpec) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, int):
            if spec.kind == "numeric" and abs(value) > sys.float_info.max:
                raise ValueError(f"takes a finite number, got an integer of {value.bit_length()} bits, past a float's range")
            return
        if isinstance(value, str):
            if self.max_chars is not None and len(value) > self.max_chars:
                raise ValueError(f"a value of {len(value)} characters is longer than the limit of {self.max_chars}")
            if self.finite_only and spec.kind == "numeric" and not re.fullmatch(NUMERIC_STRING, value):
                raise TypeError(f"takes a finite number (a number, or a string of decimal digits; null when missing), got {value[:40]!r}")
            return
        if isinstance(value, float):
            if self.finite_only and not math.isfinite(value):
                raise ValueError(f"{value} is not a finite number (send null for a missing value)")
            return
        raise TypeError(f"takes a string, number, boolean or null, got {type(value).__name__}")


NO_LIMITS = ValueLimits(max_chars=None, max_list=None, finite_only=False)


class ValueCache:
    """A dict bounded by an estimate of the bytes its keys and values hold; emptied when full.

    Emptying (rather than evicting one by one) keeps a hit to one dict lookup; the values
    that recur come straight back.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: dict = {}
        self.lock = threading.Lock()

    def get(self, key):
        return self.entries.get(key)

    def put(self, key, value, size: int) -> None:
        if size > self.max_bytes:
            return
        # a large request's values are canonicalised beside the loop, the shadow's on their thread: the count and the
        # emptying stay together (a hit stays one dict lookup, without the lock)
        with self.lock:
            if self.bytes + size > self.max_bytes:
                self.entries.clear()
                self.bytes = 0
            self.entries[key] = value
            self.bytes += size


ENTRY_OVERHEAD = 104  # a dict slot and the tuple around a value, as sys.getsizeof counts them on CPython 3.11


def entry_bytes(key: object, items: tuple) -> int:
    """Bytes of a key (a tuple key: with its items) and a tuple of values, as sys.getsizeof counts them."""
    size = ENTRY_OVERHEAD + sys.getsizeof(key) + sum(map(sys.getsizeof, items))
    if type(key) is tuple:
        size += sum(map(sys.getsizeof, key))
    return size


def cache_key(value: object) -> object:
    """A dict key for values whose canonical form depends on the value alone: str and int (not bool,
    which equals 1), and lists of str. None for anything else (checked and canonicalised every time)."""
    kind = type(value)
    if kind is str or kind is int:
        return value
    if kind is list and all(type(item) is str for item in value):
        return tuple(value)
    return None


def int_bytes(value: int) -> bytes:
    """An int's canonical bytes, as ``canonical_bytes`` gives them (its decimal digits)."""
    return str(value).encode()


def scalar_bytes(value: str | int) -> bytes:
    return value.encode() if type(value) is str else str(value).encode()
