"""The runtime a model version is served by: the CPU's or a CUDA device's, as ``settings.device`` says."""

from __future__ import annotations

from uembed.bundle.loader import Bundle
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.cuda import CudaModelRuntime
from uembed.serving.pipeline.values import ValueLimits
from uembed.serving.rows.redis import RedisTier
from uembed.serving.settings import ServiceSettings


def open_runtime(bundle: Bundle, settings: ServiceSettings, redis: RedisTier | None) -> ModelRuntime:
    """The runtime for ``settings.device``: :class:`ModelRuntime` on the CPU, :class:`CudaModelRuntime` on ``cuda[:N]``."""
    encoding = {"limits": ValueLimits(settings.max_value_chars, settings.max_list_values,
                                     require_features=settings.require_features),
                "value_cache_bytes": settings.value_cache_bytes}  # fmt: skip
    if settings.device == "cpu":
        return ModelRuntime(bundle, settings.hot_rows_bytes, redis, settings.redis_prefix, settings.compute_threads,
                            settings.dense_backend, **encoding)  # fmt: skip
    return CudaModelRuntime(bundle, settings.device, settings.device_hot_rows_bytes, redis, settings.redis_prefix,
                            settings.compute_threads, settings.device_tf32, **encoding)  # fmt: skip
