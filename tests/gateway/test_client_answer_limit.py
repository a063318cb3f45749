"""The Python client reads no answer larger than it takes (``max_answer_bytes``, 64 MiB by
default: what the gateway takes from a replica): a broken or hostile server sending a body
of gigabytes, or a gzip body that inflates to them, costs the client no more than the
bound. Real loopback servers, as the agent's HTTP server answers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
from collections.abc import AsyncIterator

import numpy as np
import pytest

from edge_agent import httpmessages, httpstream
from edgeplane_proto import oip
from orchestrator import client as client_mod
from orchestrator.gateway import upstream
from orchestrator.testing import loopback

from .loopback import cache_with, v2_server

X = np.ones((1, 4), dtype=np.float32)
HELLO = [{"role": "user", "content": "hi"}]
MIB = 1 << 20


@dataclasses.dataclass
class Sending:
    url: str
    total: int  # bytes of body it would send
    sent: int = 0
    left: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # the caller went before the end


@contextlib.asynccontextmanager
async def sending(chunks: int, chunk: int = MIB) -> AsyncIterator[Sending]:
    """Answers every request 200 with ``chunks`` chunks of ``chunk`` bytes (no length given),
    counting what it sent until the caller leaves."""
    async def body(server: Sending) -> AsyncIterator[bytes]:
        try:
            for _ in range(chunks):
                server.sent += chunk
                yield b"x" * chunk
        except BaseException:
            server.left.set()
            raise

    async def handle(request: httpmessages.Request) -> httpstream.StreamingResponse:
        return httpstream.StreamingResponse(200, body(server), content_type="application/octet-stream")

    async with loopback.replica(handle) as url:
        server = Sending(url, chunks * chunk)
        yield server


async def test_an_answer_past_the_default_bound_is_refused_not_read_whole() -> None:
    """80 MiB from a gateway: the client stops at 64 MiB, the gateway's own bound on a
    replica's answer, and says so, where it read it all to find it was no v2 answer."""
    async with sending(80) as gateway:
        async with client_mod.AsyncClient(gateway.url, direct=False, timeout=30) as c:
            with pytest.raises(client_mod.BadAnswer, match=f"larger than {64 * MIB} bytes"):
                await c.infer("m", {"input": X})
        async with asyncio.timeout(10):
            await gateway.left.wait()
        assert gateway.sent < gateway.total
    assert client_mod.MAX_ANSWER_BYTES == upstream.UpstreamPool().max_body == 64 * MIB


@pytest.mark.parametrize("sync", [False, True], ids=["AsyncClient", "Client"])
async def test_an_answer_past_the_bound_given_is_refused_by_either_client(sync: bool) -> None:
    async with sending(64) as gateway:
        if sync:
            def call() -> None:
                with client_mod.Client(gateway.url, direct=False, timeout=10, max_answer_bytes=MIB) as c:
                    c.infer("m", {"input": X})

            with pytest.raises(client_mod.BadAnswer, match=f"larger than {MIB} bytes.*max_answer_bytes"):
                await asyncio.to_thread(call)
        else:
            async with client_mod.AsyncClient(gateway.url, direct=False, timeout=10, max_answer_bytes=MIB) as c:
                with pytest.raises(client_mod.BadAnswer, match=f"larger than {MIB} bytes.*max_answer_bytes"):
                    await c.infer("m", {"input": X})
        async with asyncio.timeout(10):
            await gateway.left.wait()
        assert gateway.sent < gateway.total


@pytest.mark.parametrize("headers", [(("content-encoding", "gzip"),), ()], ids=["gzip-inflating-past-it", "its-length-past-it"])
async def test_an_answer_is_held_to_the_bound_inflated_or_by_the_length_it_declares(headers: tuple[tuple[str, str], ...]) -> None:
    """A gzip body of a few KiB that inflates to 16 MiB is held to the bound as it inflates;
    one whose Content-Length is past the bound is refused before it is read."""
    body = gzip.compress(b"\0" * (16 * MIB)) if headers else b"\0" * (2 * MIB)

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(200, body, content_type="application/octet-stream", headers=headers)

    async with loopback.replica(handle) as url:
        async with client_mod.AsyncClient(url, direct=False, timeout=10, max_answer_bytes=MIB) as c:
            with pytest.raises(client_mod.BadAnswer, match=f"larger than {MIB} bytes"):
                await c.infer("m", {"input": X})


async def test_a_replica_whose_answer_is_past_the_bound_is_left_for_the_next() -> None:
    """A replica that sends more than the client takes is as broken as one that sends no v2
    answer: it is ejected and the gateway answers; an answer within the bound is taken."""
    gateway, gateway_url = await v2_server("edge-via-gateway")
    try:
        async with sending(8) as replica:
            cache = cache_with(("edge-big", replica.url))
            async with client_mod.AsyncClient(gateway_url, cache=cache, timeout=10, max_answer_bytes=MIB) as c:
                result = await c.infer("m", {"input": np.ones((1, 200_000), dtype=np.float32)})  # 800 kB each way: within the bound
            assert result.site == "edge-via-gateway" and result.attempts == 2
            assert cache.order("m") == []  # the replica is ejected
    finally:
        await gateway.shutdown(1)


@pytest.mark.parametrize("status", [200, 400])
async def test_a_chat_s_whole_answer_or_refusal_past_the_bound_is_refused(status: int) -> None:
    """A chat read whole (``stream=False``), and a refusal, are held to the bound too (a
    stream's lines are each held to 1 MiB already)."""
    content = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * (2 * MIB)}}]}).encode()

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(status, content if status == 200 else json.dumps({"error": "x" * (2 * MIB)}).encode())

    async with loopback.replica(handle) as url:
        async with client_mod.AsyncClient(url, direct=False, timeout=10, max_answer_bytes=MIB) as c:
            with pytest.raises(client_mod.BadAnswer, match=f"larger than {MIB} bytes"):
                [t async for t in c.chat("m", HELLO, stream=False)]


async def test_an_endpoint_list_past_the_bound_is_no_list() -> None:
    """The endpoint list is an answer like any other: past the bound, the client has none
    and goes through the gateway, which answers."""
    listing = json.dumps({"ttlSeconds": 600, "endpoints": [{"site": f"s{i}", "url": "http://127.0.0.1:9"} for i in range(40_000)]})

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        if request.path.startswith("/v1/endpoints/"):
            return httpmessages.Response(200, listing.encode())
        decoded = oip.decode_request(request.body, int(request.headers[oip.BINARY_HEADER.lower()]))
        body, header_len = oip.encode_response(oip.InferResponse("m", (oip.Tensor("output", decoded.inputs[0].array),)), binary=True)
        return httpmessages.Response(200, body, headers=((oip.BINARY_HEADER, str(header_len)), ("x-edgeplane-site", "via-gateway")))

    async with loopback.replica(handle) as url:
        async with client_mod.AsyncClient(url, timeout=10, max_answer_bytes=MIB) as c:
            assert await c.endpoints("m") == []
            result = await c.infer("m", {"input": X})
    assert result.site == "via-gateway" and result.attempts == 1
