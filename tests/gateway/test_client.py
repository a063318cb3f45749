"""The Python client against real loopback servers: a replica that hangs, one that
answers, and a gateway, without a control plane (the endpoint list is put in its cache)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio

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
async def hanging(endpoint_list: bytes | None = None) -> AsyncIterator[str]:
    """Takes every request and never answers it, but ``GET /v1/endpoints/...`` when it has
    ``endpoint_list`` to answer: each connection is held until the caller leaves, and
    closed when the server is."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = await reader.readuntil(b"\r\n\r\n")
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


@pytest_asyncio.fixture
async def silent() -> AsyncIterator[str]:
    """Accepts connections, reads, never answers."""
    async with hanging() as url:
        yield url


def cache_with(*endpoints: tuple[str, str]) -> client_mod.EndpointCache:
    cache = client_mod.EndpointCache()
    cache.store("m", {"ttlSeconds": 600, "endpoints": [
        {"site": site, "url": url, "inferUrl": f"{url}/v2/models/m/infer"} for site, url in endpoints]})
    return cache


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


async def test_a_chat_moves_to_the_next_gateway_before_its_first_token() -> None:
    failing, failing_url = await answering(502, {"error": {"message": "every replica tried failed"}})
    answer = {"choices": [{"message": {"role": "assistant", "content": "from the second gateway"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    good, good_url = await answering(200, answer)
    try:
        async with client_mod.AsyncClient([refused_url(), failing_url, good_url], direct=False, timeout=5) as c:
            chat = c.chat("m", [{"role": "user", "content": "hi"}], stream=False)
            assert [t async for t in chat] == ["from the second gateway"]
            assert chat.url == good_url and chat.attempts == 3
    finally:
        await failing.shutdown(1)
        await good.shutdown(1)


@pytest.mark.parametrize("servers", [[], [""], "", [None]])
def test_a_client_needs_a_url(servers: object) -> None:
    with pytest.raises(ValueError, match="gateway"):
        client_mod.Client(servers)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [client_mod.Client, client_mod.AsyncClient])
@pytest.mark.parametrize(("setting", "said"), [
    ("socks5://ops:s3cret@127.0.0.1:1080", "a SOCKS proxy needs the socksio package (pip install socksio)"),
    ("socks4://127.0.0.1:1080", "Unknown scheme for proxy URL"),
    ("http://ops:s3cret@127.0.0.1:abc", "not a URL (Invalid port: 'abc')"),
    ("http://[::1", "not a URL (Invalid port"),
])
def test_a_proxy_in_the_environment_that_cannot_be_used_is_a_value_error_naming_it(
        make: type[client_mod.Client] | type[client_mod.AsyncClient], setting: str, said: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``ssh -D`` tunnel in ALL_PROXY: httpx mounts the proxies of the environment as the
    client is made, and what it cannot use is a setting that cannot work, said before
    anything is sent (and its password is not)."""
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ALL_PROXY", setting)
    with pytest.raises(ValueError) as raised:
        make("http://127.0.0.1:8088")
    message = str(raised.value)
    assert message.startswith(f"ALL_PROXY='{setting.replace('ops:s3cret', '***')}': {said}"), message
    assert "s3cret" not in message, message


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


async def test_a_chat_replica_that_no_longer_serves_the_model_sends_the_chat_on() -> None:
    """The same for generative models: the client's direct path and the gateway's OpenAI route."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from orchestrator.gateway import endpoints, openai_routes, proxy, routing, upstream

    stale, stale_url = await answering(404, {"error": {"message": "model 'm' is not served here", "code": "model_not_found"}})
    answer = {"choices": [{"message": {"role": "assistant", "content": "from edge-b"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    good, good_url = await answering(200, answer)
    try:
        cache = client_mod.EndpointCache()
        cache.store("m", {"ttlSeconds": 600, "endpoints": [
            {"site": site, "url": url, "api": "openai"} for site, url in (("edge-moved", stale_url), ("edge-b", good_url))]})
        async with client_mod.AsyncClient("http://127.0.0.1:9", cache=cache, timeout=5) as c:
            chat = c.chat("m", [{"role": "user", "content": "hi"}], stream=False)
            assert [t async for t in chat] == ["from edge-b"] and chat.attempts == 2

        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("m", "m", "edge-moved", "edge", "FR", "fr", 48.85, 2.35, stale_url, api=routing.API_OPENAI),
                       routing.Endpoint("m", "m", "edge-b", "edge", "DE", "de", 52.52, 13.40, good_url, api=routing.API_OPENAI)])
        pool = upstream.UpstreamPool()
        registry = CollectorRegistry()
        gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
        app = Starlette(routes=openai_routes.OpenAIGateway(gateway, registry=registry).routes())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                                   headers={"x-edgeplane-location": "48.85,2.35"})
        await pool.close()
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "from edge-b", resp.text
        assert stale_url not in table.ejected()
    finally:
        await stale.shutdown(1)
        await good.shutdown(1)


async def test_the_chat_command_ends_a_cut_answer_s_line_before_its_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A replica that dies mid-answer: what arrived stays on stdout, ended by a newline, and
    the error is one line on stderr (no traceback)."""
    from orchestrator.cli import main as cli

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        if not head.startswith(b"POST /openai/v1/chat/completions"):  # the endpoint list: none known, use the gateway
            # this server closes every connection after one answer, so it says so; else the client
            # may send its next request on the pooled connection just as the close arrives
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                         b"connection: close\r\n\r\n{}")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                         b"connection: close\r\n\r\n")
            for text in ("Hel", "lo"):
                event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        writer.close()  # mid-answer: no [DONE], no last chunk

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        code = await asyncio.to_thread(cli.main, ["chat", "m", "hi", "--server", url])
    finally:
        server.close()
    out, err = capsys.readouterr()
    assert code == 1 and out == "Hello\n", (out, err)
    assert err.startswith(f"error: the answer from {url} was cut after 5 characters: ") and len(err.strip().splitlines()) == 1, err


def test_a_model_name_is_one_path_segment_of_every_url_the_client_builds() -> None:
    """``a?x=1`` is that model, not model ``a`` with a query; ``..`` is not a step up."""
    with client_mod.Client("http://127.0.0.1:9") as c:
        for name, segment in (("a?x=1", "a%3Fx%3D1"), ("../sites/x", "..%2Fsites%2Fx"), ("..", "%2E%2E"), ("intent", "intent")):
            ((_, url, _, _),) = c._endpoints_requests(name, None)
            assert url == f"http://127.0.0.1:9/v1/endpoints/{segment}", url
            (attempt,) = c._attempts(name, [], {})
            assert str(attempt.url) == f"http://127.0.0.1:9/v2/models/{segment}/infer", attempt.url


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


async def test_a_versioned_request_goes_to_the_replicas_that_hold_that_version() -> None:
    """During a rollout the table knows each edge replica's version: a request for one goes
    to the replicas that report it, however far down the ranking (the three nearest hold
    the old one here), then to replicas whose version is not known; no replica holding it
    is a 404 from the gateway naming the versions there are, without a call."""
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette

    from orchestrator.gateway import endpoints, proxy, routing, upstream

    old_servers = [await answering(404, {"error": "no such version"}) for _ in range(3)]
    new, new_url = await v2_server("edge-far")
    table = endpoints.EndpointTable()
    table.replace([*(routing.Endpoint("m", "m", f"edge-{i}", "edge", "FR", "fr", 48.85, 2.35 + i / 100, url, version="aaaaaaaaaaaa")
                     for i, (_, url) in enumerate(old_servers)),
                   routing.Endpoint("m", "m", "edge-far", "edge", "DE", "de", 52.52, 13.40, new_url, version="bbbbbbbbbbbb")])
    pool = upstream.UpstreamPool()
    gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(CollectorRegistry()))
    body = oip.encode_request({"input": np.ones((1, 4), dtype=np.float32)})[0]
    try:
        transport = httpx.ASGITransport(app=Starlette(routes=gateway.routes()))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            resp = await http.post("/v2/models/m/versions/bbbbbbbbbbbb/infer", content=body, headers={"x-edgeplane-location": "48.85,2.35"})
            assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-far", resp.text
            resp = await http.post("/v2/models/m/versions/cccccccccccc/infer", content=body, headers={"x-edgeplane-location": "48.85,2.35"})
            assert resp.status_code == 404, resp.text
            assert resp.json()["error"] == "model 'm' has no version 'cccccccccccc' (versions served: aaaaaaaaaaaa, bbbbbbbbbbbb)"
    finally:
        await pool.close()
        for server, _ in old_servers:
            await server.shutdown(1)
        await new.shutdown(1)


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
    assert cache.ejected() == {"http://10.1.0.1:8081"} and len(cache._ejected) == 1


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


async def test_a_chat_is_one_answer_n_other_than_1_is_refused_and_other_choices_are_not_read() -> None:
    """A chat yields one text: ``n=2`` is refused before anything is sent (the engine would
    generate an answer no one reads), and events of any choice but the first, which an
    engine interleaves with it, are left out rather than spliced into its text."""
    def chunk(index: int, text: str) -> bytes:
        return b"data: " + json.dumps({"choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}).encode() + b"\n\n"

    stream = b"".join(chunk(i, t) for i, t in ((0, "Paris"), (1, "Lyon"), (0, " is"), (1, " is"), (0, " big."), (1, " small."))) + b"data: [DONE]\n\n"
    asked = []

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        asked.append(request.path)
        return httpmessages.Response(200, stream, headers=(("content-type", "text/event-stream"),))

    server = httplistener.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    messages = [{"role": "user", "content": "a city?"}]
    try:
        async with client_mod.AsyncClient(url, direct=False) as c:
            for n in (2, 0, 1.0, True):
                with pytest.raises(ValueError, match="one answer"):
                    c.chat("m", messages, n=n)
            assert asked == []
            assert "".join([t async for t in c.chat("m", messages, n=1)]) == "Paris is big."
        with client_mod.Client(url, direct=False) as sc:
            with pytest.raises(ValueError, match="one answer"):
                sc.chat("m", messages, n=3)
    finally:
        await server.shutdown(1)


async def test_a_chat_s_replicas_and_gateway_share_one_timeout(silent: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Two replicas and the gateway that take the chat and never answer: each attempt had
    the whole timeout (``--timeout 1`` gave up after 3 s, asking "is 'edgeplane serve'
    running?"); the attempts share it, and the call gives up at the timeout saying the
    answer did not come. (The upper bounds leave a loaded machine room: what matters is
    not three times the timeout.)"""
    from orchestrator.cli import main as cli

    replicas = [{"site": f"edge-{i}", "url": silent, "api": "openai"} for i in range(2)]
    messages = [{"role": "user", "content": "hi"}]
    async with hanging(json.dumps({"ttlSeconds": 600, "endpoints": replicas}).encode()) as url:
        async with client_mod.AsyncClient(url, timeout=1) as c:
            started = time.monotonic()
            chat = c.chat("m", messages)
            with pytest.raises(client_mod.TimedOut, match=r"no answer within the timeout \(1 s"):
                [t async for t in chat]
            assert 0.9 < time.monotonic() - started < 2.8
        started = time.monotonic()
        code = await asyncio.to_thread(cli.main, ["chat", "m", "hi", "--server", url, "--timeout", "1"])
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 3 and took < 2.8, (code, took, err)
    assert err.startswith("error: no answer within the timeout (1 s") and "edgeplane serve" not in err, err


@pytest.mark.parametrize("make", [client_mod.Client, client_mod.AsyncClient])
async def test_a_chat_s_endpoint_lookup_is_part_of_its_one_timeout(make: type[client_mod.Client] | type[client_mod.AsyncClient]) -> None:
    """Three gateways that take the endpoint list's lookup and never answer it: each
    lookup had the client's whole timeout, so a chat with ``timeout=1`` gave up after 3 s;
    the lookup now has what is left of the chat's one timeout."""
    async with hanging() as a, hanging() as b, hanging() as c:
        def chat() -> None:
            with client_mod.Client([a, b, c], timeout=1) as client:
                list(client.chat("m", [{"role": "user", "content": "hi"}]))

        started = time.monotonic()
        with pytest.raises(client_mod.TimedOut, match=r"no answer within the timeout \(1 s"):
            if make is client_mod.Client:
                await asyncio.to_thread(chat)
            else:
                async with client_mod.AsyncClient([a, b, c], timeout=1) as client:
                    [t async for t in client.chat("m", [{"role": "user", "content": "hi"}])]
        assert time.monotonic() - started < 2.8  # not once per gateway


async def test_a_chat_that_moves_on_keeps_nothing_of_the_failed_attempt_but_its_time() -> None:
    """A replica that sent a finish and usage, then no text and no end: the answer the
    gateway gives has its own (none here), and its time to first token counts from the
    call, the failed attempt included, as the caller waited."""
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)
        event = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: %s\n\n" % event)
        await writer.drain()
        writer.close()

    replica = await asyncio.start_server(cut, "127.0.0.1", 0)
    replica_url = f"http://127.0.0.1:{replica.sockets[0].getsockname()[1]}"
    stream = b'data: {"choices": [{"index": 0, "delta": {"content": "hello"}}]}\n\ndata: [DONE]\n\n'

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        if request.path.startswith("/v1/endpoints/"):
            return httpmessages.Response(200, json.dumps({"ttlSeconds": 600, "endpoints": [
                {"site": "edge-cut", "url": replica_url, "api": "openai"}]}).encode())
        return httpmessages.Response(200, stream, headers=(("content-type", "text/event-stream"),))

    gateway = httplistener.HttpServer(handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await gateway.start(sock)
    try:
        async with client_mod.AsyncClient(f"http://127.0.0.1:{sock.getsockname()[1]}") as c:
            chat = c.chat("m", [{"role": "user", "content": "hi"}])
            assert [t async for t in chat] == ["hello"] and chat.attempts == 2
        assert chat.finish_reason is None and chat.usage is None
        assert chat.ttft_s is not None and chat.ttft_s >= 0.3
    finally:
        replica.close()
        await gateway.shutdown(1)


async def test_clients_of_two_residencies_sharing_a_cache_each_get_their_own_endpoint_list() -> None:
    """The list is the caller's: a client with no residency is sent to the German replica, and
    one of an FR residency that shares its cache must not take that list for its own."""
    (de, de_url), (fr, fr_url) = await v2_server("edge-de"), await v2_server("edge-fr")

    def listing(url: str, site: str) -> bytes:
        return json.dumps({"ttlSeconds": 600, "endpoints": [{"site": site, "url": url, "inferUrl": f"{url}/v2/models/m/infer"}]}).encode()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = listing(fr_url, "edge-fr") if b"residency=FR" in head.split(b"\r\n")[0] else listing(de_url, "edge-de")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    gateway_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    shared = client_mod.EndpointCache()
    x = np.ones((1, 2), dtype=np.float32)
    try:
        async with client_mod.AsyncClient(gateway_url, cache=shared) as anyone, \
                client_mod.AsyncClient(gateway_url, cache=shared, residency="FR") as french:
            assert (await anyone.infer("m", {"input": x})).site == "edge-de"
            assert (await french.infer("m", {"input": x})).site == "edge-fr"
            assert (await anyone.infer("m", {"input": x})).site == "edge-de"
    finally:
        server.close()
        await de.shutdown(1)
        await fr.shutdown(1)
