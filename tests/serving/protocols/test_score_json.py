"""A /v1/score body read by the compiled reader (``_score_json.pyx``) straight into columns, against msgspec's decoding
of the same bytes (``lean_json.LeanBody`` without the reader): from any body the reader takes, the same values,
types included, in the same examples, and the same model, version and routing key; any other body left to msgspec.
Random bodies, random layouts of their JSON and random damage to them cover what a client may send; the service
answers the same with the reader and without it, scores and errors alike."""

import json
import random

import pytest

from tests.serving.inprocess import InProcessService
from uembed.loadtest.load import movielens_requests
from uembed.serving.pipeline.canonical import ExampleColumns
from uembed.serving.protocols import lean_json
from uembed.serving.protocols.lean_json import ColumnsBody, LeanBody
from uembed.serving.protocols.render import MAX_ROUTING_KEY_CHARS
from uembed.serving.registry import MAX_NAME_CHARS

COMPILED = lean_json._score_json
pytestmark = pytest.mark.skipif(COMPILED is None, reason="the compiled reader (_score_json.pyx) is not built (make install)")
MAX_EXAMPLES = 8
NAMES = ["user_id", "movie_id", "genres", "age", "ü", "x" * 128, "x" * 129, "", "a\\u0062", "examples"]
TEXTS = ["", "196", "Comedy", "ünïcödé", "名前", "🙂", "tab\there", "quote\"d", "back\\slash", "x" * 300, "\ud800", "null"]
NUMBERS = [0, -0.0, 1, -1, 7, 10**17, 10**18 - 1, 10**18, -(10**18) + 1, 2**63, 2**64, 1.5, 1e300, float("inf")]


def read(body: bytes):
    """The compiled reader's request, or None where it leaves the body to msgspec."""
    found = COMPILED.score_columns(body, MAX_EXAMPLES, MAX_NAME_CHARS, MAX_ROUTING_KEY_CHARS)
    if found is None:
        return None
    columns, count, model, version, routing_key, context, ranking = found
    if ranking:
        return ColumnsBody(None, model, version, routing_key, context, ExampleColumns(columns, count))
    return ColumnsBody(ExampleColumns(columns, count), model, version, routing_key)


def decoded(body: bytes, monkeypatch):
    """msgspec's request (the lean path's without the reader), or None where the route answers."""
    monkeypatch.setattr(lean_json, "_score_json", None)
    try:
        return LeanBody(MAX_EXAMPLES).decode(body)
    finally:
        monkeypatch.setattr(lean_json, "_score_json", COMPILED)


def typed(value):
    """A value with its type spelled out: 1 and 1.0 and True differ, as they canonicalise differently."""
    if isinstance(value, list):
        return ("list", [typed(item) for item in value])
    return (type(value).__name__, value)


def agree(body: bytes, monkeypatch) -> bool:
    """Checks the reader against msgspec on ``body``; whether the reader took it."""
    columns = read(body)
    if columns is None:
        return False
    rows = decoded(body, monkeypatch)
    assert rows is not None, f"the reader took a body the route refuses: {body[:200]!r}"
    assert (columns.model, columns.version, columns.routing_key) == (rows.model, rows.version, rows.routing_key)
    assert (columns.examples is None, columns.candidates is None) == (rows.examples is None, rows.candidates is None)
    if rows.context is None:
        assert columns.context is None
    else:
        assert {name: typed(value) for name, value in columns.context.items()} == {name: typed(value) for name, value in rows.context.items()}
    examples = columns.examples if columns.examples is not None else columns.candidates
    expected = rows.examples if rows.examples is not None else rows.candidates
    assert len(examples) == len(expected)
    for index, example in enumerate(expected):  # every example names the same features, each its own value
        assert {name: typed(value) for name, value in examples[index].items()} == {name: typed(value) for name, value in example.items()}
    return True


def random_value(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(TEXTS)
    if kind == 1:
        return rng.choice(NUMBERS)
    if kind == 2:
        return rng.choice([None, True, False])
    if kind == 3:
        return [rng.choice(TEXTS + [1, None]) if rng.random() < 0.2 else rng.choice(TEXTS[:6]) for _ in range(rng.randrange(4))]
    if kind == 4:
        return {"nested": rng.choice(TEXTS)}
    return rng.randrange(-1000, 1000)


def random_body(rng: random.Random) -> bytes:
    """A score body, usually of the form the reader takes, with a random layout of its JSON."""
    names = rng.sample(NAMES[:4] if rng.random() < 0.7 else NAMES, rng.randrange(0, 5))
    examples = []
    for _ in range(rng.choice([0, 1, 2, 5, MAX_EXAMPLES, MAX_EXAMPLES + 1])):
        own = names if rng.random() < 0.9 else rng.sample(NAMES, rng.randrange(0, 4))
        example = {name: random_value(rng) if rng.random() < 0.15 else rng.choice(TEXTS[:3] + [7, None, ["Comedy"]]) for name in own}
        examples.append(dict(rng.sample(list(example.items()), len(example))))  # the features in any order
    members = {"examples": examples}
    if rng.random() < 0.3:  # a ranking request: the context's features, and candidates with the others
        shared = rng.sample(NAMES[:4], rng.randrange(0, 3))
        members = {"context": {name: rng.choice(TEXTS[:3] + [7, None, ["Comedy"]]) if rng.random() < 0.9 else random_value(rng)
                               for name in shared},
                   "candidates": [{name: value for name, value in example.items() if name not in shared} for example in examples]}
        if rng.random() < 0.1:
            members["examples"] = examples
    for member in ("model", "version", "routing_key", "context", "candidates", "other"):
        if rng.random() < 0.15:
            members[member] = rng.choice([None, "movielens", "1", "", "ü", "x" * 129, "x" * 257, 3, {"user_id": 1}, [GOOD]])
    members = dict(rng.sample(list(members.items()), len(members)))
    layout = rng.choice([{}, {"separators": (",", ":")}, {"indent": 2}, {"indent": "\t", "separators": (" ,", " : ")}])
    text = json.dumps(members, ensure_ascii=rng.random() < 0.5, allow_nan=True, **layout)
    if rng.random() < 0.2:
        text = rng.choice([" ", "\n", "\r\n\t"]) + text + rng.choice(["", " ", "\n", " x", ",", "}"])
    return text.encode("utf-8", "surrogatepass")


GOOD = {"user_id": "196", "movie_id": 242, "genres": ["Comedy", "Drama"]}


def test_the_usual_bodies_are_read_into_columns(monkeypatch):
    for examples in movielens_requests(MAX_EXAMPLES, 50):
        assert agree(json.dumps({"examples": examples}).encode(), monkeypatch)
    body = {"examples": [GOOD, {**GOOD, "user_id": None, "genres": []}], "model": "movielens", "version": None,
            "routing_key": "k" * MAX_ROUTING_KEY_CHARS}  # fmt: skip
    assert agree(json.dumps(body, indent=1).encode(), monkeypatch)
    assert agree(json.dumps({"examples": [{"city": "São Paulo 🙂", "n": -0}]}, ensure_ascii=False).encode(), monkeypatch)
    assert agree(b'{"examples": [{}, {}]}', monkeypatch)  # examples that name nothing: every feature missing
    assert agree(b'{"examples":[{"n":-0,"m":-7,"o":"del\x7f"}]}', monkeypatch)
    assert agree(b'{"examples":[{"ab":1,"ba":"x"},{"ba":"y","ab":2}]}', monkeypatch)  # same lengths, another order
    assert agree(bytearray(b'{"examples":[{"a":"1"}], "model": "%s"}' % (b"m" * MAX_NAME_CHARS)), monkeypatch)
    assert agree(json.dumps({"examples": [{f"f{i}": i for i in range(64)}] * 2}).encode(), monkeypatch)
    assert read(json.dumps({"examples": [{f"f{i}": i for i in range(65)}]}).encode()) is None  # past 64 features
    assert read(json.dumps({"examples": [GOOD]}).encode()).examples[0] == GOOD  # not left to msgspec unseen
    ranking = {"context": {"user_id": "196", "age": 49}, "candidates": [{"movie_id": 242, "genres": []}] * 3, "model": "m"}
    assert agree(json.dumps(ranking).encode(), monkeypatch) and read(json.dumps(ranking).encode()).context == ranking["context"]
    assert agree(json.dumps({"context": {}, "candidates": [GOOD]}).encode(), monkeypatch)


@pytest.mark.parametrize("body", [
    b'{"examples": [{"a": 1.5}]}', b'{"examples": [{"a": 1e3}]}', b'{"examples": [{"a": true}]}',
    b'{"examples": [{"a": "x\\u0062"}]}', b'{"examples": [{"a\\u0062": 1}]}', b'{"examples": [{"a": "tab\tinside"}]}',
    b'{"examples": [{"a": 1}, {"b": 1}]}', b'{"examples": [{"a": 1, "b": 2}, {"a": 1}]}', b'{"examples": [{"a": 1, "a": 2}]}',
    b'{"examples": [{"a": 1234567890123456789}]}', b'{"examples": [{"a": 01}]}', b'{"examples": [{"a": -}]}',
    b'{"examples": [{"a": [1]}]}', b'{"examples": [{"a": [null]}]}', b'{"examples": [{"a": {"b": 1}}]}',
    b'{"examples": []}', b'{"examples": [{"a": 1}], "examples": [{"a": 1}]}', b'{"examples": [{"a": 1}]} x',
    b'{"context": {"a": 1}, "examples": [{"b": 1}]}', b'{"context": {"a": 1}}', b'{"context": null, "candidates": [{"b": 1}]}',
    b'{"context": {"a": 1, "a": 2}, "candidates": [{"b": 1}]}', b'{"examples": [{"a": 1}], "candidates": [{"a": 1}]}',
    b'{"context": {"a": 1}, "context": {"a": 1}, "candidates": [{"b": 1}]}', b'{"context": {"a": 1.5}, "candidates": [{"b": 1}]}',
    b'{"examples": [{"a": 1}], "other": 1}', b'{}',
    b'{"examples": [{"a": 1}], "model": "\xc3\xbc"}', b'{"examples": [{"a": 1}], "model": 3}',
    b'{"examples": [{"a": "\xff"}]}', b'{"examples": [{"a": "\xed\xa0\x80"}]}', b'[{"a": 1}]', b'',
    ('{"examples": [{"%s": 1}]}' % ("f" * (MAX_NAME_CHARS + 1))).encode(),
    ('{"examples": [%s]}' % ", ".join(['{"a": 1}'] * (MAX_EXAMPLES + 1))).encode(),
])  # fmt: skip
def test_what_the_reader_leaves_to_msgspec(body, monkeypatch):
    """Each is left to msgspec, which decodes it as the lean path always did (or refuses it: the route answers)."""
    assert read(body) is None
    assert repr(LeanBody(MAX_EXAMPLES).decode(body)) == repr(decoded(body, monkeypatch))


def test_random_bodies_are_read_as_msgspec_decodes_them(monkeypatch):
    rng = random.Random(39)
    taken = sum(agree(random_body(rng), monkeypatch) for _ in range(4000))
    assert 300 < taken < 3700  # both ways were exercised


def test_damaged_bodies_are_read_as_msgspec_decodes_them(monkeypatch):
    rng = random.Random(40)
    bodies = [json.dumps({"examples": examples, "model": "movielens"}).encode() for examples in movielens_requests(2, 20)]
    taken = 0
    for _ in range(6000):
        body = bytearray(rng.choice(bodies))
        for _ in range(rng.choice([1, 1, 2, 3])):
            at = rng.randrange(len(body))
            damage = rng.randrange(3)
            if damage == 0:
                body[at] = rng.choice(b'"{}[],:\\ -.0123456789eEnultrfa\x00\x1f\x7f\x80\xc3\xff')
            elif damage == 1:
                body.insert(at, rng.choice(b' "{}[],:\\-0e'))
            else:
                del body[at]
        taken += agree(bytes(body), monkeypatch)
    assert taken > 100  # some damage leaves valid JSON of the usual form (a digit changed, a space added)


@pytest.fixture(scope="module")
def service(synthetic_store):
    service = InProcessService(bundles=[synthetic_store / "movielens" / "1"], max_examples=MAX_EXAMPLES, max_value_chars=64)
    yield service
    service.close()


@pytest.mark.parametrize("examples", [
    [GOOD, {**GOOD, "movie_id": "302", "genres": []}],
    [{**GOOD, "age": 30, "gender": None}] * 3,
    [{**GOOD, "user_id": "u" * 65}],  # a value past max_value_chars: a 422 naming examples[0].user_id
    [GOOD, {**GOOD, "genres": "Comedy"}],  # not a list
    [{**GOOD, "movie_id": ["1"]}],  # a list for a one-value feature
    [{**GOOD, "nope": 1}],  # an unknown feature
])  # fmt: skip
def test_the_service_answers_the_same_with_the_reader_and_without_it(service, examples, monkeypatch):
    answer_both_ways(service, {"examples": examples}, monkeypatch)


CONTEXT = {"user_id": "196", "age": 49, "gender": "M"}


@pytest.mark.parametrize("context, candidates", [
    (CONTEXT, [{"movie_id": 242, "genres": ["Comedy"]}, {"movie_id": "302", "genres": []}]),
    ({}, [GOOD] * 2),
    ({**CONTEXT, "user_id": "u" * 65}, [{"movie_id": 242}]),  # a context value past max_value_chars
    ({**CONTEXT, "nope": 1}, [{"movie_id": 242}]),  # an unknown feature in the context
    (CONTEXT, [{"movie_id": 242, "nope": 1}]),  # and in the candidates
    (CONTEXT, [{"movie_id": 242, "user_id": "7"}]),  # a feature in both
    (CONTEXT, [{"movie_id": 242, "genres": "Comedy"}, {"movie_id": 1, "genres": "Drama"}]),  # not a list
    ({**CONTEXT, "genres": ["Crime", "Drama"]}, [{"movie_id": 242}] * 4),  # a list in the context
])  # fmt: skip
def test_a_ranking_request_is_answered_the_same_with_the_reader_and_without_it(service, context, candidates, monkeypatch):
    answer_both_ways(service, {"context": context, "candidates": candidates}, monkeypatch)


def answer_both_ways(service, request: dict, monkeypatch) -> None:
    body = json.dumps(request).encode()
    assert read(body) is not None
    answers = []
    for reader in (COMPILED, None):
        monkeypatch.setattr(lean_json, "_score_json", reader)
        response = service.post("/v1/score", content=body, headers={"content-type": "application/json"})
        answers.append((response.status_code, response.json()))
    assert answers[0] == answers[1]
