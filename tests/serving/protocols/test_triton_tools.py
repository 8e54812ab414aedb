"""What Triton's own tooling asks of a server, over real sockets: the model configuration and statistics
extensions (tritonclient's ``get_model_config`` and ``get_inference_statistics``, REST and gRPC), gRPC's standard
health service, honest answers for what is not implemented, output parameters, and compressed request bodies."""

import gzip
import json

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.serving.protocols.test_oip import MODEL, feature_arrays, json_inputs, triton_inputs
from tests.serving.test_cluster import publish_cli, without_row_files
from uembed.loadtest.servers import UvicornProcess, wait_until
from uembed.loadtest.traffic import MOVIELENS_FEATURES

MAX_EXAMPLES = 512  # not the default: the configuration's max_batch_size must come from the setting
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32"}


@pytest.fixture(scope="module")
def service(synthetic_store, tmp_path_factory):
    """movielens: version 1 primary, version 2 loaded beside it."""
    env = {"UEMBED_BUNDLES": str(synthetic_store / MODEL / "1"), "UEMBED_BUNDLE_STORE": str(synthetic_store),
           "UEMBED_RELOAD_TOKEN": "triton-tools-token-01", "UEMBED_MAX_EXAMPLES": str(MAX_EXAMPLES)}  # fmt: skip
    service = UvicornProcess("uembed.serving.app:create_app", env, tmp_path_factory.mktemp("tools") / "service.log").start()
    added = httpx.post(f"{service.url}/v1/models/{MODEL}/versions/2", headers={"Authorization": "Bearer triton-tools-token-01"}, timeout=60)
    assert added.status_code == 200, added.text
    yield service
    service.stop()


@pytest.fixture(scope="module")
def http_client(service):
    return triton_http.InferenceServerClient(service.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def grpc_client(service):
    return triton_grpc.InferenceServerClient(service.grpc_target)


# --- model configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["", "1", "2"])
def test_model_config_over_rest_and_grpc_agrees_with_metadata(http_client, grpc_client, version):
    config = http_client.get_model_config(MODEL, version)
    over_grpc = grpc_client.get_model_config(MODEL, version, as_json=True)["config"]
    metadata = http_client.get_model_metadata(MODEL, version)
    assert config["name"] == over_grpc["name"] == MODEL
    assert config["platform"] == config["backend"] == over_grpc["backend"] == "uembed"
    assert config["max_batch_size"] == int(over_grpc["max_batch_size"]) == MAX_EXAMPLES
    assert "dynamic_batching" in config and "dynamic_batching" in over_grpc
    assert config["parameters"]["version"]["string_value"] == (version or "1")
    # Every input: the configuration's dims are metadata's shape without the batch dimension, and its type the
    # datatype metadata states; over gRPC the same.
    assert [i["name"] for i in config["input"]] == [t["name"] for t in metadata["inputs"]] == list(MOVIELENS_FEATURES)
    for tensor, entry, entry_grpc in zip(metadata["inputs"], config["input"], over_grpc["input"]):
        assert tensor["shape"] == [-1, *entry["dims"]] and tensor["shape"][1] >= 1, tensor
        assert entry["data_type"] == entry_grpc["data_type"] == CONFIG_TYPES[tensor["datatype"]]
        assert [int(d) for d in entry_grpc["dims"]] == entry["dims"]
    ((output,), (out_meta,)) = config["output"], metadata["outputs"]
    assert (output["name"], output["data_type"]) == ("score", "TYPE_FP32") and out_meta["shape"] == [-1, *output["dims"]]


def test_model_config_of_an_unknown_model_or_version_is_not_found(http_client, grpc_client):
    with pytest.raises(InferenceServerException, match="version: model movielens has no loaded version '7'"):
        http_client.get_model_config(MODEL, "7")
    with pytest.raises(InferenceServerException) as error:
        grpc_client.get_model_config("nope")
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_a_batch_of_the_configured_shapes_scores_like_one_value_tensors(http_client, movielens_examples):
    """What perf_analyzer sends at -b 64 from the metadata: every one-value feature as [N, 1]."""
    examples = movielens_examples[:64]
    arrays = feature_arrays(examples)
    as_n1 = {name: array if array.ndim == 2 else array.reshape(-1, 1) for name, array in arrays.items()}
    flat = http_client.infer(MODEL, triton_inputs(triton_http, arrays)).as_numpy("score")
    batched = http_client.infer(MODEL, triton_inputs(triton_http, as_n1)).as_numpy("score")
    assert batched.shape == (64,)
    np.testing.assert_array_equal(batched, flat)


# --- statistics -------------------------------------------------------------------------------------
def version_stats(statistics: dict, version: str) -> dict:
    (stats,) = [s for s in statistics["model_stats"] if s["version"] == version]
    return stats


def test_statistics_count_what_was_scored_over_rest_and_grpc(service, http_client, grpc_client, movielens_examples):
    before = version_stats(http_client.get_inference_statistics(MODEL), "1")
    sizes = [1, 5, 64]
    for size in sizes:
        http_client.infer(MODEL, triton_inputs(triton_http, feature_arrays(movielens_examples[:size])), model_version="1")
    after = version_stats(http_client.get_inference_statistics(MODEL, "1"), "1")
    assert after["inference_count"] - before["inference_count"] == sum(sizes)
    succeeded = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    assert succeeded == len(sizes)
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["inference_stats"]["queue"]["count"] - before["inference_stats"]["queue"]["count"] == len(sizes)
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert after["last_inference"] > 0 and 1 <= after["execution_count"] - before["execution_count"] <= len(sizes)
    by_size = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert sum(size * count for size, count in by_size.items()) == after["inference_count"]
    # gRPC reads the same counters; /v2/models/stats (once read as a model named "stats") lists every loaded version.
    over_grpc = grpc_client.get_inference_statistics(MODEL, "1", as_json=True)["model_stats"][0]
    assert int(over_grpc["inference_count"]) == after["inference_count"]
    everything = httpx.get(f"{service.url}/v2/models/stats", timeout=30)
    assert everything.status_code == 200, everything.text
    assert sorted((s["name"], s["version"]) for s in everything.json()["model_stats"]) == [(MODEL, "1"), (MODEL, "2")]
    assert len(grpc_client.get_inference_statistics("").model_stats) == 2
    with pytest.raises(InferenceServerException, match="no model 'nope' is loaded"):
        http_client.get_inference_statistics("nope")


def test_server_metadata_lists_exactly_the_extensions_it_serves(service, http_client, grpc_client):
    extensions = http_client.get_server_metadata()["extensions"]
    assert extensions == list(grpc_client.get_server_metadata().extensions)
    assert sorted(extensions) == ["binary_tensor_data", "model_configuration", "statistics"]
    for path in (f"/v2/models/{MODEL}/config", f"/v2/models/{MODEL}/stats"):
        assert httpx.get(f"{service.url}{path}", timeout=30).status_code == 200
    # Extensions it does not list are not served.
    assert httpx.post(f"{service.url}/v2/repository/index", timeout=30).status_code == 501


# --- what is not implemented --------------------------------------------------------------------
def test_an_unimplemented_grpc_method_is_unimplemented_naming_it_and_counted(service, grpc_client):
    with pytest.raises(InferenceServerException) as error:
        grpc_client.get_model_repository_index()
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "RepositoryIndex is not implemented" in error.value.message() and "NotImplementedError" not in error.value.message()
    assert service.metrics()['uembed_grpc_requests_total{code="UNIMPLEMENTED",method="RepositoryIndex"}'] >= 1


@pytest.mark.parametrize(("method", "path"), [("POST", "/v2/repository/index"), ("GET", "/v2/trace/setting"),
                                              ("POST", f"/v2/models/{MODEL}/ready"), ("GET", "/v2/systemsharedmemory/status")])  # fmt: skip
def test_an_unknown_v2_route_says_it_is_not_supported_naming_it(service, method, path):
    response = httpx.request(method, f"{service.url}{path}", timeout=30)
    assert response.status_code == 501
    assert f"{method} {path} is not supported" in response.json()["error"]


def test_tritonclient_shows_the_unsupported_route(http_client):
    with pytest.raises(InferenceServerException, match="POST /v2/repository/index is not supported"):
        http_client.get_model_repository_index()


# --- output parameters and compressed bodies -----------------------------------------------------
def test_class_count_is_refused_naming_it(http_client, grpc_client, movielens_examples):
    arrays = feature_arrays(movielens_examples[:2])
    with pytest.raises(InferenceServerException, match=r"\[422\] output 'score': parameter 'classification' is not supported"):
        http_client.infer(MODEL, triton_inputs(triton_http, arrays), outputs=[triton_http.InferRequestedOutput("score", class_count=3)])
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer(MODEL, triton_inputs(triton_grpc, arrays), outputs=[triton_grpc.InferRequestedOutput("score", class_count=3)])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT" and "parameter 'classification' is not supported" in error.value.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies_score_like_plain_ones(http_client, movielens_examples, algorithm):
    inputs = triton_inputs(triton_http, feature_arrays(movielens_examples[:32]), binary_data=False)
    plain = http_client.infer(MODEL, inputs).as_numpy("score")
    compressed = http_client.infer(MODEL, inputs, request_compression_algorithm=algorithm).as_numpy("score")
    np.testing.assert_array_equal(compressed, plain)


def test_a_decompression_bomb_is_413(service):
    """Small on the wire, over the body limit once decompressed: refused while it inflates."""
    inflated = json.dumps({"inputs": [{"name": "pad", "datatype": "BYTES", "shape": [1], "data": [" " * (5 * 2**20)]}]}).encode()
    bomb = gzip.compress(inflated)
    assert len(bomb) < 4 * 2**20 < len(inflated)
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=bomb, headers={"Content-Encoding": "gzip"}, timeout=30)
    assert response.status_code == 413 and "once decompressed" in response.json()["error"], response.text


# --- gRPC health ---------------------------------------------------------------------------------------
def health_check(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_grpc_health_check_is_serving_when_ready(service):
    assert health_check(service.grpc_target) == health_pb2.HealthCheckResponse.SERVING
    assert health_check(service.grpc_target, "inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        health_check(service.grpc_target, "nope")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(service.grpc_target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


def test_grpc_health_follows_readiness(synthetic_store, redis_server, start_service, tmp_path):
    """Rows in Redis not yet published: not ready, so NOT_SERVING; SERVING once they are."""
    bundle = synthetic_store / MODEL / "1"
    service = start_service([without_row_files(bundle, tmp_path)], ready_path="/healthz", redis_url=redis_server.url,
                            row_source="redis", redis_prefix="health")  # fmt: skip
    assert httpx.get(f"{service.url}/v2/health/ready", timeout=30).status_code == 503
    assert health_check(service.grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING
    published = publish_cli(str(bundle), "--redis-url", redis_server.url, "--prefix", "health", "--quiet")
    assert published.returncode == 0, published.stderr
    wait_until(lambda: health_check(service.grpc_target) == health_pb2.HealthCheckResponse.SERVING, 30, "SERVING")
    assert httpx.get(f"{service.url}/v2/health/ready", timeout=30).status_code == 200


def test_a_gzip_body_of_several_members_is_read_whole(http_client, service, movielens_examples):
    """gzip allows several members one after another (RFC 1952): each is inflated, none silently dropped."""
    inputs = triton_inputs(triton_http, feature_arrays(movielens_examples[:8]), binary_data=False)
    plain = http_client.infer(MODEL, inputs).as_numpy("score")
    body = json.dumps({"inputs": json_inputs(movielens_examples[:8])}).encode()
    half = len(body) // 2
    members = gzip.compress(body[:half]) + gzip.compress(body[half:])
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=members, headers={"Content-Encoding": "gzip"}, timeout=30)
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32), plain)
    trailing = gzip.compress(body) + b"not gzip"
    response = httpx.post(f"{service.url}/v2/models/{MODEL}/infer", content=trailing, headers={"Content-Encoding": "gzip"}, timeout=30)
    assert response.status_code == 422 and "not valid gzip data" in response.json()["error"], response.text
