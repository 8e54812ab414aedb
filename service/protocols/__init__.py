"""The service's fronts, one module each, over one :class:`~service.engine.ScoringEngine` and its batcher.

``/v1`` REST lives in ``service/app.py``. :mod:`service.protocols.disconnect` is what the HTTP
fronts share: skipping the work of a client that went away.
"""
