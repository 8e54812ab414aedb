"""What the HTTP fronts share: a scoring request whose client goes away stops waiting, and the batcher skips its work.

    result = await unless_abandoned(request, engine.score(examples, model))
    if result is None:                      # the client went away
        return Response(status_code=499)    # nobody reads it; logged as a client close, as nginx does
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

ABANDON_GRACE_S = 0.02
ABANDONED = "the client went away"

T = TypeVar("T")


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_abandoned(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None when the client went away while it waited.

    A request still waiting after ABANDON_GRACE_S starts watching its connection; if the client goes away its
    task is cancelled and the batcher skips its work (uembed_abandoned_requests_total). Requests that are scored
    sooner (nearly all, below overload) pay only for a timer.
    """
    task = asyncio.current_task()
    watcher: list[asyncio.Task] = []

    async def cancel_when_gone() -> None:
        await client_gone(request)
        task.cancel(ABANDONED)

    timer = asyncio.get_running_loop().call_later(ABANDON_GRACE_S, lambda: watcher.append(asyncio.ensure_future(cancel_when_gone())))
    try:
        return await work
    except asyncio.CancelledError as exc:
        if exc.args != (ABANDONED,) or task.uncancel():  # another cancel too (a shutdown): let it through
            raise
        return None
    finally:
        timer.cancel()
        for watching in watcher:
            watching.cancel()
