"""What the gateway's clocks hold, on the v2 and the OpenAI routes alike, against a real
replica on loopback: a caller's wait, from its request's arrival (a cold start's wait for a
replica included) to its first token and to the end of its answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from orchestrator.gateway import endpoints, openai_relay, openai_routes, proxy, routing
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
            yield openai_relay.SSE_DONE
        return StreamingResponse(tokens(), media_type="text/event-stream")
    return Response(json.dumps(ANSWER), media_type="application/json")


async def infer(request: Request) -> Response:
    return Response(json.dumps({"model_name": "m", "outputs": []}), media_type="application/json")


async def metadata(request: Request) -> Response:
    return Response(json.dumps({"name": "m", "versions": ["1"], "platform": "onnxruntime_onnx", "inputs": [], "outputs": []}),
                    media_type="application/json")


REPLICA = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v2/models/m/infer", infer, methods=["POST"]),
                            Route("/v2/models/m", metadata, methods=["GET"]), Route("/v2/models/m/versions/{version}", metadata, methods=["GET"])])


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


def timed(registry: CollectorRegistry, model: str) -> tuple[float | None, float | None]:
    """``edgeplane_gateway_request_seconds`` of ``model``: (count, sum)."""
    return (registry.get_sample_value("edgeplane_gateway_request_seconds_count", {"model": model}),
            registry.get_sample_value("edgeplane_gateway_request_seconds_sum", {"model": model}))


@pytest.mark.parametrize(("path", "body"), [
    ("/v2/models/m/infer", {"inputs": []}),
    (f"{openai_routes.PREFIX}/chat/completions", CHAT),
    (f"{openai_routes.PREFIX}/chat/completions", {**CHAT, "stream": True}),
], ids=["v2", "chat", "streamed chat"])
async def test_a_request_that_woke_its_model_is_timed_from_its_arrival_on_both_route_families(path: str, body: dict) -> None:
    """The caller waited for the replica to come up: its request's time holds that wait."""
    registry = CollectorRegistry()
    async with woken_gateway(registry) as http:
        resp = await http.post(path, json=body)
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "paris", resp.text
    count, total = timed(registry, "m")
    assert count == 1 and total is not None and total >= WAKE_S


def requests_counted(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    return {(s.labels["model"], s.labels["site"], s.labels["code"]): s.value for f in registry.collect() for s in f.samples
            if s.name == "edgeplane_gateway_requests_total"}


async def test_the_gateways_own_answers_are_counted_not_timed_on_both_route_families() -> None:
    """A refusal, and every replica failed: the caller got no replica's answer,
    so ``edgeplane_gateway_requests_total`` counts them (site empty) and the request time,
    of the answers replicas gave, holds none of them, v2 or OpenAI alike."""
    down = "http://127.0.0.1:9"  # refuses the connection
    table = endpoints.EndpointTable()
    table.replace([routing.Endpoint("m", "d", "paris", "edge", "FR", "fr", 48.85, 2.35, down),
                   routing.Endpoint("m", "d", "paris", "edge", "FR", "fr", 48.85, 2.35, down, api=routing.API_OPENAI)])
    registry = CollectorRegistry()
    pool = UpstreamPool()
    gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
    app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes())
    chat_path = f"{openai_routes.PREFIX}/chat/completions"
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
            for path, body, headers, status in [
                ("/v2/models/m/infer", {}, {"x-edgeplane-location": "north"}, 400),
                ("/v2/models/m/infer", {}, {}, 502),
                (chat_path, CHAT, {"x-edgeplane-location": "north"}, 400),
                (chat_path, CHAT, {}, 502),
                (chat_path, {**CHAT, "stream": True}, {}, 502),
            ]:
                assert (await http.post(path, json=body, headers=headers)).status_code == status, (path, headers)
    finally:
        await pool.close()
    assert requests_counted(registry) == {("m", "", "400"): 2, ("m", "", "502"): 3}
    assert timed(registry, "m") == (None, None)


async def test_metadata_reads_are_neither_counted_nor_timed_as_inference_requests() -> None:
    """A KServe client reads a model's metadata before its calls: its inference requests are
    counted once each, as many as are timed, whatever it read (answered by a replica or not)."""
    registry = CollectorRegistry()
    async with loopback.serving(REPLICA) as port:
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("m", "d", "paris", "edge", "FR", "fr", 48.85, 2.35, f"http://127.0.0.1:{port}")])
        pool = UpstreamPool()
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
        app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes())
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
                for _ in range(3):
                    for path in ("/v2/models/m", "/v2/models/m/versions/1", "/v2/models/m/ready"):
                        assert (await http.get(path)).status_code == 200, path
                    assert (await http.post("/v2/models/m/infer", json={"inputs": []})).status_code == 200
                assert (await http.get("/v2/models/gone")).status_code == 404  # no replica asked
                assert (await http.get(f"{openai_routes.PREFIX}/models")).status_code == 200
        finally:
            await pool.close()
    assert requests_counted(registry) == {("m", "paris", "200"): 3}
    assert timed(registry, "m")[0] == 3



async def test_an_answer_that_took_minutes_is_timed_in_a_bucket_of_its_own() -> None:
    """A generation is timed to its last token: an answer of two and a half minutes is told
    apart from one of ten seconds, else every quantile of a generative model reads as the last bucket."""
    registry = CollectorRegistry()
    latency = proxy.GatewayMetrics.create(registry).latency
    for took in (9.5, 150):
        answer = Response(b"{}", media_type="application/json", headers={"x-edgeplane-site": "paris"})
        timed_answer = proxy.Timed(latency, "m", time.perf_counter() - took, answer)  # the request arrived ``took`` ago
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=timed_answer), base_url="http://gateway") as http:
            assert (await http.get("/")).status_code == 200
    buckets = {le: registry.get_sample_value("edgeplane_gateway_request_seconds_bucket", {"model": "m", "le": le}) for le in ("10.0", "300.0")}
    assert buckets == {"10.0": 1, "300.0": 2}
