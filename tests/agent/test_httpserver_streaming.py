"""Streamed responses on the agent's HTTP server, over real loopback sockets: chunked
framing, keep-alive after a stream, back-pressure from a client that does not read,
disconnect detection, a producer that fails mid-stream, and a producer's thread writing
items itself through the stream's Passthrough."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import AsyncIterator

import httpx

from edge_agent import httplistener, httpserver, httpstream
from edge_agent.httpmessages import Request, Response
from edge_agent.httpserver import StreamingResponse

from .conftest import serve_http, slow_reader

CHUNK = 64 * 1024


class Streams:
    def __init__(self) -> None:
        self.produced = 0
        self.closed = asyncio.Event()
        self.first_sent = asyncio.Event()
        self.passthrough: httpserver.Passthrough | None = None
        self.lent = asyncio.Event()
        self.queued: asyncio.Queue[bytes | None] = asyncio.Queue()  # items for the loop to write; None ends
        self.burst = asyncio.Event()  # /burst: its items after the first are ready

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        if request.path == "/small":
            return StreamingResponse(200, self._items([b"a", b"bb", b"", b"ccc"]))
        if request.path == "/big":
            return StreamingResponse(200, self._big(int(request.query.split("=")[1])))
        if request.path == "/forever":
            return StreamingResponse(200, self._forever())
        if request.path == "/fails":
            return StreamingResponse(200, self._fails())
        if request.path == "/burst":
            return StreamingResponse(200, self._burst(int(request.query.split("=")[1])))
        if request.path == "/lent":
            return StreamingResponse(200, self._queued(), passthrough=self._take)
        return Response(200, b"plain", content_type="text/plain")

    async def _items(self, items: list[bytes]) -> AsyncIterator[bytes]:
        for item in items:
            yield item

    async def _big(self, n: int) -> AsyncIterator[bytes]:
        for i in range(n):
            self.produced = i + 1
            yield bytes([i % 251]) * CHUNK

    async def _forever(self) -> AsyncIterator[bytes]:
        try:
            yield b"data: first\n\n"
            self.first_sent.set()
            await asyncio.Event().wait()  # a generation that would never end by itself
            yield b"never"
        finally:
            self.closed.set()

    async def _burst(self, n: int) -> AsyncIterator[bytes]:
        """A first item, then ``n`` more at once (made, or queued, faster than they are sent)."""
        try:
            yield b"first"
            await self.burst.wait()
            for i in range(n):
                self.produced = i + 1
                yield b"x" * 1024
        finally:
            self.closed.set()

    def _take(self, passthrough: httpserver.Passthrough) -> None:
        self.passthrough = passthrough
        self.lent.set()

    async def _queued(self) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            while (item := await self.queued.get()) is not None:
                yield item
        finally:
            self.closed.set()

    def send(self, data: bytes) -> bool:
        """What a producer's thread does: write ``data`` itself if the socket is lent."""
        assert self.passthrough is not None and threading.current_thread() is not threading.main_thread()
        with self.passthrough.lock:
            return self.passthrough.send(data)

    async def _fails(self) -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        raise RuntimeError("producer bug")


async def start(limits: httplistener.Limits | None = None) -> tuple[httplistener.HttpServer, Streams, int]:
    streams = Streams()
    server, port = await serve_http(streams, limits)
    return server, streams, port


async def test_chunked_framing_then_the_connection_serves_the_next_request() -> None:
    server, _, port = await start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\nGET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"transfer-encoding: chunked" in head and b"content-length" not in head
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert body == b"1\r\na\r\n2\r\nbb\r\n3\r\nccc\r\n0\r\n\r\n"  # the empty item sends nothing
        second = await asyncio.wait_for(reader.readuntil(b"plain"), 5)
        assert second.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in second
        writer.close()
        async with httpx.AsyncClient() as client:  # and a standard client decodes it
            assert (await client.get(f"http://127.0.0.1:{port}/small")).content == b"abbccc"
    finally:
        await server.shutdown(1)


async def test_a_client_that_does_not_read_holds_the_producer_back() -> None:
    server, streams, port = await start()
    n = 400  # 25 MiB in all
    try:
        reader, writer = await slow_reader(port)
        writer.write(f"GET /big?n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # Wait until production stops growing (bounded: 100 looks, 20 ms apart).
        last = -1
        for _ in range(100):
            await asyncio.sleep(0.02)
            if streams.produced == last and last > 0:
                break
            last = streams.produced
        assert 0 < streams.produced < n // 4, streams.produced  # kernel buffers + one write-buffer high-water mark
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        received = 0
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            size = int(size_line.strip(), 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), 5)
            if size == 0:
                break
            received += size
            assert data[:-2] == bytes([data[0]]) * size
        assert received == n * CHUNK and streams.produced == n
        writer.close()
    finally:
        await server.shutdown(1)


async def test_a_client_that_reads_nothing_for_the_write_timeout_is_dropped_and_its_producer_closed() -> None:
    server, streams, port = await start(httplistener.Limits(write_timeout=0.5))
    try:
        reader, writer = await slow_reader(port)
        writer.write(b"GET /big?n=400 HTTP/1.1\r\nHost: x\r\n\r\n")  # 25 MiB, never read
        for _ in range(200):  # bounded: 20 s
            if not server.connections:
                break
            await asyncio.sleep(0.1)
        assert not server.connections  # dropped without flushing what the client never read
        assert 0 < streams.produced < 100
        with contextlib.suppress(ConnectionError):
            assert len(await asyncio.wait_for(reader.read(), 10)) < 400 * CHUNK  # the stream ends, truncated
        writer.close()
    finally:
        await server.shutdown(1)


async def test_a_client_that_leaves_closes_the_producer_at_once() -> None:
    server, streams, port = await start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"data: first\n\n\r\n"), 5)
        writer.close()
        await asyncio.wait_for(streams.closed.wait(), 5)  # its finally ran: it knows nobody listens
        assert not server.connections or all(c.idle for c in server.connections)
    finally:
        await server.shutdown(1)


async def test_a_client_gone_is_noticed_at_the_next_item_of_a_producer_that_never_waits() -> None:
    """Items ready at once (queued faster than sent) never let the event loop run, and so
    never let it call connection_lost: the write that found the client gone was the last
    one made, and every item after it was made, written to a closed transport (asyncio
    logging 'socket.send() raised exception.' for each) and its producer run to its end."""
    server, streams, port = await start()
    loop = asyncio.get_running_loop()
    n = 1000
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        await loop.sock_sendall(sock, f"GET /burst?n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = b""
        for _ in range(100):  # bounded: the head and the first item come in a read or two
            if got.endswith(b"5\r\nfirst\r\n"):
                break
            got += await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        assert got.endswith(b"5\r\nfirst\r\n"), got
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # reset: the next write finds the client gone
        streams.burst.set()
        await asyncio.wait_for(streams.closed.wait(), 5)
        assert streams.produced < 10, streams.produced  # closed at the next item, not run to its end
    finally:
        await server.shutdown(1)


async def test_a_producer_that_fails_truncates_the_stream_visibly() -> None:
    server, _, port = await start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /fails HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF: the server closed the connection
        assert rest == b"b\r\ndata: one\n\n\r\n"  # no terminating zero-size chunk: the client knows it is cut
        async with httpx.AsyncClient() as client:
            try:
                await client.get(f"http://127.0.0.1:{port}/fails")
                raise AssertionError("a truncated chunked body must not read as complete")
            except httpx.RemoteProtocolError:
                pass
    finally:
        await server.shutdown(1)


async def open_lent(port: int, streams: Streams, *, slow: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                                             httpserver.Passthrough]:
    """A ``/lent`` stream, its head read, and the Passthrough its producer was given."""
    reader, writer = await (slow_reader(port) if slow else asyncio.open_connection("127.0.0.1", port))
    writer.write(b"GET /lent HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await asyncio.wait_for(streams.lent.wait(), 5)
    assert streams.passthrough is not None
    return reader, writer, streams.passthrough


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip(), 16)
    data = await asyncio.wait_for(reader.readexactly(size + 2), 10)
    assert data.endswith(b"\r\n")
    return data[:-2]


async def test_a_producers_thread_writes_items_itself_in_order_with_those_the_loop_writes() -> None:
    server, streams, port = await start()
    try:
        reader, writer, passthrough = await open_lent(port, streams)
        assert await read_chunk(reader) == b"first"
        assert await asyncio.to_thread(streams.send, b"from the thread")  # taken: the server waits
        assert await read_chunk(reader) == b"from the thread"
        await streams.queued.put(b"from the loop")
        assert await read_chunk(reader) == b"from the loop"
        assert await asyncio.to_thread(streams.send, b"the thread again")  # lent again once the loop wrote
        assert await read_chunk(reader) == b"the thread again"
        await streams.queued.put(None)
        assert await read_chunk(reader) == b""  # the last chunk: the stream is complete
        assert passthrough.items == 2 and passthrough.closed
        assert not await asyncio.to_thread(streams.send, b"too late")  # the stream is over: nothing is written
        writer.write(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")  # and the connection serves the next request
        assert (await asyncio.wait_for(reader.readuntil(b"plain"), 5)).startswith(b"HTTP/1.1 200 OK")
        writer.close()
    finally:
        await server.shutdown(1)


async def test_what_a_full_socket_did_not_take_is_written_by_the_loop_before_anything_else() -> None:
    server, streams, port = await start()
    big = bytes(range(251)) * (32 * 1024)  # 7.8 MiB: far more than the socket buffers hold
    try:
        reader, writer, passthrough = await open_lent(port, streams, slow=True)
        assert await read_chunk(reader) == b"first"
        assert await asyncio.to_thread(streams.send, big)  # taken: what the socket did not take is owed
        assert not await asyncio.to_thread(streams.send, b"next")  # the socket is back with the loop
        await streams.queued.put(b"next")  # so the producer hands it to the stream
        await streams.queued.put(None)
        assert await read_chunk(reader) == big  # whole, then what followed it
        assert await read_chunk(reader) == b"next"
        assert await read_chunk(reader) == b""
        assert passthrough.items == 1
        writer.close()
    finally:
        await server.shutdown(1)


async def test_a_lent_socket_is_taken_back_when_the_client_leaves() -> None:
    server, streams, port = await start()
    try:
        _, writer, passthrough = await open_lent(port, streams)
        writer.close()
        await asyncio.wait_for(streams.closed.wait(), 5)  # the producer is closed at once
        assert passthrough.closed  # its descriptor closed with the connection
        assert not await asyncio.to_thread(streams.send, b"nobody listens")
        assert passthrough.items == 0
    finally:
        await server.shutdown(1)


async def test_without_a_descriptor_to_lend_the_loop_writes_the_whole_stream(monkeypatch) -> None:
    def no_descriptors(fd: int) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(httpstream.os, "dup", no_descriptors)
    server, streams, port = await start()
    try:
        reader, writer, passthrough = await open_lent(port, streams)
        assert await read_chunk(reader) == b"first"
        assert passthrough.closed and not await asyncio.to_thread(streams.send, b"not lent")
        await streams.queued.put(b"not lent")  # so the producer hands it to the stream
        await streams.queued.put(None)
        assert await read_chunk(reader) == b"not lent"
        assert await read_chunk(reader) == b""
        writer.close()
    finally:
        await server.shutdown(1)
