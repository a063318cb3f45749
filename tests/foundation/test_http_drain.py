"""What the commands' HTTP server (``runloop.http_server``) does with a response still going
when the stop's drain grace ends: a started event stream ends with an error event and the end
of the stream, any other started answer is cut (its connection closed, without the chunk that
would say it is whole), and neither is logged as the application's fault. (A request not yet
answered is answered 503: ``test_serve_signals.py``.) A real server on loopback, its grace
shortened."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from orchestrator import runloop

WAIT = 30.0


async def forever(scope: dict, receive, send) -> None:  # noqa: ANN001
    """``/events``: an event stream; ``/text``: a chunked text answer; each sends its first
    bytes, then nothing more until it is cancelled."""
    kind = b"text/event-stream" if scope["path"] == "/events" else b"text/plain"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
    await asyncio.Event().wait()


@pytest.fixture
async def server(caplog: pytest.LogCaptureFixture) -> AsyncIterator[tuple[object, int, asyncio.Task[None]]]:
    srv = runloop.http_server(forever)
    uvicorn_log = logging.getLogger("uvicorn.error")  # which does not propagate to the root logger, caplog's
    uvicorn_log.addHandler(caplog.handler)
    srv.config.timeout_graceful_shutdown = 0.2
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    for _ in range(3000):  # bounded: 30 s
        if srv.started:
            break
        await asyncio.sleep(0.01)
    assert srv.started
    try:
        yield srv, sock.getsockname()[1], task
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, WAIT)
        uvicorn_log.removeHandler(caplog.handler)


async def answer_cut_by_the_stop(server: tuple[object, int, asyncio.Task[None]], path: str) -> bytes:
    srv, port, task = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        seen = b""
        while b"data: first" not in seen:
            chunk = await asyncio.wait_for(reader.read(65536), WAIT)
            assert chunk, seen
            seen += chunk
        srv.should_exit = True  # type: ignore[attr-defined]
        while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
            seen += chunk
        await asyncio.wait_for(task, WAIT)
        return seen
    finally:
        writer.close()


async def test_an_event_stream_still_going_at_the_end_of_the_drain_ends_with_an_error_event(
        server: tuple[object, int, asyncio.Task[None]], caplog: pytest.LogCaptureFixture) -> None:
    seen = await answer_cut_by_the_stop(server, "/events")
    body = seen.partition(b"\r\n\r\n")[2]
    assert b'"code": "server_stopping"' in body and b"data: [DONE]\n\n" in body, seen
    assert body.endswith(b"0\r\n\r\n"), seen  # the stream ended, not cut
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_another_answer_still_going_at_the_end_of_the_drain_is_cut_not_ended(
        server: tuple[object, int, asyncio.Task[None]], caplog: pytest.LogCaptureFixture) -> None:
    seen = await answer_cut_by_the_stop(server, "/text")
    assert seen.startswith(b"HTTP/1.1 200")
    assert not seen.endswith(b"0\r\n\r\n"), seen  # its caller cannot take it for whole
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "returned without completing response" not in caplog.text
    assert "GET /text was still answering at the end of the" in caplog.text
