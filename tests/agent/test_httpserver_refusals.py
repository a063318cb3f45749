"""What the agent's HTTP server answers itself (413, 431, 400, 408, 500), over real loopback
sockets: in OpenAI's error object for a request to ``/v1`` and below, in the v2 one
otherwise, with the same message; and a body refused while it is still being sent is read
and dropped, so that a standard client reads its 413 instead of a reset connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from edge_agent import httplistener
from edge_agent.httpmessages import Request, Response
from edge_agent.httplistener import Limits

from .conftest import serve_http
from .test_httpserver import closed, read_response

LIMITS = Limits(max_body_bytes=500, max_header_bytes=2048)
HUGE = 16 * 1024 * 1024  # more than loopback's socket buffers hold, both ends together


class Handler:
    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        if request.path.endswith("/boom"):
            raise RuntimeError("handler bug")
        if request.path.endswith("/slow"):
            self.entered.set()
            await self.release.wait()
        return Response(200, b'{"ok": true}')


async def start(limits: Limits = LIMITS) -> tuple[httplistener.HttpServer, Handler, int]:
    handler = Handler()
    server, port = await serve_http(handler, limits)
    return server, handler, port


@pytest.fixture
async def served() -> AsyncIterator[tuple[httplistener.HttpServer, Handler, int]]:
    server, handler, port = await start()
    yield server, handler, port
    await server.shutdown(1)


def openai_error(body: bytes) -> dict[str, object]:
    error = json.loads(body)["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    return error


BIG_HEAD = b"X-Big: " + b"h" * 3000 + b"\r\n"
REFUSED = [
    # (request, with {target} for the target; status, OpenAI code)
    pytest.param(b"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", 413, "request_too_large",
                 id="content-length"),
    pytest.param(b"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n", 413,
                 "request_too_large", id="expect-100-continue"),
    pytest.param(b"POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"a" * 1000 + b"\r\n0\r\n\r\n",
                 413, "request_too_large", id="chunked"),
    pytest.param(b"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400,
                 "malformed_request", id="content-length-overflow"),
    pytest.param(b"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400, "malformed_request",
                 id="content-length-not-a-number"),
    pytest.param(b"POST {target} HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, "malformed_request",
                 id="content-length-twice"),
    pytest.param(b"POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 400, "malformed_request",
                 id="bad-chunk"),
    pytest.param(b"POST {target} HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, "malformed_request", id="bad-header"),
    pytest.param(b"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 400,
                 "upgrade_not_supported", id="upgrade"),
    pytest.param(b"GET {target} HTTP/1.1\r\nHost: x\r\n" + BIG_HEAD + b"\r\n", 431, "request_head_too_large", id="big-head"),
    pytest.param(b"GET {target}/" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "request_head_too_large",
                 id="big-target-known-in-part"),
]


async def refused(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        status, headers, body = await read_response(reader)
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert await closed(reader)
        return status, headers, body
    finally:
        writer.close()


@pytest.mark.parametrize(("request_bytes", "status", "code"), REFUSED)
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/completions?x=1", "http://agent:8090/v1/models", "/v1",
                                    "/v1%2Fchat/completions"])
async def test_a_refused_request_to_v1_gets_an_openai_error_object(
        served: tuple[httplistener.HttpServer, Handler, int], request_bytes: bytes, status: int, code: str, target: str) -> None:
    _, handler, port = served
    got, _, body = await refused(port, request_bytes.replace(b"{target}", target.encode()))
    error = openai_error(body)
    assert got == status and error["code"] == code and error["type"] == "invalid_request_error" and error["param"] is None
    # the message is the one the v2 routes get
    _, _, v2 = await refused(port, request_bytes.replace(b"{target}", b"/v2/models/m/infer"))
    assert json.loads(v2) == {"error": error["message"]}
    assert handler.seen == []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:  # and the server still serves
        assert (await client.get("/v1/models")).status_code == 200


@pytest.mark.parametrize("target", ["/v2/models/m/infer", "/v2", "/metrics", "/v1x/models", "/v10/chat/completions"])
@pytest.mark.parametrize(("request_bytes", "status", "code"), REFUSED[:3])
async def test_a_refused_request_elsewhere_keeps_the_v2_error(served: tuple[httplistener.HttpServer, Handler, int],
                                                               request_bytes: bytes, status: int, code: str, target: str) -> None:
    _, _, port = served
    got, _, body = await refused(port, request_bytes.replace(b"{target}", target.encode()))
    assert got == status and isinstance(json.loads(body)["error"], str)


@pytest.mark.parametrize("raw", [b"NONSENSE\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200))])
async def test_a_request_whose_target_never_came_gets_the_v2_error(served: tuple[httplistener.HttpServer, Handler, int],
                                                                   raw: bytes) -> None:
    _, _, port = served
    got, _, body = await refused(port, raw)
    assert got == 400 and isinstance(json.loads(body)["error"], str)


async def test_a_refusal_after_a_v1_answer_is_shaped_by_its_own_target(served: tuple[httplistener.HttpServer, Handler, int]) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\nNONSENSE\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        status, _, body = await read_response(reader)
        assert status == 400 and isinstance(json.loads(body)["error"], str)  # NONSENSE named no target
    finally:
        writer.close()


async def test_a_failing_v1_handler_is_an_openai_server_error(served: tuple[httplistener.HttpServer, Handler, int]) -> None:
    _, _, port = served
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.post("/v1/chat/completions/boom", json={})
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal error", "type": "server_error", "param": None, "code": "internal_error"}}
        r = await client.post("/v2/boom", json={})
        assert r.status_code == 500 and r.json() == {"error": "internal error"}
        assert (await client.get("/v1/models")).status_code == 200  # the connection lives on


async def test_a_slow_v1_request_times_out_with_an_openai_error() -> None:
    server, _, port = await start(Limits(request_timeout=0.2))
    try:
        for target, shape in ((b"/v1/chat/completions", dict), (b"/v2/models/m/infer", str)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")  # never finishes
            status, _, body = await read_response(reader)
            error = json.loads(body)["error"]
            assert status == 408 and isinstance(error, shape) and await closed(reader)
            if shape is dict:
                assert error["code"] == "request_timeout" and error["message"] == "request not received in time"
            writer.close()
    finally:
        await server.shutdown(1)


# --- a body refused while it is still on its way -----------------------------------------------


def chunks(total: int, size: int = 1 << 20):  # noqa: ANN201
    async def gen():  # noqa: ANN202
        for _ in range(total // size):
            yield b"x" * size

    return gen()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v2/models/m/infer"])
async def test_a_standard_client_reads_the_413_of_a_body_larger_than_the_socket_buffers(
        served: tuple[httplistener.HttpServer, Handler, int], framing: str, target: str) -> None:
    """httpx (as OpenAI's SDK, on it) sends its whole request before it reads: the server
    must take the body it refused, or its close resets the connection under the answer."""
    server, handler, port = served
    content = b"x" * HUGE if framing == "content-length" else chunks(HUGE)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
        r = await client.post(target, content=content)
        assert r.status_code == 413 and r.headers["connection"] == "close"
        assert "request body exceeds 500 bytes" in r.text
        assert (await client.get("/v1/models")).status_code == 200
    assert handler.seen[-1].path == "/v1/models" and len(handler.seen) == 1
    for _ in range(100):  # the refused connection is gone once its client closed it
        if len(server.connections) <= 1:
            break
        await asyncio.sleep(0.02)
    assert len(server.connections) <= 1


async def test_a_body_refused_behind_an_answer_in_progress_is_drained_too(served: tuple[httplistener.HttpServer, Handler, int]) -> None:
    _, handler, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(handler.entered.wait(), 5)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % HUGE)
        sending = asyncio.create_task(send_all(writer, HUGE))
        await asyncio.sleep(0.1)
        handler.release.set()
        assert (await read_response(reader))[0] == 200
        status, _, body = await read_response(reader)
        assert status == 413 and openai_error(body)["code"] == "request_too_large"
        await asyncio.wait_for(sending, 10)  # all of it was taken, none of it reset
        assert await closed(reader)
    finally:
        writer.close()


async def send_all(writer: asyncio.StreamWriter, total: int, size: int = 1 << 20) -> None:
    for _ in range(total // size):
        writer.write(b"x" * size)
        await writer.drain()


async def test_draining_a_refused_body_lasts_request_timeout_at_most() -> None:
    server, _, port = await start(Limits(max_body_bytes=500, request_timeout=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        assert (await read_response(reader))[0] == 413
        assert await closed(reader)  # our end is closed at once: the client knows nothing more comes
        writer.write(b"x" * 1000)  # the client goes on sending, and never closes
        for _ in range(100):
            if not server.connections:
                break
            await asyncio.sleep(0.02)
        assert not server.connections
    finally:
        writer.close()
        await server.shutdown(1)
