"""The agent's HTTP/1.1 server over real loopback sockets: keep-alive, pipelining,
100-continue, limits, malformed input, timeouts and a draining shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os

import httpx
import pytest

from edgeplane_proto.headers import DRAINING
from edge_agent import httplistener, httpserver
from edge_agent.httpmessages import Request, Response
from edge_agent.httplistener import Limits
from orchestrator.testing import harness

from .conftest import serve_http, slow_reader


class Echo:
    """Answers with method, path, query and body; ``/slow`` waits for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/slow":
            self.entered.set()
            await self.release.wait()
        body = f"{request.method} {request.path} {request.query} ".encode() + request.body
        return Response(200, body, content_type="text/plain", headers=(("x-len", str(len(request.body))),))


async def start(limits: Limits | None = None) -> tuple[httplistener.HttpServer, Echo, int]:
    echo = Echo()
    server, port = await serve_http(echo, limits)
    return server, echo, port


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


async def test_a_standard_client_keeps_one_connection_alive() -> None:
    server, echo, port = await start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for i in range(3):
                r = await client.post(f"/a%20b/{i}?x=1", content=b"payload")
                assert r.status_code == 200
                assert r.content == f"POST /a b/{i} x=1 payload".encode()
                assert r.headers["x-len"] == "7"
        assert len(server.connections) <= 1
    finally:
        await server.shutdown(1)


async def test_pipelined_requests_are_answered_in_order() -> None:
    server, _, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        bodies = [(await read_response(reader))[2] for _ in range(3)]
        assert bodies == [b"GET /one  ", b"POST /two  abc", b"GET /three  "]
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/v2/models/m/infer", "/v2/models/m/infer", ""),  # a plain path, taken as it is
        ("/a%20b/%2Fc", "/a b//c", ""),
        ("/q?x=1&y=%20", "/q", "x=1&y=%20"),
        ("/q?", "/q", ""),
        ("http://example.test/abs?k=v", "/abs", "k=v"),  # absolute form
    ],
)
async def test_request_targets_are_split_and_decoded(target: str, path: str, query: str) -> None:
    server, echo, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await read_response(reader))[0] == 200
        assert (echo.seen[-1].path, echo.seen[-1].query) == (path, query)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_large_bodies_read_in_turns_on_two_connections_stay_their_own() -> None:
    """Every connection reads into the server's one buffer: bodies larger than it, sent
    piece by piece on two connections in turn, each reach their handler whole."""
    server, echo, port = await start()
    size = httplistener.READ_BUFFER_BYTES + 300_000
    bodies = [bytes([n]) * size for n in (1, 2)]
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in bodies]
    try:
        for _, writer in conns:
            writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        piece = 700_000
        for start_at in range(0, size, piece):
            for (_, writer), body in zip(conns, bodies, strict=True):
                writer.write(body[start_at:start_at + piece])
                await writer.drain()
        for (reader, _), body in zip(conns, bodies, strict=True):
            status, headers, answer = await read_response(reader)
            assert status == 200 and headers["x-len"] == str(size)
            assert answer == b"POST /big  " + body
    finally:
        for _, writer in conns:
            writer.close()
        await server.shutdown(1)


async def test_chunked_bodies_and_http10_close() -> None:
    server, _, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert (await read_response(reader))[2] == b"POST /c  abcde"
        writer.write(b"GET /old HTTP/1.0\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_an_http10_client_asking_for_keep_alive_is_told_it_has_it() -> None:
    server, _, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for path in (b"/one", b"/two"):  # as ab -k does: it waits for a close unless told otherwise
            writer.write(b"GET %s HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n" % path)
            status, headers, body = await read_response(reader)
            assert status == 200 and headers["connection"] == "keep-alive" and body == b"GET %s  " % path
    finally:
        writer.close()
        await server.shutdown(1)


async def test_trailer_fields_of_a_chunked_body_are_not_taken_for_headers() -> None:
    server, echo, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /t HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\nContent-Type: text/other\r\nX-Trailer: t\r\n\r\n")
        assert (await read_response(reader))[2] == b"POST /t  abc"
        assert echo.seen[-1].headers["content-type"] == "text/plain" and "x-trailer" not in echo.seen[-1].headers
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_connection_past_the_limit_is_answered_503_and_closed_and_a_freed_place_is_taken_again() -> None:
    server, _, port = await start(Limits(max_connections=2))
    kept = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        for reader, writer in kept:  # both served, and kept alive
            writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"]) == (503, "close") and b"serves 2 connections at once" in body
        assert await closed(reader) and server.turned_away == 1
        writer.close()
        kept.pop()[1].close()
        await harness.wait_until(lambda: len(server.connections) == 1, 5, what="the server to let the connection go")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        kept.append((reader, writer))
        writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
    finally:
        for _, writer in kept:
            writer.close()
        await server.shutdown(1)


def test_the_default_connection_limit_is_half_the_open_file_limit() -> None:
    soft = os.sysconf("SC_OPEN_MAX")
    assert httplistener.default_max_connections() == (1 << 16 if soft < 0 else max(64, soft // 2))
    assert httplistener.HttpServer(Echo()).max_connections == httplistener.default_max_connections()


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    server, _, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"data")
        assert (await read_response(reader))[2] == b"POST /big  data"
    finally:
        writer.close()
        await server.shutdown(1)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", 413),  # refused before the body
        (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"a" * 1000 + b"\r\n0\r\n\r\n", 413),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 3000 + b"\r\n\r\n", 431),
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200)), 400),  # a TLS hello
    ],
)
async def test_bad_requests_get_an_answer_and_a_closed_connection(request_bytes: bytes, status: int) -> None:
    server, echo, port = await start(Limits(max_body_bytes=500, max_header_bytes=2048))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes)
        got, headers, body = await read_response(reader)
        assert got == status and headers["connection"] == "close" and b'"error"' in body
        assert await closed(reader)
        assert echo.seen == []  # nothing reached the handler
        # and the server still serves
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/ok")).status_code == 200
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_handler_exception_is_a_500_and_the_connection_lives_on() -> None:
    server, _, port = await start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/boom")
            assert r.status_code == 500 and r.json() == {"error": "internal error"}
            assert (await client.get("/after")).status_code == 200
    finally:
        await server.shutdown(1)


async def test_slow_requests_time_out_and_idle_connections_are_closed() -> None:
    server, _, port = await start(Limits(request_timeout=0.2, idle_timeout=0.2))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        status, _, _ = await read_response(reader)
        assert status == 408 and await closed(reader)
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert await closed(reader)  # then idle past idle_timeout: closed without a word
        writer.close()
    finally:
        await server.shutdown(1)


async def test_a_large_body_that_keeps_coming_is_read_past_the_request_timeout_and_a_trickle_is_not() -> None:
    # A batch over a slow link takes longer than the request timeout but never stalls.
    server, echo, port = await start(Limits(request_timeout=1.0))
    piece = httpserver.BODY_PROGRESS_BYTES
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (6 * piece))
        for _ in range(6):  # 1.5 s in all, a piece every 0.25 s: each well within its timeout
            writer.write(b"a" * piece)
            await writer.drain()
            await asyncio.sleep(0.25)
        status, _, _ = await read_response(reader)
        assert status == 200 and echo.seen[-1].body == b"a" * (6 * piece)
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (6 * piece))

        async def trickle() -> None:  # a quarter of a piece a second: far from one in a request timeout
            with contextlib.suppress(ConnectionError):
                for _ in range(8):
                    writer.write(b"a" * (piece // 16))
                    await writer.drain()
                    await asyncio.sleep(0.25)

        sending = asyncio.create_task(trickle())
        status, _, _ = await read_response(reader)
        assert status == 408 and await closed(reader)
        await sending
        writer.close()
    finally:
        await server.shutdown(1)


async def test_a_kept_alive_connection_times_out_by_its_last_deadline_only() -> None:
    # One timer serves the connection and moves itself on: an earlier request's deadline
    # must neither cut a later request off nor close the connection before it is idle long.
    server, _, port = await start(Limits(request_timeout=0.1, idle_timeout=0.5))
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = loop.time()
        while loop.time() - started < 0.4:  # four request timeouts of back-to-back requests
            writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
        await asyncio.sleep(0.2)  # past the last request's timeout, well inside the idle one
        writer.write(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        answered = loop.time()
        assert await closed(reader)
        assert loop.time() - answered >= 0.45  # the idle timeout, not the request's
        writer.close()
    finally:
        await server.shutdown(1)


async def test_shutdown_lets_the_request_in_flight_finish_and_closes_idle_ones() -> None:
    server, echo, port = await start()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(idle_reader)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(echo.entered.wait(), 5)
    stopping = asyncio.create_task(server.shutdown(5))
    assert await closed(idle_reader)
    assert not stopping.done()
    echo.release.set()
    status, headers, body = await read_response(reader)
    assert status == 200 and body == b"GET /slow  " and headers["connection"] == "close"
    await asyncio.wait_for(stopping, 5)
    assert not server.connections
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    idle_writer.close()


async def test_a_connection_made_during_the_drain_is_answered_503_with_retry_after_and_the_drain_ends_with_the_last_request() -> None:
    """A client (the gateway, after the drain closed its idle connection) is told the agent is
    stopping and when to retry, not refused the connection; it does not hold the drain up."""
    server, echo, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(echo.entered.wait(), 5)
    stopping = asyncio.create_task(server.shutdown(30))
    await asyncio.sleep(0)  # the drain has started
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        for path in ("/v2/models/m/infer", "/v1/chat/completions"):
            late = await http.post(path, content=b"x" * 10_000)
            assert (late.status_code, late.headers.get("retry-after"), late.headers.get("connection")) == (503, "1", "close"), late.text
            assert late.headers.get(DRAINING) == "1"  # a gateway takes it out for its whole ejection
        assert late.json()["error"]["code"] == "draining"
    assert [r.path for r in echo.seen] == ["/slow"]  # the handler was not asked
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)  # connected during the drain, sends nothing
    echo.release.set()
    status, _, _ = await read_response(reader)
    assert status == 200
    await asyncio.wait_for(stopping, 5)  # well within the drain's 30 s
    assert await closed(silent_reader)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    silent_writer.close()


async def test_shutdown_lets_a_request_still_being_uploaded_arrive_and_answers_it() -> None:
    server, _, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"x" * 100_000
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"  # the head is in
    writer.write(body[:50_000])
    stopping = asyncio.create_task(server.shutdown(5))
    await asyncio.sleep(0)  # the drain has started (and closed what was idle)
    writer.write(body[50_000:])
    status, headers, answer = await read_response(reader)
    assert status == 200 and answer == b"POST /up  " + body and headers["connection"] == "close"
    assert await closed(reader)
    await asyncio.wait_for(stopping, 5)
    writer.close()


async def test_shutdown_gives_up_on_a_stuck_request_after_its_timeout() -> None:
    server, echo, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(echo.entered.wait(), 5)
    await asyncio.wait_for(server.shutdown(0.1), 5)
    assert await closed(reader)
    writer.close()
    echo.release.set()


async def test_a_refusal_waits_for_the_answers_before_it() -> None:
    server, echo, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(echo.entered.wait(), 5)
        writer.write(b"NONSENSE\r\n\r\n")  # while /slow is still being answered
        await asyncio.sleep(0.05)
        echo.release.set()
        first = await read_response(reader)
        second = await read_response(reader)
        assert (first[0], first[2]) == (200, b"GET /slow  ")
        assert second[0] == 400 and second[1]["connection"] == "close"
        assert await closed(reader)
    finally:
        writer.close()
        await server.shutdown(1)


async def test_100_continue_is_not_sent_ahead_of_an_earlier_answer() -> None:
    server, echo, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(echo.entered.wait(), 5)
        writer.write(b"POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        await asyncio.sleep(0.05)
        echo.release.set()
        assert (await read_response(reader))[2] == b"GET /slow  "
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"ok")
        assert (await read_response(reader))[2] == b"POST /next  ok"
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_pipelined_request_keeps_its_own_timer() -> None:
    server, _, port = await start(Limits(request_timeout=0.3, idle_timeout=30))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n")  # /b never ends
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await read_response(reader))[0] == 200
        assert (await read_response(reader))[0] == 408
        assert loop.time() - started < 5  # the request timeout, not the idle one
    finally:
        writer.close()
        await server.shutdown(1)


async def test_head_answers_carry_no_body() -> None:
    server, _, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 9" in head  # "HEAD /h  " is not sent
        assert (await read_response(reader))[2] == b"GET /g  "  # framing intact
    finally:
        writer.close()
        await server.shutdown(1)


async def test_answers_that_wait_and_answers_that_do_not_keep_their_order() -> None:
    # An answer that waits for nothing is written while the read that brought it is
    # handled; one that waits goes on in a task; pipelined requests behind it wait their turn.
    server, echo, port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[2] == b"GET /one  "
        await asyncio.wait_for(echo.entered.wait(), 5)
        assert [r.path for r in echo.seen] == ["/one", "/slow"]  # /three waits behind /slow
        echo.release.set()
        assert [(await read_response(reader))[2] for _ in range(2)] == [b"GET /slow  ", b"GET /three  "]
        writer.write(b"GET /four HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[2] == b"GET /four  "
    finally:
        writer.close()
        await server.shutdown(1)


async def test_a_waiting_answer_is_cancelled_when_its_client_leaves() -> None:
    cancelled = asyncio.Event()
    entered = asyncio.Event()

    async def waits(request: Request) -> Response:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    server, port = await serve_http(waits)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(entered.wait(), 5)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 5)
    finally:
        await server.shutdown(1)


BIG = 16 << 20  # far more than the socket buffers hold


async def serve_big(limits: Limits) -> tuple[httplistener.HttpServer, int]:
    async def big(request: Request) -> Response:
        return Response(200, b"x" * int(request.query or BIG), content_type="application/octet-stream")

    return await serve_http(big, limits)


async def dropped(server: httplistener.HttpServer) -> bool:
    for _ in range(100):  # bounded: 10 s
        if not server.connections:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_client_that_never_reads_its_answer_is_dropped_after_the_write_timeout() -> None:
    # One answer written whole: nothing later writes and would notice the client reads nothing.
    server, port = await serve_big(Limits(write_timeout=0.3))
    try:
        reader, writer = await slow_reader(port)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # then never read
        assert await dropped(server)  # long before the idle timeout (75 s)
        with contextlib.suppress(ConnectionError):
            assert len(await asyncio.wait_for(reader.read(), 10)) < BIG  # cut off, not flushed
        writer.close()
    finally:
        await server.shutdown(1)


async def test_a_client_that_reads_its_answer_slowly_gets_it_whole() -> None:
    server, port = await serve_big(Limits(write_timeout=0.5))
    try:
        reader, writer = await slow_reader(port)
        size = 2 << 20
        writer.write(b"GET /big?%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        received = 0
        while received < size:  # a piece at a time, each within the write timeout of the last
            received += len(await asyncio.wait_for(reader.readexactly(min(256 << 10, size - received)), 5))
            await asyncio.sleep(0.1)
        assert server.connections
        writer.close()
    finally:
        await server.shutdown(1)


async def test_the_end_of_a_drain_drops_a_client_that_has_not_read_its_answer() -> None:
    server, port = await serve_big(Limits())  # the write timeout (60 s) is longer than the drain
    reader, writer = await slow_reader(port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # then never read
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # the answer is being sent
    await asyncio.wait_for(server.shutdown(0.2), 5)
    assert await dropped(server)
    writer.close()
