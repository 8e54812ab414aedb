"""Waiting for something to happen: poll a condition until a deadline, never sleep a fixed time and hope.

Outside an event loop, ``uembed.loadtest.servers.wait_until(check, timeout_s, what)``; inside one (a test's
coroutine on the engine's loop, which a blocking wait would stall), :func:`wait_until_async`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until_async(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` on the running loop, letting it run between polls, until it holds or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s}s")
        await asyncio.sleep(0.01)


def steady(read: Callable[[], object], quiet_s: float = 0.3) -> Callable[[], bool]:
    """A check for ``wait_until``: true once ``read()`` has returned the same value for ``quiet_s``, for work a test
    cannot see finish (a background thread writing behind the requests) but can see stop changing."""
    last: list = []  # [value, since]

    def check() -> bool:
        value, now = read(), time.monotonic()
        if not last or value != last[0]:
            last[:] = [value, now]
            return False
        return now - last[1] >= quiet_s

    return check
