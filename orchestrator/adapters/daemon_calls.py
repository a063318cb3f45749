"""Blocking calls to a cluster's API, each in a daemon thread of its own.

The kubernetes client is synchronous, and a call may never end: an API server that took
the request and never answers, a kubeconfig's credential command that waits on a login.
On asyncio's shared pool such a call held one of its threads for good, and a few of them
took every thread, and the planning and the server's stop that run there. So each call
here runs in a thread of its own, a daemon, which holds up neither the event loop's
shutdown nor the process's exit; its outcome is a future that neither its awaiting try's
end nor a cancel stops (the thread cannot be), so a caller may wait on it again later.
The KubeRay actuator's calls and the loads of its kubeconfig clients run so.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


def start(fn: Callable[[], _T], name: str, dropped: Callable[[_T], object] | None = None) -> asyncio.Future[_T]:
    """``fn()`` in a daemon thread named ``name``, its outcome the future's. An outcome that
    comes once the loop has closed is dropped; one that comes once the future was cancelled
    is too, given to ``dropped`` first (a client to close) when it is a result. An error
    no one awaits is not logged as never retrieved: it was its try's to raise."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[_T] = loop.create_future()
    answer.add_done_callback(_retrieved)

    def run() -> None:
        try:
            outcome: tuple[Any, Exception | None] = (fn(), None)
        except Exception as exc:  # the awaiting try's to raise
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(_settle, answer, dropped, *outcome)
        except RuntimeError:  # the loop closed meanwhile: no one is left to take it
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return answer


def _settle(answer: asyncio.Future[Any], dropped: Callable[[Any], object] | None, result: Any, error: Exception | None) -> None:
    if answer.cancelled():
        if dropped is not None and error is None:
            dropped(result)
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)


def _retrieved(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()
