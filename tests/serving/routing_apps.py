"""Service factories for the routing tests (``uvicorn tests.service.routing_apps:slow_shadow_app --factory``).

``slow_shadow_app``: the real service, except that shadow copies of version ``$SLOW_SHADOW_VERSION`` stall
``$SLOW_SHADOW_S`` seconds on the shadow thread before being scored: a candidate far slower than the traffic.
"""

import os
import time

from uembed.serving.app import create_app
from uembed.serving.engine import ScoringEngine
from uembed.serving.settings import load_settings


def slow_shadow_app():
    settings = load_settings()
    engine = ScoringEngine(settings)
    score = engine.registry.shadow._score
    slow_version, stall_s = os.environ["SLOW_SHADOW_VERSION"], float(os.environ["SLOW_SHADOW_S"])

    def stalled(copies):
        if copies[0].runtime.version == slow_version:
            time.sleep(stall_s)
        score(copies)

    engine.registry.shadow._score = stalled
    return create_app(settings, engine)
