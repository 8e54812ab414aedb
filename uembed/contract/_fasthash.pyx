# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The hashing contract's per-value work in compiled code: canonical bytes and xxh3 keys of whole columns.

``uembed/contract/hashing.py`` is the contract and its pure-Python implementation; it calls these functions
instead when this extension is built (and ``UEMBED_PURE_PYTHON`` is not set), and the tests hold both to the same
golden vectors. The common types (None, bool, int, float, str, bytes) are canonicalised here; any other value
goes to ``fallback`` (the contract's ``canonical_bytes``), which also raises its errors. Keys come from
``XXH3_64bits_withSeed`` of the system's libxxhash, on the canonical bytes in place: a string's UTF-8 buffer or
an int's digits in a stack buffer, no bytes object per value.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_CheckExact, PyDict_GetItem
from cpython.exc cimport PyErr_Clear
from cpython.list cimport PyList_CheckExact, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.set cimport PySet_Contains
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check, PyFloat_CheckExact
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport floor, isfinite, isnan
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memcpy

import numpy as np
import xxhash


cdef extern from "xxhash.h":
    ctypedef unsigned long long XXH64_hash_t
    XXH64_hash_t XXH3_64bits_withSeed(const void* data, size_t length, XXH64_hash_t seed) nogil


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    # The same call with its error left to the caller (cleared: the checked path raises it again, naming the value).
    const char* utf8_or_null "PyUnicode_AsUTF8AndSize"(object text, Py_ssize_t* size) noexcept
    bint PyUnicode_CheckExact(object value)
    bint PyLong_CheckExact(object value)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)
    bint PyUnicode_Check(object value)
    bint PyBool_Check(object value)
    long long PyLong_AsLongLongAndOverflow(object value, int* overflow) except? -1
    char* PyOS_double_to_string(double value, char format_code, int precision, int flags, int* kind) except NULL
    int Py_DTSF_ADD_DOT_0


# Room for any long long's digits and any float's repr (at most 24 characters), with the terminating NUL.
cdef enum:
    SCRATCH = 48
# Integral floats whose magnitude is below 2**63 convert to long long exactly; larger ones take Python's int.
cdef double LONG_LIMIT = 9223372036854775808.0
cdef uint64_t LOW_HALF = 0xFFFFFFFF


@cython.cdivision(True)
cdef inline Py_ssize_t write_decimal(long long number, char* out) noexcept:
    """``number``'s decimal digits (a leading minus when negative, as printf's %lld) at ``out``; their count.
    A few times faster than snprintf, which parses its format each call."""
    cdef char digits[24]
    cdef unsigned long long magnitude = (0ULL - <unsigned long long>number) if number < 0 else <unsigned long long>number
    cdef Py_ssize_t count = 0, length = 0
    while True:
        digits[count] = <char>(48 + magnitude % 10)  # 48: '0'
        count += 1
        magnitude //= 10
        if magnitude == 0:
            break
    if number < 0:
        out[0] = 45  # '-'
        length = 1
    while count > 0:
        count -= 1
        out[length] = digits[count]
        length += 1
    return length


cdef object canonical_view(object value, char* scratch, const char** data, Py_ssize_t* size, object fallback):
    """The canonical bytes of ``value``, in the contract's order of checks (hashing.canonical_bytes): either written
    to ``data``/``size`` (pointing into ``scratch``, a constant or the value's own buffer) and None returned, or
    returned as a bytes object (the rare cases: ints past 64 bits, integral floats past 2**63, other types)."""
    cdef int overflow = 0
    cdef long long number
    cdef double real
    cdef char* text
    if value is None:
        data[0], size[0] = scratch, 0
        return None
    if PyBool_Check(value):  # before int: bool is an int subclass
        if value:
            data[0] = b"true"
            size[0] = 4
        else:
            data[0] = b"false"
            size[0] = 5
        return None
    if PyLong_Check(value):
        number = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            return str(int(value)).encode()
        data[0], size[0] = scratch, write_decimal(number, scratch)
        return None
    if PyFloat_Check(value):
        real = PyFloat_AS_DOUBLE(value)
        if isnan(real):
            data[0], size[0] = scratch, 0
            return None
        if isfinite(real) and floor(real) == real:
            if -LONG_LIMIT < real < LONG_LIMIT:
                data[0], size[0] = scratch, write_decimal(<long long>real, scratch)
                return None
            return str(int(real)).encode()
        # repr(float) itself: the shortest string that round-trips (float_repr's call)
        text = PyOS_double_to_string(real, c'r', 0, Py_DTSF_ADD_DOT_0, NULL)
        size[0] = snprintf(scratch, SCRATCH, b"%s", text)
        PyMem_Free(text)
        data[0] = scratch
        return None
    if PyUnicode_Check(value):
        data[0] = PyUnicode_AsUTF8AndSize(value, size)  # a lone surrogate raises UnicodeEncodeError, as str.encode
        return None
    if PyBytes_Check(value):
        data[0], size[0] = PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)
        return None
    return fallback(value)


cdef list as_list(object values):
    if type(values) is list:
        return <list>values
    if isinstance(values, np.ndarray):
        return values.tolist()  # numpy scalars to Python's: their canonical bytes are the same (int(), float())
    return list(values)


def canonical_column(values, fallback):
    """Canonical bytes of each value (a list, tuple, numpy array or other iterable of scalars): a list of bytes."""
    cdef list items = as_list(values)
    cdef Py_ssize_t i, n = len(items), size = 0
    cdef const char* data = NULL
    cdef char scratch[SCRATCH]
    cdef list out = [None] * n
    cdef object value, owned
    for i in range(n):
        value = items[i]
        if PyBytes_Check(value):
            out[i] = value
            continue
        owned = canonical_view(value, scratch, &data, &size, fallback)
        out[i] = owned if owned is not None else PyBytes_FromStringAndSize(data, size)
    return out


def hash_values(values, uint64_t seed, fallback):
    """Keys (uint64) of values (as :func:`canonical_column` takes them) under one seed: canonicalise and hash in one
    pass, with no bytes object per value of the common types."""
    cdef list items = as_list(values)
    cdef Py_ssize_t i, n = len(items), size = 0
    cdef const char* data = NULL
    cdef char scratch[SCRATCH]
    keys = np.empty(n, dtype=np.uint64)
    cdef uint64_t[::1] out = keys
    cdef object owned
    for i in range(n):
        owned = canonical_view(items[i], scratch, &data, &size, fallback)
        if owned is not None:
            data, size = PyBytes_AS_STRING(owned), PyBytes_GET_SIZE(owned)
        out[i] = XXH3_64bits_withSeed(data, <size_t>size, seed)
    return keys


cdef inline uint64_t bytes_key(object value, uint64_t seed) except? 0:
    if not PyBytes_Check(value):  # another buffer (bytearray, memoryview), or an error: as the pure path does it
        return xxhash.xxh3_64_intdigest(value, seed=seed)
    return XXH3_64bits_withSeed(PyBytes_AS_STRING(value), <size_t>PyBytes_GET_SIZE(value), seed)


def hash_bytes(values, uint64_t seed):
    """Keys (uint64) of already-canonical byte strings under one seed (a sequence or other iterable of bytes)."""
    cdef list items = as_list(values)
    cdef Py_ssize_t i, n = len(items)
    keys = np.empty(n, dtype=np.uint64)
    cdef uint64_t[::1] out = keys
    for i in range(n):
        out[i] = bytes_key(items[i], seed)
    return keys


def hash_bytes_columns(columns, seeds):
    """Keys uint64 [len(columns), n] of columns of n canonical byte strings each, column i under ``seeds[i]``."""
    cdef list column_list = as_list(columns)
    cdef Py_ssize_t c, i, count = len(column_list), n = len(column_list[0]) if count else 0
    cdef list items
    cdef uint64_t seed
    for items_object in column_list:
        if len(items_object) != n:
            raise ValueError(f"columns of different lengths: {[len(column) for column in column_list]}")
    if len(seeds) != count:
        raise ValueError(f"{count} columns but {len(seeds)} seeds")
    keys = np.empty((count, n), dtype=np.uint64)
    cdef uint64_t[:, ::1] out = keys
    for c in range(count):
        items = as_list(column_list[c])
        seed = seeds[c]
        for i in range(n):
            out[c, i] = bytes_key(items[i], seed)
    return keys


@cython.cdivision(True)
def hash_bytes_rows(columns, seeds, const uint64_t[:, ::1] table_rows):
    """``hash_bytes_columns``' keys uint64 [F, n] and, from the same pass, each key's row in its hashed table, int64
    [F, n]: key % ``table_rows[f, 0]`` (``hashing.rows_of``)."""
    cdef Py_ssize_t c, i, count, n
    cdef uint64_t size
    keys = hash_bytes_columns(columns, seeds)
    count, n = keys.shape[0], keys.shape[1]
    if table_rows.shape[0] != count or table_rows.shape[1] != 1:
        raise ValueError(f"{count} columns but table rows of shape ({table_rows.shape[0]}, {table_rows.shape[1]})")
    rows = np.empty((count, n), dtype=np.int64)
    cdef const uint64_t[:, ::1] key_of = keys
    cdef long long[:, ::1] row_of = rows
    for c in range(count):
        size = table_rows[c, 0]
        if size == 0:
            raise ValueError("a table needs at least one row, got 0")
        for i in range(n):
            row_of[c, i] = <long long>(key_of[c, i] % size)
    return keys, rows


@cython.cdivision(True)
def filters_contain(const unsigned char[::1] bits, const uint64_t[::1] offsets, const uint64_t[::1] sizes,
                    const uint64_t[:, ::1] keys, int probes):
    """Bloom filters asked at once (``uembed/contract/known.py``'s KnownSets): bool [F, n], key [f, i] against the
    filter whose ``sizes[f]`` bits start at bit ``offsets[f]`` of ``bits``; probe p of a key is bit
    ``(low + p * high) % size`` (its 32-bit halves), as the numpy path computes it."""
    cdef Py_ssize_t f, i, count = keys.shape[0], n = keys.shape[1]
    cdef uint64_t key, position, step, size, offset
    cdef int probe
    if offsets.shape[0] != count or sizes.shape[0] != count:
        raise ValueError(f"{count} rows of keys for {offsets.shape[0]} filters")
    known = np.ones((count, n), dtype=np.uint8)
    cdef unsigned char[:, ::1] out = known
    for f in range(count):
        size, offset = sizes[f], offsets[f]
        if (offset + size + 7) // 8 > <uint64_t>bits.shape[0]:
            raise ValueError(f"filter {f} runs past the end of the bits")
        for i in range(n):
            key = keys[f, i]
            # (low + p * high) % size, probe after probe, from two remainders: a division costs more than the rest
            position, step = (key & LOW_HALF) % size, (key >> 32) % size
            for probe in range(probes):
                if not (bits[(position + offset) >> 3] >> ((position + offset) & 7)) & 1:
                    out[f, i] = 0
                    break
                position += step
                if position >= size:
                    position -= size
    return known.view(bool)


@cython.cdivision(True)
def filters_unseen(const unsigned char[::1] bits, const uint64_t[::1] offsets, const uint64_t[::1] sizes,
                   const uint64_t[:, ::1] keys, const Py_ssize_t[::1] which, const uint64_t[::1] missing, int probes):
    """How many of each asked row's keys no filter holds, the missing value's key never counted: int64 [K], for row
    ``which[k]`` of ``keys`` against filter k and ``missing[k]`` (``filters_contain``'s probes, counted in the same
    pass rather than as a bool array and three more over it)."""
    cdef Py_ssize_t k, f, i, count = which.shape[0], n = keys.shape[1]
    cdef uint64_t key, position, step, size, offset
    cdef int probe
    cdef long long unseen
    if offsets.shape[0] != count or sizes.shape[0] != count or missing.shape[0] != count:
        raise ValueError(f"{count} rows asked for {offsets.shape[0]} filters and {missing.shape[0]} missing keys")
    counts = np.zeros(count, dtype=np.int64)
    cdef long long[::1] out = counts
    for k in range(count):
        f = which[k]
        if f < 0 or f >= keys.shape[0]:
            raise IndexError(f"row {f} of {keys.shape[0]} rows of keys")
        size, offset = sizes[k], offsets[k]
        if size == 0 or (offset + size + 7) // 8 > <uint64_t>bits.shape[0]:
            raise ValueError(f"filter {k} runs past the end of the bits")
        unseen = 0
        for i in range(n):
            key = keys[f, i]
            if key == missing[k]:
                continue
            position, step = (key & LOW_HALF) % size, (key >> 32) % size
            for probe in range(probes):
                if not (bits[(position + offset) >> 3] >> ((position + offset) & 7)) & 1:
                    unseen += 1
                    break
                position += step
                if position >= size:
                    position -= size
        out[k] = unseen
    return counts


def length_prefixed(data, bint text):
    """The elements of a buffer of length-prefixed values (each a 4-byte little-endian length, then that many bytes:
    the Open Inference Protocol's serialised BYTES tensors): bytes, or (``text``) str decoded as UTF-8, which raises
    UnicodeDecodeError for an element that is not. None when the framing is broken (a length cut off at the end, or
    one past it): the caller's checked path names the element."""
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t offset = 0, end = view.shape[0], length
    cdef const char* base
    cdef list out = []
    if end == 0:
        return out
    base = <const char*>&view[0]
    while offset < end:
        if end - offset < 4:
            return None
        length = (<Py_ssize_t>view[offset] | (<Py_ssize_t>view[offset + 1] << 8) | (<Py_ssize_t>view[offset + 2] << 16)
                  | (<Py_ssize_t>view[offset + 3] << 24))
        offset += 4
        if length > end - offset:
            return None
        if text:
            out.append(PyUnicode_DecodeUTF8(base + offset, length, NULL))
        else:
            out.append(PyBytes_FromStringAndSize(base + offset, length))
        offset += length
    return out


# The canonicalise stage's plain requests (a list of dicts, ``uembed/serving/pipeline/canonical.py``): one feature's
# column read straight from the examples, checked and canonicalised in one pass, for the values that need no more
# than that. A value left out or null is the missing value (an empty list's, for a list feature), as the checked
# path makes it. Anything else (a value of another type, past a limit, or one the contract drops) answers None, and
# the caller takes its checked path, which gives the same bytes or names the value at fault.

cdef object plain_text_bytes(object value, Py_ssize_t max_chars, char* scratch):
    """Canonical bytes of a str of at most ``max_chars`` characters (negative: no limit), an int within 64 bits or
    None (the missing value b""); None for anything else, or for a str that is not valid UTF-8 (a lone surrogate)."""
    cdef Py_ssize_t size = 0
    cdef const char* data
    cdef int overflow = 0
    cdef long long number
    if value is None:
        return b""
    if PyUnicode_CheckExact(value):
        if 0 <= max_chars < PyUnicode_GET_LENGTH(value):
            return None
        data = utf8_or_null(value, &size)
        if data == NULL:
            PyErr_Clear()
            return None
        return PyBytes_FromStringAndSize(data, size)
    if PyLong_CheckExact(value):  # exact: not a bool
        number = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            return None
        return PyBytes_FromStringAndSize(scratch, write_decimal(number, scratch))
    return None


cdef inline PyObject* example_value(list examples, Py_ssize_t i, str name):
    """Example ``i``'s value of ``name`` (borrowed; None where the example leaves it out, as dict.get reads it), or
    NULL where example ``i`` is not a dict (or is past the list's end: a key's __eq__ may run Python code that
    shortens it)."""
    cdef PyObject* found
    if i >= PyList_GET_SIZE(examples):
        return NULL
    example = <object>PyList_GET_ITEM(examples, i)
    if not PyDict_CheckExact(example):
        return NULL
    found = PyDict_GetItem(example, name)
    return found if found != NULL else <PyObject*>None


def text_column_of(list examples, str name, Py_ssize_t max_chars, frozenset missing):
    """Canonical bytes of a one-value feature ``name`` in each example (each a dict) when every value is a str of at
    most ``max_chars`` characters (negative: no limit), an int within 64 bits, or null or left out (the missing value
    b""); a value among ``missing`` (the feature's missing markers, canonical) becomes b"" too. None otherwise."""
    cdef Py_ssize_t i, n = len(examples)
    cdef char scratch[SCRATCH]
    cdef PyObject* found
    cdef object encoded
    cdef list out = [None] * n
    cdef bint markers = len(missing) > 0
    for i in range(n):
        found = example_value(examples, i, name)
        if found == NULL:
            return None
        encoded = plain_text_bytes(<object>found, max_chars, scratch)
        if encoded is None:
            return None
        if markers and PySet_Contains(missing, encoded):
            encoded = b""
        out[i] = encoded
    return out


def text_column(list column, Py_ssize_t max_chars, frozenset missing):
    """``text_column_of`` for a column already cut out of the examples (a value per example: a front's columns)."""
    cdef Py_ssize_t i, n = len(column)
    cdef char scratch[SCRATCH]
    cdef object encoded
    cdef list out = [None] * n
    cdef bint markers = len(missing) > 0
    for i in range(n):
        if i >= PyList_GET_SIZE(column):  # shortened meanwhile (a marker's __eq__ may run Python code)
            return None
        encoded = plain_text_bytes(<object>PyList_GET_ITEM(column, i), max_chars, scratch)
        if encoded is None:
            return None
        if markers and PySet_Contains(missing, encoded):
            encoded = b""
        out[i] = encoded
    return out


cdef object plain_items(object value, Py_ssize_t max_chars, Py_ssize_t max_list, frozenset missing, bint markers,
                        tuple empty, char* scratch):
    """Canonical bytes of a list of at most ``max_list`` items (negative: no limit), each a non-empty str of at most
    ``max_chars`` characters that is none of ``missing``, as a tuple; an empty list (or None) is ``empty``. None
    otherwise."""
    cdef Py_ssize_t j, length
    cdef object item, encoded, items
    if value is None:
        return empty
    if not PyList_CheckExact(value):
        return None
    length = PyList_GET_SIZE(value)
    if 0 <= max_list < length:
        return None
    if length == 0:
        return empty
    items = PyTuple_New(length)
    for j in range(length):
        if j >= PyList_GET_SIZE(value):
            return None
        item = <object>PyList_GET_ITEM(value, j)
        if not PyUnicode_CheckExact(item):
            return None
        encoded = plain_text_bytes(item, max_chars, scratch)
        if encoded is None or PyBytes_GET_SIZE(encoded) == 0 or (markers and PySet_Contains(missing, encoded)):
            return None  # the contract drops an empty string or a missing marker from its list: the checked path
        Py_INCREF(encoded)  # PyTuple_SET_ITEM takes the reference
        PyTuple_SET_ITEM(items, j, encoded)
    return items


def list_column_of(list examples, str name, Py_ssize_t max_chars, Py_ssize_t max_list, frozenset missing,
                   tuple empty):
    """Tuples of canonical bytes of a multivalent feature ``name`` in each example (each a dict) when every value is
    a list of at most ``max_list`` items (negative: no limit), each a non-empty str of at most ``max_chars``
    characters that is none of ``missing``; an empty list, null or a value left out is ``empty``. None otherwise."""
    cdef Py_ssize_t i, n = len(examples)
    cdef char scratch[SCRATCH]
    cdef PyObject* found
    cdef object items
    cdef list out = [None] * n
    cdef bint markers = len(missing) > 0
    for i in range(n):
        found = example_value(examples, i, name)
        if found == NULL:
            return None
        items = plain_items(<object>found, max_chars, max_list, missing, markers, empty, scratch)
        if items is None:
            return None
        out[i] = items
    return out


def list_column(list column, Py_ssize_t max_chars, Py_ssize_t max_list, frozenset missing, tuple empty):
    """``list_column_of`` for a column already cut out of the examples (a list per example: a front's columns)."""
    cdef Py_ssize_t i, n = len(column)
    cdef char scratch[SCRATCH]
    cdef object items
    cdef list out = [None] * n
    cdef bint markers = len(missing) > 0
    for i in range(n):
        items = plain_items(<object>PyList_GET_ITEM(column, i), max_chars, max_list, missing, markers, empty, scratch)
        if items is None:
            return None
        out[i] = items
    return out


# A front's tensors in their binary form (the Open Inference Protocol's raw contents: BYTES elements each a 4-byte
# little-endian length and the bytes; INT32 and INT64 little-endian) read straight into canonical columns, with no
# str or int made per value: what ``text_column`` and ``list_column`` give for the values such a tensor decodes to,
# where every element is ASCII (its characters are its bytes) within the limits. Anything else answers None, and the
# caller decodes the tensor's values and takes the readers above, or the checked path that names the value at fault.

cdef inline Py_ssize_t frame_length(const unsigned char* at) noexcept:
    return <Py_ssize_t>(<uint32_t>at[0] | (<uint32_t>at[1] << 8) | (<uint32_t>at[2] << 16) | (<uint32_t>at[3] << 24))


cdef inline Py_ssize_t next_frame(const unsigned char* base, Py_ssize_t end, Py_ssize_t* offset) noexcept:
    """The length of the element whose 4-byte length is at ``offset`` (moved past it, to the element); -1 when the
    length, or the element it announces, runs past ``end``."""
    cdef Py_ssize_t length
    if end - offset[0] < 4:
        return -1
    length = frame_length(base + offset[0])
    offset[0] += 4
    return -1 if length > end - offset[0] else length


cdef inline bint ascii(const unsigned char* at, Py_ssize_t length) noexcept:
    cdef Py_ssize_t i
    cdef unsigned char seen = 0
    for i in range(length):
        seen |= at[i]
    return seen < 128


def framed_count(data):
    """How many elements a serialised BYTES tensor's framing holds; -1 when it is broken (a length cut off at the
    end, or one past it)."""
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t offset = 0, end = view.shape[0], count = 0, length
    cdef const unsigned char* base = &view[0] if end else NULL
    while offset < end:
        length = next_frame(base, end, &offset)
        if length < 0:
            return -1
        offset += length
        count += 1
    return count


cdef object ascii_bytes(const unsigned char* at, Py_ssize_t length, Py_ssize_t max_chars):
    """The element's bytes when it is ASCII of at most ``max_chars`` characters (negative: no limit); else None."""
    if 0 <= max_chars < length or not ascii(at, length):
        return None
    return PyBytes_FromStringAndSize(<const char*>at, length)


def framed_text_column(data, Py_ssize_t count, Py_ssize_t max_chars, frozenset missing):
    """``text_column`` of a serialised BYTES tensor of ``count`` elements (one value per example), read from its
    bytes: each element's own bytes where every element is ASCII of at most ``max_chars`` characters; an element
    among ``missing`` becomes b"". None otherwise, or when the framing does not hold ``count`` elements."""
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t i, offset = 0, end = view.shape[0], length
    cdef const unsigned char* base = &view[0] if end else NULL
    cdef object encoded
    cdef list out = [None] * count
    cdef bint markers = len(missing) > 0
    for i in range(count):
        length = next_frame(base, end, &offset)
        if length < 0:
            return None
        encoded = ascii_bytes(base + offset, length, max_chars) if length else b""
        if encoded is None:
            return None
        if markers and PySet_Contains(missing, encoded):
            encoded = b""
        out[i] = encoded
        offset += length
    return out if offset == end else None


def framed_list_column(data, Py_ssize_t count, Py_ssize_t width, Py_ssize_t max_chars, Py_ssize_t max_list,
                       frozenset missing, tuple empty):
    """``list_column`` of a serialised [``count``, ``width``] BYTES tensor (a list per example, "" its padding), read
    from its bytes: a row's non-empty elements as a tuple (an empty row is ``empty``) where every such element is
    ASCII of at most ``max_chars`` characters and none of ``missing``, and a row holds at most ``max_list`` of them
    (negative: no limit). None otherwise, or when the framing does not hold ``count`` * ``width`` elements."""
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t i, j, kept, offset = 0, end = view.shape[0], length
    cdef const unsigned char* base = &view[0] if end else NULL
    cdef object encoded
    cdef list row, out = [None] * count
    cdef bint markers = len(missing) > 0
    for i in range(count):
        row = []
        for j in range(width):
            length = next_frame(base, end, &offset)
            if length < 0:
                return None
            if length:
                encoded = ascii_bytes(base + offset, length, max_chars)
                if encoded is None or (markers and PySet_Contains(missing, encoded)):
                    return None  # the contract drops a missing marker from its list: the checked path
                row.append(encoded)
                offset += length
        kept = len(row)
        if 0 <= max_list < kept:
            return None
        out[i] = tuple(row) if kept else empty
    return out if offset == end else None


def integer_text_column(data, Py_ssize_t itemsize, Py_ssize_t count, frozenset missing):
    """``text_column`` of an INT32 (``itemsize`` 4) or INT64 (8) tensor of ``count`` little-endian elements, read
    from its bytes: each value's decimal digits; a value among ``missing`` becomes b"". None when the data is not
    ``count`` such elements."""
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t i, k
    cdef uint64_t raw
    cdef long long number
    cdef char scratch[SCRATCH]
    cdef object encoded
    cdef list out
    cdef bint markers = len(missing) > 0
    if itemsize not in (4, 8) or view.shape[0] != count * itemsize:
        return None
    out = [None] * count
    for i in range(count):
        raw = 0
        for k in range(itemsize):
            raw |= (<uint64_t>view[i * itemsize + k]) << (8 * k)
        number = <long long><int64_t>raw if itemsize == 8 else <long long><int32_t><uint32_t>raw
        encoded = PyBytes_FromStringAndSize(scratch, write_decimal(number, scratch))
        if markers and PySet_Contains(missing, encoded):
            encoded = b""
        out[i] = encoded
    return out


def numeric_column(list column, const double[::1] boundaries, tuple buckets, frozenset missing, bint nan_missing):
    """Canonical bytes of a numeric feature's column (``FeatureSpec.bucket``: how many of the ascending ``boundaries``
    are at most the value, in decimal, taken from ``buckets``, the decimals of 0 to len(boundaries)) when every value
    is None, an int within 64 bits or a finite float; None (and NaN, with ``nan_missing``) is the missing value b"",
    and so is a value among ``missing`` (the feature's markers, canonical). None otherwise (a bool, a str, an
    infinity, a NaN the limits refuse, a bigger int, another type): the checked path."""
    cdef Py_ssize_t i, low, high, middle, n = len(column), count = boundaries.shape[0]
    cdef char scratch[SCRATCH]
    cdef const char* data
    cdef Py_ssize_t size
    cdef int overflow = 0
    cdef long long number
    cdef double real
    cdef object value, own
    cdef list out = [None] * n
    cdef bint markers = len(missing) > 0
    if len(buckets) != count + 1:
        raise ValueError(f"{len(buckets)} bucket labels for {count} boundaries")
    for i in range(n):
        if i >= PyList_GET_SIZE(column):  # shortened meanwhile (a marker's __eq__ may run Python code)
            return None
        value = <object>PyList_GET_ITEM(column, i)
        if value is None:
            out[i] = b""
            continue
        if PyFloat_CheckExact(value):
            real = PyFloat_AS_DOUBLE(value)
            if isnan(real) and nan_missing:
                out[i] = b""
                continue
            if not isfinite(real):
                return None
        elif PyLong_CheckExact(value):  # exact: not a bool
            number = PyLong_AsLongLongAndOverflow(value, &overflow)
            if overflow:
                return None
            real = <double>number  # rounded to nearest, ties to even, as float(int)
        else:
            return None
        if markers:
            own = canonical_view(value, scratch, &data, &size, None)
            if own is None:
                own = PyBytes_FromStringAndSize(data, size)
            if PySet_Contains(missing, own):
                out[i] = b""
                continue
        low, high = 0, count  # the first boundary greater than the value (numpy's searchsorted, side="right")
        while low < high:
            middle = (low + high) >> 1
            if boundaries[middle] <= real:
                low = middle + 1
            else:
                high = middle
        out[i] = buckets[low]
    return out


def rows_without_padding(list values, Py_ssize_t count, Py_ssize_t width):
    """An [N, W] tensor's elements (``count`` * ``width`` of them, row after row) as a list per row, the padding left
    out (what is false: the empty str)."""
    cdef Py_ssize_t i, j
    cdef object item
    cdef list row, out = [None] * count
    if len(values) != count * width:
        raise ValueError(f"{len(values)} elements for {count} rows of {width}")
    for i in range(count):
        row = []
        for j in range(i * width, (i + 1) * width):
            item = <object>PyList_GET_ITEM(values, j)
            if item:
                row.append(item)
        out[i] = row
    return out


def list_rows(values, Py_ssize_t width, bint mean, seeds, hashed_rows, known_seed):
    """A multivalent feature's hashed rows and pooling weights over a batch (``ExampleEncoder._list_rows``), in one
    pass: ``values`` holds each example's canonical values (a tuple or list of bytes). Returns int64 rows and float32
    weights [n, width * lookups], lookup after lookup: slot j of an example is its j-th value (a value past ``width``
    is cut), weighted 1 (``mean``: 1 / the values kept), or the missing value's row weighted 0 where its list is
    shorter; row = xxh3(value, seeds[l]) % hashed_rows[l]. And the keys under ``known_seed`` of the values kept
    (uint64, example after example), for the unseen count; none when ``known_seed`` is None."""
    cdef Py_ssize_t n = len(values), lookups = len(seeds), i, j, l, length, kept, count = 0
    cdef Py_ssize_t columns = width * lookups
    cdef bint known = known_seed is not None
    cdef uint64_t known_key_seed = known_seed if known else 0
    cdef object items, item
    cdef float weight
    cdef const char* data
    cdef Py_ssize_t size
    if len(hashed_rows) != lookups:
        raise ValueError(f"{lookups} seeds but {len(hashed_rows)} table sizes")
    # uint64 arrays (the encoder keeps them so) are read as they are: no copies a call
    seed_array = np.ascontiguousarray(seeds, dtype=np.uint64)
    table_array = np.ascontiguousarray(hashed_rows, dtype=np.uint64)
    cdef const uint64_t[::1] seed_of = seed_array
    cdef const uint64_t[::1] rows_in = table_array
    for l in range(lookups):
        if rows_in[l] == 0:
            raise ValueError("a table needs at least one row, got 0")
    cdef long long* missing_row = <long long*>PyMem_Malloc(max(lookups, 1) * sizeof(long long))
    if missing_row == NULL:
        raise MemoryError()
    try:
        for l in range(lookups):
            missing_row[l] = <long long>(XXH3_64bits_withSeed(b"", 0, seed_of[l]) % rows_in[l])
        return _list_rows_into(values, n, width, mean, lookups, seed_of, rows_in, missing_row, known, known_key_seed)
    finally:
        PyMem_Free(missing_row)


cdef object _list_rows_into(object values, Py_ssize_t n, Py_ssize_t width, bint mean, Py_ssize_t lookups,
                            const uint64_t[::1] seed_of, const uint64_t[::1] rows_in, const long long* missing_row,
                            bint known, uint64_t known_key_seed):
    """``list_rows``' pass, its tables' rows for the missing value given."""
    cdef Py_ssize_t i, j, l, length, kept, count = 0
    cdef Py_ssize_t columns = width * lookups
    cdef object items, item
    cdef float weight
    cdef const char* data
    cdef Py_ssize_t size
    rows = np.empty((n, columns), dtype=np.int64)
    weights = np.zeros((n, columns), dtype=np.float32)
    cdef long long[:, ::1] row_out = rows
    cdef float[:, ::1] weight_out = weights
    cdef Py_ssize_t total = 0
    if known:
        for i in range(n):
            length = len(values[i])
            total += length if length < width else width
    known_array = np.empty(total, dtype=np.uint64)
    cdef uint64_t[::1] known_out = known_array
    for i in range(n):
        items = values[i]
        length = len(items)
        kept = length if length < width else width
        weight = <float>(1.0 / kept) if mean and kept > 0 else 1.0
        for j in range(width):
            if j < kept:
                item = items[j]
                if not PyBytes_Check(item):
                    raise TypeError(f"canonical values are bytes, got {type(item).__name__}")
                data, size = PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item)
                for l in range(lookups):
                    row_out[i, l * width + j] = <long long>(XXH3_64bits_withSeed(data, <size_t>size, seed_of[l]) % rows_in[l])
                    weight_out[i, l * width + j] = weight
                if known:
                    if count >= total:  # a sequence whose length changed between the two passes
                        raise ValueError("a list changed while its rows were computed")
                    known_out[count] = XXH3_64bits_withSeed(data, <size_t>size, known_key_seed)
                    count += 1
            else:
                for l in range(lookups):
                    row_out[i, l * width + j] = missing_row[l]
    return rows, weights, known_array
