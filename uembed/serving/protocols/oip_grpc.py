"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``'s methods, and grpcio's asyncio server
for them (``UEMBED_GRPC_SERVER=grpcio``; by default ``grpc_h2.py`` serves the same methods over uvicorn's HTTP/2).

The grpcio server runs in each worker that serves HTTP (started and stopped in the app's lifespan) on a
thread and event loop of its own (:class:`GrpcServerThread`), and every call's work runs on the
worker's event loop, over the same :class:`~service.protocols.oip.InferencePlane`, engine and
batcher as HTTP's. The messages and the servicer base are the generated ones that Triton's client
package ships (``tritonclient.grpc.service_pb2`` and ``service_pb2_grpc``, from the protocol's
``grpc_service.proto``); no proto is kept here.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelStatistics (``oip_config.py``) and ModelInfer, with inputs as ``raw_input_contents`` (one
entry per input, little-endian; BYTES elements each a 4-byte little-endian length and the bytes)
or as typed ``contents``; the score comes back in ``raw_output_contents``, as Triton's server
sends it. On the gRPC port's own server (``grpc_h2.py``) a request in the usual form is read, and its reply
written, without protobuf's objects (``infer_wire.py``). The other methods of the service (streaming, the model
repository, shared memory, trace and log settings) answer UNIMPLEMENTED with a message naming the method, logged at debug and
counted as any call (on either server). A requested output takes no parameters (``classification``: INVALID_ARGUMENT).

``grpc.health.v1.Health`` (Kubernetes' gRPC probes) answers SERVING when the service is ready, as
``/v2/health/ready`` decides, else NOT_SERVING; for the server (service "") and for
``inference.GRPCInferenceService``.

Errors are gRPC status codes, from the status of their row in the error table: a bad tensor
INVALID_ARGUMENT (the message names it), an unknown model or version NOT_FOUND, not ready or
overloaded UNAVAILABLE, past the request deadline DEADLINE_EXCEEDED.

With several uvicorn workers each binds the port with SO_REUSEPORT (grpcio's default on
Linux), and the kernel hands each new connection to one of them; a gRPC client keeps its
connection, so one channel's calls all go to one worker. Spread a single client's load with
several channels, or a load balancer that balances calls. ``uembed serve`` claims the port before its
workers start (``uembed/serving/process.py``), so no other server's workers join them on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from uembed.contract.errors import NotFound, NotReady, TensorError, UembedError, Unsupported
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.protocols.grpc_wire import CallMetrics
from uembed.serving.protocols.infer_wire import InferCall, infer_reply, reply_message
from uembed.serving.protocols.oip import InferencePlane, InputTensor, check_outputs, elements
from uembed.serving.protocols.oip_config import config_message, model_config, model_statistics, statistics_message
from uembed.serving.protocols.render import grpc_code, table_error
from uembed.serving.protocols.tensors import texts
from uembed.serving.settings import ServiceSettings

log = logging.getLogger("uembed.oip.grpc")

# Which typed field of InferTensorContents holds each datatype.
CONTENTS_FIELDS = {"BYTES": "bytes_contents", "INT32": "int_contents", "INT64": "int64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents"}  # fmt: skip
SHUTDOWN_GRACE_S = 5.0


def rpc(method):
    """An RPC whose errors end the call with the status code of their row in the error table; every call is
    timed and counted (uembed_grpc_request_duration_seconds, uembed_grpc_requests_total)."""
    name = method.__name__

    @functools.wraps(method)
    async def with_status_codes(self, request, context):
        started = time.perf_counter()
        try:
            response = await self.on_service_loop(method(self, request, context))
        except Exception as exc:  # noqa: BLE001 - a bug is INTERNAL; the log has the traceback
            error = table_error(exc, name)
        else:
            self.observe(name, started, None)
            return response
        self.observe(name, started, error)
        await context.abort(grpc_code(error), str(error))

    return with_status_codes


def typed_contents(tensor) -> list:
    """A tensor's typed ``contents`` as Python values (BYTES decoded as UTF-8)."""
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:  # a datatype no feature takes: refused, naming the feature's, when the inputs are read
        return []
    values = list(getattr(tensor.contents, field))
    return texts(tensor.name, values) if tensor.datatype == "BYTES" else values


def read_inputs(request: service_pb2.ModelInferRequest) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs; "
                          "send one per input, or typed contents for all")  # fmt: skip
    inputs = []
    for index, tensor in enumerate(request.inputs):
        if "shared_memory_region" in tensor.parameters:
            raise TensorError(f"input {tensor.name!r}: shared memory is not supported; send the data in the request")
        if raw and tensor.HasField("contents"):
            raise TensorError(f"input {tensor.name!r}: both contents and raw_input_contents; send one")
        data = raw[index] if raw else typed_contents(tensor)
        inputs.append(InputTensor(tensor.name, tensor.datatype, list(tensor.shape), data))
    return inputs


class Observed:
    """A servicer whose calls :func:`rpc` times and counts."""

    def __init__(self, plane: InferencePlane, service_loop: asyncio.AbstractEventLoop) -> None:
        self.plane = plane
        self.observe = CallMetrics(plane.engine.metrics).observe
        self.service_loop = service_loop

    async def on_service_loop(self, work):
        """``work`` (a coroutine) run on the service's event loop, where the engine and its batcher live; a call
        cancelled here (the client went away, its deadline passed) cancels it there."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.service_loop))



class InferenceServicer(Observed, service_pb2_grpc.GRPCInferenceServiceServicer):

    @rpc
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        try:
            await self.plane.ready()
        except UembedError:
            return service_pb2.ServerReadyResponse(ready=False)
        return service_pb2.ServerReadyResponse(ready=True)

    @rpc
    async def ModelReady(self, request, context):
        try:
            self.plane.ready_model(request.name, request.version)  # an unknown model or version: NOT_FOUND
        except NotReady:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(**self.plane.server_metadata())

    @rpc
    async def ModelMetadata(self, request, context):
        metadata = self.plane.model_metadata(request.name, request.version)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[tensor(**t) for t in metadata["inputs"]],
            outputs=[tensor(**t) for t in metadata["outputs"]],
        )

    @rpc
    async def ModelConfig(self, request, context):
        return config_message(model_config(self.plane, request.name, request.version))

    @rpc
    async def ModelStatistics(self, request, context):
        return statistics_message(model_statistics(self.plane, request.name, request.version))

    @rpc
    async def ModelInfer(self, request, context):  # grpcio's server: a message, which grpcio serialises
        call, runtime, scores = await self.scored(request)
        return reply_message(runtime.name, runtime.version, call.id, scores)

    async def infer(self, request: service_pb2.ModelInferRequest | InferCall) -> bytes:
        """ModelInfer on the gRPC port's own server: its reply, serialised."""
        call, runtime, scores = await self.scored(request)
        return infer_reply(runtime.name, runtime.version, call.id, scores)

    async def scored(self, request: service_pb2.ModelInferRequest | InferCall) -> tuple[InferCall, ModelRuntime, np.ndarray]:
        """A request message, or the :class:`InferCall` the compiled reader made of one, scored."""
        call = request if type(request) is InferCall else await self.infer_call(request)
        check_outputs(call.outputs, call.output_parameters)
        scores, runtime = await self.plane.infer(call.model_name, call.model_version, call.inputs, call.values)
        return call, runtime, scores

    async def infer_call(self, request: service_pb2.ModelInferRequest) -> InferCall:
        if request.raw_input_contents:  # read a tensor at a time (the data stays bytes), its shape once
            inputs = read_inputs(request)
            values = elements(inputs)
        else:  # typed contents are converted a value at a time: where a large request's are, the count decides
            values = elements(request.inputs)
            inputs = await self.plane.engine.decoded(values, read_inputs, request)
        outputs = request.outputs
        return InferCall(request.model_name, request.model_version, request.id, inputs, values,
                         [output.name for output in outputs], [list(output.parameters) for output in outputs])  # fmt: skip


IMPLEMENTED = tuple(name for name in vars(InferenceServicer) if name[:1].isupper())


def unimplemented(method: str):
    """An RPC of the protocol this server does not implement: UNIMPLEMENTED naming it (grpcio's stub would answer
    "Unexpected <class 'NotImplementedError'>", which reads like a crash), logged at debug and counted."""

    async def answer(self, request, context):
        log.debug("gRPC call of %s, which is not implemented", method)
        raise Unsupported(f"inference.GRPCInferenceService/{method} is not implemented by this server (uembed); it "
                          f"implements {', '.join(IMPLEMENTED)}")  # fmt: skip

    answer.__name__ = method
    return rpc(answer)


for _method in [name for name in vars(service_pb2_grpc.GRPCInferenceServiceServicer) if name[:1].isupper()]:
    if _method not in IMPLEMENTED:
        setattr(InferenceServicer, _method, unimplemented(_method))


class HealthServicer(Observed, health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health``: SERVING when the service is ready (every model's row checks passed and an example
    went through the batcher, as ``/v2/health/ready``), else NOT_SERVING; an unknown service is NOT_FOUND (Check) or
    SERVICE_UNKNOWN (Watch), as the health protocol has it."""

    SERVICES = ("", "inference.GRPCInferenceService")
    WATCH_EVERY_S = 1.0  # how often a Watch stream looks again; it writes only a change

    async def status(self, service: str) -> int:
        if service not in self.SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        try:
            await self.plane.ready()
        except UembedError:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    @rpc
    async def Check(self, request, context):
        if request.service not in self.SERVICES:
            raise NotFound(f"service {request.service[:100]!r}: not served here; ask for \"\" (the server) or "
                           "inference.GRPCInferenceService")  # fmt: skip
        return health_pb2.HealthCheckResponse(status=await self.status(request.service))

    async def Watch(self, request, context):
        last = None
        while True:
            status = await self.on_service_loop(self.status(request.service))
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(self.WATCH_EVERY_S)


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServerThread:
    """grpcio's asyncio server on a thread and event loop of its own; every call's work (decoding, scoring) runs on
    the service's loop, as an HTTP request's does. grpcio hands each step of a call (a new call, its message, its
    reply sent) to the loop it serves: on the service's loop, a call advanced one step per batch, as a batch holds
    that loop while it runs, so calls reached the batcher one at a time; here they are read, and their replies
    sent, while a batch runs."""

    def __init__(self, plane: InferencePlane, settings: ServiceSettings, address: str) -> None:
        self.plane, self.settings, self.address = plane, settings, address
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: grpc.aio.Server | None = None
        self.thread: threading.Thread | None = None

    async def start(self) -> None:
        started: concurrent.futures.Future = concurrent.futures.Future()
        service_loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, args=(service_loop, started), name="uembed-grpc", daemon=True)
        self.thread.start()
        await asyncio.wrap_future(started)

    def _run(self, service_loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future) -> None:
        self.loop = loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self.server = loop.run_until_complete(self._serve(service_loop))
        except BaseException as exc:  # noqa: BLE001 - the port is taken, or grpcio failed: the start raises it
            loop.close()
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self, service_loop: asyncio.AbstractEventLoop) -> grpc.aio.Server:
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),  # the default on Linux, stated: every worker binds the same port
                ("grpc.max_receive_message_length", self.settings.max_body_bytes),  # the HTTP body limit, for a request
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.plane, service_loop), server)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(self.plane, service_loop), server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            bound, reason = 0, str(exc)
        else:
            reason = "the port is taken"
        if not bound:
            raise UembedError(f"gRPC: cannot listen on {self.address} ({reason}); set UEMBED_GRPC_PORT to a free port, "
                              "or 0 for no gRPC")  # fmt: skip
        await server.start()
        return server

    async def stop(self) -> None:
        """Stop taking calls and let the calls in flight finish (up to SHUTDOWN_GRACE_S), then end the thread."""
        if self.loop is None or self.thread is None or not self.thread.is_alive():
            return
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.server.stop(SHUTDOWN_GRACE_S), self.loop))
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's where it is installed (as uvicorn's), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def start_grpc_server(plane: InferencePlane, settings: ServiceSettings) -> GrpcServerThread | None:
    """The gRPC server on ``grpc_host:grpc_port``, on its own thread; None when grpc_port is 0."""
    if not settings.grpc_port:
        return None
    server = GrpcServerThread(plane, settings, bind_address(settings.grpc_host, settings.grpc_port))
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", server.address)
    return server


async def stop_grpc_server(server: GrpcServerThread | None) -> None:
    """Stop taking calls and let the calls in flight finish (up to SHUTDOWN_GRACE_S)."""
    if server is not None:
        await server.stop()
