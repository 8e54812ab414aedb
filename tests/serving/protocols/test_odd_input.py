"""Odd input over real sockets: bodies nested deep, bodies not in UTF-8, header numbers that are not ASCII digits,
and examples that leave features out. Every one is a 4xx naming the field or header, never a 500 (issue #35, items 5
and 9; issue #36, item 5). And random bodies and gRPC requests (hypothesis, the same examples on every run): each
answered or refused, never a 5xx or an internal error."""

import json

import grpc
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from uembed.loadtest.servers import UvicornProcess
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.serving.protocols.bodies import MAX_JSON_DEPTH

MODEL = "movielens"
EXAMPLE = {"user_id": "196", "movie_id": "242", "age": 49, "gender": "M", "occupation": "writer", "zip_code": "55105",
           "genres": ["Comedy"]}  # fmt: skip
JSON = {"content-type": "application/json"}


def start(store, tmp_path_factory, **settings) -> UvicornProcess:
    env = {"UEMBED_BUNDLES": str(store / MODEL / "1"), **{f"UEMBED_{k.upper()}": v for k, v in settings.items()}}
    return UvicornProcess("uembed.serving.app:create_app", env, tmp_path_factory.mktemp("odd") / "service.log").start()


@pytest.fixture(scope="module")
def service(synthetic_store, tmp_path_factory):
    service = start(synthetic_store, tmp_path_factory)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def strict(synthetic_store, tmp_path_factory):
    service = start(synthetic_store, tmp_path_factory, require_features="true")
    yield service
    service.stop()


def nested(depth: int) -> bytes:
    return b"[" * depth + b'"Comedy"' + b"]" * depth


def v2_body(data: bytes) -> bytes:
    """A /v2 request whose genres tensor's data is ``data`` (the other inputs well formed)."""
    inputs = [{"name": name, "datatype": "BYTES", "shape": [1], "data": [str(EXAMPLE[name])]}
              for name in MOVIELENS_FEATURES if name != "genres"]  # fmt: skip
    return orjson.dumps({"inputs": inputs})[:-2] + b',{"name":"genres","datatype":"BYTES","shape":[1,1],"data":' + data + b"}]}"


# --- #35 item 5: depth and header numbers ------------------------------------------------------------------
@pytest.mark.parametrize("depth", [500, 1000, 5000])
@pytest.mark.parametrize("headers", [JSON, {}], ids=["lean", "route"])  # without a JSON type: FastAPI's route
def test_a_score_body_nested_deep_is_a_422_naming_it(service, depth, headers):
    body = b'{"examples": [{"genres": ' + nested(depth) + b"}]}"
    response = httpx.post(f"{service.url}/v1/score", content=body, headers=headers, timeout=30)
    assert response.status_code == 422, response.text
    # the lean path's decoder reads a few hundred levels: the value is then refused by the feature's checks
    assert response.json()["detail"] in (f"body: lists and objects nested {depth + 3} deep; at most {MAX_JSON_DEPTH}",
                                         "examples[0].genres: takes a string, number, boolean or null, got list")


def test_an_admin_body_nested_deep_is_a_422(service):
    body = b'{"split": ' + b'{"1":' * 1000 + b"1" + b"}" * 1000 + b"}"
    response = httpx.put(f"{service.url}/v1/models/{MODEL}/routing", content=body, headers=JSON, timeout=30)
    assert response.status_code == 422 and "nested 1001 deep" in response.json()["detail"], response.text


@pytest.mark.parametrize("depth", [5, 990, 1000, 2000])
def test_v2_data_nested_deep_is_a_422_naming_the_tensor(service, depth):
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=v2_body(nested(depth)), timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    # orjson refuses past its own limit (1024 levels) as invalid JSON; below it the tensor is named
    assert "not valid JSON" in error if depth > 1024 else "input 'genres': data nested in more than 4 lists" in error


def test_v2_binary_framing_with_data_nested_deep_is_a_422(service):
    header = v2_body(nested(995))
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=header,
                          headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)  # fmt: skip
    assert response.status_code == 422 and "input 'genres'" in response.json()["error"], response.text


@pytest.mark.parametrize("length", ["\u00b2".encode("latin-1"), b"7" * 4301, b"1" * 19, b"\xd9\xa3"],
                         ids=["superscript", "4301-digits", "19-digits", "arabic-indic"])  # fmt: skip
def test_an_inference_header_length_not_in_ascii_digits_is_a_422_naming_the_header(service, length):
    body = v2_body(b'[["Comedy"]]')
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=body,
                          headers=[(b"Inference-Header-Content-Length", length)], timeout=30)  # fmt: skip
    assert response.status_code == 422, response.text
    assert "Inference-Header-Content-Length" in response.json()["error"]


# --- #35 item 9: UTF-8 only ---------------------------------------------------------------------------------
UTF16 = [("utf-16", "UTF-16"), ("utf-16-le", "NUL bytes"), ("utf-16-be", "NUL bytes"), ("utf-8-sig", "byte-order mark"),
         ("utf-32", "UTF-16")]  # fmt: skip


@pytest.mark.parametrize(("encoding", "words"), UTF16, ids=[e for e, _ in UTF16])
@pytest.mark.parametrize("headers", [JSON, {}], ids=["lean", "route"])
def test_a_score_body_not_in_utf8_is_a_422(service, encoding, words, headers):
    body = orjson.dumps({"examples": [EXAMPLE]}).decode().encode(encoding)
    response = httpx.post(f"{service.url}/v1/score", content=body, headers=headers, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("body: not UTF-8 JSON") and words in response.json()["detail"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-8-sig"])
def test_a_v2_body_not_in_utf8_is_a_422(service, encoding):
    body = v2_body(b'[["Comedy"]]').decode().encode(encoding)
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=body, headers=JSON, timeout=30)
    assert response.status_code == 422, response.text


# --- #36 item 5: missing features ---------------------------------------------------------------------------
def missing_count(service, feature: str) -> float:
    return service.metrics().get(f'uembed_missing_features_total{{feature="{feature}",model="{MODEL}"}}', 0.0)


def test_features_left_out_are_scored_and_counted_per_example(service):
    before = {name: missing_count(service, name) for name in MOVIELENS_FEATURES}
    partial = {k: v for k, v in EXAMPLE.items() if k not in ("genres", "age")}
    response = httpx.post(f"{service.url}/v1/score", json={"examples": [{}, partial, EXAMPLE]}, timeout=30)
    assert response.status_code == 200, response.text
    # a ranking request: the context's features count as given to every candidate
    context = {k: EXAMPLE[k] for k in ("user_id", "age", "gender", "occupation", "zip_code")}
    ranking = {"context": context, "candidates": [{"movie_id": "242"}, {"movie_id": "302", "genres": ["Crime"]}]}
    assert httpx.post(f"{service.url}/v1/score", json=ranking, timeout=30).status_code == 200
    after = {name: missing_count(service, name) for name in MOVIELENS_FEATURES}
    expected = {name: 1 + (name in ("genres", "age")) + (name == "genres") for name in MOVIELENS_FEATURES}
    assert {name: after[name] - before[name] for name in MOVIELENS_FEATURES} == expected


def test_readiness_probes_count_no_missing_feature(service):
    before = missing_count(service, "genres")
    for path in ("/readyz", "/v2/health/ready"):
        assert httpx.get(f"{service.url}{path}", timeout=30).status_code == 200
    assert missing_count(service, "genres") == before


@pytest.mark.parametrize("age", [b"49", b"1e400"], ids=["lean", "route"])
def test_with_require_features_a_v1_example_missing_one_is_a_422_naming_them(strict, age):
    """1e400: a number past a float's range, which msgspec refuses and the route reads (the lean path hands it on)."""
    partial = {k: v for k, v in EXAMPLE.items() if k not in ("genres", "age")}
    body = orjson.dumps({"examples": [EXAMPLE, partial]}).replace(b'"age":49', b'"age":' + age, 1)
    response = httpx.post(f"{strict.url}/v1/score", content=body, headers=JSON, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("examples[1]: missing features: age, genres")
    ranking = {"context": {k: EXAMPLE[k] for k in EXAMPLE if k not in ("movie_id", "genres")},
               "candidates": [{"movie_id": "242", "genres": []}, {"movie_id": "302"}]}  # fmt: skip
    response = httpx.post(f"{strict.url}/v1/score", json=ranking, timeout=30)
    assert response.status_code == 422 and response.json()["detail"].startswith("candidates[1]: missing features: genres")
    ranking["candidates"][1]["genres"] = None  # null is a missing value, sent: accepted
    assert httpx.post(f"{strict.url}/v1/score", json=ranking, timeout=30).status_code == 200


def test_with_require_features_a_missing_tensor_is_refused_naming_them_over_v2_and_grpc(strict):
    inputs = [{"name": name, "datatype": "BYTES", "shape": [1], "data": [str(EXAMPLE[name])]}
              for name in MOVIELENS_FEATURES if name not in ("genres", "gender")]  # fmt: skip
    response = httpx.post(f"{strict.url}/v2/models/{MODEL}/infer", json={"inputs": inputs}, timeout=30)
    assert response.status_code == 422 and "missing features: gender, genres" in response.json()["error"], response.text
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for tensor in inputs:
        request.inputs.add(name=tensor["name"], datatype="BYTES", shape=[1]).contents.bytes_contents.append(tensor["data"][0].encode())
    with grpc.insecure_channel(strict.grpc_target) as channel, pytest.raises(grpc.RpcError) as error:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing features: gender, genres" in error.value.details()


@pytest.mark.parametrize("shape", [[None], ["x"], [1e300] * 2000, [2**62, 2**62], [-1, 1]], ids=["null", "text", "huge-floats", "huge-ints", "negative"])
def test_a_v2_shape_of_anything_is_a_422_naming_the_tensor(service, shape):
    """A shape is read before the tensors are decoded (to choose where): one that is not one or two whole numbers
    matching the data is refused, naming the tensor, and costs no big product."""
    inputs = [{"name": name, "datatype": "BYTES", "shape": [1], "data": [str(EXAMPLE[name])]} for name in MOVIELENS_FEATURES]
    inputs[0]["shape"] = shape
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=orjson.dumps({"inputs": inputs}), timeout=30)
    assert response.status_code == 422 and f"'{MOVIELENS_FEATURES[0]}'" in response.json()["error"], response.text


# --- random bodies: whatever a client sends, a 4xx or an answer, never a 5xx --------------------------------------
RANDOM = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
# JSON numbers past 64 bits too (the stdlib's encoder writes them; orjson would not)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                    st.sampled_from(["", "\u0000", "a" * 300, "\u00e9", "NaN"]))  # fmt: skip
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)  # fmt: skip
NAMES = st.one_of(st.sampled_from(MOVIELENS_FEATURES), st.text(max_size=8))
ONE_CHANGED = st.builds(lambda name, value: {**EXAMPLE, name: value}, st.sampled_from(MOVIELENS_FEATURES), VALUES)
EXAMPLES = st.lists(st.one_of(ONE_CHANGED, st.dictionaries(NAMES, VALUES, max_size=8), VALUES), max_size=4)
SCORE_BODIES = st.one_of(
    st.builds(lambda examples: {"examples": examples}, EXAMPLES),
    st.builds(lambda context, candidates: {"context": context, "candidates": candidates}, st.one_of(ONE_CHANGED, VALUES), EXAMPLES),
    st.builds(lambda model, version, key: {"examples": [EXAMPLE], "model": model, "version": version, "routing_key": key},
              VALUES, VALUES, VALUES),
    st.dictionaries(st.sampled_from(["examples", "context", "candidates", "model", "version", "routing_key", "other"]), VALUES, max_size=4),
)  # fmt: skip
DATATYPES = ["BYTES", "INT64", "INT32", "FP64", "FP32", "FP16", "BOOL", "UINT8", "?"]
TENSORS = st.fixed_dictionaries({"name": NAMES, "datatype": st.one_of(st.sampled_from(DATATYPES), VALUES),
                                 "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), VALUES), "data": VALUES},
                                optional={"parameters": VALUES})  # fmt: skip
V2_BODIES = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(TENSORS, max_size=8)}, optional={"outputs": VALUES, "parameters": VALUES}),
    st.builds(lambda tensor: {"inputs": [{"name": name, "datatype": "BYTES", "shape": [1], "data": [str(EXAMPLE[name])]}
                                         for name in MOVIELENS_FEATURES if name != tensor.get("name")] + [tensor]}, TENSORS),
)  # fmt: skip


@RANDOM
@given(body=SCORE_BODIES)
def test_a_random_score_body_is_answered_or_refused_never_a_5xx(service, body):
    response = httpx.post(f"{service.url}/v1/score", content=json.dumps(body).encode(), headers=JSON, timeout=10)
    assert response.status_code < 500, (body, response.text)


@RANDOM
@given(body=V2_BODIES)
def test_a_random_v2_body_is_answered_or_refused_never_a_5xx(service, body):
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=json.dumps(body).encode(), headers=JSON, timeout=10)
    assert response.status_code < 500, (body, response.text)


GRPC_TENSORS = st.lists(st.fixed_dictionaries({
    "name": NAMES, "datatype": st.sampled_from(DATATYPES), "shape": st.lists(st.integers(-1, 4), max_size=3),
    "raw": st.one_of(st.none(), st.binary(max_size=40)), "texts": st.lists(st.binary(max_size=6), max_size=4),
    "ints": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)}), max_size=8)  # fmt: skip


@RANDOM
@given(tensors=GRPC_TENSORS)
def test_a_random_grpc_request_is_answered_or_refused_never_an_internal_error(service, tensors):
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for tensor in tensors:
        given_tensor = request.inputs.add(name=tensor["name"], datatype=tensor["datatype"])
        given_tensor.shape.extend(tensor["shape"])
        if tensor["raw"] is None:
            given_tensor.contents.bytes_contents.extend(tensor["texts"])
            given_tensor.contents.int64_contents.extend(tensor["ints"])
        else:
            request.raw_input_contents.append(tensor["raw"])
    with grpc.insecure_channel(service.grpc_target) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                                        grpc.StatusCode.UNAVAILABLE), (str(request)[:2000], error.details())  # fmt: skip
