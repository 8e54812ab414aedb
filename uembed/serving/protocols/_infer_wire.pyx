# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The Open Inference Protocol's ``ModelInferRequest`` read from its wire format in one C pass, and its
``ModelInferResponse`` written the same way (``infer_wire.py`` has the contract and the fallback).

The reader takes the form nearly every client sends: the request's three strings, its inputs (name, datatype, shape)
with their data in ``raw_input_contents`` (one entry an input), and the outputs asked for by name. Anything else (a
parameter, typed contents, a field given twice, a field this reader does not know, a wire type or length that does not
add up, text that is not UTF-8, an entry count that differs from the inputs') returns None, and the caller reads the
message with protobuf: so what protobuf refuses is refused by protobuf's own error, and no field is ever dropped here.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t

# Field numbers of grpc_service.proto (tritonclient's service_pb2); wire types 0 (varint) and 2 (length-delimited).
cdef enum:
    VARINT = 0
    DELIMITED = 2
cdef uint64_t MAX_COUNTED = (<uint64_t>1) << 32  # as oip.elements caps its count


cdef struct Cursor:
    const unsigned char* data
    Py_ssize_t pos
    Py_ssize_t end


cdef inline bint read_varint(Cursor* cursor, uint64_t* out) noexcept nogil:
    """False for a varint cut off or longer than ten bytes."""
    cdef uint64_t value = 0
    cdef unsigned char byte
    cdef int shift = 0
    while cursor.pos < cursor.end and shift < 64:
        byte = cursor.data[cursor.pos]
        cursor.pos += 1
        value |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            out[0] = value
            return True
        shift += 7
    return False


cdef inline bint read_tag(Cursor* cursor, uint64_t* out) noexcept nogil:
    """A field's tag, taken only in one byte: every tag read here fits one (field numbers up to 15), and protobuf
    refuses a tag spread over more than five bytes, which a varint read would take."""
    if cursor.pos >= cursor.end or cursor.data[cursor.pos] >= 0x80:
        return False
    out[0] = cursor.data[cursor.pos]
    cursor.pos += 1
    return True


cdef inline bint read_length(Cursor* cursor, Py_ssize_t* start, Py_ssize_t* stop) noexcept nogil:
    """A length-delimited field's bounds; False where the length runs past the enclosing message."""
    cdef uint64_t length
    if not read_varint(cursor, &length) or length > <uint64_t>(cursor.end - cursor.pos):
        return False
    start[0] = cursor.pos
    cursor.pos += <Py_ssize_t>length
    stop[0] = cursor.pos
    return True


cdef object utf8(const unsigned char* data, Py_ssize_t start, Py_ssize_t stop):
    """The text of a string field, or None where it is not UTF-8 (protobuf refuses it: the caller falls back)."""
    try:
        return PyUnicode_DecodeUTF8(<const char*>data + start, stop - start, NULL)
    except UnicodeDecodeError:
        return None


cdef object read_input(const unsigned char* data, Py_ssize_t start, Py_ssize_t stop):
    """An InferInputTensor's (name, datatype, shape), or None where it holds more (parameters, contents) or is odd."""
    cdef Cursor cursor = Cursor(data, start, stop)
    cdef Py_ssize_t begin, end
    cdef uint64_t key, value
    cdef Cursor packed
    name = datatype = None
    shape = []
    while cursor.pos < cursor.end:
        if not read_tag(&cursor, &key):
            return None
        if key == (1 << 3 | DELIMITED) or key == (2 << 3 | DELIMITED):
            if not read_length(&cursor, &begin, &end):
                return None
            text = utf8(data, begin, end)
            if text is None:
                return None
            if key >> 3 == 1:
                if name is not None:
                    return None
                name = text
            else:
                if datatype is not None:
                    return None
                datatype = text
        elif key == (3 << 3 | VARINT):  # a shape element, unpacked
            if not read_varint(&cursor, &value):
                return None
            shape.append(<int64_t>value)
        elif key == (3 << 3 | DELIMITED):  # shape elements, packed
            if not read_length(&cursor, &begin, &end):
                return None
            packed = Cursor(data, begin, end)
            while packed.pos < packed.end:
                if not read_varint(&packed, &value):
                    return None
                shape.append(<int64_t>value)
        else:
            return None
    return ("" if name is None else name, "" if datatype is None else datatype, shape)


cdef object read_output(const unsigned char* data, Py_ssize_t start, Py_ssize_t stop):
    """An InferRequestedOutputTensor's name, or None where it has parameters or is odd."""
    cdef Cursor cursor = Cursor(data, start, stop)
    cdef Py_ssize_t begin, end
    cdef uint64_t key
    name = None
    while cursor.pos < cursor.end:
        if not read_tag(&cursor, &key) or key != (1 << 3 | DELIMITED) or name is not None:
            return None
        if not read_length(&cursor, &begin, &end):
            return None
        name = utf8(data, begin, end)
        if name is None:
            return None
    return "" if name is None else name


cdef uint64_t counted(list shape):
    """What oip.elements counts for one input: the product of a shape of one or two whole numbers (capped), else 0."""
    cdef uint64_t product = 1
    if not 1 <= len(shape) <= 2:
        return 0
    for size in shape:
        if not 0 <= size < MAX_COUNTED:
            return 0
        product *= <uint64_t>size
    return product if product < MAX_COUNTED else MAX_COUNTED


def infer_request(bytes message):
    """``(model_name, model_version, id, inputs, raw, outputs, values)``: inputs as (name, datatype, shape) tuples,
    raw as one bytes an input, outputs as names, values as ``oip.elements`` counts them. None where the message is
    not in the form read here (see the module's text)."""
    cdef const unsigned char* data = <const unsigned char*><const char*>message
    cdef Cursor cursor = Cursor(data, 0, len(message))
    cdef Py_ssize_t begin, end
    cdef uint64_t key, field, values = 0
    strings = [None, None, None]
    inputs, outputs, raw = [], [], []
    while cursor.pos < cursor.end:
        if not read_tag(&cursor, &key) or key & 7 != DELIMITED or not read_length(&cursor, &begin, &end):
            return None
        field = key >> 3
        if 1 <= field <= 3:
            if strings[field - 1] is not None:
                return None
            text = utf8(data, begin, end)
            if text is None:
                return None
            strings[field - 1] = text
        elif field == 5:
            tensor = read_input(data, begin, end)
            if tensor is None:
                return None
            inputs.append(tensor)
        elif field == 6:
            name = read_output(data, begin, end)
            if name is None:
                return None
            outputs.append(name)
        elif field == 7:
            raw.append(PyBytes_FromStringAndSize(<const char*>data + begin, end - begin))
        else:  # the request's parameters (4), or a field this reader does not know
            return None
    if not raw or len(raw) != len(inputs):
        return None
    for tensor in inputs:
        values += counted(tensor[2])
        if values > MAX_COUNTED:
            values = MAX_COUNTED
    return ("" if strings[0] is None else strings[0], "" if strings[1] is None else strings[1],
            "" if strings[2] is None else strings[2], inputs, raw, outputs, values)


cdef bytes varint(uint64_t value):
    cdef unsigned char buffer[10]
    cdef Py_ssize_t size = 0
    while value >= 0x80:
        buffer[size] = <unsigned char>(value & 0x7F) | 0x80
        value >>= 7
        size += 1
    buffer[size] = <unsigned char>value
    return PyBytes_FromStringAndSize(<const char*>buffer, size + 1)


cdef bytes delimited(uint64_t field, bytes payload):
    return varint(field << 3 | DELIMITED) + varint(len(payload)) + payload


def infer_response(str model_name, str model_version, str request_id, str output, str datatype, bytes data,
                   int64_t count):
    """A ModelInferResponse's bytes, as protobuf serialises it: the three strings (each left out where empty), one
    output tensor (its name, datatype and shape [count]) and its data in ``raw_output_contents``."""
    parts = []
    for field, text in ((1, model_name), (2, model_version), (3, request_id)):
        if text:
            parts.append(delimited(field, text.encode()))
    tensor = delimited(1, output.encode()) + delimited(2, datatype.encode()) + delimited(3, varint(<uint64_t>count))
    parts.append(delimited(5, tensor))
    parts.append(delimited(6, data))
    return b"".join(parts)
