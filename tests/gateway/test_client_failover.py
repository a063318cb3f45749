"""How the Python client fails a request over, against real loopback servers and without a
control plane (the endpoint list is put in its cache): a replica that never answers costs
the timeout, a gateway answers when every replica failed, gateways are tried in order, a
replica that no longer serves the model or answers 500 sends the request on, one at
capacity does not, and which replicas and gateways are ejected for how long."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import numpy as np
import pytest

from edge_agent import httplistener, httpmessages
from edgeplane_proto import oip
from orchestrator import client as client_mod

from .loopback import answering, cache_with, refused_url, v2_server


@pytest.mark.parametrize("binary", [True, False])
async def test_a_replica_that_never_answers_costs_the_timeout_then_fails_over(silent: str, binary: bool) -> None:
    replica, replica_url = await v2_server("edge-b")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    try:
        cache = cache_with(("edge-hang", silent), ("edge-b", replica_url))
        async with client_mod.AsyncClient("http://127.0.0.1:9", timeout=0.3, cache=cache, binary=binary) as c:
            t = time.monotonic()
            result = await c.infer("m", {"input": x})
            took = time.monotonic() - t
        assert result.site == "edge-b" and result.attempts == 2
        np.testing.assert_array_equal(result["output"], x * 2)
        assert 0.25 < took < 10  # the timeout applied: neither ignored nor waited for forever
        assert cache.order("m") == [e for e in cache.order("m") if e["site"] == "edge-b"]  # the silent one is ejected

        def sync_call() -> client_mod.InferResult:
            with client_mod.Client("http://127.0.0.1:9", timeout=0.3, cache=cache_with(("edge-hang", silent), ("edge-b", replica_url)),
                                   binary=binary) as sc:
                return sc.infer("m", {"input": x})

        result = await asyncio.to_thread(sync_call)
        assert result.site == "edge-b" and result.attempts == 2
    finally:
        await replica.shutdown(1)


async def test_when_every_replica_fails_the_gateway_answers(silent: str) -> None:
    gateway, gateway_url = await v2_server("edge-via-gateway")
    try:
        async with client_mod.AsyncClient(gateway_url, timeout=0.3, cache=cache_with(("edge-hang", silent))) as c:
            result = await c.infer("m", {"input": np.ones((2, 3), dtype=np.float32)})
        assert result.site == "edge-via-gateway" and result.url == gateway_url and result.attempts == 2
        np.testing.assert_array_equal(result["output"], np.full((2, 3), 2, dtype=np.float32))
    finally:
        await gateway.shutdown(1)


async def test_requests_fail_over_between_gateways_in_order() -> None:
    unready, unready_url = await answering(503, {"error": "the gateway has no endpoint table from the control plane yet"})
    good, good_url = await v2_server("edge-via-gateway-2")
    dead = refused_url()
    x = np.ones((1, 3), dtype=np.float32)
    try:
        async with client_mod.AsyncClient([dead, unready_url, good_url], direct=False, timeout=5) as c:
            assert await c.endpoints("m") == []  # direct=False: no endpoint list is asked for
            first = await c.infer("m", {"input": x})
            assert first.url == good_url and first.attempts == 3
            again = await c.infer("m", {"input": x})  # the unreachable gateway is now tried last
            assert again.url == good_url and again.attempts == 2

        def sync_call() -> client_mod.InferResult:
            with client_mod.Client([dead, good_url], direct=False, timeout=5) as sc:
                return sc.infer("m", {"input": x})

        result = await asyncio.to_thread(sync_call)
        assert result.url == good_url and result.attempts == 2
        np.testing.assert_array_equal(result["output"], x * 2)
        # The last gateway's answer is the caller's: its 503 says no replica can answer.
        async with client_mod.AsyncClient([dead, unready_url], direct=False, timeout=5) as c:
            with pytest.raises(client_mod.NoEndpoint, match="no endpoint table"):
                await c.infer("m", {"input": x})
    finally:
        await unready.shutdown(1)
        await good.shutdown(1)


async def test_a_replica_that_no_longer_serves_the_model_sends_the_request_on() -> None:
    """A model moved away a moment ago: its old replica answers 404 while the endpoint lists
    (the client's, the gateway's table) catch up. That is not the caller's error: the next
    replica is tried, and the old one, which serves other models, is not ejected."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from orchestrator.gateway import endpoints, proxy, routing, upstream

    stale, stale_url = await answering(404, {"error": "model 'm' is not served by this agent"})
    replica, replica_url = await v2_server("edge-b")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    try:
        cache = cache_with(("edge-moved", stale_url), ("edge-b", replica_url))
        async with client_mod.AsyncClient("http://127.0.0.1:9", cache=cache) as c:
            result = await c.infer("m", {"input": x})
        assert result.site == "edge-b" and result.attempts == 2
        np.testing.assert_array_equal(result["output"], x * 2)

        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("m", "m", "edge-moved", "edge", "FR", "fr", 48.85, 2.35, stale_url),
                       routing.Endpoint("m", "m", "edge-b", "edge", "DE", "de", 52.52, 13.40, replica_url)])
        pool = upstream.UpstreamPool()
        gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(CollectorRegistry()))
        body, _ = oip.encode_request({"input": x})
        transport = httpx.ASGITransport(app=Starlette(routes=gateway.routes()))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            resp = await http.post("/v2/models/m/infer", content=body, headers={"x-edgeplane-location": "48.85,2.35"})
        await pool.close()
        assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-b", resp.text
        assert stale_url not in table.ejected()
    finally:
        await stale.shutdown(1)
        await replica.shutdown(1)


@pytest.mark.parametrize(("status", "ejected"), [(500, False), (502, True), (503, True)])
async def test_a_replica_s_500_fails_over_without_taking_it_from_everyone(status: int, ejected: bool) -> None:
    """A 500 is an error of that one request (a body no check foresaw): the next replica
    answers it, and the first goes on serving every other caller. 502, 503 (loading,
    draining) and 504 say the replica cannot answer now: it is left out for a while, as is
    one whose every answer is a 500. The same on the v2 and the OpenAI routes."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from orchestrator.gateway import endpoints, openai_routes, proxy, routing, upstream

    answer = {"choices": [{"message": {"role": "assistant", "content": "from edge-b"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    failing, failing_url = await answering(status, {"error": "the replica failed"})
    replica, replica_url = await v2_server("edge-b")
    chat, chat_url = await answering(200, answer)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    try:
        for api, second, path, body in (
            (routing.API_V2, replica_url, "/v2/models/m/infer", oip.encode_request({"input": x})[0]),
            (routing.API_OPENAI, chat_url, "/openai/v1/chat/completions",
             json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()),
        ):
            table = endpoints.EndpointTable()
            table.replace([routing.Endpoint("m", "m", "edge-a", "edge", "FR", "fr", 48.85, 2.35, failing_url, api=api),
                           routing.Endpoint("m", "m", "edge-b", "edge", "DE", "de", 52.52, 13.40, second, api=api)])
            pool = upstream.UpstreamPool()
            gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(CollectorRegistry()))
            routes = gateway.routes() + openai_routes.OpenAIGateway(gateway, registry=CollectorRegistry()).routes()
            transport = httpx.ASGITransport(app=Starlette(routes=routes))
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
                resp = await http.post(path, content=body, headers={"x-edgeplane-location": "48.85,2.35",
                                                                    "content-type": "application/json"})
                assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-b", (api, resp.text)
                assert (failing_url in table.ejected()) is ejected, api
                if status == 500:  # a replica that answers 500 to everything is broken: the fifth ejects it
                    for _ in range(table.ejecting_500s - 1):
                        resp = await http.post(path, content=body, headers={"x-edgeplane-location": "48.85,2.35",
                                                                            "content-type": "application/json"})
                        assert resp.status_code == 200, (api, resp.text)
                    assert failing_url in table.ejected(), api
            await pool.close()
    finally:
        for server in (failing, replica, chat):
            await server.shutdown(1)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(("said", "waits"), [
    ("3", 3.0),
    ("\xb2", None),  # latin-1 "²": a digit to str.isdigit, not to float
    ("Mon, 01 Jan 2024 00:00:00 +99999999999999999", None),  # a zone past any calendar
    ("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", None),
], ids=["seconds", "superscript-two", "zone-overflows", "year-overflows"])
async def test_a_replica_at_capacity_is_a_refusal_that_says_when_to_retry(chat: bool, said: str, waits: float | None) -> None:
    """A replica whose sequences are full answers 429 with ``Retry-After``: the request is
    not moved elsewhere, as the gateway does not move it (that would move the queue), and
    the application is told how long to wait. A Retry-After that cannot be read says
    nothing: the refusal is still the refusal, not an error of the client's own."""
    async def full(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(429, b'{"error": "model \'m\' is at capacity"}', headers=(("retry-after", said),))

    server = httplistener.HttpServer(full)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cache = client_mod.EndpointCache()
    cache.store("m", {"ttlSeconds": 600, "endpoints": [{"site": "edge-a", "url": url, "api": "openai" if chat else "v2",
                                                         "inferUrl": f"{url}/v2/models/m/infer"}]})
    try:
        async with client_mod.AsyncClient(refused_url(), cache=cache, timeout=5) as c:
            with pytest.raises(client_mod.InferenceError, match="at capacity") as refused:
                if chat:
                    [t async for t in c.chat("m", [{"role": "user", "content": "hi"}])]
                else:
                    await c.infer("m", {"input": np.ones(1, np.float32)})
        assert refused.value.status == 429 and refused.value.retry_after == waits
    finally:
        await server.shutdown(1)


@pytest.mark.parametrize("chat", [False, True])
async def test_a_gateway_with_no_replica_ready_says_when_to_retry(chat: bool) -> None:
    """A gateway whose replicas are not ready yet (or drain) answers 503 with Retry-After:
    ``NoEndpoint`` says how long it asked to wait, as a refusal's ``InferenceError`` does."""
    async def not_ready(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(503, b'{"error": "no replica of \'m\' is ready yet"}', headers=(("retry-after", "2"),))

    server = httplistener.HttpServer(not_ready)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    try:
        async with client_mod.AsyncClient(f"http://127.0.0.1:{sock.getsockname()[1]}", direct=False, timeout=5) as c:
            with pytest.raises(client_mod.NoEndpoint, match="ready yet") as refused:
                if chat:
                    [t async for t in c.chat("m", [{"role": "user", "content": "hi"}])]
                else:
                    await c.infer("m", {"input": np.ones(1, np.float32)})
        assert refused.value.retry_after == 2.0
    finally:
        await server.shutdown(1)


async def test_a_cascade_stage_s_500_escalates_without_ejecting_the_replica() -> None:
    """The OpenAI cascade treats a stage's 500 as the plain routes do: the request goes on
    to the next stage, and the replica that answered it stays in the table."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_routes, proxy, routing, upstream

    answer = {"choices": [{"message": {"role": "assistant", "content": "from dc"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    failing, failing_url = await answering(500, {"error": {"message": "the run failed"}})
    dc, dc_url = await answering(200, answer)
    try:
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("m", "d", "edge-a", "edge", "FR", "fr", 48.85, 2.35, failing_url, api=routing.API_OPENAI),
                       routing.Endpoint("m", "d", "dc-a", "datacenter", "FR", "fr", 48.86, 2.34, dc_url, api=routing.API_OPENAI)])
        table.cascades = {"m": cascade_rules.CascadeRoute("m", "d", (
            cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True)),
            cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)))}
        pool = upstream.UpstreamPool()
        handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(CollectorRegistry()))
        gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(CollectorRegistry()), cascade=handler)
        transport = httpx.ASGITransport(app=Starlette(routes=openai_routes.OpenAIGateway(gateway, registry=CollectorRegistry()).routes()))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            resp = await http.post("/openai/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                                   headers={"x-edgeplane-location": "48.85,2.35"})
        await pool.close()
        assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "dc-a", resp.text
        assert table.ejected() == frozenset()
    finally:
        for server in (failing, dc):
            await server.shutdown(1)


def ejections_kept(cache: client_mod.EndpointCache) -> int:
    """How many ejections ``cache`` holds, run out or not. Read from its private record:
    ``ejected()`` shows only the replicas ejected now, and what is asked here is that the
    others are not kept at all."""
    return len(cache._ejected)


def test_a_client_keeps_only_the_replicas_ejected_now() -> None:
    """A client that runs for months meets replicas that fail and go away for good, each at
    a URL of its own: one is left out for ``ejection_s``, and then nothing of it is kept."""
    now = [0.0]
    cache = client_mod.EndpointCache(clock=lambda: now[0], ejection_s=10)
    for i in range(1000):
        cache.eject(f"http://10.0.{i // 250}.{i % 250}:8081")
    assert len(cache.ejected()) == 1000
    now[0] = 10.0
    cache.eject("http://10.1.0.1:8081")
    assert cache.ejected() == {"http://10.1.0.1:8081"} and ejections_kept(cache) == 1


async def test_a_gateway_that_went_down_is_asked_for_the_list_once_per_ejection_not_per_request() -> None:
    """Past the list's TTL with its gateway gone, each request would ask it for the list
    again (a connect timeout each, for a gateway that drops connections) though the replica
    answers: the list held is served, and the gateway asked again only after ``ejection_s``."""
    replica, replica_url = await v2_server("edge-a")
    endpoints = json.dumps({"ttlSeconds": 10, "endpoints": [
        {"site": "edge-a", "url": replica_url, "inferUrl": f"{replica_url}/v2/models/m/infer"}]}).encode()
    up, asked_while_down = [True], [0]

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if up[0]:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(endpoints), endpoints))
            await writer.drain()
        else:
            asked_while_down[0] += 1  # taken and dropped at once, as by a host that went away
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    gateway_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    x = np.ones((1, 2), dtype=np.float32)
    now = [0.0]

    async def served_by(c: client_mod.Client | client_mod.AsyncClient) -> str:
        if isinstance(c, client_mod.Client):
            return (await asyncio.to_thread(c.infer, "m", {"input": x})).site
        return (await c.infer("m", {"input": x})).site

    try:
        for make in (client_mod.AsyncClient, client_mod.Client):
            up[0], asked_while_down[0], now[0] = True, 0, 0.0
            c = make(gateway_url, cache=client_mod.EndpointCache(clock=lambda: now[0], ejection_s=10))
            assert await served_by(c) == "edge-a"
            up[0] = False
            for now[0] in (11.0, 11.5, 13.0, 20.9):  # past the TTL
                assert await served_by(c) == "edge-a"
            assert asked_while_down[0] == 1, make
            now[0] = 21.0  # the ejection is over: asked again, once
            assert await served_by(c) == "edge-a" and await served_by(c) == "edge-a"
            assert asked_while_down[0] == 2, make
            c.close() if isinstance(c, client_mod.Client) else await c.aclose()
    finally:
        server.close()
        await replica.shutdown(1)
