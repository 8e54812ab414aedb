"""ModelInfer's request read by the compiled reader (``_infer_wire.pyx``) against protobuf's reading of the same bytes,
and its reply written by both: the same call from any message the reader takes, protobuf's own reading (or refusal) of
any it does not, and the same reply bytes. Random messages, their forms reordered by hand, and random damage to them
cover what a client may send."""

import random

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from tests.serving.protocols.test_grpc_h2 import INFER
from tests.serving.protocols.test_grpc_lane import TwoWays
from tests.serving.protocols.test_oip import MODEL
from uembed.bundle.loader import load_bundle
from uembed.loadtest.peers import grpc_request
from uembed.serving.protocols import infer_wire
from uembed.serving.protocols.infer_wire import InferCall, InferRequestReader, infer_reply
from uembed.serving.protocols.oip import elements

Request = service_pb2.ModelInferRequest
Tensor = Request.InferInputTensor
COMPILED = infer_wire._infer_wire
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="the compiled reader (_infer_wire.pyx) is not built (make install)")
TEXTS = ["", "user_id", "genres", "ünïcödé", "名前", "🙂", "x" * 300]
DATATYPES = ["BYTES", "INT64", "INT32", "FP32", "FP64", "", "NOPE"]
SIZES = [-(2**63), -1, 0, 1, 4, 64, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1]


@pytest.fixture
def compiled(monkeypatch):
    """Which reader FromString uses: ``compiled(True)`` the extension's, ``compiled(False)`` protobuf's alone."""
    return lambda on: monkeypatch.setattr(infer_wire, "_infer_wire", COMPILED if on else None)


def random_request(rng: random.Random) -> Request:
    request = Request(model_name=rng.choice(TEXTS), model_version=rng.choice(["", "1", "2"]), id=rng.choice(TEXTS))
    for _ in range(rng.randrange(1, 8)):
        tensor = request.inputs.add(name=rng.choice(TEXTS), datatype=rng.choice(DATATYPES))
        tensor.shape.extend(rng.choice(SIZES) for _ in range(rng.choice([0, 1, 1, 2, 2, 3])))
        request.raw_input_contents.append(rng.randbytes(rng.choice([0, 1, 8, 200, 3000])))
    for _ in range(rng.choice([0, 0, 1, 2])):
        request.outputs.add(name=rng.choice(["score", "", "other"]))
    return request


def view(read) -> tuple:
    """What ModelInfer takes from a call or a message: the same tuple from both."""
    if isinstance(read, InferCall):
        inputs = [(t.name, t.datatype, list(t.shape), bytes(t.data)) for t in read.inputs]
        return read.model_name, read.model_version, read.id, inputs, read.values, read.outputs, read.output_parameters
    inputs = [(t.name, t.datatype, list(t.shape), bytes(data)) for t, data in zip(read.inputs, read.raw_input_contents, strict=True)]
    parameters = [list(o.parameters) for o in read.outputs]
    return (read.model_name, read.model_version, read.id, inputs, elements(read.inputs), [o.name for o in read.outputs],
            None if not any(parameters) else parameters)  # fmt: skip


def message_of(call: InferCall) -> Request:
    request = Request(model_name=call.model_name, model_version=call.model_version, id=call.id)
    for tensor in call.inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        request.raw_input_contents.append(tensor.data)
    for name in call.outputs:
        request.outputs.add(name=name)
    return request


def outcome(data: bytes):
    """A read's result, as a comparable value: the call, protobuf's message, or protobuf's refusal."""
    try:
        read = InferRequestReader.FromString(data)
    except DecodeError:
        return "DecodeError"
    return ("call" if isinstance(read, InferCall) else "message", view(read) if isinstance(read, InferCall) else read)


def same_reading(data: bytes, compiled) -> str:
    """Asserts the reader gives what protobuf reads of ``data``: the same call where it takes the message (nothing
    protobuf keeps, an unknown field or a parameter, dropped), protobuf's message where it does not, protobuf's
    refusal where protobuf refuses it. Returns which of "call", "message" or "DecodeError" it was."""
    compiled(True)
    read = outcome(data)
    compiled(False)
    expected = outcome(data)
    if read == "DecodeError" or expected == "DecodeError":
        assert read == expected
        return read
    if read[0] == "call":
        message = expected[1]
        assert read[1] == view(message)
        compiled(True)
        call = InferRequestReader.FromString(data)
        assert message_of(call).SerializeToString(deterministic=True) == message.SerializeToString(deterministic=True)
        return "call"
    assert read == expected
    return "message"


def key(tag: int, wire: int) -> bytes:
    return bytes([tag << 3 | wire])


def varint(value: int) -> bytes:
    value &= 2**64 - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def delimited(tag: int, payload: bytes) -> bytes:
    return key(tag, 2) + varint(len(payload)) + payload


@needs_compiled
@pytest.mark.parametrize("seed", range(40))
def test_a_usual_request_is_read_as_protobuf_reads_it(seed, compiled):
    data = random_request(random.Random(seed)).SerializeToString()
    compiled(True)
    call = InferRequestReader.FromString(data)
    assert isinstance(call, InferCall)
    assert view(call) == view(Request.FromString(data))
    assert message_of(call).SerializeToString() == data  # nothing in the message left out
    compiled(False)
    assert isinstance(InferRequestReader.FromString(data), Request)


@needs_compiled
def test_fields_in_any_order_and_shapes_unpacked_read_the_same(compiled):
    tensor = delimited(1, "user_id".encode()) + key(3, 0) + varint(64) + delimited(2, b"INT64") + key(3, 0) + varint(-1)
    data = (delimited(7, bytes(range(16))) + delimited(6, delimited(1, b"score")) + delimited(5, tensor)
            + delimited(3, "req".encode()) + delimited(1, MODEL.encode()))  # fmt: skip
    compiled(True)
    call = InferRequestReader.FromString(data)
    assert isinstance(call, InferCall)
    assert view(call) == view(Request.FromString(data))
    assert call.inputs[0].shape == [64, -1] and call.values == 0  # a negative size counts nothing, as elements counts it


@needs_compiled
def test_what_the_reader_does_not_take_is_read_by_protobuf(compiled):
    usual = random_request(random.Random(1))
    usual.ClearField("outputs")
    data = usual.SerializeToString()
    with_contents = Request()
    with_contents.CopyFrom(usual)
    with_contents.inputs[0].contents.bytes_contents.append(b"x")
    typed = Request()
    typed.CopyFrom(usual)
    typed.ClearField("raw_input_contents")
    short = Request()
    short.CopyFrom(usual)
    short.raw_input_contents.append(b"one more")
    forms = {
        "a request parameter": data + Request(parameters={"priority": service_pb2.InferParameter(int64_param=1)}).SerializeToString(),
        "an input parameter": data + Request(inputs=[Tensor(name="x", parameters={"shared_memory_region": service_pb2.InferParameter(
            string_param="r")})]).SerializeToString(),
        "an output parameter": data + Request(outputs=[Request.InferRequestedOutputTensor(name="score", parameters={
            "classification": service_pb2.InferParameter(int64_param=2)})]).SerializeToString(),
        "contents beside raw data": with_contents.SerializeToString(),
        "typed contents alone": typed.SerializeToString(),
        "more raw entries than inputs": short.SerializeToString(),
        "the model named twice": data + Request(model_name="other").SerializeToString(),
        "a tensor named twice": data + delimited(5, delimited(1, b"a") + delimited(1, b"b")) + delimited(7, b""),
        "an unknown field": data + key(15, 0) + varint(7),
        "an unknown field in a tensor": data + delimited(5, delimited(1, b"a") + key(9, 0) + varint(1)) + delimited(7, b""),
    }  # fmt: skip
    for name, form in forms.items():
        compiled(True)
        read = InferRequestReader.FromString(form)
        assert isinstance(read, Request), name
        assert read == Request.FromString(form), name


@needs_compiled
def test_a_malformed_message_is_refused_by_protobuf_as_without_the_reader(compiled):
    data = random_request(random.Random(2)).SerializeToString()
    forms = {
        "cut short": data[:-3],
        "a length past the end": delimited(1, b"m")[:1] + varint(50) + b"m",
        "a varint past ten bytes": key(5, 2) + b"\xff" * 11,
        "a model name that is not UTF-8": delimited(1, b"\xff\xfe") + data,
        "a tensor name that is not UTF-8": delimited(5, delimited(1, b"\xc3")) + delimited(7, b""),
        "an output name that is not UTF-8": data + delimited(6, delimited(1, b"\xed\xa0\x80")),  # a surrogate
    }
    for name, form in forms.items():
        compiled(False)
        with pytest.raises(DecodeError):
            InferRequestReader.FromString(form)
        compiled(True)
        with pytest.raises(DecodeError):
            InferRequestReader.FromString(form)


@needs_compiled
@pytest.mark.parametrize("seed", range(10))
def test_damaged_messages_read_as_protobuf_reads_them_or_go_to_protobuf(seed, compiled):
    rng = random.Random(seed)
    taken = 0
    for _ in range(300):
        data = bytearray(random_request(rng).SerializeToString())
        for _ in range(rng.randrange(1, 4)):
            where = rng.randrange(len(data))
            damage = rng.choice(["flip", "cut", "insert"])
            if damage == "flip":
                data[where] = rng.randrange(256)
            elif damage == "cut":
                del data[where : where + rng.randrange(1, 4)]
            else:
                data[where:where] = rng.randbytes(rng.randrange(1, 4))
        taken += same_reading(bytes(data), compiled) == "call"
    assert taken  # some damage leaves a message the reader takes (a changed name, size or data byte)


def overlong(value: int, size: int) -> bytes:
    """``value``'s varint spread over ``size`` bytes (zero bits in continued bytes), as some encoders may write it."""
    short = varint(value)
    if size <= len(short):
        return short
    return bytes(byte | 0x80 for byte in short) + b"\x80" * (size - len(short) - 1) + b"\x00"


@needs_compiled
@pytest.mark.parametrize("size", range(1, 12))
def test_tags_lengths_and_sizes_written_in_more_bytes_read_as_protobuf_reads_them(size, compiled):
    """Protobuf refuses a tag of more than five bytes and takes an overlong length or size: the reader never takes
    what protobuf refuses, nor reads a field protobuf would not."""
    tensor = delimited(1, b"user_id") + delimited(2, b"INT64")
    forms = [
        overlong(1 << 3 | 2, size) + b"\x01m" + delimited(5, tensor) + delimited(7, b""),  # the model's tag
        delimited(5, overlong(1 << 3 | 2, size) + b"\x01a") + delimited(7, b""),  # a tensor's name's tag
        delimited(6, overlong(1 << 3 | 2, size) + b"\x01s") + delimited(5, tensor) + delimited(7, b""),  # an output's
        key(1, 2) + overlong(1, size) + b"m" + delimited(5, tensor) + delimited(7, b""),  # a length
        delimited(5, tensor + key(3, 0) + overlong(64, size)) + delimited(7, b""),  # a size
        delimited(5, tensor + delimited(3, overlong(64, size) + varint(2))) + delimited(7, b""),  # a packed size
    ]
    readings = [same_reading(form, compiled) for form in forms]
    assert readings[3:] == (["call"] * 3 if size <= 10 else ["DecodeError"] * 3), readings
    assert readings[0] == ("call" if size == 1 else "message" if size <= 5 else "DecodeError"), readings


@needs_compiled
def test_odd_counts_and_buffers_read_as_protobuf_reads_them(compiled):
    big = Request(model_name=MODEL)
    for _ in range(3):  # each 2**31 x 2 values: the sum passes the count's cap
        big.inputs.add(name="x", datatype="BYTES", shape=[2**31, 2])
        big.raw_input_contents.append(b"")
    data = big.SerializeToString()
    assert same_reading(data, compiled) == "call"
    compiled(True)
    assert InferRequestReader.FromString(data).values == elements(big.inputs) == 2**32
    assert same_reading(Request(model_name=MODEL, raw_input_contents=[b"x"]).SerializeToString(), compiled) == "message"
    assert same_reading(Request(model_name=MODEL).SerializeToString(), compiled) == "message"  # no inputs at all
    usual = random_request(random.Random(3)).SerializeToString()
    compiled(True)
    from_bytes = view(InferRequestReader.FromString(usual))
    assert view(InferRequestReader.FromString(bytearray(usual))) == from_bytes == view(InferRequestReader.FromString(memoryview(usual)))


@needs_compiled
@pytest.mark.parametrize("count", [0, 1, 3, 200])
def test_the_reply_is_the_bytes_protobuf_writes(count, compiled):
    scores = np.random.default_rng(count).random(count, dtype=np.float32)
    for names in [(MODEL, "1", "call-1"), ("", "", ""), ("ünïcödé", "12", "🙂" * 40), ("m" * 300, "v", "")]:
        compiled(True)
        written = infer_reply(*names, scores)
        compiled(False)
        assert written == infer_reply(*names, scores)
        reply = service_pb2.ModelInferResponse.FromString(written)
        assert (reply.model_name, reply.model_version, reply.id) == names
        assert np.frombuffer(reply.raw_output_contents[0], "<f4").tolist() == scores.tolist()


@needs_compiled
def test_calls_over_the_port_have_the_same_outcome_with_the_reader_or_without(synthetic_store, movielens_examples, compiled):
    specs = load_bundle(synthetic_store / MODEL / "1").feature_specs

    def body_of(examples, **fields) -> bytes:  # a client's usual message, and fields merged after it
        return grpc_request(MODEL, examples, specs) + Request(**fields).SerializeToString()

    ways = TwoWays(synthetic_store / MODEL / "1", max_body_bytes=256 * 1024)
    calls = {
        "scored": body_of(movielens_examples[:32], id="call-1"),
        "an unknown model": grpc_request("nope", movielens_examples[:4], specs),
        "an unknown model, named twice": body_of(movielens_examples[:4], model_name="nope"),
        "an unknown version": body_of(movielens_examples[:4], model_version="9"),
        "an unknown output": body_of(movielens_examples[:4], outputs=[Request.InferRequestedOutputTensor(name="x")]),
        "a bad tensor": Request(model_name=MODEL, inputs=[Tensor(name="user_id", datatype="FP32", shape=[1])],
                                raw_input_contents=[b"\0\0\0\0"]).SerializeToString(),  # fmt: skip
    }
    try:
        for name, body in calls.items():
            compiled(True)
            read = InferRequestReader.FromString(body)
            assert isinstance(read, InferCall) == (name != "an unknown model, named twice"), name
            for listener in (ways.lane, ways.asgi):
                compiled(True)
                with_reader = ways.call(listener, INFER, body)
                compiled(False)
                assert with_reader == ways.call(listener, INFER, body), name
                assert (with_reader[0] == grpc.StatusCode.OK) == (name == "scored"), (name, with_reader)
    finally:
        ways.close()
