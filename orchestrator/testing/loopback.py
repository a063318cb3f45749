"""An ASGI app behind uvicorn on a loopback port, with the settings the control plane and
the gateway serve with (``runloop.http_server``): for tests that need real HTTP (a caller
that leaves mid-body, a stream read line by line) without a whole control plane. And
:class:`CannedHandler`, for the standard library's server answering what a test tells it
(a server the CLI or the client is pointed at)."""

from __future__ import annotations

import asyncio
import http.server
import socket
from collections.abc import AsyncIterator, Mapping
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


class CannedHandler(http.server.BaseHTTPRequestHandler):
    """A request handler whose answers a test writes: :meth:`reply` sends one whole answer
    (JSON unless ``headers`` say otherwise); no access log on the test's output."""

    def reply(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"content-type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass
