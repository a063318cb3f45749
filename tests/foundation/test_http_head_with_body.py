"""The commands' HTTP server sends a response's head together with its first body bytes.

uvicorn writes the head as soon as the application starts the response; the server from
``runloop.http_server`` holds it for the first body bytes (one send: a streamed answer's
first event reaches the client in the same segment as the head), or for the next turn of
the event loop when the body is not ready, so a head is never held back by a slow body.
What these tests hold is that every response still arrives whole and on time: whether the
head left in one send with the first event is not visible to a client on the same event
loop (it reads after both writes either way); ``bench/genai_gateway.py`` measures the gain.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from orchestrator import runloop

WAIT = 30.0


class App:
    """Answers /whole (head and body at once), /slow (head, then the body once the test
    opens the gate) and /empty (204)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        assert scope["type"] == "http"
        path = scope["path"]
        if path == "/empty":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        if path == "/slow":
            await asyncio.wait_for(self.gate.wait(), WAIT)
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, int]]:
    app = App()
    server = runloop.http_server(app)
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(3000):  # bounded: 30 s
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started
    try:
        yield app, sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)


async def test_responses_whose_body_follows_at_once_arrive_whole_on_a_kept_connection(served: tuple[App, int]) -> None:
    _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(3):  # keep-alive: every response on the connection
            writer.write(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n")
            first = await asyncio.wait_for(reader.read(65536), WAIT)
            assert first.startswith(b"HTTP/1.1 200")
            rest = first
            while not rest.endswith(b"0\r\n\r\n"):
                rest += await asyncio.wait_for(reader.read(65536), WAIT)
            assert b"data: [DONE]\n\n" in rest
    finally:
        writer.close()


async def test_a_head_whose_body_is_not_ready_is_sent_alone(served: tuple[App, int]) -> None:
    app, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)  # the body waits for this test
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        app.gate.set()
        body = b""
        while not body.endswith(b"0\r\n\r\n"):
            body += await asyncio.wait_for(reader.read(65536), WAIT)
        assert b"data: first\n\n" in body and b"data: [DONE]\n\n" in body
        writer.write(b"HEAD /whole HTTP/1.1\r\nhost: x\r\n\r\n")  # a head and no body
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)).startswith(b"HTTP/1.1 200")
        writer.write(b"GET /empty HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), WAIT)  # to the server's close
        assert rest.startswith(b"HTTP/1.1 204") and rest.endswith(b"\r\n\r\n")
    finally:
        writer.close()


async def _ask(port: int, request: bytes, piece: int = 16384) -> bytes:
    """Send ``request`` in pieces and read the answer to the server's close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            for i in range(0, len(request), 16384):
                writer.write(request[i:i + 16384])
                await writer.drain()
        except ConnectionError:  # the server answered and closed while the rest was being sent
            pass
        answer = b""
        while True:  # what arrived before a reset stays readable
            try:
                chunk = await asyncio.wait_for(reader.read(65536), WAIT)
            except ConnectionError:
                return answer
            if not chunk:
                return answer
            answer += chunk
    finally:
        writer.close()


async def test_a_request_head_over_64_kib_is_refused_and_a_large_body_is_not(served: tuple[App, int]) -> None:
    """httptools keeps a head in memory until it is complete: a 1 MB header was read whole.
    The server answers 431 past 64 KiB of head and closes; a big body is no head."""
    _, port = served
    big = await _ask(port, b"GET /whole HTTP/1.1\r\nhost: x\r\nx-filler: " + b"a" * (1 << 20) + b"\r\nconnection: close\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 431"), big[:200]
    one_read = await _ask(port, b"GET /whole HTTP/1.1\r\nhost: x\r\nx-filler: " + b"a" * 70_000 + b"\r\nconnection: close\r\n\r\n",
                          piece=1 << 20)  # all of it in one read: parsed whole before any read ends inside it
    assert one_read.startswith(b"HTTP/1.1 431"), one_read[:200]
    near = await _ask(port, b"GET /whole HTTP/1.1\r\nhost: x\r\nx-filler: " + b"a" * 40_000 + b"\r\nconnection: close\r\n\r\n")
    assert near.startswith(b"HTTP/1.1 200"), near[:200]
    body = b"b" * (1 << 20)
    posted = await _ask(port, b"POST /whole HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    assert posted.startswith(b"HTTP/1.1 200"), posted[:200]
