"""An ASGI app behind uvicorn on a loopback port, with the settings the control plane and
the gateway serve with (``runloop.http_server``): for tests that need real HTTP (a caller
that leaves mid-body, a stream read line by line) without a whole control plane;
:func:`replica`, the agent's own HTTP server answering as a test tells it (a model replica
the gateway routes to). And the standard library's server answering what a test tells it
(a server the CLI or the client is pointed at): :func:`http_server` with a handler such as
:class:`CannedHandler`, or :func:`in_thread` for a server a test built itself."""

from __future__ import annotations

import asyncio
import http.server
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from edge_agent import httplistener, httpmessages
from orchestrator import runloop

Server = TypeVar("Server", bound=socketserver.BaseServer)


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


@asynccontextmanager
async def replica(handle: httpmessages.Handler) -> AsyncIterator[str]:
    """The agent's HTTP server answering with ``handle`` on 127.0.0.1; yields its base URL."""
    server = httplistener.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await server.shutdown(1)


@asynccontextmanager
async def behind_a_redirect(body: bytes) -> AsyncIterator[tuple[str, list[str]]]:
    """``body`` served by a mirror that a download reaches only through a redirect to another
    host: yields the URL to start from (host 127.0.0.1), whose answer is a 302 to the mirror
    (host ``localhost``, another port), and the paths the mirror was asked for."""
    asked: list[str] = []

    async def mirror(request: Request) -> Response:
        asked.append(request.url.path)
        return Response(body)

    async with serving(Starlette(routes=[Route("/m.onnx", mirror)])) as mirror_port:
        moved = RedirectResponse(f"http://localhost:{mirror_port}/m.onnx", status_code=302)
        async with serving(Starlette(routes=[Route("/m.onnx", lambda _: moved)])) as port:
            yield f"http://127.0.0.1:{port}/m.onnx", asked


@contextmanager
def in_thread(server: Server, *, stopped_within_s: float = 5.0) -> Iterator[Server]:
    """Serve with ``server``, already bound (of a class of the test's own, another address
    family, a socket behind TLS), in a daemon thread; after, shut it down, close its socket
    and wait for the thread (``stopped_within_s`` at most)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(stopped_within_s)


@contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """The standard library's threading HTTP server answering with ``handler`` on 127.0.0.1,
    served in a daemon thread; yields its base URL, and stops it after."""
    with in_thread(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as server:
        yield f"http://127.0.0.1:{server.server_port}"


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
