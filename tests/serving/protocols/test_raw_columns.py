"""Tensors in binary form (gRPC's raw_input_contents, the REST binary extension) canonicalised straight from their
bytes (``RawColumn`` and the compiled framed readers) against the values decoded first and the pure-Python path: the
same canonical values, truncations and missing counts, the same examples read back, or the same error."""

import random
from dataclasses import replace

import numpy as np
import pytest

from uembed.bundle.loader import load_bundle
from uembed.contract import hashing
from uembed.contract.errors import ExampleError, TensorError
from uembed.serving.pipeline.column_readers import RawColumn
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.encoding import ExampleEncoder
from uembed.serving.pipeline.values import ValueLimits
from uembed.serving.protocols import oip
from uembed.serving.protocols.oip import InputTensor

needs_extension = pytest.mark.skipif(not hashing.compiled_available(), reason="the compiled hashing extension is not built")
RAW_READERS = ("framed_text_column", "framed_list_column", "integer_text_column")
ID_FEATURES = ("user_id", "movie_id", "age")


@pytest.fixture(autouse=True)
def restore_backend():
    before = hashing.hashing_backend()
    yield
    hashing.use_backend(before)


def framed(elements: list[bytes]) -> bytes:
    return b"".join(len(element).to_bytes(4, "little") + element for element in elements)


def text_tensor(rng: random.Random, name: str, values: list[str]) -> InputTensor:
    """A one-value feature's BYTES tensor, [N] or [N, 1]."""
    shape = [len(values)] if rng.random() < 0.8 else [len(values), 1]
    return InputTensor(name, "BYTES", shape, framed([value.encode("utf-8", "surrogatepass") for value in values]))


def random_request(rng: random.Random, size: int) -> list[InputTensor]:
    """One tensor per MovieLens feature, binary, mostly what the framed readers take and now and then what they leave
    to the decoded values: a value that is not ASCII (or not UTF-8), past the character limit, a missing marker, an
    empty string, a list past its limit or holding a marker, a list feature joined in an [N] tensor, a broken framing,
    a data size that does not fit the shape."""
    odd = ["", "unknown", "x" * 300, "東京", "\ud800", "é"]
    tensors = []
    for name in ID_FEATURES:
        ids = [rng.randrange(-(2**31), 2**31) if rng.random() < 0.1 else rng.randrange(5000) for _ in range(size)]
        datatype = rng.choice(["INT64", "INT32", "BYTES"])
        if datatype == "BYTES":
            tensors.append(text_tensor(rng, name, [str(value) for value in ids]))
        else:
            dtype = np.dtype("<i8" if datatype == "INT64" else "<i4")
            shape = [size] if rng.random() < 0.8 else [size, 1]
            tensors.append(InputTensor(name, datatype, shape, np.array(ids, dtype=dtype).tobytes()))
    for name, choices in (("zip_code", ["33755", "02139", "T8H1N"]), ("occupation", ["writer", "unknown", "doctor"]),
                          ("gender", ["M", "F"])):  # fmt: skip
        values = [rng.choice(choices) for _ in range(size)]
        if rng.random() < 0.15:
            values[rng.randrange(size)] = rng.choice(odd)
        tensors.append(text_tensor(rng, name, values))
    lists = [[rng.choice(["Drama", "Comedy", "Film-Noir"]) for _ in range(rng.randrange(0, 4))] for _ in range(size)]
    if rng.random() < 0.15:
        lists[rng.randrange(size)] = rng.choice([["Drama", "unknown"], ["x"] * 9, ["東京"], ["x" * 300], ["é", "Drama"]])
    if rng.random() < 0.1:  # the values joined by the separator, one element an example
        tensors.append(text_tensor(rng, "genres", ["|".join(values) for values in lists]))
    else:
        width = max(1, max(map(len, lists)))
        padded = [value for values in lists for value in values + [""] * (width - len(values))]
        tensors.append(InputTensor("genres", "BYTES", [size, width], framed([value.encode() for value in padded])))
    if rng.random() < 0.08:  # a tensor whose bytes do not hold its shape: cut, or one element short
        index = rng.randrange(len(tensors))
        tensor = tensors[index]
        tensors[index] = replace(tensor, data=tensor.data[: len(tensor.data) - rng.choice([1, 2, 4, 8])])
    rng.shuffle(tensors)
    return tensors


def outcome(runtime: ModelRuntime, inputs: list[InputTensor]):
    """What the plane's decode gives for ``inputs``: the canonical values, truncations and missing counts, and the
    examples read back from the columns (a routing rule's and a shadow's view); or the error."""
    try:
        examples, canonical = oip.decode_inputs(runtime, inputs, 1024)
    except (TensorError, ExampleError) as exc:
        return ("error", type(exc).__name__, str(exc))
    values = {name: [tuple(v) if isinstance(v, list) else v for v in column] for name, column in canonical.values.items()}
    return values, canonical.truncated, canonical.missing, examples[:]


@needs_extension
@pytest.mark.parametrize("seed, limits", [(0, {}), (1, {}), (2, {"max_chars": 3, "max_list": 2}),
                                          (3, {"max_chars": 0, "max_list": 0}), (4, {"max_chars": -1}),
                                          (5, {"max_chars": None, "max_list": None})])  # fmt: skip
def test_tensors_canonicalise_alike_from_their_bytes_from_their_values_and_in_python(synthetic_store, seed, limits, monkeypatch):
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    runtime = ModelRuntime(bundle)
    specs = dict(bundle.feature_specs)
    specs["occupation"] = replace(specs["occupation"], missing=("unknown",))
    specs["genres"] = replace(specs["genres"], missing=("unknown",), max_values=5)
    runtime.encoder = ExampleEncoder(specs, bundle.plan, ValueLimits(**limits), 0, bundle.known_values)
    rng = random.Random(seed)
    requests = [random_request(rng, rng.choice([1, 7, 64])) for _ in range(80)]
    read = dict.fromkeys(RAW_READERS, 0)  # columns the framed readers did read (not None)
    for reader in RAW_READERS:
        function = getattr(hashing._fasthash, reader)
        def counted(*args, function=function, reader=reader):
            column = function(*args)
            read[reader] += column is not None
            return column
        monkeypatch.setattr(hashing._fasthash, reader, counted)
    outcomes = {}
    for way in ("bytes", "values", "python"):
        hashing.use_backend("python" if way == "python" else "compiled")
        if way == "values":  # the readers step aside for every column: each RawColumn is decoded
            for reader in RAW_READERS:
                monkeypatch.setattr(hashing._fasthash, reader, lambda *args: None)
        outcomes[way] = [outcome(runtime, inputs) for inputs in requests]
    assert outcomes["bytes"] == outcomes["values"] == outcomes["python"]
    errors = [result for result in outcomes["python"] if result[0] == "error"]
    assert errors and {result[1] for result in errors} <= {"TensorError", "ExampleError", "ValueRefused"}
    if limits.get("max_chars", 0) is not None and limits.get("max_chars", 0) < 0:
        assert not any(read.values())  # a negative limit: every value to the checked path
    elif not limits or limits.get("max_chars") is None:
        assert len(errors) < len(requests)
        assert all(read.values()), read  # each reader read columns


@needs_extension
def test_the_framed_readers_step_aside_for_what_they_do_not_check():
    extension = hashing._fasthash
    markers = frozenset({b"unknown"})
    assert extension.framed_count(framed([b"a", b"", b"xyz"])) == 3
    assert extension.framed_count(b"") == 0
    for broken in (b"\x01\x00\x00", framed([b"ab"])[:-1], framed([b"a"]) + b"\x00"):
        assert extension.framed_count(broken) == -1, broken
    assert extension.framed_text_column(framed([b"x", b"", b"unknown"]), 3, 8, markers) == [b"x", b"", b""]
    for element in ("é".encode(), b"\xff", b"much too long"):
        assert extension.framed_text_column(framed([b"x", element]), 2, 8, markers) is None, element
    data = framed([b"a", b"b"])
    assert extension.framed_text_column(data, 1, 8, markers) is None  # more elements than examples
    assert extension.framed_text_column(data, 3, 8, markers) is None  # fewer
    assert extension.framed_text_column(memoryview(data), 2, -1, frozenset()) == [b"a", b"b"]
    rows = framed([b"a", b"", b"b", b"", b"", b""])
    assert extension.framed_list_column(rows, 2, 3, 8, 2, markers, (b"",)) == [(b"a", b"b"), (b"",)]
    for row in ([b"unknown", b""], [b"a", b"b", b"c"], ["é".encode(), b""], [b"much too long", b""]):
        elements = row + [b""] * (3 - len(row))
        assert extension.framed_list_column(framed(elements), 1, 3, 8, 2, markers, (b"",)) is None, row
    assert extension.framed_list_column(rows, 3, 2, 8, 2, markers, (b"",)) == [(b"a",), (b"b",), (b"",)]
    assert extension.framed_list_column(rows, 2, 2, 8, 2, markers, (b"",)) is None  # elements left over
    ids = np.array([0, -7, 2**63 - 1, -(2**63)], dtype="<i8")
    assert extension.integer_text_column(ids.tobytes(), 8, 4, frozenset({b"0"})) == [b"", b"-7", str(2**63 - 1).encode(),
                                                                                   str(-(2**63)).encode()]  # fmt: skip
    small = np.array([2**31 - 1, -(2**31), 5], dtype="<i4")
    assert extension.integer_text_column(small.tobytes(), 4, 3, frozenset()) == [b"2147483647", b"-2147483648", b"5"]
    assert extension.integer_text_column(small.tobytes(), 4, 2, frozenset()) is None
    assert extension.integer_text_column(small.tobytes(), 3, 4, frozenset()) is None


def test_a_raw_column_reads_as_the_values_it_decodes_once():
    calls = []
    column = RawColumn(b"", "BYTES", 3, None, False, lambda: calls.append(1) or ["a", "b", "c"])
    assert len(column) == 3 and not calls  # nothing decoded until a value is asked for
    assert column[1] == "b" and column[-1] == "c" and list(column) == ["a", "b", "c"]
    assert calls == [1]


@needs_extension
def test_another_version_reads_the_columns_as_the_values_the_request_held(synthetic_store):
    """A shadow version canonicalises the columns decoded for the primary: where its feature reads a tensor otherwise
    (a list where the primary's takes one value, or the reverse), it gets the primary's values, not the bytes read its
    own way."""
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    runtime = ModelRuntime(bundle)
    specs = dict(bundle.feature_specs)
    specs["genres"] = replace(specs["genres"], kind="categorical")
    specs["zip_code"] = replace(specs["zip_code"], kind="multivalent")
    shadow = ExampleEncoder(specs, replace(bundle.plan, features=tuple(
        replace(f, width=4) if f.name == "zip_code" else replace(f, width=1) if f.name == "genres" else f
        for f in bundle.plan.features)), ValueLimits(), 0, {})  # fmt: skip
    inputs = random_request(random.Random(7), 3)
    for index, tensor in enumerate(inputs):
        if tensor.name == "genres":
            inputs[index] = InputTensor("genres", "BYTES", [3, 1], framed([b"Drama", b"", b"Crime"]))
        elif tensor.name == "zip_code":
            inputs[index] = InputTensor("zip_code", "BYTES", [3, 1], framed([b"Crime|Drama", b"x", b""]))
    hashing.use_backend("compiled")
    examples = oip.columns_from_inputs(runtime, inputs, 1024)
    assert isinstance(examples.columns["genres"], RawColumn) and isinstance(examples.columns["zip_code"], RawColumn)
    decoded = {name: list(column) for name, column in examples.columns.items()}

    def canonical(columns):
        try:
            result = shadow.canonicalise_columns(columns, 3)
        except ExampleError as exc:
            return str(exc)
        return result.values

    from_raw = canonical(examples.columns)
    assert from_raw == canonical(decoded) == "examples[0].genres: takes one value, got a list"
    del decoded["genres"], examples.columns["genres"]  # the shadow's zip_code alone: split by the separator
    from_raw = shadow.canonicalise_columns(examples.columns, 3)
    assert from_raw.values["zip_code"] == shadow.canonicalise_columns(decoded, 3).values["zip_code"]
    assert from_raw.values["zip_code"][0] == (b"Crime", b"Drama")


def clean_request(count: int) -> list[InputTensor]:
    """One tensor per MovieLens feature, every value what the framed readers take."""
    ids = np.arange(1, count + 1, dtype="<i8").tobytes()
    texts = framed([b"a%d" % i for i in range(count)])
    return [InputTensor(name, "INT64", [count], ids) for name in ID_FEATURES] + [
        InputTensor(name, "BYTES", [count], texts) for name in ("zip_code", "occupation", "gender")]


@pytest.mark.parametrize("way", ["compiled", "python"])
def test_an_n_by_0_list_tensor_reads_as_empty_lists(synthetic_store, way):
    if way == "compiled" and not hashing.compiled_available():
        pytest.skip("the compiled hashing extension is not built")
    hashing.use_backend(way)
    runtime = ModelRuntime(load_bundle(synthetic_store / "movielens" / "1"))
    examples, canonical = oip.decode_inputs(runtime, [*clean_request(2), InputTensor("genres", "BYTES", [2, 0], b"")], 1024)
    assert [example["genres"] for example in examples] == [[], []]
    assert canonical.values["genres"] == [(b"",), (b"",)]
    assert canonical.values["user_id"] == [b"1", b"2"] and canonical.values["gender"] == [b"a0", b"a1"]


def damaged(rng: random.Random, inputs: list[InputTensor]) -> list[InputTensor]:
    """``inputs`` with a fault the tensors' checks refuse, or a form they take but the one-pass reader leaves to them:
    a tensor gone, given twice, unknown or renamed; another datatype; JSON data; a shape of another rank, batch or width, or
    with a bool, a negative or a float for a size; a batch of 0 or past the limit; a one-value feature sent two a row;
    a tensor of another batch than the rest."""
    inputs = list(inputs)
    index = rng.randrange(len(inputs))
    tensor = inputs[index]
    count = tensor.shape[0]
    fault = rng.randrange(15)
    if fault == 0:
        del inputs[index]
    elif fault == 1:
        inputs.append(tensor)
    elif fault == 2:
        inputs.append(replace(tensor, name="no_such_feature"))
    elif fault == 3:
        inputs[index] = replace(tensor, datatype=rng.choice(["FP32", "FP64", "INT8", "BOOL", "BYTES", "INT64"]))
    elif fault == 4:
        inputs[index] = replace(tensor, data=["1"] * count)
    elif fault == 5:
        inputs[index] = replace(tensor, shape=rng.choice([[count, 1, 1], [], [count * 2], [count, 2], [1, count]]))
    elif fault == 6:
        inputs[index] = replace(tensor, shape=[True] if count == 1 else [count, True])
    elif fault == 7:
        inputs[index] = replace(tensor, shape=rng.choice([[-count], [count, -1], [float(count)], [count, 1.0], [None, 2],
                                                          ["x", 2], [[0], 3], [None], [{}, 2]]))
    elif fault == 8:
        inputs = [replace(t, shape=[0, *t.shape[1:]], data=b"") for t in inputs]
    elif fault == 9:
        inputs[index] = replace(tensor, shape=(count,))
    elif fault == 11:  # a one-value feature's tensor as [N, 2], its data the size of that shape
        index = next(i for i, t in enumerate(inputs) if t.name != "genres")
        tensor = inputs[index]
        inputs[index] = replace(tensor, shape=[count, 2], data=(bytes(tensor.data) * 2 if tensor.datatype != "BYTES"
                                                              else framed([b"x"] * (2 * count))))  # fmt: skip
    elif fault == 12:  # one tensor of another batch
        other = next(t for t in random_request(rng, count + rng.choice([1, 2])) if t.name == tensor.name)
        inputs[index] = other
    elif fault == 13:  # renamed: unknown, or another feature's (which is then given twice, this one never)
        inputs[index] = replace(tensor, name=rng.choice(["no_such_feature", *(t.name for t in inputs if t is not tensor)]))
    elif fault == 10:
        inputs[index] = replace(tensor, data=bytearray(tensor.data) if rng.random() < 0.5 else memoryview(tensor.data))
    rng.shuffle(inputs)
    return inputs


def outcome_of(read):
    """What ``read()`` returns, or the error it raises (as text)."""
    try:
        return read()
    except TensorError as exc:
        return str(exc)


def read_back(column) -> list | str:
    """A column's values as a shadow version or a routing rule reads them, or the error that decoding them raises."""
    try:
        return list(column)
    except TensorError as exc:
        return str(exc)


@needs_extension
@pytest.mark.parametrize("max_examples", [1024, 7])
def test_the_one_pass_reader_gives_the_checked_columns_or_steps_aside(synthetic_store, max_examples, monkeypatch):
    """``raw_columns`` (the usual binary request read in one pass) answers only where the tensors' checks pass, with
    the columns they give (the same data, datatype, count, width and reading), and leaves every other request to them,
    so every refusal is still theirs."""
    hashing.use_backend("compiled")
    runtime = ModelRuntime(load_bundle(synthetic_store / "movielens" / "1"))
    plan = oip.feature_plan(runtime)
    rng = random.Random(11)
    answered = stepped_aside = 0
    for trial in range(600):
        inputs = random_request(rng, rng.choice([1, 7, 64]))
        if trial % 2:
            inputs = damaged(rng, inputs)
        fast = oip.raw_columns(hashing._fasthash, plan, inputs, max_examples)
        with monkeypatch.context() as patch:  # the tensors' checks alone
            patch.setattr(oip, "raw_columns", lambda *args: None)
            checked = outcome_of(lambda: oip.columns_from_inputs(runtime, inputs, max_examples))
        served = outcome_of(lambda: oip.columns_from_inputs(runtime, inputs, max_examples))
        if isinstance(checked, str):
            assert fast is None and served == checked, inputs
            stepped_aside += 1
            continue
        if fast is None:
            stepped_aside += 1
            continue
        answered += 1
        assert fast.count == checked.count and list(fast.columns) == list(checked.columns)
        for name, column in fast.columns.items():
            other = checked.columns[name]
            assert type(column) is type(other) is RawColumn
            assert (column.data, column.datatype, column.count, column.width, column.multivalent) == (
                other.data, other.datatype, other.count, other.width, other.multivalent)
            assert read_back(column) == read_back(other)
    assert answered > 100 and stepped_aside > 100


@needs_extension
@pytest.mark.parametrize("shape", [[None, 2], ["x", 2], [[0], 3], [{}, 2], ["x", 20_000_000_000]])
def test_a_list_tensors_batch_that_is_not_a_whole_number_is_refused_before_anything_is_sized_by_it(synthetic_store, shape):
    """A shape's sizes are checked before they are multiplied: [N, W] with N not a whole number (JSON's null, a string,
    a list) steps aside to the tensors' checks, which refuse it (a client's "x" times a large W would otherwise make
    a string of gigabytes on the event loop)."""
    hashing.use_backend("compiled")
    runtime = ModelRuntime(load_bundle(synthetic_store / "movielens" / "1"))
    inputs = [*clean_request(2), InputTensor("genres", "BYTES", shape, framed([b"Drama"] * 4))]
    assert oip.raw_columns(hashing._fasthash, oip.feature_plan(runtime), inputs, 1024) is None
    with pytest.raises(TensorError, match="input 'genres': shape"):
        oip.columns_from_inputs(runtime, inputs, 1024)
