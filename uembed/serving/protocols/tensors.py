"""An Open Inference Protocol tensor's elements as Python values (``uembed/serving/protocols/oip.py`` says what each
datatype and shape may hold): from JSON ``data`` (flat or nested) or binary data (each BYTES element a 4-byte
little-endian length and the bytes), each checked, with errors that name the tensor and its element.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import partial

import numpy as np

from uembed.contract.errors import TensorError
from uembed.contract.features import FeatureKind, FeatureSpec
from uembed.contract.hashing import compiled_extension

# Little-endian element types of the fixed-size datatypes; BYTES elements are length-prefixed.
FIXED_SIZE = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
FLOATS = frozenset({"FP32", "FP64"})
# What a JSON (or gRPC typed) element of each datatype may be; bool is not an int here.
ELEMENT_TYPES = {"BYTES": (str,), "INT32": (int,), "INT64": (int,), "FP32": (int, float), "FP64": (int, float)}
ACCEPTED = {
    FeatureKind.CATEGORICAL: ("BYTES", "INT64", "INT32"),
    FeatureKind.NUMERIC: ("FP32", "FP64", "INT64", "INT32", "BYTES"),
    FeatureKind.MULTIVALENT: ("BYTES",),
}
BYTES_LENGTH = struct.Struct("<I")


@dataclass
class InputTensor:
    """One input as a transport read it: ``data`` is a JSON-like list (flat or nested, row-major) or raw bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: list | bytes


def bytes_elements(name: str, data: bytes, limit: int | None = None) -> list[bytes]:
    """A serialised BYTES tensor's elements (its first ``limit``): each a 4-byte little-endian length, then that many
    bytes. A tensor whose framing is broken, or only its first elements (a routing key), is read by
    :func:`checked_elements`, which names the element at fault."""
    if limit is not None:
        return checked_elements(name, data, limit)
    extension = compiled_extension()
    if extension is not None:  # one C pass, no Python step per element
        elements = extension.length_prefixed(data, False)
    else:
        if type(data) is not bytes:  # a memoryview or bytearray: its slices would not be bytes
            data = bytes(data)
        elements = frames(data, data)
    return checked_elements(name, data) if elements is None else elements


def text_elements(name: str, data: bytes) -> list[str]:
    """A serialised BYTES tensor's elements as UTF-8 text. ASCII (most ids and words, length prefixes under 128
    included) is decoded once, the elements sliced from it; otherwise each element is decoded."""
    extension = compiled_extension()
    if extension is not None:  # one C pass, each element decoded as it is read
        try:
            elements = extension.length_prefixed(data, True)
        except UnicodeDecodeError:  # an element that is not UTF-8: named below
            elements = None
        return texts(name, bytes_elements(name, data)) if elements is None else elements
    if type(data) is not bytes:
        data = bytes(data)
    if not data.isascii():
        return texts(name, bytes_elements(name, data))
    elements = frames(data, data.decode("ascii"))
    return texts(name, checked_elements(name, data)) if elements is None else elements


def frames(data: bytes, source: bytes | str) -> list | None:
    """The elements of a BYTES tensor's framing, sliced from ``source`` (``data`` or, for ASCII, its text) in one
    tight pass (each length says where the next one is, so the pass is sequential); None when it is broken."""
    elements = []
    append, unpack, size = elements.append, BYTES_LENGTH.unpack_from, BYTES_LENGTH.size
    offset, end = 0, len(data)
    try:
        while offset < end:
            start = offset + size
            offset = start + unpack(data, offset)[0]
            append(source[start:offset])
    except struct.error:  # a length cut off at the end
        return None
    # the offsets only grow: the last element is the one that can run past the end
    return None if offset > end else elements


def checked_elements(name: str, data: bytes, limit: int | None = None) -> list[bytes]:
    """:func:`bytes_elements` one element at a time, raising for the first whose framing is broken."""
    elements = []
    offset, end = 0, len(data)
    while offset < end and len(elements) != limit:
        where = element_name(name, len(elements))
        if offset + BYTES_LENGTH.size > end:
            raise TensorError(f"{where}: its 4-byte BYTES length is cut off at byte {offset}")
        (length,) = BYTES_LENGTH.unpack_from(data, offset)
        offset += BYTES_LENGTH.size
        if offset + length > end:
            raise TensorError(f"{where}: a BYTES length of {length} bytes, past the end of its data "
                              f"({end - offset} bytes left)")  # fmt: skip
        elements.append(bytes(data[offset : offset + length]))
        offset += length
    return elements


def element_name(name: str, index: int) -> str:
    """How an error names one element of a tensor (the form every error about a value takes)."""
    return f"input {name!r} element {index}"


def texts(name: str, elements: list[bytes]) -> list[str]:
    """BYTES elements decoded as UTF-8, in one C-level pass; only a tensor with an element that is not UTF-8 is
    decoded again one element at a time, to name it."""
    try:
        return list(map(bytes.decode, elements))
    except UnicodeDecodeError:
        return [text(name, index, element) for index, element in enumerate(elements)]


def text(name: str, index: int, element: bytes) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TensorError(f"{element_name(name, index)}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


# A tensor's data nests one list per dimension; rank 2 is the most any input takes, and a few more levels are
# flattened as well (a client that nests [N] data as [[a], [b]]). Deeper is refused before any of it is walked.
MAX_DATA_DEPTH = 4


def flat(name: str, data: list) -> list:
    """Row-major elements of a flat or nested list, in at most MAX_DATA_DEPTH lists, one level at a time (no
    recursion: the depth of a JSON body is the client's)."""
    for _ in range(MAX_DATA_DEPTH - 1):
        if not any(type(item) is list for item in data):
            return data
        data = [element for item in data for element in (item if type(item) is list else (item,))]
    if any(type(item) is list for item in data):
        raise TensorError(f"input {name!r}: data nested in more than {MAX_DATA_DEPTH} lists (one a dimension)")
    return data


def tensor_values(tensor: InputTensor, limit: int | None = None) -> list:
    """The elements of a tensor (its first ``limit``) as Python values: str (BYTES), int or float."""
    name, datatype = tensor.name, tensor.datatype
    if isinstance(tensor.data, list):
        values = flat(name, tensor.data) if limit is None else flat(name, tensor.data)[:limit]
        allowed = ELEMENT_TYPES[datatype]
        for index, value in enumerate(values):
            if type(value) not in allowed:
                raise TensorError(f"{element_name(name, index)}: {json_type(value)}, not a {datatype} value")
        return values
    if datatype == "BYTES":
        if limit is None:
            return text_elements(name, tensor.data)
        return texts(name, bytes_elements(name, tensor.data, limit))
    dtype = FIXED_SIZE[datatype]
    if len(tensor.data) % dtype.itemsize:
        raise TensorError(f"input {name!r}: {len(tensor.data)} bytes of data are not a whole number of {datatype} "
                          f"elements ({dtype.itemsize} bytes each)")  # fmt: skip
    count = len(tensor.data) // dtype.itemsize
    return np.frombuffer(tensor.data, dtype=dtype, count=count if limit is None else min(limit, count)).tolist()


def json_type(value: object) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", type(None): "null",
            dict: "an object", list: "a list"}.get(type(value), type(value).__name__)  # fmt: skip


def check_shape(tensor: InputTensor, spec: FeatureSpec) -> None:
    shape = tensor.shape
    if len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0:  # [N]: most tensors
        return
    if not shape or len(shape) > 2 or any(type(d) is not int or d < 0 for d in shape):
        raise TensorError(f"input {tensor.name!r}: shape {shape} is not [N] or [N, {'W' if spec.multivalent else '1'}] "
                          "(N, the batch, first)")  # fmt: skip
    if len(shape) == 2 and shape[1] != 1 and not spec.multivalent:
        raise TensorError(f"input {tensor.name!r}: shape {shape}: feature {spec.name} takes one value per example, "
                          "shape [N] or [N, 1]")  # fmt: skip


def value_name(tensor: InputTensor, example: int) -> str:
    """How an error names one example's value in a tensor: its element, or its row in an [N, W] tensor."""
    if len(tensor.shape) == 2 and tensor.shape[1] != 1:
        return f"input {tensor.name!r} row {example}"
    return element_name(tensor.name, example)


def column(tensor: InputTensor, spec: FeatureSpec, values: list) -> list:
    """Per example, the value ``/v1/score`` would be sent for this feature."""
    if spec.multivalent and len(tensor.shape) == 2:
        return multivalent_rows(values, tensor.shape[0], tensor.shape[1])
    if tensor.datatype in FLOATS and any(map(math.isnan, values)):  # a C-level pass: most columns have no NaN
        return [None if math.isnan(value) else value for value in values]
    return values


def multivalent_rows(values: list, count: int, width: int) -> list[list]:
    """An [N, W] tensor's rows as lists of values, the padding ("") left out (in one compiled pass, else by C-level
    maps: slices, then each row's values filtered by truth, which only "" fails: the elements are strings)."""
    extension = compiled_extension()
    if extension is not None and type(values) is list:
        return extension.rows_without_padding(values, count, width)
    if width == 0:  # an [N, 0] tensor: every list empty (a range cannot step by 0)
        return [[] for _ in range(count)]
    rows = map(values.__getitem__, map(slice, range(0, count * width, width), range(width, (count + 1) * width, width)))
    return list(map(list, map(partial(filter, None), rows)))
