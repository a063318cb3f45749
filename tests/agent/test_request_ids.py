"""The agent's HTTP server returns the ``X-Request-Id`` it was sent (the gateway's, or a
direct caller's) on its answer, its own refusals included, and names it in the lines it
logs for a request that failed; it makes none and logs nothing of a request that succeeded.
Over real loopback sockets, with handlers that answer, fail and stream as each test says."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from edge_agent import httplistener
from edge_agent.httpmessages import Request, Response
from edge_agent.httpstream import StreamingResponse

from .conftest import serve_http
from .test_httpserver import read_response

ID = "6f1c2a9e-3b7d-4c1e-9f0a-2d4b6c8e0a1b"


async def handle(request: Request) -> Response | StreamingResponse:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/stream":
        return StreamingResponse(200, tokens(fail=False))
    if request.path == "/stream-cut":
        return StreamingResponse(200, tokens(fail=True))
    if request.path == "/missing":
        return Response(404, b'{"error": "no such model"}')
    return Response(200, b"{}")


async def tokens(*, fail: bool) -> AsyncIterator[bytes]:
    yield b"data: one\n\n"
    if fail:
        raise RuntimeError("producer bug")
    yield b"data: [DONE]\n\n"


@pytest.fixture
async def agent() -> AsyncIterator[httpx.AsyncClient]:
    server, port = await serve_http(handle)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield http
    finally:
        await server.shutdown(1)


@pytest.mark.parametrize("path", ["/ok", "/missing", "/boom", "/stream"])
async def test_every_answer_returns_the_id_it_was_sent(agent: httpx.AsyncClient, path: str) -> None:
    resp = await agent.get(path, headers={"x-request-id": ID})
    assert resp.headers.get("x-request-id") == ID, (resp.status_code, resp.headers)


async def test_an_answer_to_a_request_with_no_id_or_one_not_to_keep_names_none(agent: httpx.AsyncClient) -> None:
    assert "x-request-id" not in (await agent.get("/ok")).headers
    assert "x-request-id" not in (await agent.get("/ok", headers={"x-request-id": "jane@example.com"})).headers
    assert "x-request-id" not in (await agent.get("/ok", headers={"x-request-id": "x" * 129})).headers


async def test_a_refusal_of_the_server_itself_returns_the_id() -> None:
    server, port = await serve_http(handle, httplistener.Limits(max_body_bytes=100))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /ok HTTP/1.1\r\nhost: a\r\nx-request-id: {ID}\r\ncontent-length: 1000\r\n\r\n".encode())
        status, headers, _ = await read_response(reader)
        writer.close()
    finally:
        await server.shutdown(1)
    assert (status, headers.get("x-request-id")) == (413, ID)


async def test_a_request_that_failed_is_logged_with_its_id_and_one_that_succeeded_not_at_all(
        agent: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent")
    assert (await agent.get("/ok", headers={"x-request-id": "fine-1"})).status_code == 200
    assert (await agent.get("/stream", headers={"x-request-id": "fine-2"})).status_code == 200
    assert (await agent.get("/boom", headers={"x-request-id": ID})).status_code == 500
    with pytest.raises(httpx.RemoteProtocolError):  # the stream is cut: no last chunk
        await agent.get("/stream-cut", headers={"x-request-id": "cut-1"})
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("edge_agent")]
    assert f"GET /boom failed (request {ID})" in lines
    assert "stream failed (request cut-1)" in lines
    assert not [line for line in lines if "fine-" in line]


async def test_a_failure_of_a_request_with_no_id_is_logged_as_before(agent: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="edge_agent")
    assert (await agent.get("/boom")).status_code == 500
    assert [r.getMessage() for r in caplog.records if r.name.startswith("edge_agent")] == ["GET /boom failed"]
