"""The Open Inference Protocol's REST routes under ``/v2``, in the service's FastAPI app.

    GET  /v2/health/live                                  200 {"live": true}
    GET  /v2/health/ready                                 200 {"ready": true}; 503 until every model is ready
    GET  /v2                                              server metadata: name, version, extensions
    GET  /v2/models/{name}[/versions/{version}]           model metadata: one input per feature, output score
    GET  /v2/models/{name}[/versions/{version}]/ready     200 ready; 404 unknown model or version; 503 not yet
    GET  /v2/models/{name}[/versions/{version}]/config    Triton's model configuration (oip_config.py)
    GET  /v2/models[/{name}[/versions/{version}]]/stats   Triton's statistics: every model, a model's versions, one
    POST /v2/models/{name}[/versions/{version}]/infer     tensors in (JSON, or JSON and binary data), score out;
                                                          the body may be gzip or deflate (Content-Encoding)
    *    /v2/...  anything else                           501 {"error": "... is not supported ..."}

Tensors and their encoding: :mod:`service.protocols.oip`. The binary-data extension (Triton's
clients use it): the body is a JSON header of ``Inference-Header-Content-Length`` bytes, then
each input that has a ``binary_data_size`` parameter, in input order. The response is binary
when the request asks (``binary_data`` on the requested output ``score``, or
``binary_data_output`` on the request): the JSON header, then the scores as little-endian float32.

A compressed body is held to ``max_body_bytes`` once decompressed (413 past it). Requested outputs may carry
``binary_data`` only: another parameter (``classification``, Triton's ``class_count``) is a 422 naming it.

Errors take the protocol's shape, ``{"error": message}``, with the status and headers of
their row in the error table (bad tensors: 422 naming the tensor; unknown model: 404; not
ready or overloaded: 503). The routes are not in ``/openapi.json``: the protocol has its
own specification, and a body of JSON followed by binary data is not something OpenAPI
can state.
"""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from uembed.contract.errors import TensorError, Unsupported, ValidationFailed
from uembed.serving.protocols.bodies import decompressed, header_number
from uembed.serving.protocols.disconnect import unless_abandoned
from uembed.serving.protocols.oip import OUTPUT, OUTPUT_DATATYPE, InferencePlane, InputTensor, check_outputs
from uembed.serving.protocols.oip_config import model_config, model_statistics
from uembed.serving.protocols.render import client_closed, json_response, json_scores, oip_error, table_error

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT_PARAMETERS = frozenset({"binary_data"})  # what a requested output may ask for


class ProtocolRoute(APIRoute):
    """A route whose errors go out as ``{"error": message}``, the Open Inference Protocol's error body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def with_protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - a bug answers 500 in the protocol's shape; the log has it
                return oip_error(table_error(exc, request.url.path))

        return with_protocol_errors


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it (none without ``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, b""
    length = header_number(header_length)
    if length is None or length > len(body):
        raise ValidationFailed(f"{HEADER_LENGTH}: {header_length[:40]!r} is not a length within the body's {len(body)} "
                               "bytes (ASCII digits)")  # fmt: skip
    return body[:length], body[length:]


def parameter(item: dict, key: str, where: str) -> object:
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise TensorError(f"{where}: parameters is not an object")
    return parameters.get(key)


def read_inputs(request: dict, binary: bytes) -> list[InputTensor]:
    """The request's inputs, each with its JSON ``data`` or its slice of the binary data."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise TensorError("inputs: a list of tensors is required")
    out = []
    offset = 0
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise TensorError(f"inputs[{index}]: a tensor is an object with a name, datatype, shape and data")
        name = tensor["name"]
        where = f"input {name!r}"
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if not isinstance(datatype, str):
            raise TensorError(f"{where}: datatype is required (a string such as BYTES or FP32)")
        if not isinstance(shape, list):
            raise TensorError(f"{where}: shape is required (a list of dimensions, the batch first)")
        if parameter(tensor, "shared_memory_region", where) is not None:
            raise TensorError(f"{where}: shared memory is not supported; send the data in the request")
        size = parameter(tensor, "binary_data_size", where)
        if size is not None:
            if "data" in tensor:
                raise TensorError(f"{where}: both data and binary_data_size; send one")
            if type(size) is not int or size < 0:
                raise TensorError(f"{where}: binary_data_size {size!r} is not a byte count")
            if offset + size > len(binary):
                raise TensorError(f"{where}: binary_data_size {size} is past the end of the binary data "
                                  f"({len(binary) - offset} bytes left after the JSON header)")  # fmt: skip
            data = binary[offset : offset + size]
            offset += size
        elif isinstance(tensor.get("data"), list):
            data = tensor["data"]
        else:
            raise TensorError(f"{where}: data is required (a list), or binary_data_size with {HEADER_LENGTH}")
        out.append(InputTensor(name, datatype, shape, data))
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} bytes of binary data are left over after the inputs' binary_data_size")
    return out


def binary_output(request: dict) -> bool:
    """Whether the score goes back as binary data: the output's ``binary_data`` parameter, else the request's
    ``binary_data_output`` (which Triton's clients set when they name no output)."""
    default = parameter(request, "binary_data_output", "request") is True
    outputs = request.get("outputs")
    if not outputs:
        return default
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise TensorError("outputs: a list of objects with a name")
    for o in outputs:
        parameter(o, "binary_data", f"output {o['name']!r}")  # parameters must be an object
    check_outputs([o["name"] for o in outputs], [list(o.get("parameters") or ()) for o in outputs], OUTPUT_PARAMETERS)
    flags = [parameter(o, "binary_data", f"output {o['name']!r}") for o in outputs]
    return any(default if flag is None else flag is True for flag in flags)


def infer_response(request: dict, scores: np.ndarray, model: str, version: str, binary: bool) -> Response:
    output: dict = {"name": OUTPUT, "datatype": OUTPUT_DATATYPE, "shape": [len(scores)]}
    body: dict = {"model_name": model, "model_version": version, "outputs": [output]}
    if isinstance(request.get("id"), str):
        body = {"id": request["id"], **body}
    if binary:
        data = scores.astype("<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(data)}
        header = orjson.dumps(body)
        return Response(header + data, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(header))})
    output["data"] = json_scores(scores)  # the digits /v1/score writes
    return json_response(body)


def oip_router(plane: InferencePlane) -> APIRouter:
    router = APIRouter(prefix="/v2", route_class=ProtocolRoute, include_in_schema=False)

    @router.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/health/ready")
    async def ready() -> dict:
        await plane.ready()
        return {"ready": True}

    @router.get("")
    async def server_metadata() -> dict:
        return plane.server_metadata()

    async def model_metadata(request: Request) -> dict:
        return plane.model_metadata(request.path_params["name"], request.path_params.get("version"))

    async def model_ready(request: Request) -> dict:
        runtime = plane.ready_model(request.path_params["name"], request.path_params.get("version"))
        return {"name": runtime.name, "version": runtime.version, "ready": True}

    async def model_configuration(request: Request) -> dict:
        return model_config(plane, request.path_params["name"], request.path_params.get("version"))

    async def statistics(request: Request) -> Response:
        return json_response(model_statistics(plane, request.path_params.get("name", ""), request.path_params.get("version")))

    async def infer(request: Request) -> Response:
        body, encoding = await request.body(), request.headers.get("content-encoding", "identity")
        if encoding.strip().lower() not in ("", "identity"):  # inflating is decoding: beside the loop, as a large body's
            body = await asyncio.to_thread(decompressed, body, encoding, plane.settings.max_body_bytes)
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        try:
            infer_request = orjson.loads(header)
        except orjson.JSONDecodeError as exc:
            raise ValidationFailed(f"body: the inference request is not valid JSON ({exc})") from None
        if not isinstance(infer_request, dict):
            raise ValidationFailed("body: the inference request is a JSON object")
        inputs = read_inputs(infer_request, binary)
        binary_scores = binary_output(infer_request)
        scored = await unless_abandoned(request, plane.infer(request.path_params["name"], request.path_params.get("version"), inputs))
        if scored is None:
            return client_closed()
        scores, runtime = scored
        return infer_response(infer_request, scores, runtime.name, runtime.version, binary_scores)

    async def unsupported(request: Request) -> Response:
        raise Unsupported(f"{request.method} {request.url.path[:200]} is not supported by this server (uembed); it "
                          f"serves the Open Inference Protocol's health, metadata, inference and its extensions "
                          f"{', '.join(plane.server_metadata()['extensions'])}")  # fmt: skip

    router.add_api_route("/models/stats", statistics, methods=["GET"])  # before /models/{name}: not a model's name
    # A path with and without /versions/{version}; the version, when given, must be loaded (one of several).
    for model_path in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(model_path, model_metadata, methods=["GET"])
        router.add_api_route(f"{model_path}/ready", model_ready, methods=["GET"])
        router.add_api_route(f"{model_path}/config", model_configuration, methods=["GET"])
        router.add_api_route(f"{model_path}/stats", statistics, methods=["GET"])
        router.add_api_route(f"{model_path}/infer", infer, methods=["POST"])
    # Last: any other path or method under /v2 (Triton's repository, shared memory, trace and logging routes).
    router.add_api_route("/{rest:path}", unsupported, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    return router
