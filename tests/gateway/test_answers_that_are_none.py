"""A replica's answer that the caller could not use is a failed attempt, not an answer to
relay: a redirect (an ingress sending plain HTTP to HTTPS, an auth proxy sending to its
login page), which no caller of the gateway can follow, or a 200 that is not what was asked
(a proxy's own HTML page where a stream was asked for, a chat completion cut short). The
request moves on to the next replica, and when none is left the 502 says what each replica
did; a cascade's stage moves on alike. A redirecting replica is ejected at once (every request
to it is redirected); one whose 200 was no answer as a 500 is, at the fifth in a row. Real HTTP on loopback; the replicas are small
Starlette apps."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_routes, proxy, routing
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.testing import loopback

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
INFER = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
NEAREST = {"x-edgeplane-location": "48.85,2.35"}  # site-0 first, then site-1
ROUTES = [("/v2/models/m/infer", INFER), ("/openai/v1/chat/completions", CHAT), ("/openai/v1/chat/completions", {**CHAT, "stream": True})]
ROUTE_IDS = ["v2", "openai", "openai-stream"]
#: m and llm as cascades whose first stage is the edge replicas (no rule: its answer stands)
#: and the next the data centre, which has none.
CASCADES = {model: cascade_rules.CascadeRoute(model, model, (cascade_rules.StageRoute("small", frozenset({"edge"}), None),
                                                             cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {})
            for model in ("m", "llm")}


async def healthy(request: Request) -> Response:
    """A good replica: a v2 answer, a whole chat completion, or a chat stream when asked for one."""
    if request.url.path.startswith("/v2/"):
        return Response(json.dumps({"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}]}),
                        media_type="application/json")
    if (await request.json()).get("stream"):
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": "stop"}]}
        return Response(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n", media_type="text/event-stream")
    return Response(json.dumps({"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]}), media_type="application/json")


def redirecting(status: int, location: str):  # noqa: ANN201
    async def answer(request: Request) -> Response:
        return Response(f"<html><body>{status}</body></html>", status_code=status, media_type="text/html", headers={"location": location})
    return answer


@contextlib.asynccontextmanager
async def gateway_over(*answers, table: endpoints.EndpointTable, cascaded: bool = False) -> AsyncIterator[httpx.AsyncClient]:  # noqa: ANN002
    """A gateway whose models m (v2) and llm (OpenAI) have a replica answering each of ``answers``,
    at site-0, site-1... (``cascaded``: they are :data:`CASCADES`)."""
    async with contextlib.AsyncExitStack() as stack:
        apps = [Starlette(routes=[Route("/{path:path}", a, methods=["POST"])]) for a in answers]
        ports = [await stack.enter_async_context(loopback.serving(app)) for app in apps]
        table.replace([routing.Endpoint(model, model, f"site-{i}", "edge", "FR", "west", 48.85, 2.35 + i, f"http://127.0.0.1:{port}",
                                        api=api)
                       for i, port in enumerate(ports) for model, api in (("m", "v2"), ("llm", "openai"))])
        if cascaded:
            table.set_cascades(CASCADES)
        registry, pool = CollectorRegistry(), UpstreamPool()
        gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry),
                                cascade=cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry)))
        app = Starlette(routes=gateway.routes() + openai_routes.OpenAIGateway(gateway, registry=registry).routes())
        port = await stack.enter_async_context(loopback.serving(app))
        yield await stack.enter_async_context(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10))


@pytest.mark.parametrize("cascaded", [False, True], ids=["plain", "cascade"])
@pytest.mark.parametrize(("path", "body"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(("status", "location"), [(308, "https://replica.example/v2/models/m/infer"), (302, "https://sso.example/login")],
                         ids=["to-https", "to-a-login-page"])
async def test_a_replica_that_redirects_is_passed_over_for_the_next_and_ejected(path: str, body: dict, status: int, location: str,
                                                                               cascaded: bool) -> None:
    table = endpoints.EndpointTable()
    async with gateway_over(redirecting(status, location), healthy, table=table, cascaded=cascaded) as http:
        answer = await http.post(path, json=body, headers=NEAREST)
    assert (answer.status_code, answer.headers["x-edgeplane-site"]) == (200, "site-1"), answer.text
    assert "location" not in answer.headers
    assert [e.site for e in table.endpoints("m") if e.url in table.ejected()] == ["site-0"]


@pytest.mark.parametrize("cascaded", [False, True], ids=["plain", "cascade"])
@pytest.mark.parametrize(("path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_a_model_whose_only_replica_redirects_is_a_502_saying_where_to(path: str, body: dict, cascaded: bool) -> None:
    async with gateway_over(redirecting(308, "https://replica.example/"), table=endpoints.EndpointTable(), cascaded=cascaded) as http:
        answer = await http.post(path, json=body)
    assert answer.status_code == (503 if cascaded else 502), answer.text  # a cascade's next stage has no replica at all
    assert "site-0: redirected to https://replica.example/ (HTTP 308)" in answer.text, answer.text
    assert "location" not in answer.headers


PAGE = "<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"


async def a_proxy_s_page(request: Request) -> Response:
    return Response(PAGE, media_type="text/html")


async def cut_short(request: Request) -> Response:
    return Response('{"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assis',
                    media_type="application/json")


@pytest.mark.parametrize("cascaded", [False, True], ids=["plain", "cascade"])
@pytest.mark.parametrize(("sick", "stream"), [(a_proxy_s_page, True), (a_proxy_s_page, False), (cut_short, False)],
                         ids=["html-to-a-stream", "html-to-a-whole-chat", "json-cut-short"])
async def test_a_chat_answered_200_with_no_answer_moves_on_to_the_next_replica(sick, stream: bool, cascaded: bool) -> None:  # noqa: ANN001
    table = endpoints.EndpointTable()
    async with gateway_over(sick, healthy, table=table, cascaded=cascaded) as http:
        answer = await http.post("/openai/v1/chat/completions", json={**CHAT, "stream": stream}, headers=NEAREST)
    assert (answer.status_code, answer.headers["x-edgeplane-site"]) == (200, "site-1"), answer.text
    if stream:
        assert answer.headers["content-type"].startswith("text/event-stream") and answer.text.endswith("data: [DONE]\n\n")
    else:
        assert answer.json()["choices"][0]["message"]["content"] == "hello"
    assert not table.ejected()  # one odd answer: an error of that request, as a 500 is


@pytest.mark.parametrize("cascaded", [False, True], ids=["plain", "cascade"])
async def test_a_replica_whose_every_200_is_a_proxy_s_page_is_ejected_at_the_fifth_in_a_row(cascaded: bool) -> None:
    table = endpoints.EndpointTable(ejecting_500s=5)
    async with gateway_over(a_proxy_s_page, table=table, cascaded=cascaded) as http:
        for i in range(5):
            answer = await http.post("/openai/v1/chat/completions", json={**CHAT, "stream": True})
            # a cascade's stage runs whole, and its next stage has no replica at all
            why = "the answer is not a JSON object" if cascaded else "answered a streamed request with text/html"
            assert (answer.status_code, f"site-0: {why}" in answer.text) == ((503 if cascaded else 502), True), answer.text
            assert bool(table.ejected()) == (i == 4), f"after request {i + 1}"
