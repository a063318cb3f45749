"""An ASGI app behind uvicorn on a loopback port, with the settings the control plane and
the gateway serve with (``runloop.http_server``): for tests that need real HTTP (a caller
that leaves mid-body, a stream read line by line) without a whole control plane."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from orchestrator import runloop


@asynccontextmanager
async def serving(app: Any, *, started_within_s: float = 5.0) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1; yields its port once uvicorn listens, and stops it after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = runloop.http_server(app)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(started_within_s):
            while not server.started:
                if task.done():  # it failed to start: its exception, not a timeout
                    task.result()
                await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
