"""The compiled hashing path (uembed/contract/_fasthash.pyx) against the pure-Python one: the same canonical bytes,
keys and errors on random values of every type a feature takes, the same rows through the service's encoder, and
the pure path still whole on its own (UEMBED_PURE_PYTHON=1)."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from uembed.bundle.loader import load_bundle
from uembed.contract import hashing
from uembed.contract.errors import ExampleError
from uembed.contract.hashing import (
    canonical_bytes,
    canonical_column,
    hash_canonical,
    hash_canonical_columns,
    hash_values,
    lookup_seed,
)
from uembed.contract.known import KnownSets, KnownValues, training_keys
from uembed.serving.pipeline.cpu import ModelRuntime

ROOT = Path(__file__).resolve().parents[2]
needs_extension = pytest.mark.skipif(
    not hashing.compiled_available(), reason="the compiled hashing extension is not built (make install builds it)"
)


@pytest.fixture(autouse=True)
def restore_backend():
    """Tests here switch paths; the next test finds the one the process started with, even after a failure."""
    before = hashing.hashing_backend()
    yield
    hashing.use_backend(before)


def test_the_extension_is_built_where_required():
    """CI and `make install` build the extension; UEMBED_REQUIRE_EXTENSION=1 turns its absence into a failure
    rather than the other tests' skips."""
    if os.environ.get("UEMBED_REQUIRE_EXTENSION") == "1":
        assert hashing.compiled_available(), "uembed.contract._fasthash is not importable: make install builds it"
    elif not hashing.compiled_available():
        pytest.skip("the compiled hashing extension is not built (UEMBED_REQUIRE_EXTENSION=1 makes this a failure)")
    if os.environ.get("UEMBED_PURE_PYTHON", "") in ("", "0"):
        assert hashing.hashing_backend() == "compiled"


def random_text(rng: random.Random) -> str:
    alphabets = ("abcXYZ019 |-_", "äöüßéñçø", "東京日本語中文", "😀🚀👍🏽", "\x00\t\n\x7f", "\u200b\u0301\ufeff")
    return "".join(rng.choice(rng.choice(alphabets)) for _ in range(rng.randrange(0, 12)))


def random_value(rng: random.Random) -> object:
    kind = rng.randrange(13)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-1000, 1000)
    if kind == 3:  # the edges of 64 bits and far past them
        return rng.choice([2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64, 10**40, -(10**30)]) + rng.randrange(-2, 3)
    if kind == 4:
        return rng.uniform(-1e6, 1e6)
    if kind == 5:  # integral floats, some past 2**63, and the values every float path must get right
        return rng.choice([0.0, -0.0, 3.0, -7.0, 2.0**63, -(2.0**63), 2.0**62, 1e300, -1e300, 9.007199254740993e15,
                           float("nan"), float("inf"), float("-inf"), 5e-324, 1e-5, 0.1, 1e16, 1e22, 1.5e-7])  # fmt: skip
    if kind == 6:
        return float(rng.randrange(-(10**6), 10**6))
    if kind == 7:
        return ""
    if kind == 8:
        return random_text(rng).encode()
    if kind == 9:  # numpy scalars: the compiled path hands them to the Python canonicaliser
        return rng.choice([np.int64(rng.randrange(-99, 99)), np.uint64(2**64 - 1), np.float32(0.1), np.float64(2.5),
                           np.int8(-3), np.str_("np")])  # fmt: skip
    return random_text(rng)


@needs_extension
@pytest.mark.parametrize("seed", range(5))
def test_compiled_and_pure_python_agree_on_random_values(seed):
    rng = random.Random(seed)
    values = [random_value(rng) for _ in range(2000)]
    seeds = [lookup_seed(f"feature{i}", i % 3) for i in range(4)]
    out = {}
    for backend in hashing.BACKENDS:
        hashing.use_backend(backend)
        canonical = canonical_column(values)
        out[backend] = (canonical, [hash_values(values, s) for s in seeds], hash_canonical(canonical, seeds[0]),
                        hash_canonical_columns([canonical[:500], canonical[500:1000]], seeds[:2]))  # fmt: skip
    compiled, python = out["compiled"], out["python"]
    assert compiled[0] == python[0] == [canonical_bytes(v) for v in values]
    for a, b in zip(compiled[1:3], python[1:3]):
        assert [k.tolist() for k in np.atleast_2d(a)] == [k.tolist() for k in np.atleast_2d(b)]
    assert compiled[3].tolist() == python[3].tolist()
    assert compiled[2].dtype == compiled[3].dtype == np.uint64


@needs_extension
def test_numpy_columns_hash_as_their_python_values():
    ints = np.array([-5, 0, 7, 2**62], dtype=np.int64)
    floats = np.array([0.5, -0.0, 3.0, float("nan")], dtype=np.float64)
    seed = lookup_seed("n")
    for column in (ints, floats, np.array(["a", "日本"]), np.array([True, False])):
        expected = hash_canonical([canonical_bytes(v) for v in column.tolist()], seed)
        for backend in hashing.BACKENDS:
            hashing.use_backend(backend)
            assert hash_values(column, seed).tolist() == expected.tolist()


@needs_extension
@pytest.mark.parametrize("bad, error", [([{"a": 1}], TypeError), ([[1]], TypeError), ([object()], TypeError),
                                        (["\ud800"], UnicodeEncodeError), ([10**5000], ValueError)])  # fmt: skip
def test_both_paths_refuse_the_same_values_with_the_same_error(bad, error):
    messages = []
    for backend in hashing.BACKENDS:
        hashing.use_backend(backend)
        with pytest.raises(error) as raised:
            hash_values(bad, 1)
        messages.append(str(raised.value))
        with pytest.raises(error):
            canonical_column(bad)
    assert messages[0] == messages[1]


@needs_extension
def test_canonical_values_of_another_type_hash_or_fail_alike_on_both_paths():
    for backend in hashing.BACKENDS:
        hashing.use_backend(backend)
        with pytest.raises(TypeError):
            hash_canonical(["text"], 1)
        assert hash_canonical([bytearray(b"ab"), memoryview(b"ab")], 1).tolist() == hash_canonical([b"ab"] * 2, 1).tolist()
        with pytest.raises(ValueError, match="different lengths"):
            hash_canonical_columns([[b"a"], [b"a", b"b"]], [1, 2])


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of compiled, python"):
        hashing.use_backend("rust")


@needs_extension
def test_the_encoder_gives_the_same_rows_on_both_paths(synthetic_store, movielens_examples):
    """The service's canonicalise + hash of raw examples (ids as numbers and as strings, floats, missing values),
    examples and columns, gives the same rows and weights on the compiled path as on the pure-Python one."""
    examples = [dict(e) for e in movielens_examples[:300]]
    for i, example in enumerate(examples):  # mixed columns: ids as JSON strings in some examples, values missing
        if i % 3 == 0:
            example["user_id"], example["age"] = str(example["user_id"]), float(example["age"])
        if i % 7 == 0:
            example["zip_code"] = None
    columns = {name: [e.get(name) for e in examples] for name in examples[0]}
    bundle = load_bundle(synthetic_store / "movielens" / "1")
    out = {}
    for backend in hashing.BACKENDS:
        hashing.use_backend(backend)
        encoder = ModelRuntime(bundle).encoder
        out[backend] = (encoder.hash([encoder.canonicalise(examples)]),
                        encoder.hash([encoder.canonicalise_columns(columns, len(examples))]))  # fmt: skip
    for (rows, weights), (expected_rows, expected_weights) in zip(out["compiled"], out["python"]):
        assert np.array_equal(rows, expected_rows) and np.array_equal(weights, expected_weights)
    assert np.array_equal(out["compiled"][0][0], out["compiled"][1][0])


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_uembed_pure_python_forces_the_fallback():
    code = "from uembed.contract.hashing import hashing_backend; print(hashing_backend())"
    assert run_python(code, UEMBED_PURE_PYTHON="1").stdout.split() == ["python"]
    expected = "compiled" if hashing.compiled_available() else "python"
    assert run_python(code, UEMBED_PURE_PYTHON="0").stdout.split() == [expected]


def test_the_golden_vectors_pass_under_uembed_pure_python():
    """The whole golden-vector and hashing files in a process that never uses the extension."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
         "tests/contract/test_golden_hashing.py", "tests/contract/test_hashing.py"],
        cwd=ROOT, env={**os.environ, "UEMBED_PURE_PYTHON": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


def test_an_extension_hashing_otherwise_than_python_xxhash_is_not_used():
    """A libxxhash whose XXH3 differs (one from before XXH3 was stable) must not serve: the import check refuses it."""

    class Differs:
        @staticmethod
        def hash_bytes(values, seed):
            return np.array([xxhash.xxh64_intdigest(v, seed) for v in values], dtype=np.uint64)  # another hash

    assert not hashing._agrees_with_xxhash(Differs)
    if hashing.compiled_available():
        assert hashing._agrees_with_xxhash(hashing._fasthash)


@needs_extension
def test_several_known_value_filters_asked_at_once_answer_as_each_alone():
    """KnownSets (the service's unseen-value count of its one-value features): the compiled probes and numpy's give
    each filter's own answer, for keys it holds and keys it does not."""
    rng = np.random.default_rng(3)
    trained = [rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True) for n in (1, 7, 64, 3000)]
    filters = [KnownValues.build(keys) for keys in trained]
    asked = rng.integers(0, 2**64 - 1, (len(trained), 500), dtype=np.uint64, endpoint=True)
    asked[:, ::3] = [keys[rng.integers(0, keys.size, 167)] for keys in trained]  # a third of them trained
    want = np.stack([f.contains(keys) for f, keys in zip(filters, asked)])
    assert want[:, ::3].all() and not want.all()
    for backend in hashing.BACKENDS:
        hashing.use_backend(backend)
        got = KnownSets(filters).contains(asked)
        assert got.dtype == bool and got.tolist() == want.tolist(), backend
        assert KnownSets(filters[1:2]).contains(asked[1:2, :0]).shape == (1, 0)
    hashing.use_backend("compiled")
    with pytest.raises(ValueError, match="4 rows of keys for 2 filters"):
        hashing.compiled_extension().filters_contain(KnownSets(filters[:2]).bits, np.zeros(2, np.uint64),
                                                     np.ones(2, np.uint64), asked, 4)  # fmt: skip


@needs_extension
def test_unseen_keys_counted_in_the_probes_pass_equal_numpys_count():
    """KnownSets.unseen (the service's unseen-value counts): the compiled count, in the probes' own pass, against
    numpy's, rows asked in any order, the missing value's key never counted even where no filter holds it."""
    rng = np.random.default_rng(5)
    trained = [rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True) for n in (1, 50, 3000)]
    filters = [KnownValues.build(keys) for keys in trained]
    keys = rng.integers(0, 2**64 - 1, (4, 700), dtype=np.uint64, endpoint=True)
    which = [3, 0, 1]  # row 3 against filter 0, row 0 against filter 1, row 1 against filter 2
    for row, held in zip(which, trained):
        keys[row, ::4] = held[rng.integers(0, held.size, keys[row, ::4].size)]
    missing = np.array([keys[3, 1], 7, keys[1, 2]], dtype=np.uint64)  # two of them asked, unheld
    keys[3, 5] = keys[3, 1]
    counted = {}
    for backend in hashing.BACKENDS:
        hashing.use_backend(backend)
        counted[backend] = KnownSets(filters).unseen(keys, which, missing)
        assert counted[backend].dtype == np.int64 and counted[backend].shape == (3,)
    want = [int((~f.contains(keys[row]) & (keys[row] != m)).sum()) for f, row, m in zip(filters, which, missing)]
    assert counted["compiled"].tolist() == counted["python"].tolist() == want
    assert 0 < want[0] < 700 - 175 - 1  # the held quarter and the missing key's two places not counted
    assert KnownSets(filters[:1]).unseen(keys[:, :0], [0], missing[:1]).tolist() == [0]
    for backend in hashing.BACKENDS:  # both refuse what is out of their contract, alike
        hashing.use_backend(backend)
        with pytest.raises(IndexError, match="row 9 of 4 rows"):
            KnownSets(filters[:1]).unseen(keys, [9], missing[:1])
        with pytest.raises(IndexError, match="row -1 of 4 rows"):
            KnownSets(filters[:1]).unseen(keys, [-1], missing[:1])
        with pytest.raises(ValueError, match="1 rows asked for 2 filters"):
            KnownSets(filters[:2]).unseen(keys, [0], missing[:2])


@needs_extension
def test_keys_and_their_rows_in_one_pass_equal_rows_of_the_keys():
    rng = random.Random(4)
    columns = [[f"{rng.random()}".encode() for _ in range(300)] for _ in range(3)]
    seeds, table_rows = [11, 12, 13], np.array([[1], [350], [2**40 + 7]], dtype=np.uint64)
    for backend in hashing.BACKENDS:
        hashing.use_backend(backend)
        keys, rows = hashing.hash_canonical_rows(columns, seeds, table_rows)
        assert np.array_equal(keys, hashing.hash_canonical_columns(columns, seeds))
        assert rows.dtype == np.int64 and np.array_equal(rows, hashing.rows_of(keys, table_rows)), backend
    for backend in hashing.BACKENDS:  # both refuse what is out of their contract, alike
        hashing.use_backend(backend)
        for bad in (np.array([[1], [0], [3]], dtype=np.uint64), np.array([[1], [-5], [3]])):
            with pytest.raises(ValueError, match="at least one row"):
                hashing.hash_canonical_rows(columns, seeds, bad)
        for bad in (table_rows[:2], table_rows.ravel(), table_rows.astype(np.float64)):
            with pytest.raises(ValueError, match=r"3 columns but table rows of shape"):
                hashing.hash_canonical_rows(columns, seeds, bad)


@needs_extension
def test_the_built_extension_has_every_function_its_callers_use():
    """A checkout does not rebuild the .so: one built from an older source would be missing what newer callers
    use, and is then not used at all (UEMBED_REQUIRE_EXTENSION=1: refused at import)."""
    assert all(callable(getattr(hashing._fasthash, name, None)) for name in hashing.EXTENSION_FUNCTIONS)
    code = ("import sys, types; import uembed.contract._fasthash as built; stale = types.ModuleType('stale'); "
            "stale.__dict__.update({k: v for k, v in vars(built).items() if k != 'length_prefixed'}); "
            "sys.modules['uembed.contract._fasthash'] = stale; import uembed.contract; uembed.contract._fasthash = stale; "
            "from uembed.contract import hashing; print(hashing.hashing_backend())")  # fmt: skip
    assert run_python(code).stdout.split() == ["python"]
    refused = run_python(code, UEMBED_REQUIRE_EXTENSION="1")
    assert refused.returncode != 0 and "built from an older source (no length_prefixed)" in refused.stderr


def plain_request(rng: random.Random, size: int) -> list[dict]:
    """``size`` examples as ``/v1/score``'s JSON gives them, mostly what the compiled column readers take (ids as
    numbers or strings, genre lists) and now and then what they leave to the checked path: a value left out or
    null, a bool, a float, an int past 64 bits, a lone surrogate, a missing marker, an empty string in a list, a
    list past the feature's limit, a value past the character limit, a list where one value goes."""
    odd = [None, True, 2.5, 10**30, "\ud800", "unknown", "x" * 300, ["a"]]
    odd_lists = [None, [], ["Drama", ""], ["Drama", "unknown"], ["x"] * 9, ["Drama", 7], "Drama|Comedy", [str(i) for i in range(300)]]
    examples = []
    for _ in range(size):
        example = {"user_id": rng.choice([rng.randrange(-5, 10**6), str(rng.randrange(10**6)), -(2**63), 2**63 - 1]),
                   "movie_id": rng.randrange(2000), "zip_code": random_text(rng), "age": rng.choice([18, 25, "35"]),
                   "occupation": rng.choice(["writer", "unknown", "東京"]), "gender": rng.choice("MF"),
                   "genres": [rng.choice(["Drama", "Comedy", "Film-Noir", "😀"]) for _ in range(rng.randrange(0, 4))]}  # fmt: skip
        if rng.random() < 0.02:
            name = rng.choice(list(example))
            if rng.random() < 0.3:
                del example[name]
            else:
                example[name] = rng.choice(odd_lists if name == "genres" else odd)
        examples.append(example)
    return examples


@needs_extension
@pytest.mark.parametrize("seed, limits", [(0, {}), (1, {}), (2, {"max_chars": None, "max_list": None}),
                                          (3, {"max_chars": 3, "max_list": 2}), (4, {"max_chars": 0, "max_list": 0}),
                                          (5, {"max_chars": -1})])  # fmt: skip
def test_plain_requests_canonicalise_alike_through_the_compiled_column_readers(synthetic_store, seed, limits, monkeypatch):
    """The compiled readers of a plain request's columns (text_column_of, list_column_of) against the checked path
    they stand in for: the same canonical values, truncations and missing counts, or the same error, on requests
    where now and then one value is what only the checked path takes or refuses (then the reader steps aside)."""
    from dataclasses import replace

    from uembed.serving.pipeline.encoding import ExampleEncoder
    from uembed.serving.pipeline.values import ValueLimits

    bundle = load_bundle(synthetic_store / "movielens" / "1")
    specs = dict(bundle.feature_specs)
    specs["occupation"] = replace(specs["occupation"], missing=("unknown",))
    specs["genres"] = replace(specs["genres"], missing=("unknown",), max_values=5)
    rng = random.Random(seed)
    requests = [plain_request(rng, rng.choice([1, 7, 64])) for _ in range(60)]
    outcomes: dict[str, list] = {}
    answered = []  # the readers' columns (not None): they did read, where the limits let them
    for reader in ("text_column_of", "list_column_of"):
        function = getattr(hashing._fasthash, reader)
        monkeypatch.setattr(hashing._fasthash, reader,
                            lambda *a, function=function: answered.append(function(*a)) or answered[-1])  # fmt: skip
    for backend, readers in (("compiled", True), ("compiled", False), ("python", False)):
        hashing.use_backend(backend)
        encoder = ExampleEncoder(specs, bundle.plan, ValueLimits(**limits), 0, bundle.known_values)
        got = []
        for request in requests:
            # a tuple of the same dicts is not a list: the readers are not used, the rest of the compiled path is
            examples = request if readers else tuple(request)
            try:
                canonical = encoder.canonicalise(examples)
            except ExampleError as exc:
                got.append(("error", str(exc)))
                continue
            rows, weights = encoder.hash([canonical])
            values = {name: [tuple(v) if isinstance(v, list) else v for v in column]  # a list's values: list or tuple
                      for name, column in canonical.values.items()}  # fmt: skip
            got.append((values, canonical.truncated, canonical.missing, rows.tolist(), weights.tolist(), encoder.take_unseen()))
        outcomes[f"{backend}-{readers}"] = got
    assert outcomes["compiled-True"] == outcomes["compiled-False"] == outcomes["python-False"]
    errors = sum(1 for outcome in outcomes["python-False"] if outcome[0] == "error")
    assert 0 < errors <= len(requests)  # requests the checked path refuses were asked
    read = sum(column is not None for column in answered)
    if limits.get("max_chars", 0) is not None and limits.get("max_chars", 0) < 0:
        assert not answered  # a negative limit: every value to the checked path
    elif limits.get("max_chars") != 0:
        assert read > 0
    if not limits:
        assert errors < len(requests)  # and requests it scores


@needs_extension
def test_the_column_readers_step_aside_for_what_they_do_not_check():
    extension = hashing.compiled_extension() or hashing._fasthash
    markers = frozenset({b"unknown"})
    assert extension.text_column_of([{"a": "x"}, {"a": -12}, {"a": "unknown"}], "a", 8, markers) == [b"x", b"-12", b""]
    for value in (True, 1.5, 2**64, "\ud800", "much too long", b"raw"):
        assert extension.text_column_of([{"a": "x"}, {"a": value}], "a", 8, markers) is None, value
    # null, or the feature left out: the missing value, as the checked path makes it
    assert extension.text_column_of([{"a": "x"}, {}, {"a": None}], "a", 8, markers) == [b"x", b"", b""]
    assert extension.text_column_of([{"a": "x"}, ("a", "y")], "a", 8, markers) is None  # not a dict
    assert extension.text_column(["x", -12, "unknown", "", None], 8, markers) == [b"x", b"-12", b"", b"", b""]
    for value in (True, 1.5, 2**64, "\ud800", "much too long", b"raw", ["x"]):
        assert extension.text_column(["x", value], 8, markers) is None, value
    assert extension.text_column(["é" * 8], 8, frozenset()) == ["é".encode() * 8]  # the limit counts characters
    assert extension.list_column_of([{"g": ["a", "b"]}, {"g": []}, {"g": None}, {}], "g", 8, 2, markers,
                                    (b"",)) == [(b"a", b"b"), (b"",), (b"",), (b"",)]  # fmt: skip
    assert extension.list_column([["a"], None], 8, 2, markers, (b"",)) == [(b"a",), (b"",)]
    for value in (["a", ""], ["unknown"], ["a", "b", "c"], ["a", 1], ["a", None], ("a",), "a", ["much too long"]):
        assert extension.list_column_of([{"g": value}], "g", 8, 2, markers, (b"",)) is None, value
        assert extension.list_column([["a"], value], 8, 2, markers, (b"",)) is None, value
    assert extension.list_column([["a", "b"], []], 8, 2, markers, (b"",)) == [(b"a", b"b"), (b"",)]


@needs_extension
@pytest.mark.parametrize("seed, limits", [(0, {}), (1, {}), (2, {"max_chars": 3, "max_list": 2}),
                                          (3, {"max_chars": 0, "max_list": 0}), (4, {"max_chars": -1})])
def test_a_fronts_columns_canonicalise_alike_through_the_compiled_column_readers(synthetic_store, seed, limits, monkeypatch):
    """A front's columns (feature -> a value per example, as /v2 and gRPC decode them) through the compiled text and
    list columns against the pure path: the same canonical values, truncations and missing counts, or the same
    error."""
    from dataclasses import replace

    from uembed.serving.pipeline.encoding import ExampleEncoder
    from uembed.serving.pipeline.values import ValueLimits

    bundle = load_bundle(synthetic_store / "movielens" / "1")
    specs = dict(bundle.feature_specs)
    specs["occupation"] = replace(specs["occupation"], missing=("unknown",))
    specs["genres"] = replace(specs["genres"], missing=("unknown",), max_values=5)
    rng = random.Random(seed)
    requests = [plain_request(rng, rng.choice([1, 7, 64])) for _ in range(60)]
    answered = {"text_column": 0, "list_column": 0}  # columns the readers did read (not None)
    for reader in answered:
        function = getattr(hashing._fasthash, reader)
        def counted(*args, function=function, reader=reader):
            column = function(*args)
            answered[reader] += column is not None
            return column
        monkeypatch.setattr(hashing._fasthash, reader, counted)
    outcomes = {}
    for backend in ("compiled", "python"):
        hashing.use_backend(backend)
        encoder = ExampleEncoder(specs, bundle.plan, ValueLimits(**limits), 0, bundle.known_values)
        got = []
        for request in requests:
            columns = {name: [example.get(name) for example in request] for name in specs}
            try:
                canonical = encoder.canonicalise_columns(columns, len(request))
            except ExampleError as exc:
                got.append(("error", str(exc)))
                continue
            values = {name: [tuple(v) if isinstance(v, list) else v for v in column] for name, column in canonical.values.items()}
            got.append((values, canonical.truncated, canonical.missing))
        outcomes[backend] = got
    assert outcomes["compiled"] == outcomes["python"]
    assert any(outcome[0] == "error" for outcome in outcomes["python"])  # requests the checked path refuses were asked
    if not limits:
        assert any(outcome[0] != "error" for outcome in outcomes["python"])  # and requests it scores
        assert answered["text_column"] > 0 and answered["list_column"] > 0
    elif limits.get("max_chars") == -1:
        assert answered == {"text_column": 0, "list_column": 0}  # a negative limit: every value to the checked path


@needs_extension
def test_an_n_by_w_tensors_rows_drop_their_padding_as_the_pure_path_does():
    from uembed.serving.protocols import oip

    rng = random.Random(0)
    for count, width in ((1, 1), (3, 4), (64, 6), (5, 1)):
        values = [rng.choice(["", "", "Drama", "Comedy", "😀", "x" * 40]) for _ in range(count * width)]
        compiled = oip.multivalent_rows(values, count, width)
        hashing.use_backend("python")
        assert compiled == oip.multivalent_rows(values, count, width)
        hashing.use_backend("compiled")
    with pytest.raises(ValueError):
        hashing._fasthash.rows_without_padding(["a", "b", "c"], 2, 2)


@needs_extension
@pytest.mark.parametrize("method", ["unified", "multi-size-unified", "hashing-trick"])
def test_a_list_features_rows_in_one_compiled_pass_equal_the_numpy_path(method):
    """list_rows (a multivalent feature's rows, weights and unseen count in one C pass) against the numpy path it
    replaces, with one and several lookups, mean and sum pooling, lists longer than the width, empty and missing."""
    from dataclasses import replace

    from uembed.contract.plan import Pooling, build_plan
    from uembed.model.data import load_movielens100k
    from uembed.serving.pipeline.encoding import ExampleEncoder

    dataset = load_movielens100k()
    training, _, _ = dataset.split(0)
    # a few genres take one lookup by default: two more, for a feature of several
    plan = build_plan(method, dataset.spec, training.columns, 8, budget_fraction=0.1,
                      lookups_offset=2 if method == "multi-size-unified" else 0)  # fmt: skip
    known = {name: KnownValues.build(keys) for name, keys in training_keys(training.columns).items()}
    specs = {feature.name: feature for feature in dataset.spec.features}
    hashing.use_backend("compiled")
    encoder = ExampleEncoder(specs, plan, known=known)
    genres = next(f for f in plan.features if f.name == "genres")
    assert "genres" in encoder.hashed_lists and (method != "multi-size-unified" or len(genres.lookups) > 1)
    rng = random.Random(1)
    names = [b"Drama", b"Comedy", b"Film-Noir", b"never-trained", b"\xf0\x9f\x98\x80"]
    values = [tuple(rng.choice(names) for _ in range(rng.randrange(1, 9))) for _ in range(300)]
    values += [(b"",), [b"Drama", b"Comedy"], (b"never-trained",) * 12]  # an empty list, a list, past the width
    for pooling in (Pooling.MEAN, Pooling.SUM):
        feature = replace(genres, pooling=pooling)
        compiled = encoder._list_rows(feature, values), encoder.take_unseen()["genres"]
        lists, encoder.hashed_lists = encoder.hashed_lists, {}  # the numpy path
        try:
            numpy = encoder._list_rows(feature, values), encoder.take_unseen()["genres"]
        finally:
            encoder.hashed_lists = lists
        (rows, weights), (want_rows, want_weights) = compiled[0], numpy[0]
        assert rows.dtype == want_rows.dtype and weights.dtype == want_weights.dtype
        assert np.array_equal(rows, want_rows) and np.array_equal(weights, want_weights)
        assert compiled[1] == numpy[1] > 0  # the values never trained on, counted alike


@needs_extension
def test_list_rows_without_training_values_gives_no_keys():
    rows, weights, keys = hashing._fasthash.list_rows([(b"a", b"b"), (b"",)], 3, True, (7, 9), (10, 20), None)
    assert rows.shape == weights.shape == (2, 6) and keys.size == 0
    assert weights.tolist()[0] == [0.5, 0.5, 0.0] * 2 and weights.tolist()[1] == [1.0, 0.0, 0.0] * 2


def test_a_negative_max_values_is_refused():
    from uembed.contract.errors import SpecError
    from uembed.contract.features import FeatureSpec

    with pytest.raises(SpecError, match="max_values must be at least 0"):
        FeatureSpec(name="genres", kind="multivalent", max_values=-1)
