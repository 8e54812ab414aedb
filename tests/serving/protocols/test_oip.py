"""The Open Inference Protocol (KServe v2) over real sockets: Triton's own clients, REST and gRPC, against the service.

Scores must equal /v1/score's for the same examples (one encoding path, one batcher); bad tensors get a 4xx
(REST, ``{"error": message}``) or INVALID_ARGUMENT (gRPC) that names the tensor."""

import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.scoring import score
from tests.serving.inprocess import InProcessService
from uembed.loadtest.peers import grpc_request
from uembed.loadtest.servers import UvicornProcess, free_port, wait_until
from uembed.loadtest.traffic import MOVIELENS_FEATURES
from uembed.serving.protocols.grpc_h2 import start_grpc_server, stop_grpc_server
from uembed.serving.protocols.oip import InferencePlane

MODEL = "movielens"
EXAMPLES = 256


@pytest.fixture(scope="module")
def service(synthetic_store, tmp_path_factory):
    service = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(synthetic_store / MODEL / "1")},
                             tmp_path_factory.mktemp("oip") / "service.log").start()  # fmt: skip
    yield service
    service.stop()


@pytest.fixture(scope="module")
def examples(movielens_examples):
    return movielens_examples[:EXAMPLES]


@pytest.fixture(scope="module")
def v1_scores(service, examples):
    return score(service.url, examples)


def feature_arrays(examples: list[dict]) -> dict[str, np.ndarray]:
    """One array per feature as a client would build it: ids and ages INT64, strings BYTES, genres [N, W]
    padded with ""."""
    arrays = {}
    for name in MOVIELENS_FEATURES:
        values = [example[name] for example in examples]
        if name == "genres":
            width = max(map(len, values))
            arrays[name] = np.array([genres + [""] * (width - len(genres)) for genres in values], dtype=object)
        elif all(type(value) is int for value in values):
            arrays[name] = np.array(values, dtype=np.int64)
        else:
            arrays[name] = np.array(values, dtype=object)
    return arrays


def triton_inputs(client_module, arrays: dict[str, np.ndarray], **binary) -> list:
    inputs = []
    for name, array in arrays.items():
        tensor = client_module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, **binary)
        inputs.append(tensor)
    return inputs


# --- scores ---------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triton_http_client_scores_like_v1(service, examples, v1_scores, binary):
    client = triton_http.InferenceServerClient(service.url.removeprefix("http://"))
    inputs = triton_inputs(triton_http, feature_arrays(examples), binary_data=binary)
    output = triton_http.InferRequestedOutput("score", binary_data=binary)
    result = client.infer(MODEL, inputs, outputs=[output], request_id="r1")
    scores = result.as_numpy("score")
    assert scores.dtype == np.float32 and scores.shape == (EXAMPLES,)
    np.testing.assert_allclose(scores, v1_scores, rtol=0, atol=1e-6)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (MODEL, "1", "r1")
    # No requested outputs: Triton's client asks for binary_data_output, and the version path works the same.
    again = client.infer(MODEL, inputs, model_version="1").as_numpy("score")
    np.testing.assert_array_equal(again, scores)


def test_triton_grpc_client_scores_like_v1_with_raw_input_contents(service, examples, v1_scores):
    client = triton_grpc.InferenceServerClient(service.grpc_target)
    result = client.infer(MODEL, triton_inputs(triton_grpc, feature_arrays(examples)), request_id="g1")
    scores = result.as_numpy("score")
    assert scores.dtype == np.float32 and scores.shape == (EXAMPLES,)
    np.testing.assert_allclose(scores, v1_scores, rtol=0, atol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "g1")
    assert service.metrics()['uembed_grpc_requests_total{code="OK",method="ModelInfer"}'] >= 1


def test_grpc_typed_contents_and_joined_multivalent_values_score_like_v1(service, examples, v1_scores):
    """Typed ``contents`` (what Go and Java stubs often send), ids as BYTES strings, and genres as [N] strings
    joined by the feature's separator: the same canonical values, so the same scores."""
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for name in MOVIELENS_FEATURES:
        values = [example[name] for example in examples]
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(values)])
        if name == "genres":
            values = ["|".join(genres) for genres in values]
        elif name == "age":
            tensor.datatype = "INT64"
            tensor.contents.int64_contents.extend(values)
            continue
        tensor.contents.bytes_contents.extend(str(value).encode() for value in values)
    with grpc.insecure_channel(service.grpc_target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    scores = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    assert list(response.outputs[0].shape) == [EXAMPLES] and response.outputs[0].datatype == "FP32"
    np.testing.assert_allclose(scores, v1_scores, rtol=0, atol=1e-6)


def test_a_json_request_without_the_client_library(service, examples, v1_scores):
    """The protocol's JSON form by hand: nested data, the score as JSON numbers."""
    arrays = feature_arrays(examples[:3])
    inputs = [{"name": name, "datatype": np_to_triton_dtype(array.dtype), "shape": list(array.shape), "data": array.tolist()}
              for name, array in arrays.items()]  # fmt: skip
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", json={"inputs": inputs}, timeout=30)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("score", "FP32", [3])
    np.testing.assert_allclose(output["data"], v1_scores[:3], rtol=0, atol=1e-6)


# --- health, readiness, metadata ----------------------------------------------------------------
def test_health_readiness_and_metadata_over_http(service):
    client = triton_http.InferenceServerClient(service.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "7")
    server = client.get_server_metadata()
    assert server["name"] == "uembed" and "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata(MODEL)
    assert metadata["versions"] == ["1"] and client.get_model_metadata(MODEL, "1") == metadata
    inputs = {tensor["name"]: (tensor["datatype"], tensor["shape"]) for tensor in metadata["inputs"]}
    assert list(inputs) == list(MOVIELENS_FEATURES)
    assert inputs["user_id"] == ("BYTES", [-1, 1]) and inputs["genres"][0] == "BYTES"
    assert len(inputs["genres"][1]) == 2 and inputs["genres"][1][0] == -1 and inputs["genres"][1][1] >= 1
    assert metadata["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
    with pytest.raises(InferenceServerException, match="model: no model 'nope' is loaded"):
        client.get_model_metadata("nope")


def test_health_readiness_and_metadata_over_grpc(service):
    client = triton_grpc.InferenceServerClient(service.grpc_target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert client.get_server_metadata().name == "uembed"
    metadata = client.get_model_metadata(MODEL)
    assert [tensor.name for tensor in metadata.inputs] == list(MOVIELENS_FEATURES)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("score", "FP32", [-1])]
    for call in (lambda: client.is_model_ready("nope"), lambda: client.get_model_metadata(MODEL, "7")):
        with pytest.raises(InferenceServerException) as error:
            call()
        assert error.value.status() == "StatusCode.NOT_FOUND"


# --- bad requests ------------------------------------------------------------------------------
def json_inputs(examples: list[dict]) -> list[dict]:
    return [{"name": name, "datatype": np_to_triton_dtype(array.dtype), "shape": list(array.shape), "data": array.ravel().tolist()}
            for name, array in feature_arrays(examples).items()]  # fmt: skip


def with_input(examples, name, **changes):
    inputs = json_inputs(examples)
    for tensor in inputs:
        if tensor["name"] == name:
            tensor.update(changes)
    return inputs


def bad_requests(examples):
    """(what, inputs, status, words the error must hold)."""
    two = examples[:2]
    return [
        ("wrong datatype", with_input(two, "age", datatype="FP32", data=[20.0, 50.0]), 422, ["'age'", "FP32", "BYTES, INT64, INT32"]),
        ("unknown datatype", with_input(two, "gender", datatype="BF16"), 422, ["'gender'", "BF16"]),
        ("wrong shape", with_input(two, "user_id", shape=[1, 2]), 422, ["'user_id'", "[1, 2]", "one value per example"]),
        ("rank 3", with_input(two, "genres", shape=[2, 3, 1]), 422, ["'genres'", "[2, 3, 1]"]),
        ("batch sizes differ", with_input(two, "movie_id", shape=[1], data=[402]), 422, ["'movie_id'", "batch size 1, but input 'user_id' has 2"]),
        ("data and shape disagree", with_input(two, "zip_code", data=["63129"]), 422, ["'zip_code'", "holds 2 elements", "1"]),
        ("element of another type", with_input(two, "occupation", data=["student", 7]), 422, ["'occupation'", "element 1", "BYTES"]),
        ("missing feature", [t for t in json_inputs(two) if t["name"] != "genres"], 422, ["missing features: genres"]),
        ("unknown input", json_inputs(two) + [{"name": "colour", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}],
         422, ["'colour'", "no such input"]),
        ("no data", with_input(two, "gender", data=None), 422, ["'gender'", "data is required"]),
        ("a value over the limit", with_input(two, "zip_code", data=["9" * 300, "1"]), 422, ["input 'zip_code' element 0: ", "300 characters"]),
        ("a list over the limit", with_input(two, "genres", shape=[2, 300], data=["x"] * 600), 422, ["input 'genres' row 0: ", "300 values"]),
        ("too many examples", with_input(two, "user_id", shape=[2000]), 422, ["'user_id'", "2000 examples", "1024"]),
    ]


@pytest.mark.parametrize("case", range(13))
def test_a_bad_tensor_over_http_is_a_4xx_naming_it(service, examples, case):
    what, inputs, status, words = bad_requests(examples)[case]
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", json={"inputs": inputs}, timeout=30)
    assert response.status_code == status, (what, response.text)
    body = response.json()
    assert list(body) == ["error"], what
    for word in words:
        assert word in body["error"], (what, body["error"])


def raw_bytes(array: np.ndarray) -> bytes:
    """A tensor's data as the binary extension and raw_input_contents carry it (BYTES: a 4-byte length per element)."""
    if array.dtype != object:
        return array.astype(array.dtype.newbyteorder("<")).tobytes()
    return b"".join(struct.pack("<I", len(value.encode())) + value.encode() for value in array.ravel())


def binary_body(examples, tamper=None) -> tuple[bytes, dict]:
    """A binary-data request as Triton's client frames it (every input binary), then ``tamper(header, blobs)``."""
    header = {"inputs": [], "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}
    blobs = []
    for name, array in feature_arrays(examples).items():
        blobs.append(raw_bytes(array))
        header["inputs"].append({"name": name, "datatype": np_to_triton_dtype(array.dtype), "shape": list(array.shape),
                                 "parameters": {"binary_data_size": len(blobs[-1])}})  # fmt: skip
    if tamper:
        tamper(header, blobs)
    json_header = orjson.dumps(header)
    return json_header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(json_header))}


# Binary data spoilt after framing (features in order: user_id, movie_id INT64; zip_code BYTES; ...; genres last).
def cut_zip_codes(header, blobs):
    blobs[2] = blobs[2][:-3]  # the last zip code's bytes cut short, its length prefix left as it was
    header["inputs"][2]["parameters"]["binary_data_size"] -= 3


def bad_utf8(header, blobs):
    blobs[2] = struct.pack("<I", 2) + b"\xff\xfe" + blobs[2][4 + 5 :]  # the first zip code (5 bytes) -> 2 invalid ones
    header["inputs"][2]["parameters"]["binary_data_size"] = len(blobs[2])


def odd_int64_bytes(header, blobs):
    blobs[0] = blobs[0][:-1]
    header["inputs"][0]["parameters"]["binary_data_size"] -= 1


def size_past_the_end(header, blobs):
    header["inputs"][-1]["parameters"]["binary_data_size"] += 100


@pytest.mark.parametrize(
    ("tamper", "headers", "words"),
    [
        (cut_zip_codes, None, ["input 'zip_code' element 1: ", "past the end"]),
        (bad_utf8, None, ["input 'zip_code' element 0: ", "not UTF-8"]),
        (odd_int64_bytes, None, ["'user_id'", "15 bytes", "INT64"]),
        (size_past_the_end, None, ["'genres'", "binary_data_size", "past the end"]),
        (None, {"Inference-Header-Content-Length": "999999"}, ["Inference-Header-Content-Length", "999999"]),
        (None, {"Inference-Header-Content-Length": "-4"}, ["Inference-Header-Content-Length", "-4"]),
        (None, {"Inference-Header-Content-Length": "10"}, ["not valid JSON"]),
        (None, {"Content-Encoding": "br"}, ["Content-Encoding", "br", "gzip, deflate or identity"]),
        (None, {"Content-Encoding": "gzip"}, ["not valid gzip data"]),
    ],
)
def test_a_malformed_binary_request_is_a_4xx_naming_the_problem(service, examples, tamper, headers, words):
    body, framing = binary_body(examples[:2], tamper)
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=body, headers={**framing, **(headers or {})}, timeout=30)
    assert response.status_code == 422, response.text
    for word in words:
        assert word in response.json()["error"], response.text


def test_a_binary_request_framed_by_hand_scores_like_v1(service, examples, v1_scores):
    body, framing = binary_body(examples[:5])
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=body, headers=framing, timeout=30)
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    header = orjson.loads(response.content[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 20}
    np.testing.assert_allclose(np.frombuffer(response.content[length:], "<f4"), v1_scores[:5], rtol=0, atol=1e-6)


def test_unknown_model_version_or_output_over_http(service, examples):
    inputs = json_inputs(examples[:2])
    for path, status, words in [
        ("/v2/models/nope/infer", 404, "model: no model 'nope' is loaded"),
        (f"/v2/models/{MODEL}/versions/7/infer", 404, f"version: model {MODEL} has no loaded version '7'"),
    ]:
        response = httpx.post(f"{service.url}{path}", json={"inputs": inputs}, timeout=30)
        assert response.status_code == status and words in response.json()["error"], response.text
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", json={"inputs": inputs, "outputs": [{"name": "probability"}]})
    assert response.status_code == 422 and "output 'probability'" in response.json()["error"]


def test_bad_tensors_over_grpc_are_invalid_argument_naming_them(service, examples):
    client = triton_grpc.InferenceServerClient(service.grpc_target)
    arrays = feature_arrays(examples[:2])
    cases = [
        ({**arrays, "age": arrays["age"].astype(np.float32)}, MODEL, "StatusCode.INVALID_ARGUMENT", "input 'age': datatype 'FP32'"),
        ({**arrays, "movie_id": arrays["movie_id"][:1]}, MODEL, "StatusCode.INVALID_ARGUMENT", "input 'movie_id': batch size 1, but input 'user_id' has 2"),
        ({k: v for k, v in arrays.items() if k != "gender"}, MODEL, "StatusCode.INVALID_ARGUMENT", "missing features: gender"),
        ({**arrays, "zip_code": arrays["zip_code"].reshape(1, 2)}, MODEL, "StatusCode.INVALID_ARGUMENT", "input 'zip_code': shape [1, 2]"),
        (arrays, "nope", "StatusCode.NOT_FOUND", "model: no model 'nope' is loaded"),
    ]
    for tensors, model, code, words in cases:
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, triton_inputs(triton_grpc, tensors))
        assert error.value.status() == code and words in error.value.message(), error.value
    calls = service.metrics()
    assert calls['uembed_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}'] >= 4
    assert calls['uembed_grpc_requests_total{code="NOT_FOUND",method="ModelInfer"}'] >= 1


def test_malformed_raw_input_contents_over_grpc(service, examples):
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for name, array in feature_arrays(examples[:2]).items():
        request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=array.shape)
        request.raw_input_contents.append(raw_bytes(array))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]  # user_id's INT64 bytes cut short
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'user_id': 15 bytes" in error.value.details()
        del request.raw_input_contents[-1]
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents: 6 entries for 7 inputs" in error.value.details()


# --- two versions of other features under a routing rule ---------------------------------------------------
TOKEN = "oip-routing-token-0123"
PAIR_FEATURES = {"1": ("C1", "C2"), "2": ("C1", "N1")}  # C1 in both: the routing rule's sticky feature


@pytest.fixture(scope="module")
def routed_service(tmp_path_factory):
    """Model ``pair``: primary version 1 (C1, C2) and version 2 (C1 and a numeric N1) loaded beside it, and a
    50/50 split between them sticky by C1, so a request naming no version may be routed away from the primary."""
    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.contract.features import FeatureSpec

    root = tmp_path_factory.mktemp("routed")
    write_synthetic_bundle(root, "pair", (FeatureSpec("C1"), FeatureSpec("C2")), 1000, progress=False)
    write_synthetic_bundle(root, "pair", (FeatureSpec("C1"), FeatureSpec("N1", kind="numeric", boundaries=(0.0, 1.0, 10.0))),
                           1000, version="2", seed=1, progress=False)  # fmt: skip
    env = {"UEMBED_BUNDLES": str(root / "pair" / "1"), "UEMBED_BUNDLE_STORE": str(root), "UEMBED_RELOAD_TOKEN": TOKEN}
    service = UvicornProcess("uembed.serving.app:create_app", env, root / "service.log").start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"{service.url}/v1/models/pair/versions/2", headers=auth, timeout=30).status_code == 200
    rule = {"split": {"1": 50, "2": 50}, "sticky_feature": "C1"}
    assert httpx.put(f"{service.url}/v1/models/pair/routing", json=rule, headers=auth, timeout=30).status_code == 200
    yield service
    service.stop()


def pair_examples(version: str, user: str) -> list[dict]:
    """Three examples with the features of ``version``, the first of them ``user``'s (the routing key)."""
    if version == "1":
        return [{"C1": user, "C2": "a"}, {"C1": "x", "C2": ""}, {"C1": "y", "C2": "b"}]
    return [{"C1": user, "N1": 0.5}, {"C1": "x", "N1": None}, {"C1": "y", "N1": 12.0}]


def pair_arrays(examples: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.array([np.nan if e[name] is None else e[name] for e in examples], dtype=np.float64)
            if name == "N1" else np.array([e[name] for e in examples], dtype=object) for name in examples[0]}  # fmt: skip


def test_a_request_routed_away_from_the_primary_is_checked_and_scored_by_the_version_it_is_routed_to(routed_service):
    """No version named: each front resolves the request once, so its tensors are checked against the features of
    the version the routing rule gives it (not the primary's) and scored by that version, with /v1's scores."""
    rest = triton_http.InferenceServerClient(routed_service.url.removeprefix("http://"))
    grpc_client = triton_grpc.InferenceServerClient(routed_service.grpc_target)
    seen = set()
    for user in (f"user-{i}" for i in range(24)):
        routed = httpx.post(f"{routed_service.url}/v1/score", json={"model": "pair", "examples": [{"C1": user}]}, timeout=30)
        version = routed.json()["version"]
        seen.add(version)
        examples = pair_examples(version, user)
        v1 = httpx.post(f"{routed_service.url}/v1/score", json={"model": "pair", "examples": examples}, timeout=30).json()
        assert v1["version"] == version
        arrays = pair_arrays(examples)
        over_rest = rest.infer("pair", triton_inputs(triton_http, arrays))
        over_grpc = grpc_client.infer("pair", triton_inputs(triton_grpc, arrays))
        assert over_rest.get_response()["model_version"] == over_grpc.get_response().model_version == version
        for result in (over_rest, over_grpc):
            np.testing.assert_allclose(result.as_numpy("score"), v1["scores"], rtol=0, atol=1e-6)
        # The other version's tensors: refused as inputs of the version the request is routed to.
        other = "2" if version == "1" else "1"
        unknown = PAIR_FEATURES[other][1]
        wrong = pair_arrays(pair_examples(other, user))
        refusal = f"input {unknown!r}: model pair has no such input"
        with pytest.raises(InferenceServerException, match=rf"^\[422\] {refusal}"):
            rest.infer("pair", triton_inputs(triton_http, wrong))
        with pytest.raises(InferenceServerException) as refused:
            grpc_client.infer("pair", triton_inputs(triton_grpc, wrong))
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and refused.value.message().startswith(refusal)
    assert seen == {"1", "2"}


# --- numeric features (MovieLens has none: its age is categorical) --------------------------------------
@pytest.fixture(scope="module")
def numeric_service(tmp_path_factory):
    from uembed.bundle.synthetic import write_synthetic_bundle
    from uembed.contract.features import FeatureSpec

    features = (FeatureSpec("I1", kind="numeric", boundaries=(0.0, 1.0, 10.0, 100.0)), FeatureSpec("C1"),
                FeatureSpec("tags", kind="multivalent", separator=","))  # fmt: skip
    root = tmp_path_factory.mktemp("numeric")
    bundle = write_synthetic_bundle(root, "numeric", features, 1000, progress=False)
    service = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(bundle)}, root / "service.log").start()
    yield service
    service.stop()


def test_numeric_features_take_floats_ints_and_strings_nan_is_missing(numeric_service):
    values = [0.5, 5.0, 50.0, 500.0, None, 49.0]
    v1 = score(numeric_service.url, [{"I1": v, "C1": "a", "tags": ["x", "y"]} for v in values])
    client = triton_http.InferenceServerClient(numeric_service.url.removeprefix("http://"))
    as_floats = np.array([np.nan if v is None else v for v in values])
    for i1 in (as_floats.astype(np.float32), as_floats, np.array([f"{v}" if v is not None else "" for v in values], dtype=object)):
        arrays = {"I1": i1, "C1": np.array(["a"] * 6, dtype=object), "tags": np.array(["x,y"] * 6, dtype=object)}
        scores = client.infer("numeric", triton_inputs(triton_http, arrays)).as_numpy("score")
        np.testing.assert_allclose(scores, v1, rtol=0, atol=1e-6, err_msg=str(i1.dtype))
    arrays = {"I1": np.array([1, np.inf], dtype=np.float32), "C1": np.array(["a", "b"], dtype=object), "tags": np.array(["", ""], dtype=object)}
    with pytest.raises(InferenceServerException, match=r"input 'I1' element 1: inf is not a finite number"):
        client.infer("numeric", triton_inputs(triton_http, arrays))


def test_a_bad_value_is_named_by_its_tensor_and_element_over_rest_and_grpc(numeric_service):
    """Not as /v1 names it (examples[i].feature): the client sent tensors."""
    arrays = {"I1": np.array(["1.5", "abc"], dtype=object), "C1": np.array(["a", "b"], dtype=object),
              "tags": np.array(["x", "y"], dtype=object)}  # fmt: skip
    words = "input 'I1' element 1: takes a finite number"
    client = triton_http.InferenceServerClient(numeric_service.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match=words) as error:
        client.infer("numeric", triton_inputs(triton_http, arrays))
    assert "examples[" not in error.value.message()
    with pytest.raises(InferenceServerException, match=words) as error:
        triton_grpc.InferenceServerClient(numeric_service.grpc_target).infer("numeric", triton_inputs(triton_grpc, arrays))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    response = httpx.post(f"{numeric_service.url}/v1/score", json={"examples": [{"I1": "abc"}]}, timeout=30)
    assert response.status_code == 422 and response.json()["detail"].startswith("examples[0].I1: takes a finite number")


# --- the gRPC server's lifecycle ---------------------------------------------------------------------
def test_a_grpc_port_taken_by_another_program_stops_the_start_with_a_message(synthetic_store, tmp_path):
    with socket.socket() as taken:  # no SO_REUSEPORT: the service cannot share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(synthetic_store / MODEL / "1"),
                                 "UEMBED_GRPC_PORT": str(port)}, tmp_path / "taken.log")  # fmt: skip
        with pytest.raises(RuntimeError, match=f"gRPC: cannot listen on 127.0.0.1:{port}"):
            service.start()


def listening_sockets(port: int) -> int:
    """Sockets listening on a TCP port of this network namespace (IPv4 and IPv6 tables; state 0A is LISTEN)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


def test_two_workers_share_the_grpc_port(synthetic_store, examples, v1_scores, tmp_path):
    """Each worker binds the gRPC port with SO_REUSEPORT; the kernel gives each new connection to one of them."""
    service = UvicornProcess("uembed.serving.app:create_app", {"UEMBED_BUNDLES": str(synthetic_store / MODEL / "1")},
                             tmp_path / "workers.log", workers=2).start()  # fmt: skip
    try:
        wait_until(lambda: listening_sockets(service.grpc_port) == 2, 30, "both workers' gRPC servers")
        for _ in range(6):  # a new channel (a new connection) each time
            client = triton_grpc.InferenceServerClient(service.grpc_target)
            scores = client.infer(MODEL, triton_inputs(triton_grpc, feature_arrays(examples[:8]))).as_numpy("score")
            np.testing.assert_allclose(scores, v1_scores[:8], rtol=0, atol=1e-6)
            client.close()
    finally:
        service.stop()
    assert "cannot listen" not in service.log_path.read_text()


@pytest.mark.parametrize("grpc_server", ["http2", "grpcio"])
def test_grpc_calls_that_arrive_while_a_batch_holds_the_loop_are_read_and_join_one_batch(synthetic_store, examples, grpc_server):
    """Calls that arrive while the service's loop is busy (a batch runs on it) all reach the batcher when it is free,
    to be scored together. grpcio's server has its own thread and loop and reads them meanwhile (served on the
    service's loop, grpcio advanced each call one step per batch, and the calls were scored one batch each); uvicorn's
    HTTP/2, on the service's loop, reads them all in the loop's next turn, as it reads HTTP requests."""
    service = InProcessService(bundles=[synthetic_store / MODEL / "1"], grpc_port=free_port(), grpc_host="127.0.0.1",
                               grpc_server=grpc_server)  # fmt: skip
    server = service.run(start_grpc_server(InferencePlane(service.engine, service.settings), service.settings))
    try:
        if grpc_server == "grpcio":
            assert server.thread.is_alive() and server.thread is not service.thread
        channel = grpc.insecure_channel(f"127.0.0.1:{service.settings.grpc_port}")
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        bodies = [grpc_request(MODEL, examples[i * 8 : (i + 1) * 8], service.engine.registry.find(MODEL, None).bundle.feature_specs)
                  for i in range(8)]  # fmt: skip
        call(bodies[0], timeout=30)  # connected, and the first batch's lazy work done
        before = service.metrics()["uembed_batch_examples_count"]
        held = threading.Event()
        service.loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(1.0)))  # as a long batch holds the loop
        held.wait(10)
        pending = [call.future(body, timeout=30) for body in bodies]
        replies = [service_pb2.ModelInferResponse.FromString(future.result()) for future in pending]
        assert [len(np.frombuffer(reply.raw_output_contents[0], "<f4")) for reply in replies] == [8] * 8
        assert service.metrics()["uembed_batch_examples_count"] - before == 1
        channel.close()
    finally:
        service.run(stop_grpc_server(server))
        service.close()
    if grpc_server == "grpcio":
        assert not server.thread.is_alive()
