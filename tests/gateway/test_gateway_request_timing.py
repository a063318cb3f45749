"""What the gateway's clocks hold, on the v2 and the OpenAI routes alike, against a real
replica on loopback: a caller's wait, from its request's arrival (a cold start's wait for a
replica included) to its first token and to the end of its answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from orchestrator.gateway import endpoints, openai_routes, proxy, routing
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.testing import loopback

pytestmark = pytest.mark.asyncio

WAKE_S = 0.2  # how long a replica of the cold model takes to come up
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ANSWER = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}]}


async def chat(request: Request) -> Response:
    if (await request.json()).get("stream"):
        async def tokens() -> AsyncIterator[bytes]:
            yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "42"}}]}\n\n'
            yield openai_routes.SSE_DONE
        return StreamingResponse(tokens(), media_type="text/event-stream")
    return Response(json.dumps(ANSWER), media_type="application/json")


async def infer(request: Request) -> Response:
    return Response(json.dumps({"model_name": "m", "outputs": []}), media_type="application/json")


REPLICA = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v2/models/m/infer", infer, methods=["POST"])])


@asynccontextmanager
async def woken_gateway(registry: CollectorRegistry) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway whose model ``m`` is scaled to zero: a request wakes it, and its replica
    (v2 and OpenAI alike) is in the table :data:`WAKE_S` later."""
    async with loopback.serving(REPLICA) as port:
        url = f"http://127.0.0.1:{port}"
        fleet = [routing.Endpoint("m", "d", "paris", "edge", "FR", "fr", 48.85, 2.35, url),
                 routing.Endpoint("m", "d", "paris", "edge", "FR", "fr", 48.85, 2.35, url, api=routing.API_OPENAI)]
        table = endpoints.EndpointTable()
        table.replace([], deployed={"m": "deployment d is ScaledToZero"}, cold={"m"})
        table.on_wake = lambda model: asyncio.get_running_loop().call_later(WAKE_S, table.replace, fleet)
        pool = UpstreamPool()
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cold_start_s=10)
        app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes())
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
                yield http
        finally:
            await pool.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_chat_that_woke_its_model_times_its_first_token_from_the_callers_request(stream: bool) -> None:
    registry = CollectorRegistry()
    async with woken_gateway(registry) as http:
        resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream})
    assert resp.status_code == 200 and "42" in resp.text, resp.text
    assert registry.get_sample_value("edgeplane_gateway_time_to_first_token_seconds_count", {"model": "m"}) == 1
    assert registry.get_sample_value("edgeplane_gateway_time_to_first_token_seconds_sum", {"model": "m"}) >= WAKE_S
