"""The Open Inference Protocol's model configuration and statistics extensions, in Triton's shapes, for REST and gRPC.

Tools written for Triton (perf_analyzer, ``tritonclient``'s ``get_model_config`` and ``get_inference_statistics``)
read a model's configuration before anything else. Each builder returns the JSON Triton's REST API answers; gRPC
parses the same dict into the protocol's messages (:func:`config_message`, :func:`statistics_message`), so the two
transports cannot disagree.

The configuration of a model version::

    name, platform and backend "uembed", max_batch_size (UEMBED_MAX_EXAMPLES: the batch dimension is every input's
    first), one input per feature (data_type from the datatype metadata states; dims without the batch: [1], or [W]
    for a list), the output score (FP32, dims []: one score per example), dynamic_batching (requests of a version
    are batched together; max_queue_delay_microseconds from UEMBED_MAX_WAIT_MS), instance_group (one compute
    thread, CPU or GPU) and the version as a parameter.

Statistics come from the counters the engine keeps per loaded version (``uembed/serving/statistics.py``).
"""

from __future__ import annotations

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.protocols.oip import ACCEPTED, OUTPUT, OUTPUT_DATATYPE, PLATFORM, InferencePlane, input_shape

# The protocol's datatypes as Triton's configuration names them.
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32",
                "FP64": "TYPE_FP64"}  # fmt: skip


def model_config(plane: InferencePlane, name: str, version: str | None) -> dict:
    """The configuration of the loaded ``version`` of ``name`` (its primary when none is asked for)."""
    runtime = plane.loaded(name, version)
    settings = plane.settings
    inputs = [{"name": feature, "data_type": CONFIG_TYPES[ACCEPTED[spec.kind][0]], "format": "FORMAT_NONE",
               "dims": input_shape(runtime, spec)[1:]}
              for feature, spec in runtime.bundle.feature_specs.items()]  # fmt: skip
    return {
        "name": runtime.name,
        "platform": PLATFORM,
        "backend": PLATFORM,
        "max_batch_size": plane.max_examples,
        "input": inputs,
        "output": [{"name": OUTPUT, "data_type": CONFIG_TYPES[OUTPUT_DATATYPE], "dims": []}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_wait_ms * 1000)},
        "instance_group": [{"name": runtime.name, "kind": "KIND_CPU" if settings.device == "cpu" else "KIND_GPU",
                            "count": 1}],  # fmt: skip
        "parameters": {"version": {"string_value": runtime.version}},
    }


def versions_asked(plane: InferencePlane, name: str, version: str | None) -> list[ModelRuntime]:
    """The loaded versions a statistics request asks for: every version of every model (no name), every loaded
    version of ``name`` (no version), or that one (an unknown model or version: 404)."""
    registry = plane.engine.registry
    if not name:
        return registry.loaded()
    if version:
        return [plane.loaded(name, version)]
    plane.loaded(name, None)
    return list(registry.versions[name].values())


def model_statistics(plane: InferencePlane, name: str, version: str | None) -> dict:
    """Triton's statistics of the versions asked for (:func:`versions_asked`), as counted in this worker."""
    stats = plane.engine.stats
    return {"model_stats": [stats.of(runtime.name, runtime.version).report(runtime.name, runtime.version)
                            for runtime in versions_asked(plane, name, version)]}  # fmt: skip


def config_message(config: dict) -> service_pb2.ModelConfigResponse:
    return service_pb2.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))


def statistics_message(statistics: dict) -> service_pb2.ModelStatisticsResponse:
    return json_format.ParseDict(statistics, service_pb2.ModelStatisticsResponse())
