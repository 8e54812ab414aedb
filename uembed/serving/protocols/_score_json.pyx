# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""A ``/v1/score`` body read from its JSON straight into one list of values per feature, in one C pass
(``lean_json.py`` has the contract and the fallback: msgspec's decoding into one dict per example).

An example's dict is built only to be read back feature by feature by the canonicaliser; reading the body into
columns skips both, and the canonicaliser's column readers take the lists as a front's columns. The reader takes
the form nearly every client sends: ``{"examples": [...]}``, or a ranking request's ``{"context": {...},
"candidates": [...]}``, with an optional ``model``, ``version`` and ``routing_key`` (ASCII strings or null); every
example (candidate) an object naming the same features (in any order, each once), each value (the context's too) a
string, an integer of at most 18 digits, null, or a list of strings. Strings hold no escape and no control
character; feature names and the three strings are ASCII. Anything else (a float, true or false, an escape, a
feature an example leaves out or names twice, a member this reader does not know, a body that breaks the form rule,
a name past the route's limits, JSON that does not parse) returns None, and the caller decodes the body with
msgspec, as before: so every refusal is the route's own, and where this reader answers, its columns hold exactly
the values msgspec's dicts would (``tests/serving/protocols/test_score_json.py``).
"""

from cpython.list cimport PyList_Append
from cpython.long cimport PyLong_FromLongLong
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcmp, memcpy

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, unsigned int maxchar)
    void* PyUnicode_DATA(object text)

cdef enum:
    MAX_FEATURES = 64  # the features a request may name here (one bit each)
    MAX_DIGITS = 18  # an integer's digits: any such number fits a long long


cdef object NOT_READ = object()  # what read_value answers for a value this reader leaves to msgspec


cdef struct Cursor:
    const unsigned char* data
    Py_ssize_t pos
    Py_ssize_t end


cdef inline void skip_space(Cursor* at) noexcept nogil:
    cdef unsigned char c
    while at.pos < at.end:
        c = at.data[at.pos]
        if c != 32 and c != 10 and c != 13 and c != 9:  # JSON's whitespace: space, \n, \r, \t
            return
        at.pos += 1


cdef inline bint take(Cursor* at, unsigned char wanted) noexcept nogil:
    """Past whitespace, the byte ``wanted``: True and past it, or False."""
    skip_space(at)
    if at.pos < at.end and at.data[at.pos] == wanted:
        at.pos += 1
        return True
    return False


cdef inline Py_ssize_t string_end(Cursor* at, bint* ascii) noexcept nogil:
    """At an opening quote: the position of the closing one (the cursor left after it), with ``ascii`` set when every
    byte between is below 0x80; -1 for an escape, a control character or no closing quote."""
    cdef Py_ssize_t i = at.pos + 1
    cdef unsigned char c
    cdef unsigned char high = 0
    while i < at.end:
        c = at.data[i]
        if c == 34:  # '"'
            at.pos = i + 1
            ascii[0] = high < 0x80
            return i
        if c == 92 or c < 32:  # a backslash, or a control character JSON does not allow in a string
            return -1
        high |= c
        i += 1
    return -1


cdef inline object ascii_text(const unsigned char* data, Py_ssize_t size):
    """A str of ``size`` ASCII bytes, copied into a new compact string (no codec's checks: they were made)."""
    cdef object text = PyUnicode_New(size, 127)
    memcpy(PyUnicode_DATA(text), data, size)
    return text


cdef object read_string(Cursor* at):
    """A JSON string at the cursor as a str (UTF-8 checked as msgspec checks it); None where this reader leaves it."""
    cdef Py_ssize_t start = at.pos + 1, stop
    cdef bint ascii = False
    if at.pos >= at.end or at.data[at.pos] != 34:
        return None
    stop = string_end(at, &ascii)
    if stop < 0:
        return None
    if ascii:
        return ascii_text(at.data + start, stop - start)
    try:
        return PyUnicode_DecodeUTF8(<const char*>at.data + start, stop - start, NULL)
    except UnicodeDecodeError:  # not UTF-8 (or a surrogate's bytes): msgspec's error, by the fallback
        return None


cdef inline bint ascii_name(Cursor* at, Py_ssize_t limit, Py_ssize_t* start, Py_ssize_t* stop) noexcept nogil:
    """An ASCII string of at most ``limit`` bytes at the cursor (past whitespace): its bounds, the cursor after it."""
    cdef bint ascii = False
    skip_space(at)
    if at.pos >= at.end or at.data[at.pos] != 34:
        return False
    start[0] = at.pos + 1
    stop[0] = string_end(at, &ascii)
    return stop[0] >= 0 and ascii and stop[0] - start[0] <= limit


cdef object read_integer(Cursor* at):
    """A JSON integer of at most MAX_DIGITS digits as an int; None for anything else (a float, a longer number,
    a leading zero JSON does not allow)."""
    cdef Py_ssize_t i = at.pos, digits = 0
    cdef bint negative = False
    cdef long long number = 0
    cdef unsigned char c
    if at.data[i] == 45:  # '-'
        negative = True
        i += 1
    while i < at.end and 48 <= at.data[i] <= 57:
        if digits == MAX_DIGITS:  # before the product: one more digit may not fit
            return None
        number = number * 10 + (at.data[i] - 48)
        digits += 1
        i += 1
    if digits == 0 or (digits > 1 and at.data[i - digits] == 48):  # no digit, or a leading zero
        return None
    if i < at.end:
        c = at.data[i]
        if c == 46 or c == 101 or c == 69:  # '.', 'e', 'E': a float
            return None
    at.pos = i
    return PyLong_FromLongLong(-number if negative else number)


cdef object read_value(Cursor* at):
    """One feature's value at the cursor (past whitespace): a str, an int, None (JSON's null) or a list of strs;
    NOT_READ where this reader leaves it."""
    cdef unsigned char c
    cdef object item
    cdef list items
    skip_space(at)
    if at.pos >= at.end:
        return NOT_READ
    c = at.data[at.pos]
    if c == 34:
        item = read_string(at)
        return NOT_READ if item is None else item
    if c == 45 or 48 <= c <= 57:
        item = read_integer(at)
        return NOT_READ if item is None else item
    if c == 110:  # 'n'
        if at.end - at.pos >= 4 and memcmp(at.data + at.pos, b"null", 4) == 0:
            at.pos += 4
            return None
        return NOT_READ
    if c == 91:  # '['
        at.pos += 1
        items = []
        if take(at, 93):  # ']'
            return items
        while True:
            skip_space(at)
            item = read_string(at)
            if item is None:
                return NOT_READ
            items.append(item)
            if take(at, 93):
                return items
            if not take(at, 44):  # ','
                return NOT_READ
    return NOT_READ


cdef class Columns:
    """The features named so far (in the first example's order), their bytes for matching the next examples' keys,
    and a list of values each."""

    cdef list names
    cdef list lists
    cdef bytes joined  # every name's bytes end to end
    cdef Py_ssize_t[MAX_FEATURES + 1] offsets

    def __cinit__(self):
        self.names, self.lists, self.joined = [], [], b""
        self.offsets[0] = 0


cdef inline Py_ssize_t known_feature(Columns columns, const unsigned char* name, Py_ssize_t length, Py_ssize_t hint):
    """The index of the feature ``name`` among those named so far (``hint``, the same place in the first example,
    tried first); -1 where it is not one of them."""
    cdef Py_ssize_t i, count = len(columns.names)
    cdef const char* joined = columns.joined
    if hint < count and columns.offsets[hint + 1] - columns.offsets[hint] == length \
            and memcmp(joined + columns.offsets[hint], name, length) == 0:
        return hint
    for i in range(count):
        if columns.offsets[i + 1] - columns.offsets[i] == length and memcmp(joined + columns.offsets[i], name, length) == 0:
            return i
    return -1


cdef bint read_examples(Cursor* at, Columns columns, Py_ssize_t max_examples, Py_ssize_t max_name, Py_ssize_t* count) except -1:
    """The examples' array at the cursor into ``columns``; False where this reader leaves the body."""
    cdef Py_ssize_t start = 0, stop = 0, feature, position, examples = 0, named
    cdef unsigned long long seen, every = 0
    cdef object value
    if not take(at, 91):  # '['
        return False
    if take(at, 93):  # an empty list: the route refuses it
        return False
    while True:
        if examples >= max_examples or not take(at, 123):  # '{'
            return False
        seen, position = 0, 0
        if not take(at, 125):  # '}': an example naming nothing (then every example names nothing)
            while True:
                if not ascii_name(at, max_name, &start, &stop) or not take(at, 58):  # ':'
                    return False
                feature = known_feature(columns, at.data + start, stop - start, position)
                if feature < 0:
                    named = len(columns.names)
                    if examples > 0 or named >= MAX_FEATURES:  # a feature the first example did not name
                        return False
                    columns.names.append(ascii_text(at.data + start, stop - start))
                    columns.lists.append([])
                    columns.joined += (<const char*>at.data)[start:stop]
                    columns.offsets[named + 1] = columns.offsets[named] + (stop - start)
                    feature = named
                if seen & (1ULL << feature):  # named twice in one example
                    return False
                seen |= 1ULL << feature
                value = read_value(at)
                if value is NOT_READ:
                    return False
                PyList_Append(columns.lists[feature], value)
                position += 1
                if take(at, 125):
                    break
                if not take(at, 44):
                    return False
        if examples == 0:
            every = seen
        elif seen != every:  # an example that leaves out a feature another names
            return False
        examples += 1
        if take(at, 93):
            count[0] = examples
            return True
        if not take(at, 44):
            return False


cdef object read_context(Cursor* at, Py_ssize_t max_name):
    """A ranking request's context at the cursor (an object of feature -> value) as a dict; NOT_READ where this reader
    leaves it (a feature named twice among them)."""
    cdef Py_ssize_t start = 0, stop = 0
    cdef dict context = {}
    cdef object name, value
    if not take(at, 123):  # '{' (null, the route refuses it, among the rest)
        return NOT_READ
    if take(at, 125):
        return context
    while True:
        if not ascii_name(at, max_name, &start, &stop) or not take(at, 58):
            return NOT_READ
        name = ascii_text(at.data + start, stop - start)
        if name in context:
            return NOT_READ
        value = read_value(at)
        if value is NOT_READ:
            return NOT_READ
        context[name] = value
        if take(at, 125):
            return context
        if not take(at, 44):
            return NOT_READ


def score_columns(body, Py_ssize_t max_examples, Py_ssize_t max_name, Py_ssize_t max_routing_key):
    """``(columns, count, model, version, routing_key, context, ranking)`` of a score body (``columns``: feature -> its
    value in each of the ``count`` examples, or candidates where ``ranking``; ``context``: a ranking request's dict,
    else None), or None where the caller decodes it with msgspec (module docstring). ``max_name``: the longest
    feature name, model or version (characters); ``max_routing_key``: the longest routing key."""
    cdef const unsigned char[::1] view = body
    cdef Cursor at
    cdef Columns columns = Columns()
    cdef Py_ssize_t start = 0, stop = 0, length, count = 0
    cdef bint have_examples = False, ranking = False
    cdef object context = None
    cdef list strings = [None, None, None]  # model, version, routing_key
    cdef int given = 0, which
    at.data = &view[0] if view.shape[0] else NULL
    at.pos, at.end = 0, view.shape[0]
    if not take(&at, 123):
        return None
    if take(&at, 125):  # {}: the route refuses it
        return None
    while True:
        if not ascii_name(&at, 16, &start, &stop) or not take(&at, 58):
            return None
        length = stop - start
        if (length == 8 and memcmp(at.data + start, b"examples", 8) == 0) \
                or (length == 10 and memcmp(at.data + start, b"candidates", 10) == 0):
            if have_examples or not read_examples(&at, columns, max_examples, max_name, &count):
                return None  # both forms, or one given twice: the route names the rule broken
            have_examples, ranking = True, length == 10
        elif length == 7 and memcmp(at.data + start, b"context", 7) == 0:
            if context is not None:
                return None
            context = read_context(&at, max_name)
            if context is NOT_READ:
                return None
        else:
            if length == 5 and memcmp(at.data + start, b"model", 5) == 0:
                which = 0
            elif length == 7 and memcmp(at.data + start, b"version", 7) == 0:
                which = 1
            elif length == 11 and memcmp(at.data + start, b"routing_key", 11) == 0:
                which = 2
            else:  # an unknown member: msgspec's decoding, and the route's refusal
                return None
            if given & (1 << which):
                return None
            given |= 1 << which
            skip_space(&at)
            if at.pos < at.end and at.data[at.pos] == 110:  # null
                if at.end - at.pos < 4 or memcmp(at.data + at.pos, b"null", 4) != 0:
                    return None
                at.pos += 4
            else:
                if not ascii_name(&at, max_routing_key if which == 2 else max_name, &start, &stop):
                    return None
                strings[which] = ascii_text(at.data + start, stop - start)
        if take(&at, 125):
            break
        if not take(&at, 44):
            return None
    skip_space(&at)
    if at.pos != at.end or not have_examples or (context is not None and not ranking):
        return None  # the form rule: examples alone, or candidates with an optional context
    return dict(zip(columns.names, columns.lists)), count, strings[0], strings[1], strings[2], context, ranking
