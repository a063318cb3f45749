"""A generative cascade at the gateway against loopback replicas that answer as each test
tells them: what each stage is asked for, and what the caller gets back."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpserver
from orchestrator.api import methods
from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_routes, proxy, routing, upstream

Handle = Callable[[httpserver.Request], Awaitable[httpserver.Response]]
DC = cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def chat_answer(content: str, finish: str = "stop") -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "chat",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                                    "finish_reason": finish}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}).encode()


@asynccontextmanager
async def replica(handle: Handle) -> AsyncIterator[str]:
    server = httpserver.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await server.shutdown(1)


def endpoint(site: str, tier: str, url: str, **kw: Any) -> routing.Endpoint:
    return routing.Endpoint("chat", "chat-dep", site, tier, "FR", "fr", 48.85, 2.35, url, api=routing.API_OPENAI, **kw)


@asynccontextmanager
async def gateway(fleet: list[routing.Endpoint], first: cascade_rules.StageRoute, **options: float) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's routes over ``fleet``, whose model ``chat`` is a cascade of ``first``, then :data:`DC`."""
    table = endpoints.EndpointTable()
    table.replace(fleet)
    table.set_cascades({"chat": cascade_rules.CascadeRoute("chat", "chat-dep", (first, DC), {})})
    pool = upstream.UpstreamPool()
    registry = CollectorRegistry()
    handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry))
    gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cascade=handler)
    app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry, **options).routes(),
                    exception_handlers=methods.EXCEPTION_HANDLERS)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
            yield http
    finally:
        await pool.close()


async def test_an_escalated_stage_on_vllm_is_asked_for_its_served_model_name() -> None:
    asked: list[str] = []

    async def edge(request: httpserver.Request) -> httpserver.Response:  # cut at max_tokens: escalate
        return httpserver.Response(200, chat_answer("The answer is", finish="length"))

    async def vllm(request: httpserver.Request) -> httpserver.Response:  # serves its served model name only
        asked.append(json.loads(request.body)["model"])
        if asked[-1] != "org/large-chat":
            return httpserver.Response(404, openai_routes.error_body(f"The model `{asked[-1]}` does not exist.", 404))
        return httpserver.Response(200, chat_answer("The answer is 42."))

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(edge) as edge_url, replica(vllm) as dc_url:
        fleet = [endpoint("edge-paris", "edge", edge_url), endpoint("dc-paris", "datacenter", dc_url, served_model="org/large-chat")]
        async with gateway(fleet, first) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT)
    assert resp.status_code == 200, resp.text
    assert asked == ["org/large-chat"]
    assert resp.headers["x-edgeplane-cascade-stage"] == "large" and resp.headers["x-edgeplane-cascade-escalation"] == "escalated"
    assert resp.json()["choices"][0]["message"]["content"] == "The answer is 42."


async def test_a_completion_asking_logprobs_0_gets_them_through_a_stage_judged_by_logprobs() -> None:
    asked: list[Any] = []

    async def edge(request: httpserver.Request) -> httpserver.Response:
        lp = json.loads(request.body).get("logprobs")
        asked.append(lp)
        logprobs = None if lp is None else {"tokens": [" Paris", "."], "token_logprobs": [-0.01, -0.02],
                                            "top_logprobs": [{" Paris": -0.01}, {".": -0.02}] if lp else [{}, {}],
                                            "text_offset": [0, 6]}
        return httpserver.Response(200, json.dumps({
            "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "chat",
            "choices": [{"index": 0, "text": " Paris.", "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}).encode())

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(mean_logprob_below=-1.0))
    prompt = {"model": "chat", "prompt": "The capital of France is", "max_tokens": 2}
    async with replica(edge) as edge_url, gateway([endpoint("edge-paris", "edge", edge_url)], first) as http:
        wanted = await http.post(f"{openai_routes.PREFIX}/completions", json={**prompt, "logprobs": 0})
        unasked = await http.post(f"{openai_routes.PREFIX}/completions", json=prompt)
    assert asked == [0, 1]  # the caller's own 0: no alternatives; the judge's 1 when the caller asked for none
    assert wanted.status_code == 200 and wanted.headers["x-edgeplane-cascade-stage"] == "small", wanted.text
    assert wanted.json()["choices"][0]["logprobs"]["token_logprobs"] == [-0.01, -0.02]
    assert unasked.status_code == 200 and unasked.json()["choices"][0]["logprobs"] is None
