"""Numeric features' columns bucketised in one compiled pass (``numeric_column``) against the checked path value by
value and the pure-Python backend: the same canonical bytes (bucket indices), or the same error."""

import random

import numpy as np
import pytest

from uembed.bundle.synthetic import synthetic_plan
from uembed.contract import hashing
from uembed.contract.errors import ExampleError
from uembed.contract.features import FeatureSpec
from uembed.serving.pipeline.encoding import ExampleEncoder
from uembed.serving.pipeline.values import NO_LIMITS, ValueLimits

needs_extension = pytest.mark.skipif(not hashing.compiled_available(), reason="the compiled hashing extension is not built")
BOUNDARIES = (-1.5, 0.0, 0.0, 1.0, 2.5, 10.0, 1e6)  # a repeated boundary: a value on it goes past both


@pytest.fixture(autouse=True)
def restore_backend():
    before = hashing.hashing_backend()
    yield
    hashing.use_backend(before)


def features() -> dict[str, FeatureSpec]:
    specs = [FeatureSpec("count", kind="numeric", boundaries=BOUNDARIES),
             FeatureSpec("price", kind="numeric", boundaries=BOUNDARIES, missing=(-1,)),
             FeatureSpec("bare", kind="numeric", boundaries=(5.0,)),
             FeatureSpec("item")]  # fmt: skip
    return {spec.name: spec for spec in specs}


def random_number(rng: random.Random) -> object:
    """Mostly what the compiled pass takes (ints, floats on and between boundaries, None, NaN, markers), now and then
    what it leaves to the checked path (an infinity, a bool, a str, an int past 64 bits)."""
    if rng.random() < 0.04:
        return rng.choice([float("inf"), -float("inf"), True, "3.5", "", "abc", 2**64, -(2**70), np.float64(1.0)])
    return rng.choice([
        rng.choice(BOUNDARIES), -1, -1.0, 0, -0.0, None, float("nan"), 2**63 - 1, -(2**63), 2**53 + 1,
        rng.uniform(-5, 20), rng.randrange(-10, 20), 5e-324, 1e308, rng.choice(BOUNDARIES) + rng.choice([-1e-9, 1e-9]),
    ])  # fmt: skip


def outcome(encoder: ExampleEncoder, examples: list[dict], as_columns: bool):
    try:
        if as_columns:
            columns = {name: [example.get(name) for example in examples] for name in encoder.specs}
            canonical = encoder.canonicalise_columns(columns, len(examples))
        else:
            canonical = encoder.canonicalise(examples)
    except ExampleError as exc:
        return ("error", str(exc))
    return canonical.values, canonical.missing


@needs_extension
@pytest.mark.parametrize("seed, limits", [(0, None), (1, None), (2, NO_LIMITS), (3, ValueLimits(max_chars=-1))])
def test_numeric_columns_bucketise_alike_compiled_checked_and_in_python(seed, limits, monkeypatch):
    specs = features()
    plan = synthetic_plan(list(specs.values()), 1000, 4, 1, ())
    rng = random.Random(seed)
    requests = [[{"count": random_number(rng), "price": random_number(rng), "bare": random_number(rng), "item": "a"}
                 for _ in range(rng.choice([1, 5, 40]))] for _ in range(150)]  # fmt: skip
    read = []  # the columns the compiled pass did read (not None)
    function = hashing._fasthash.numeric_column
    monkeypatch.setattr(hashing._fasthash, "numeric_column", lambda *args: read.append(function(*args)) or read[-1])
    outcomes = {}
    for way in ("compiled", "checked", "python"):
        hashing.use_backend("python" if way == "python" else "compiled")
        if way == "checked":
            monkeypatch.setattr(hashing._fasthash, "numeric_column", lambda *args: None)
        encoder = ExampleEncoder(specs, plan, limits or ValueLimits(), 0, {})
        outcomes[way] = [outcome(encoder, examples, as_columns) for examples in requests for as_columns in (False, True)]
    assert outcomes["compiled"] == outcomes["checked"] == outcomes["python"]
    errors = sum(result[0] == "error" for result in outcomes["python"])
    if limits is None:
        assert 0 < errors < len(outcomes["python"])
    if limits is not None and limits.max_chars == -1:
        assert not read  # a negative limit: every value to the checked path
    else:
        assert sum(column is not None for column in read) > 0


@needs_extension
def test_the_numeric_pass_steps_aside_for_what_it_does_not_check():
    numeric_column = hashing._fasthash.numeric_column
    boundaries = np.asarray(BOUNDARIES)
    buckets = tuple(str(i).encode() for i in range(len(BOUNDARIES) + 1))
    assert numeric_column([None, float("nan"), -2, -1.5, 0, 0.0, -0.0, 1e6, 1e7, 2**63 - 1], boundaries, buckets,
                          frozenset(), True) == [b"", b"", b"0", b"1", b"3", b"3", b"3", b"7", b"7", b"7"]  # fmt: skip
    assert numeric_column([-1, -1.0, -1.5], boundaries, buckets, frozenset({b"-1"}), True) == [b"", b"", b"1"]
    for value in (True, "1", float("inf"), -float("inf"), 2**63, np.float64(1.0), [1]):
        assert numeric_column([1, value], boundaries, buckets, frozenset(), True) is None, value
    assert numeric_column([1, float("nan")], boundaries, buckets, frozenset(), False) is None  # the limits refuse NaN
    assert numeric_column([3.0], np.asarray([], dtype=np.float64), (b"0",), frozenset(), True) == [b"0"]
    with pytest.raises(ValueError):
        numeric_column([1], boundaries, buckets[:-1], frozenset(), True)


@needs_extension
def test_boundaries_that_are_not_floats_are_compared_by_the_checked_path():
    """A spec built in Python may hold int boundaries past float64's precision: compared exactly, value by value."""
    spec = FeatureSpec("x", kind="numeric", boundaries=(2**64 + 1,))
    specs = {"x": spec, "item": FeatureSpec("item")}
    encoder = ExampleEncoder(specs, synthetic_plan(list(specs.values()), 100, 4, 1, ()), ValueLimits(), 0, {})
    assert "x" not in encoder.numeric_buckets
    assert encoder.canonicalise([{"x": 18446744073709551616.0, "item": "a"}]).values["x"] == [b"0"]
