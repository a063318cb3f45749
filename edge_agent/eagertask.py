"""A coroutine run at once, up to its first real wait, instead of as a task the event loop
starts on its next turn: Python 3.12's eager tasks, for 3.11. The agent's HTTP connections
(``edge_agent.httpserver``) answer each request this way."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` now, up to its first real wait; a task carries it on from there, and
    None means it finished without waiting (Python 3.12's eager tasks, for 3.11).

    Most answers wait for nothing (a short run computed on the loop, then one write): then
    no task is created and the loop does not go round once more (one ``epoll_wait`` and a
    task step fewer per request, about a tenth of the tiny model's overhead)."""
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_carry_on(coro, waiting_on))


@types.coroutine
def _carry_on(coro: Coroutine[Any, Any, None], waiting_on: Any) -> Generator[Any, Any, None]:
    """Drive a coroutine already started by hand, as ``await`` would (values and
    exceptions, cancellation included, pass through to it)."""
    while True:
        try:
            sent = yield waiting_on
        except BaseException as exc:  # noqa: BLE001 - thrown in by the task: passed on as is
            try:
                waiting_on = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration:
                return
