"""Loopback servers the client tests talk to, in place of replicas and gateways: one that
doubles its input, one that answers one status, one that takes requests and never answers,
one that streams one event over and over, a port that refuses connections, and an endpoint cache that names them (no control plane)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator

from edge_agent import httplistener, httpmessages
from edgeplane_proto import oip
from orchestrator import client as client_mod


async def v2_server(site: str) -> tuple[httplistener.HttpServer, str]:
    """Answers every infer with the input doubled, in the encoding it came in."""

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        header = request.headers.get(oip.BINARY_HEADER.lower())
        decoded = oip.decode_request(request.body, int(header) if header else None)
        answer = oip.InferResponse("m", (oip.Tensor("output", decoded.inputs[0].array * 2),))
        body, header_len = oip.encode_response(answer, binary=header is not None)
        headers = [("x-edgeplane-site", site)]
        if header_len is not None:
            headers.append((oip.BINARY_HEADER, str(header_len)))
        return httpmessages.Response(200, body, headers=tuple(headers))

    server = httplistener.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.asynccontextmanager
async def hanging(endpoint_list: bytes | None = None, heads: list[bytes] | None = None) -> AsyncIterator[str]:
    """Takes every request and never answers it, but ``GET /v1/endpoints/...`` when it has
    ``endpoint_list`` to answer: each connection is held until the caller leaves, and
    closed when the server is. ``heads``: where each request's head is added as it comes."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = await reader.readuntil(b"\r\n\r\n")
            if heads is not None:
                heads.append(head)
            if endpoint_list is not None and head.startswith(b"GET /v1/endpoints/"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(endpoint_list), endpoint_list))
                await writer.drain()
            else:
                while await reader.read(1 << 16):  # until the caller leaves
                    pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


#: How long a test waits for an event a server sees (``Streaming.left``): a guard against a
#: hang only, far above the few milliseconds it takes, on a loaded machine too.
HANG_GUARD_S = 60.0


@dataclasses.dataclass
class Streaming:
    url: str
    left: asyncio.Event  # set once a caller has closed its connection
    sent: int = 0  # bytes of the stream written to callers


@contextlib.asynccontextmanager
async def streaming(event: bytes, *, opening: bytes = b"", every_s: float = 0.05, most: int = 100) -> AsyncIterator[Streaming]:
    """Answers each request with an event stream: ``opening``, then ``event`` every
    ``every_s`` seconds, ``most`` times at most (then it stops, with no ``[DONE]``), until
    the caller leaves."""
    left = asyncio.Event()

    async def until_closed(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 16):  # the request's body, then nothing until the caller leaves
                pass
        left.set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        gone = asyncio.ensure_future(until_closed(reader))
        try:
            writer.write(opening)
            for _ in range(most):
                writer.write(event)
                stream.sent += len(event)
                await writer.drain()
                if (await asyncio.wait([gone], timeout=every_s))[0]:
                    break
        except ConnectionError:
            # The caller left and writing to it saw that first: ``gone``, cancelled next, may
            # not have read it yet and would never set ``left`` (likely on a busy machine).
            left.set()
        finally:
            gone.cancel()
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    stream = Streaming(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", left)
    try:
        yield stream
    finally:
        server.close()
        await server.wait_closed()


def cache_with(*endpoints: tuple[str, str]) -> client_mod.EndpointCache:
    cache = client_mod.EndpointCache()
    cache.store("m", {"ttlSeconds": 600, "endpoints": [
        {"site": site, "url": url, "inferUrl": f"{url}/v2/models/m/infer"} for site, url in endpoints]})
    return cache


async def answering(status: int, body: dict[str, object]) -> tuple[httplistener.HttpServer, str]:
    """Answers every request with ``status`` and ``body`` (a gateway with no table, or a chat replica)."""

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(status, json.dumps(body).encode(), headers=(("x-edgeplane-site", f"status-{status}"),))

    server = httplistener.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused
