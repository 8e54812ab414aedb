"""The service's assembly: one :class:`ScoringEngine` on app state, its fronts, and their shared middleware.

``create_app(settings)`` builds the app (tests build their own); the engine starts in the lifespan and drains
admitted requests on shutdown. The fronts, each a module of ``uembed/serving/protocols/``:

    /v1     REST: score, models, the admin calls             v1.py (valid score bodies: lean_json.py)
    /v2     the Open Inference Protocol over REST            oip_rest.py  } over one InferencePlane (oip.py)
    gRPC    the Open Inference Protocol, started here too    oip_grpc.py  } (served by grpc_h2.py)

They share the engine, its batcher and the error table; each renders errors in its protocol's shape
(``render.py``). Every HTTP request first passes the body limits and request metrics (``limits.py``), except a
valid score request the service's protocol answers itself (``fast_lane.py``, under the same limits and metrics); the
probes (/healthz, /readyz, /metrics) are ``probes.py``.
"""

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from uembed.contract.errors import UembedError
from uembed.serving.engine import ScoringEngine
from uembed.serving.metrics import forget_dead_workers, forget_this_worker
from uembed.serving.protocols.fast_lane import FastScoreLane
from uembed.serving.protocols.grpc_h2 import start_grpc_server, stop_grpc_server
from uembed.serving.protocols.lean_json import LeanScoreRoute
from uembed.serving.protocols.limits import LimitsAndMetrics
from uembed.serving.protocols.oip import InferencePlane
from uembed.serving.protocols.oip_rest import oip_router
from uembed.serving.protocols.probes import add_probe_routes
from uembed.serving.protocols.render import v1_http_error, v1_table_error, v1_validation_error
from uembed.serving.protocols.v1 import add_v1_routes, score_examples, scored_body, v1_openapi
from uembed.serving.settings import ServiceSettings, load_settings

log = logging.getLogger("uembed.app")


def create_app(settings: ServiceSettings | None = None, engine: ScoringEngine | None = None) -> FastAPI:
    settings = settings or load_settings()
    engine = engine or ScoringEngine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gone = forget_dead_workers()  # a respawned worker's gauges replace its predecessor's, not add to them
        if gone:
            log.info("forgot the live gauges of gone workers %s", gone)
        if not engine.registry.models:
            if not settings.bundles:
                raise UembedError("no bundle to serve: set UEMBED_BUNDLES, or start with `uembed serve` (demo bundle)")
            for path in settings.bundles:
                engine.registry.load(path)
        # Bundles, sessions and caches live as long as the process: keep them out of GC passes (tail latency).
        gc.collect()
        gc.freeze()
        threshold = gc.get_threshold()
        if settings.gc_gen0_threshold:
            gc.set_threshold(settings.gc_gen0_threshold, *threshold[1:])
        engine.metrics.vitals.rebase()  # the start's own collections are not the traffic's
        engine.metrics.vitals.keep_fresh(asyncio.get_running_loop())  # for the scrapes another worker answers
        try:
            await engine.astart()
            try:
                grpc_server = await start_grpc_server(plane, settings)
            except BaseException:
                await engine.astop()
                raise
            yield
            await stop_grpc_server(grpc_server)  # its calls in flight finish before the engine drains
            await engine.astop()
            forget_this_worker()
        finally:
            engine.metrics.vitals.stop()
            gc.set_threshold(*threshold)  # as it was: a process that hosts the app (a test, another app) goes on
            gc.unfreeze()

    # /docs and /redoc load their scripts and styles from this server (fastapi-offline's copies), not a CDN:
    # they work on a machine without internet.
    app = FastAPIOffline(
        title="uembed scoring service",
        version="1",
        summary="Scores ranking examples with unified-embedding models from exported bundles.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    plane = InferencePlane(engine, settings)  # the Open Inference Protocol, REST here and gRPC from the lifespan
    app.include_router(oip_router(plane))  # its routes render their own errors
    score_route = add_v1_routes(app, engine, settings)
    # Errors raised outside the OIP routes (and Starlette's own: unknown path, wrong method) take /v1's shape.
    app.add_exception_handler(UembedError, v1_table_error)
    app.add_exception_handler(RequestValidationError, v1_validation_error)
    app.add_exception_handler(StarletteHTTPException, v1_http_error)
    app.add_exception_handler(Exception, v1_table_error)

    # Valid score bodies skip the framework (lean_json.py); the limits and metrics wrap both paths.
    app.add_middleware(LeanScoreRoute, route=score_route, max_examples=settings.max_examples,
                       score=partial(score_examples, engine))  # fmt: skip
    app.add_middleware(LimitsAndMetrics, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_ms / 1000, metrics=engine.metrics)  # fmt: skip
    # ...and the service's HTTP protocol answers them without the ASGI stack where their heads allow (fast_lane.py)
    app.state.fast_lane = FastScoreLane(partial(scored_body, engine), settings.max_examples, settings.max_body_bytes,
                                        settings.body_timeout_ms / 1000, engine.metrics)  # fmt: skip

    add_probe_routes(app, engine)
    app.openapi = partial(v1_openapi, app, engine, settings)
    return app
