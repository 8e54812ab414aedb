"""ModelInfer's request and reply on the gRPC port's own server (``grpc_h2.py``, ``grpc_lane.py``), without protobuf's
objects where the call has the usual form.

Reading a protobuf message is quick, but every field read from it after is a Python call into protobuf's C library,
and a call reads dozens (each input's name, datatype, shape, parameters, contents and data). The compiled reader
(``_infer_wire.pyx``) reads the request's wire format once into what the call needs (:class:`InferCall`); the reply is
written in one pass too. A message it does not take (a parameter, typed contents, a field given twice or unknown,
anything malformed) is read by protobuf, as before, so every refusal is protobuf's own or the servicer's. Without the
extension, or with ``UEMBED_PURE_PYTHON=1``, protobuf reads and writes every call; both ways give the same columns and
the same reply bytes (``tests/serving/protocols/test_infer_wire.py``). A request with typed contents is looked at by
the reader, then read by protobuf.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2

from uembed.serving.protocols.oip import OUTPUT, OUTPUT_DATATYPE, InputTensor

try:  # built by the install (make install); protobuf's messages without it
    from uembed.serving.protocols import _infer_wire
except ImportError:
    _infer_wire = None
if os.environ.get("UEMBED_PURE_PYTHON", "") not in ("", "0"):
    _infer_wire = None


@dataclass(slots=True)
class InferCall:
    """What ModelInfer needs of its request: the model asked for, the inputs (their data as sent), and the outputs."""

    model_name: str
    model_version: str
    id: str
    inputs: list[InputTensor]
    values: int  # oip.elements of the inputs: where their decoding runs
    outputs: list[str]
    output_parameters: list[list[str]] | None  # each output's parameter names; None: none has any


class InferRequestReader:
    """ModelInfer's request type on the gRPC port's own server: ``FromString`` gives an :class:`InferCall` where the
    compiled reader takes the message, else protobuf's ``ModelInferRequest`` (which raises protobuf's DecodeError for
    a malformed one)."""

    DESCRIPTOR = service_pb2.ModelInferRequest.DESCRIPTOR  # how an error names the message

    @staticmethod
    def FromString(message: bytes) -> InferCall | service_pb2.ModelInferRequest:  # noqa: N802 - protobuf's name
        read = None if _infer_wire is None else _infer_wire.infer_request(bytes(message))
        if read is None:
            return service_pb2.ModelInferRequest.FromString(message)
        model_name, model_version, request_id, tensors, raw, outputs, values = read
        inputs = [InputTensor(name, datatype, shape, data) for (name, datatype, shape), data in zip(tensors, raw)]
        return InferCall(model_name, model_version, request_id, inputs, values, outputs, None)


def infer_reply(model_name: str, model_version: str, request_id: str, scores: np.ndarray) -> bytes:
    """The serialised ModelInferResponse (:func:`reply_message`'s bytes)."""
    if _infer_wire is None:
        return reply_message(model_name, model_version, request_id, scores).SerializeToString()
    return _infer_wire.infer_response(model_name, model_version, request_id, OUTPUT, OUTPUT_DATATYPE,
                                      scores.astype("<f4").tobytes(), len(scores))  # fmt: skip


def reply_message(model_name: str, model_version: str, request_id: str, scores: np.ndarray) -> service_pb2.ModelInferResponse:
    """ModelInfer's reply: the scores in ``raw_output_contents`` (FP32, little-endian), as Triton's server sends them."""
    output = service_pb2.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype=OUTPUT_DATATYPE, shape=[len(scores)])
    return service_pb2.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id,
                                          outputs=[output], raw_output_contents=[scores.astype("<f4").tobytes()])  # fmt: skip
