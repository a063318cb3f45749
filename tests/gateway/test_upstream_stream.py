"""The upstream pool's streaming mode against real loopback servers: bodies arrive as they
are sent, a slow reader holds the server back, leaving early closes the connection, and
only a connection whose body arrived whole is reused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from orchestrator.gateway.upstream import STREAM_HIGH_WATER, StreamCut, UpstreamError, UpstreamPool

WAIT = 30.0  # generous: CI machines are loaded

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback HTTP server whose answers the test writes byte by byte; it counts
    connections and notes when a client closed its side."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.client_left = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def wait_for_close(self, reader: asyncio.StreamReader) -> None:
        """Reads until the client closes its side of the connection."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.client_left.set()


async def read_to_end(stream) -> list[bytes]:  # noqa: ANN001
    parts = []
    while data := await asyncio.wait_for(stream.read(), WAIT):
        parts.append(data)
    return parts


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_body_arrives_piece_by_piece_as_the_server_sends_it(framing: str) -> None:
    """The server sends its second piece only after the client got the first: a client
    that waited for the whole body would never finish."""
    first_seen = asyncio.Event()
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        else:
            length = sum(map(len, pieces))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % length)
        for i, piece in enumerate(pieces):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
            await writer.drain()
            if i == 0:
                await asyncio.wait_for(first_seen.wait(), WAIT)
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    server = await Server(handler).start()
    pool = UpstreamPool()
    try:
        stream = await asyncio.wait_for(pool.stream("POST", server.url, b"{}", {"content-type": "application/json"}), WAIT)
        assert stream.status == 200 and stream.headers["content-type"] == "text/event-stream"
        got = [await asyncio.wait_for(stream.read(), WAIT)]
        assert got == [pieces[0]]
        first_seen.set()
        got += await read_to_end(stream)
        assert b"".join(got) == b"".join(pieces)
        assert await stream.read() == b""  # still the end
        # whole: the connection went back to the pool and carries the next request
        again = await asyncio.wait_for(pool.stream("POST", server.url, b"{}"), WAIT)
        first_seen.set()
        assert b"".join(await read_to_end(again)) == b"".join(pieces)
        assert server.connections == 1
    finally:
        await pool.close()
        await server.stop()


async def test_a_close_delimited_body_ends_at_the_close_and_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()
        raise ConnectionError  # this connection is done

    server = await Server(handler).start()
    pool = UpstreamPool()
    try:
        for _ in range(2):
            stream = await asyncio.wait_for(pool.stream("GET", server.url), WAIT)
            assert b"".join(await read_to_end(stream)) == b"all of it"
        assert server.connections == 2
    finally:
        await pool.close()
        await server.stop()


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_body_cut_by_the_server_is_a_stream_cut_after_its_bytes(framing: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
        await writer.drain()
        writer.close()
        raise ConnectionError

    server = await Server(handler).start()
    pool = UpstreamPool()
    try:
        stream = await asyncio.wait_for(pool.stream("GET", server.url), WAIT)
        got = b""
        with pytest.raises(StreamCut, match="before the end of the answer"):
            for _ in range(10):
                got += await asyncio.wait_for(stream.read(), WAIT)
        assert got == b"hello"
        assert isinstance(StreamCut("x"), UpstreamError)  # the gateway's one error family
        # the cut connection is not pooled: the next request opens a new one
        stream = await asyncio.wait_for(pool.stream("GET", server.url), WAIT)
        with pytest.raises(StreamCut):
            await asyncio.wait_for(stream.body(), WAIT)
        assert server.connections == 2
    finally:
        await pool.close()
        await server.stop()


async def test_failures_before_the_head_are_upstream_errors_not_stream_cuts() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # read the request, answer nothing
        raise ConnectionError

    server = await Server(handler).start()
    pool = UpstreamPool(connect_timeout=5)
    try:
        with pytest.raises(UpstreamError) as caught:
            await asyncio.wait_for(pool.stream("POST", server.url, b"{}"), WAIT)
        assert not isinstance(caught.value, StreamCut)
        await server.stop()
        with pytest.raises(UpstreamError, match="connect to") as caught:
            await asyncio.wait_for(pool.stream("POST", server.url, b"{}"), WAIT)
        assert not isinstance(caught.value, StreamCut)
    finally:
        await pool.close()


async def test_a_caller_that_leaves_closes_the_upstream_connection() -> None:
    """Cancelling the task that reads (a caller gone) closes the connection: the server
    sees it, as a replica that should stop generating would."""
    holder: list[Server] = []
    sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ntoken1\r\n")
        await writer.drain()
        sent.set()
        await holder[0].wait_for_close(reader)  # never ends the body: only the client can end this
        raise ConnectionError

    server = await Server(handler).start()
    holder.append(server)
    pool = UpstreamPool()
    got_first = asyncio.Event()

    async def caller() -> None:
        async with await pool.stream("POST", server.url, b"{}") as stream:
            await stream.read()
            got_first.set()
            await stream.read()  # waits for a token that never comes

    try:
        task = asyncio.ensure_future(caller())
        await asyncio.wait_for(got_first.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.client_left.wait(), WAIT)
        assert sent.is_set()
        # the left connection is not handed out again: the next request opens a new one
        async with await asyncio.wait_for(pool.stream("POST", server.url, b"{}"), WAIT) as stream:
            assert await asyncio.wait_for(stream.read(), WAIT) == b"token1"
        assert server.connections == 2
    finally:
        await pool.close()
        await server.stop()


async def test_closing_a_stream_before_its_end_closes_the_connection_and_the_next_one_is_new() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        await writer.drain()
        await asyncio.wait_for(reader.read(1), WAIT)  # the client's close ends this connection
        raise ConnectionError

    server = await Server(handler).start()
    pool = UpstreamPool()
    try:
        for _ in range(3):
            stream = await asyncio.wait_for(pool.stream("GET", server.url), WAIT)
            assert await asyncio.wait_for(stream.read(), WAIT) == b"12345"
            stream.close()
        assert server.connections == 3
    finally:
        await pool.close()
        await server.stop()


async def test_a_slow_reader_holds_the_server_back() -> None:
    """A reader that stops reading pauses the socket: the server's writes block once the
    kernel's buffers are full, far short of the body, and the client holds at most its
    high-water mark plus one socket read. Reading on, the whole body arrives intact."""
    total = 64 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB
    written = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        while written[0] < total:
            writer.write(piece)
            await writer.drain()
            written[0] += len(piece)

    server = await Server(handler).start()
    pool = UpstreamPool()
    try:
        stream = await asyncio.wait_for(pool.stream("GET", server.url), WAIT)
        received = len(await asyncio.wait_for(stream.read(), WAIT))
        # Let the server run on while nothing is read, until its writes stop (bounded).
        loop = asyncio.get_running_loop()
        deadline, steady, last = loop.time() + WAIT, 0, -1
        while steady < 10 and written[0] < total and loop.time() < deadline:
            await asyncio.sleep(0.02)
            steady = steady + 1 if written[0] == last else 0
            last = written[0]
        assert written[0] < total // 2, f"the server wrote {written[0]} bytes to a reader that read {received}"
        held = len(await asyncio.wait_for(stream.read(), WAIT))
        assert held <= STREAM_HIGH_WATER + 256 * 1024
        received += held
        while data := await asyncio.wait_for(stream.read(), WAIT):
            assert data[:1] == bytes([received % 256])  # in order, nothing lost
            received += len(data)
        assert received == total == written[0]
    finally:
        await pool.close()
        await server.stop()


async def test_a_body_larger_than_the_high_water_mark_pauses_resumes_and_leaves_the_connection_usable() -> None:
    """Streams and buffered requests share one pooled connection once each body is whole."""
    body = b"x" * (4 * STREAM_HIGH_WATER)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    server = await Server(handler).start()
    pool = UpstreamPool()
    try:
        stream = await asyncio.wait_for(pool.stream("GET", server.url), WAIT)
        got = await asyncio.wait_for(stream.body(), WAIT)
        assert got == body
        stream = await asyncio.wait_for(pool.stream("GET", server.url), WAIT)
        assert await asyncio.wait_for(stream.body(), WAIT) == body
        answer = await asyncio.wait_for(pool.request("GET", server.url), WAIT)
        assert answer.body == body
        assert server.connections == 1
    finally:
        await pool.close()
        await server.stop()


async def test_interim_answers_are_skipped_and_the_final_head_is_returned() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\nx-final: yes\r\ncontent-length: 4\r\n\r\ndone")
        await writer.drain()

    server = await Server(handler).start()
    pool = UpstreamPool()
    try:
        async with await asyncio.wait_for(pool.stream("POST", server.url, b"{}"), WAIT) as stream:
            assert stream.status == 201 and stream.headers.get("x-final") == "yes" and "link" not in stream.headers
            assert await asyncio.wait_for(stream.body(), WAIT) == b"done"
    finally:
        await pool.close()
        await server.stop()
