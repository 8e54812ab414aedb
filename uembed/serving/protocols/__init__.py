"""The service's fronts, one module each, over one :class:`~uembed.serving.engine.ScoringEngine` and its batcher.

Each front resolves a request to its model version once (``engine.resolve``), checks its inputs against that
version and hands the resolved target to the engine (``engine.score_resolved``).

- :mod:`~uembed.serving.protocols.v1`: ``/v1`` REST (score, models, the admin calls), its pydantic models and
  OpenAPI schema; :mod:`~uembed.serving.protocols.lean_json` answers valid ``/v1/score`` bodies around the
  framework.
- The Open Inference Protocol (KServe "v2"): its protocol-neutral part in :mod:`~uembed.serving.protocols.oip`
  (tensors in, columns out; metadata; readiness) and :mod:`~uembed.serving.protocols.oip_config` (model
  configuration and statistics, Triton's shapes), served by :mod:`~uembed.serving.protocols.oip_rest` (FastAPI
  routes under ``/v2``) and :mod:`~uembed.serving.protocols.oip_grpc` (``inference.GRPCInferenceService``'s
  methods, and grpcio's asyncio server for them), served by default by :mod:`~uembed.serving.protocols.grpc_h2`
  (gRPC as an ASGI app) on :mod:`~uembed.serving.protocols.http2` (uvicorn's HTTP/2 in the worker's loop).
- What they share: :mod:`~uembed.serving.protocols.render` (each protocol's rendering of the one error table, the
  499 of a client that went away, scores as JSON, the score request's form rule),
  :mod:`~uembed.serving.protocols.disconnect` (skipping the work of a client that went away) and
  :mod:`~uembed.serving.protocols.limits` (the body limits and request metrics of every HTTP request) and
  :mod:`~uembed.serving.protocols.writes` (a response's writes sent as one, on both HTTP ports).
"""
