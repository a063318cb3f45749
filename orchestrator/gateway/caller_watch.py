"""Work for a caller of the gateway's OpenAI routes, cancelled when the caller leaves.

uvicorn does not cancel an app whose caller went away; only reading ``receive`` tells. A
generation the caller no longer waits for would run on at its replica, so the work of an
answer (picking and relaying a replica, a cascade's stages) runs beside a watch of
``receive``, and the first to end cancels the other: the work's upstream connections close,
and the replica stops generating. :mod:`orchestrator.gateway.openai_routes` answers through
these; a relay (:mod:`orchestrator.gateway.openai_relay`) watches its caller itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

_T = TypeVar("_T")


async def until_disconnected(work: Awaitable[_T], receive: Receive) -> _T | None:
    """``work``'s result, or None when the caller disconnected first. The work is then
    cancelled, which closes its upstream connections: the replica stops generating."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((job, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, watch):
            task.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)
    return None if job.cancelled() else job.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Decided(Response):
    """The ASGI answer that is worked out (a cascade's stages) while the caller is watched:
    a caller who leaves cancels that work, as it does a relay's."""

    def __init__(self, decide: Callable[[], Awaitable[Response]]) -> None:
        self.decide = decide
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await until_disconnected(self.decide(), receive)
        if answer is not None:  # it may be a relay, which watches the caller itself
            await answer(scope, receive, send)
