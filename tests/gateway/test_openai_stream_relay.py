"""The OpenAI relay against replicas that stream badly or in ways of their own: raw HTTP
servers on loopback whose bytes each test writes, behind the real gateway app; and the
reading of their events (:mod:`orchestrator.gateway.event_stream`) on bodies split as a
test says. Before the first token a bad stream goes to the next replica unseen; after it,
the caller is told the stream broke, and the replica is judged by how its stream ended,
not by its first token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from orchestrator.gateway import endpoints, event_stream, openai_routes, proxy, routing
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.testing import loopback

WAIT = 30.0  # generous: CI machines are loaded
CHAT = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "stream": True}
CALLER = {"x-edgeplane-location": "48.85,2.35"}  # site-0 is the nearest, site-1 the next
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
DONE = b"data: [DONE]\n\n"

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def event(obj: dict | str, end: bytes = b"\n") -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return b"data: " + data.encode() + end + end


def delta(**fields: str | None) -> dict:
    finish = fields.pop("finish", None)
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields, "finish_reason": finish}]}


OPENING = event(delta(role="assistant", content=""))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)


async def healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(OPENING) + chunk(event(delta(content="hello"))) + chunk(event(delta(finish="stop")))
                     + chunk(DONE) + b"0\r\n\r\n")
        await writer.drain()


class Replica:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        try:
            await self.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def gateway(*behaviours: Behaviour, first_token_timeout: float = 10.0, idle_timeout: float = 10.0
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, list[Replica], endpoints.EndpointTable, CollectorRegistry]]:
    """A gateway whose generative model ``llm`` has one replica per behaviour (site-0, site-1...)."""
    replicas = [Replica(b) for b in behaviours]
    async with contextlib.AsyncExitStack() as stack:
        for r in replicas:
            r.server = await asyncio.start_server(r.serve, "127.0.0.1", 0)
            stack.push_async_callback(r.server.wait_closed)
            stack.callback(r.server.close)
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("llm", "llm", f"site-{i}", "edge", "FR", "west", 48.85, 2.35 + i, f"http://127.0.0.1:{r.port}",
                                        api=routing.API_OPENAI) for i, r in enumerate(replicas)])
        registry = CollectorRegistry()
        pool = UpstreamPool(timeout=WAIT)
        stack.push_async_callback(pool.close)
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
        oa = openai_routes.OpenAIGateway(gw, registry=registry, first_token_timeout=first_token_timeout, idle_timeout=idle_timeout)
        port = await stack.enter_async_context(loopback.serving(Starlette(routes=oa.routes())))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT))
        yield http, replicas, table, registry


async def chat(http: httpx.AsyncClient) -> httpx.Response:
    async with asyncio.timeout(WAIT):
        return await http.post("/openai/v1/chat/completions", json=CHAT, headers=CALLER)


def contents(answer: httpx.Response) -> list[object]:
    """What the caller's SDK reads: each event's data, as JSON where it is."""
    events = [e.removeprefix("data: ") for e in answer.text.split("\n\n") if e]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def served(answer: httpx.Response) -> tuple[str | None, bool]:
    """Which site answered, and whether its stream ended with an error event."""
    return answer.headers.get("x-edgeplane-site"), any(isinstance(e, dict) and "error" in e for e in contents(answer))


class Scripted:
    """A body whose reads return these pieces, then its end."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    async def read(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


async def events_of(*pieces: bytes) -> list[bytes]:
    reader = event_stream.Reader(Scripted(*pieces), asyncio.get_running_loop().time() + WAIT, WAIT)
    return [batch async for batch in reader.batches()]


@pytest.mark.parametrize(("pieces", "batches"), [
    pytest.param([b"data: a\n\ndata: b\n\n"], [b"data: a\n\ndata: b\n\n"], id="LF: one read, one batch"),
    pytest.param([b"data: a\r\n\r\n", b"data: b\r\n\r\n"], [b"data: a\n\n", b"data: b\n\n"], id="CRLF"),
    pytest.param([b"data: a\r\rdata: b\r\r"], [b"data: a\n\ndata: b\n\n"], id="CR"),
    pytest.param([b"data: a\r", b"\n\r\n"], [b"data: a\n\n"], id="a CRLF split between two reads"),
    pytest.param([b"data: a\r", b"data: b\r\r"], [b"data: a\ndata: b\n\n"], id="a CR ending a read is one line end"),
    pytest.param([b"data: a\n", b"\n"], [b"data: a\n\n"], id="the blank line in the next read"),
    pytest.param([b"data: a\r\n\r", b"\n"], [b"data: a\n\n"], id="a CRLF blank line split between two reads"),
    pytest.param([b"data: a\r\n\r"], [b"data: a\n\n"], id="a CR ending the body ends its last line"),
])
async def test_events_are_split_at_any_blank_line_whatever_the_line_ends(pieces: list[bytes], batches: list[bytes]) -> None:
    assert await events_of(*pieces) == batches


async def test_a_body_that_ends_inside_an_event_is_a_cut() -> None:
    with pytest.raises(event_stream.Cut, match="inside an event"):
        await events_of(b"data: a\n\n", b"data: b\r\n")


async def test_a_stream_whose_lines_end_in_crlf_is_relayed() -> None:
    """As servers built on sse-starlette send it."""
    async def crlf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + b"".join(chunk(event(e, b"\r\n")) for e in (delta(role="assistant", content="hello"), delta(finish="stop"), "[DONE]"))
                     + b"0\r\n\r\n")
        await writer.drain()

    async with gateway(crlf) as (http, _, _, _):
        answer = await chat(http)
    assert answer.status_code == 200, answer.text
    assert contents(answer) == [delta(role="assistant", content="hello"), delta(finish="stop"), "[DONE]"]


def opens_then(wait: Callable[[asyncio.StreamReader], Awaitable[object]]) -> Behaviour:
    """A replica that sends the head and the chat's opening at once, as an engine does before
    its prefill, then answers once ``wait`` is over."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(OPENING))
        await writer.drain()
        await wait(reader)
        writer.write(chunk(event(delta(content="late"))) + chunk(event(delta(finish="stop"))) + chunk(DONE) + b"0\r\n\r\n")
        await writer.drain()
    return answer


async def test_a_first_token_after_the_opening_is_waited_for_until_the_first_token_timeout() -> None:
    """The idle timeout is for pauses between tokens; a prefill longer than it is no stall."""
    async with gateway(opens_then(lambda _: asyncio.sleep(1.0)), first_token_timeout=WAIT, idle_timeout=0.2) as (http, _, _, _):
        answer = await chat(http)
    assert served(answer) == ("site-0", False), answer.text
    assert contents(answer)[1] == delta(content="late")


async def test_a_replica_with_no_first_token_after_its_opening_is_left_within_the_first_token_timeout() -> None:
    async with gateway(opens_then(lambda reader: reader.read()), healthy, first_token_timeout=0.5, idle_timeout=120) as (http, _, _, _):
        began = time.monotonic()
        answer = await chat(http)
        took = time.monotonic() - began
    assert served(answer) == ("site-1", False), answer.text
    assert took < WAIT / 2, f"the first token was waited for {took:.1f}s, as long as a pause between tokens"  # 120 s


GENERATION_FAILED = event({"error": {"message": "failed to allocate the KV cache", "type": "server_error", "param": None,
                                     "code": "generation_failed"}})


@pytest.mark.parametrize(("batch", "kind"), [
    pytest.param(OPENING, None, id="a chat's opening: nothing yet"),
    pytest.param(b": keep-alive\n\n" + OPENING, None, id="a comment and an opening: nothing yet"),
    pytest.param(OPENING + event(delta(content="hi")), event_stream.Kind.TOKEN, id="a token after the opening"),
    pytest.param(event(delta(role="assistant", content="hi")), event_stream.Kind.TOKEN, id="an opening that holds a token"),
    pytest.param(event(delta(finish="stop")), event_stream.Kind.TOKEN, id="a finish with no token: an answer"),
    pytest.param(event({"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0}]}}]}),
                 event_stream.Kind.TOKEN, id="a tool call"),
    pytest.param(event({"choices": [{"index": 0, "text": "", "finish_reason": None}]}), event_stream.Kind.TOKEN,
                 id="a text completion's chunk"),
    pytest.param(OPENING + GENERATION_FAILED + DONE, event_stream.Kind.ERROR, id="an error"),
    pytest.param(OPENING + DONE, event_stream.Kind.DONE, id="[DONE] with no token"),
])
def test_what_a_stream_begins_with(batch: bytes, kind: event_stream.Kind | None) -> None:
    lead = event_stream.lead(batch)
    assert (lead and lead[0]) == kind


@pytest.mark.parametrize("ending", [GENERATION_FAILED + DONE, DONE], ids=["an error event", "[DONE] with no token"])
async def test_a_stream_that_ends_before_its_first_token_goes_to_the_next_replica(ending: bytes) -> None:
    """The head and the opening left before the prefill, which then failed: the caller sees nothing of it."""
    async def fails_at_prefill(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(OPENING) + chunk(ending) + b"0\r\n\r\n")
        await writer.drain()

    async with gateway(fails_at_prefill, healthy) as (http, (sick, _), table, _):
        answer = await chat(http)
        assert sick.requests == 1
        assert served(answer) == ("site-1", False), answer.text
        assert contents(answer) == [delta(role="assistant", content=""), delta(content="hello"), delta(finish="stop"), "[DONE]"]
        assert not table.ejected()  # like a 500: an error of this one request


async def test_a_stream_that_fails_before_its_first_token_at_every_replica_is_a_502_saying_why() -> None:
    async def fails_at_prefill(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(OPENING) + chunk(GENERATION_FAILED + DONE) + b"0\r\n\r\n")
        await writer.drain()

    async with gateway(fails_at_prefill) as (http, _, _, _):
        answer = await chat(http)
    assert answer.status_code == 502
    assert "site-0: error before the first token: failed to allocate the KV cache" in answer.json()["error"]["message"]


def cut(registry: CollectorRegistry, site: str) -> float:
    return registry.get_sample_value("edgeplane_gateway_streams_cut_total", {"model": "llm", "site": site}) or 0.0


async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + OPENING
                 + event(delta(content="The answer is")))
    await writer.drain()  # and the connection closes


async def chunked_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(SSE_HEAD + chunk(OPENING) + chunk(event(delta(content="The answer is"))) + b"0\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize("behaviour", [close_delimited, chunked_end], ids=["closed", "chunked body ended"])
async def test_a_stream_that_ends_without_done_after_its_first_token_ends_with_an_error(behaviour: Behaviour) -> None:
    async with gateway(behaviour) as (http, _, _, registry):
        answer = await chat(http)
        assert answer.status_code == 200
        *relayed, error, done = contents(answer)
        assert relayed == [delta(role="assistant", content=""), delta(content="The answer is")]
        assert (error["error"]["message"], done) == ("site-0: stream ended without [DONE]", "[DONE]")
        assert cut(registry, "site-0") == 1


async def test_a_stream_that_ends_with_done_is_not_counted_cut() -> None:
    async with gateway(healthy) as (http, _, _, registry):
        answer = await chat(http)
        assert served(answer) == ("site-0", False) and contents(answer)[-1] == "[DONE]"
        assert cut(registry, "site-0") == 0


def first_token_then(then: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> Behaviour:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(SSE_HEAD + chunk(OPENING) + chunk(event(delta(content="Sure,"))))
            await writer.drain()
            await then(reader, writer)
    return answer


async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # wedged until the gateway gives up and closes the connection
    raise ConnectionError


async def fails(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(chunk(GENERATION_FAILED + DONE) + b"0\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize("then", [stalls, fails], ids=["stalls", "sends an error"])
async def test_a_replica_that_fails_after_every_first_token_is_ejected_at_the_fifth_in_a_row(then: Behaviour) -> None:
    """Like a 500 or a silent stream before the first token: one long pause must not take
    the replica from every caller, one that does it every time is left out."""
    async with gateway(first_token_then(then), healthy, idle_timeout=0.2) as (http, _, table, _):
        assert [served(await chat(http)) for _ in range(table.ejecting_500s)] == [("site-0", True)] * table.ejecting_500s
        assert served(await chat(http)) == ("site-1", False)


async def test_a_replica_whose_connection_breaks_after_the_first_token_is_ejected() -> None:
    async def breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()
        raise ConnectionError

    async with gateway(first_token_then(breaks), healthy) as (http, _, _, registry):
        assert served(await chat(http)) == ("site-0", True)
        assert served(await chat(http)) == ("site-1", False)
        assert cut(registry, "site-0") == 1
