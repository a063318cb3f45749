"""A generative cascade at the gateway, for the tests that put one over loopback replicas that
answer as each test tells them: the chat a caller sends, answers as a replica gives them
(whole or streamed), the stage replicas the tests reuse (answering, at capacity, refusing,
cut at max_tokens, answering "42"), and the gateway's routes over a table of them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages, httpstream
from orchestrator.api import methods
from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_cascade, openai_relay, openai_routes, proxy, routing, upstream

Handle = Callable[[httpmessages.Request], Awaitable[httpmessages.Response]]
DC = cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def chat_answer(content: str, finish: str = "stop") -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "chat",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                                    "finish_reason": finish}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}).encode()


def chat_reply(request: httpmessages.Request, content: str, finish: str = "stop") -> httpmessages.Response:
    """:func:`chat_answer` as a replica gives it: as a stream when the request asks for one."""
    if not json.loads(request.body).get("stream"):
        return httpmessages.Response(200, chat_answer(content, finish))
    events = openai_cascade.replay(json.loads(chat_answer(content, finish)), chat=True, usage=False)
    return httpmessages.Response(200, b"".join(events), content_type="text/event-stream")


def endpoint(site: str, tier: str, url: str, lat: float = 48.85, lon: float = 2.35, **kw: Any) -> routing.Endpoint:
    return routing.Endpoint("chat", "chat-dep", site, tier, "FR", "fr", lat, lon, url, api=routing.API_OPENAI, **kw)


def cascade_of(first: cascade_rules.StageRoute, fleet: list[routing.Endpoint]) -> endpoints.EndpointTable:
    """A table of ``fleet``, whose model ``chat`` is a cascade of ``first``, then :data:`DC`."""
    table = endpoints.EndpointTable()
    table.replace(fleet)
    table.set_cascades({"chat": cascade_rules.CascadeRoute("chat", "chat-dep", (first, DC), {})})
    return table


@asynccontextmanager
async def gateway_app(table: endpoints.EndpointTable, stats: cascade.CascadeStats | None = None,
                      registry: CollectorRegistry | None = None, **options: float) -> AsyncIterator[Starlette]:
    """The gateway's routes over ``table`` (its cascades counted in ``stats``, its metrics in ``registry``)."""
    pool = upstream.UpstreamPool()
    registry = registry if registry is not None else CollectorRegistry()
    handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry), stats)
    gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cascade=handler)
    try:
        yield Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry, **options).routes(),
                        exception_handlers=methods.EXCEPTION_HANDLERS)
    finally:
        await pool.close()


@asynccontextmanager
async def gateway(table: endpoints.EndpointTable, stats: cascade.CascadeStats | None = None,
                  registry: CollectorRegistry | None = None, **options: float) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_app(table, stats, registry, **options) as app, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
        yield http


def answering(content: str) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return chat_reply(request, content)
    return handle


def at_capacity(retry_after: str) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:  # as the agent answers with its sequences full
        return httpmessages.Response(429, openai_relay.error_body("model 'chat' is at capacity (1 running, 0 queued); retry after 1s", 429,
                                                                 code="rate_limit_exceeded"), headers=(("retry-after", retry_after),))
    return handle


def refusing(status: int) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(status, openai_relay.error_body(f"refused with {status}", status))
    return handle


async def truncated(request: httpmessages.Request) -> httpmessages.Response:  # cut at max_tokens: escalate
    return chat_reply(request, "The answer is", finish="length")


def answering_42(generating_s: float) -> httpmessages.Handler:
    """A stage that answers "42": streamed, a token at once, ``generating_s`` of generation and
    the end; whole, after ``generating_s``."""
    async def tokens() -> AsyncIterator[bytes]:
        yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "42"}}]}\n\n'
        await asyncio.sleep(generating_s)
        yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        yield openai_relay.SSE_DONE

    async def handle(request: httpmessages.Request) -> httpmessages.Response | httpstream.StreamingResponse:
        if json.loads(request.body).get("stream"):
            return httpstream.StreamingResponse(200, tokens())
        await asyncio.sleep(generating_s)
        return httpmessages.Response(200, chat_answer("The answer is 42."))
    return handle
