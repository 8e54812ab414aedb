"""The service's fronts, one module each, over one :class:`~service.engine.ScoringEngine` and its batcher.

``/v1`` REST lives in ``uembed/serving/app.py``; the Open Inference Protocol (KServe "v2") has its
protocol-neutral part in :mod:`service.protocols.oip` (tensors in, examples out; metadata;
readiness), rendered by :mod:`service.protocols.oip_rest` (FastAPI routes under ``/v2``) and
:mod:`service.protocols.oip_grpc` (``inference.GRPCInferenceService`` on grpcio's asyncio
server). :mod:`service.protocols.disconnect` is what the HTTP fronts share: skipping the work
of a client that went away.
"""
