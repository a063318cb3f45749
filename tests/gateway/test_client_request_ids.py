"""The Python client's request ids: one ``X-Request-Id`` per call (the caller's, or one it
makes), sent to each replica it tries directly and to the gateway, which sends it on to its
own replicas; the result and every error the call raises carry it. Against replicas on the
agent's own HTTP server that note what each request carried, and the gateway's routes behind
uvicorn, wrapped as both servers wrap them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages
from edgeplane_proto import oip
from orchestrator import client as client_mod
from orchestrator.api import methods
from orchestrator.gateway import correlation, endpoints, openai_relay, openai_routes, proxy, routing, upstream
from orchestrator.testing import loopback

from .loopback import refused_url

X = np.ones((1, 2), dtype=np.float32)
USER = [{"role": "user", "content": "hi"}]
MADE = re.compile(r"[0-9a-f]{32}")
CHAT = {"choices": [{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class Replica:
    """Answers every request with ``status`` (a v2 answer doubling the input, or a chat, for
    200; an error of the API asked otherwise), noting each request's id."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.ids: list[str | None] = []

    async def handle(self, request: httpmessages.Request) -> httpmessages.Response:
        self.ids.append(request.headers.get("x-request-id"))
        chat = request.path.endswith("/chat/completions")
        if self.status != 200:
            body = openai_relay.error_body("refused", self.status) if chat else oip.error_body(f"replica says {self.status}")
            return httpmessages.Response(self.status, body)
        if chat:
            return httpmessages.Response(200, json.dumps(CHAT).encode())
        header = request.headers.get(oip.BINARY_HEADER.lower())
        decoded = oip.decode_request(request.body, int(header) if header else None)
        body, length = oip.encode_response(oip.InferResponse("m", (oip.Tensor("output", decoded.inputs[0].array * 2),)),
                                           binary=header is not None)
        return httpmessages.Response(200, body, headers=((oip.BINARY_HEADER, str(length)),) if length is not None else ())


@contextlib.asynccontextmanager
async def fleet(direct: list[Replica], behind: list[Replica]) -> AsyncIterator[Callable[..., client_mod.AsyncClient]]:
    """``direct`` replicas in the client's endpoint list (nearest first), and a gateway whose
    replicas are ``behind``: a maker of clients of both."""
    async with contextlib.AsyncExitStack() as stack:
        listed = [(f"edge-{i}", await stack.enter_async_context(loopback.replica(r.handle))) for i, r in enumerate(direct)]
        table = endpoints.EndpointTable()
        fleet = []
        for i, r in enumerate(behind):
            url = await stack.enter_async_context(loopback.replica(r.handle))
            fleet += [routing.Endpoint(model, model, f"gw-{i}", "edge", "FR", "fr", 48.85, 2.35 + i / 100, url, api=api)
                      for model, api in (("m", routing.API_V2), ("chat", routing.API_OPENAI))]
        table.replace(fleet)
        pool = upstream.UpstreamPool()
        stack.push_async_callback(pool.close)
        registry = CollectorRegistry()
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry))
        app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes(),
                        exception_handlers=methods.EXCEPTION_HANDLERS)
        gateway = f"http://127.0.0.1:{await stack.enter_async_context(loopback.serving(correlation.Correlated(app)))}"

        def client() -> client_mod.AsyncClient:
            cache = client_mod.EndpointCache()
            for model, api in (("m", "v2"), ("chat", "openai")):
                cache.store(model, {"ttlSeconds": 600, "endpoints": [
                    {"site": site, "url": url, "inferUrl": f"{url}/v2/models/{model}/infer", "api": api} for site, url in listed]})
            return client_mod.AsyncClient(gateway, cache=cache, timeout=10)

        yield client


async def test_an_inference_that_fails_over_to_the_gateway_keeps_the_callers_id_everywhere() -> None:
    down, behind = Replica(500), Replica(200)
    async with fleet([down], [behind]) as make, make() as c:
        result = await c.infer("m", {"input": X}, request_id="order-7.2")
    assert result.url.startswith("http://127.0.0.1") and result.site == "gw-0" and result.attempts == 2
    assert result.request_id == "order-7.2" and down.ids == behind.ids == ["order-7.2"]


async def test_each_call_without_an_id_gets_its_own_sent_to_every_attempt() -> None:
    down, behind = Replica(500), Replica(200)
    async with fleet([down], [behind]) as make, make() as c:
        first = await c.infer("m", {"input": X})
        second = await c.infer("m", {"input": X})
    assert MADE.fullmatch(first.request_id) and second.request_id != first.request_id
    assert down.ids == [first.request_id]  # then left out of rotation: the second call went to the gateway at once
    assert behind.ids == [first.request_id, second.request_id]


async def test_every_error_of_a_call_carries_its_id() -> None:
    refusing, behind = Replica(400), Replica(200)
    async with fleet([refusing], [behind]) as make, make() as c:
        with pytest.raises(client_mod.InferenceError) as refused:
            await c.infer("m", {"input": X}, request_id="refused-1")
        with pytest.raises(client_mod.NoEndpoint) as unknown:  # through the gateway, which knows no such model
            await c.infer("nope", {"input": X}, request_id="unknown-1")
        with pytest.raises(client_mod.InferenceError) as chat_refused:
            [t async for t in c.chat("chat", USER, request_id="chat-1")]
    assert (refused.value.status, refused.value.request_id) == (400, "refused-1") and refusing.ids[0] == "refused-1"
    assert unknown.value.request_id == "unknown-1"
    assert chat_refused.value.request_id == "chat-1" and refusing.ids[1] == "chat-1"
    async with client_mod.AsyncClient(refused_url(), direct=False, timeout=5) as c:
        with pytest.raises(client_mod.Unreachable) as unreachable:
            await c.infer("m", {"input": X})
    assert MADE.fullmatch(unreachable.value.request_id or "")


async def test_a_chat_keeps_its_id_through_a_failover_and_says_it() -> None:
    down, behind = Replica(503), Replica(200)
    async with fleet([down], [behind]) as make, make() as c:
        chat = c.chat("chat", USER, stream=False, request_id="chat-2")
        assert [t async for t in chat] == ["hello"]
        made = c.chat("chat", USER, stream=False)
        assert [t async for t in made] == ["hello"]
    assert chat.request_id == "chat-2" and chat.attempts == 2 and MADE.fullmatch(made.request_id)
    assert down.ids == ["chat-2"] and behind.ids == ["chat-2", made.request_id]


async def test_the_synchronous_client_does_the_same() -> None:
    down, behind = Replica(500), Replica(200)
    async with fleet([down], [behind]) as make:
        a = make()
        cache, gateway = a.cache, a.server
        await a.aclose()

        def calls() -> tuple[client_mod.InferResult, client_mod.EdgeplaneError]:
            with client_mod.Client(gateway, cache=cache, timeout=10) as c:
                result = c.infer("m", {"input": X}, request_id="sync-1")
                try:
                    c.infer("nope", {"input": X}, request_id="sync-2")
                except client_mod.EdgeplaneError as exc:
                    return result, exc
            raise AssertionError("no error")

        result, error = await asyncio.to_thread(calls)
    assert result.request_id == "sync-1" and down.ids == behind.ids == ["sync-1"]
    assert isinstance(error, client_mod.NoEndpoint) and error.request_id == "sync-2"


@pytest.mark.parametrize(("given", "error"), [
    ("two words", ValueError),
    ("x" * 129, ValueError),
    ("jane@example.com", ValueError),
    ("", ValueError),
    (7, TypeError),
])
async def test_an_id_that_cannot_travel_is_refused_before_anything_is_sent(given: object, error: type[Exception]) -> None:
    down = Replica(200)
    async with fleet([down], []) as make, make() as c:
        with pytest.raises(error, match="request_id"):
            await c.infer("m", {"input": X}, request_id=given)  # type: ignore[arg-type]
        with pytest.raises(error, match="request_id"):
            c.chat("chat", USER, request_id=given)  # type: ignore[arg-type]
    assert down.ids == []
