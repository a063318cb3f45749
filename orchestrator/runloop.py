"""How the long-running commands (``edgeplane serve``, ``edgeplane gateway``) run their event
loop: on uvloop when it is installed (it is, with uvicorn[standard] and Ray; a gateway's
per-request cost is mostly event-loop overhead), until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def until_signalled() -> None:
    """Return at the first SIGINT or SIGTERM, then say so."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("stopping...", flush=True)
