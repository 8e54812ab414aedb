"""What the cycle collector would find of the service's own: for tests that requests and connections are freed by
reference counting alone. The service makes young-generation GC passes rare (``gc_gen0_threshold``), so whatever it
leaves in a reference cycle (a protocol, a request's frames, their bodies) stays long after the answer."""

from __future__ import annotations

import gc
import types
from contextlib import contextmanager

# the packages whose objects count: the service's and the servers' and frameworks' it runs on
PACKAGES = ("uembed", "uvicorn", "starlette", "fastapi", "grpc")


def is_ours(obj) -> bool:
    if isinstance(obj, types.TracebackType):
        obj = obj.tb_frame
    if isinstance(obj, (types.FrameType, types.CoroutineType)):
        code = obj.f_code if isinstance(obj, types.FrameType) else obj.cr_code
        return any(f"/{package}/" in code.co_filename for package in PACKAGES)
    return type(obj).__module__.split(".")[0] in PACKAGES


@contextmanager
def collector_off():
    """Runs the block with the cycle collector off, then fills the list it yields with the garbage of ours that a
    collection finds (other threads' garbage of other packages is left out: it is not the service's)."""
    gc.collect()
    gc.disable()
    found: list = []
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.extend(obj for obj in gc.garbage if is_ours(obj))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def described(found: list) -> list[str]:
    """The types found, most common first (for an assertion's message)."""
    counts: dict[str, int] = {}
    for obj in found:
        name = type(obj).__qualname__
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} x{count}" for name, count in sorted(counts.items(), key=lambda item: -item[1])[:8]]
