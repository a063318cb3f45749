"""A generative cascade at the gateway against loopback replicas that answer as each test
tells them: what each stage is asked for, and what the caller gets back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages, httpstream
from orchestrator.api import methods
from orchestrator.gateway import cascade, cascade_rules, endpoints, event_stream, openai_cascade, openai_routes, proxy, routing, upstream
from orchestrator.testing import loopback
from orchestrator.testing.loopback import replica

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


async def test_an_escalated_stage_on_vllm_is_asked_for_its_served_model_name() -> None:
    asked: list[str] = []

    async def edge(request: httpmessages.Request) -> httpmessages.Response:  # cut at max_tokens: escalate
        return httpmessages.Response(200, chat_answer("The answer is", finish="length"))

    async def vllm(request: httpmessages.Request) -> httpmessages.Response:  # serves its served model name only
        asked.append(json.loads(request.body)["model"])
        if asked[-1] != "org/large-chat":
            return httpmessages.Response(404, openai_routes.error_body(f"The model `{asked[-1]}` does not exist.", 404))
        return httpmessages.Response(200, chat_answer("The answer is 42."))

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(edge) as edge_url, replica(vllm) as dc_url:
        fleet = [endpoint("edge-paris", "edge", edge_url), endpoint("dc-paris", "datacenter", dc_url, served_model="org/large-chat")]
        async with gateway(cascade_of(first, fleet)) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT)
    assert resp.status_code == 200, resp.text
    assert asked == ["org/large-chat"]
    assert resp.headers["x-edgeplane-cascade-stage"] == "large" and resp.headers["x-edgeplane-cascade-escalation"] == "escalated"
    assert resp.json()["choices"][0]["message"]["content"] == "The answer is 42."


async def test_a_chat_the_third_stage_answers_adds_both_earlier_stages_and_is_one_escalated_request() -> None:
    async def cut(request: httpmessages.Request) -> httpmessages.Response:  # stopped at max_tokens after 50 ms of work: escalate
        await asyncio.sleep(0.05)
        return httpmessages.Response(200, chat_answer("The answer is", finish="length"))

    async def whole(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(200, chat_answer("The answer is 42."))

    truncated = cascade_rules.GenerativeRule(truncated=True)
    route = cascade_rules.CascadeRoute("chat", "chat-dep", (cascade_rules.StageRoute("small", frozenset({"edge"}), truncated),
                                                            cascade_rules.StageRoute("mid", frozenset({"regional"}), truncated), DC), {})
    async with replica(cut) as edge_url, replica(cut) as regional_url, replica(whole) as dc_url:
        table = endpoints.EndpointTable()
        table.replace([endpoint("edge-paris", "edge", edge_url), endpoint("reg-paris", "regional", regional_url),
                       endpoint("dc-paris", "datacenter", dc_url)])
        table.set_cascades({"chat": route})
        pool = upstream.UpstreamPool()
        registry = CollectorRegistry()
        handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry))
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cascade=handler)
        app = Starlette(routes=openai_routes.OpenAIGateway(gw, registry=registry).routes(), exception_handlers=methods.EXCEPTION_HANDLERS)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
                resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT)
        finally:
            await pool.close()
    assert resp.status_code == 200 and resp.headers["x-edgeplane-cascade-stage"] == "large", resp.text
    [row] = handler.stats.snapshot({"chat": route})
    assert (row["escalationRate"], row["escalations"]) == (1.0, {"unsure": 2})
    assert row["meanAddedLatencyMs"] >= 100  # both earlier stages' 50 ms, not the first one's alone


async def test_a_completion_asking_logprobs_0_gets_them_through_a_stage_judged_by_logprobs() -> None:
    asked: list[Any] = []

    async def edge(request: httpmessages.Request) -> httpmessages.Response:
        lp = json.loads(request.body).get("logprobs")
        asked.append(lp)
        logprobs = None if lp is None else {"tokens": [" Paris", "."], "token_logprobs": [-0.01, -0.02],
                                            "top_logprobs": [{" Paris": -0.01}, {".": -0.02}] if lp else [{}, {}],
                                            "text_offset": [0, 6]}
        return httpmessages.Response(200, json.dumps({
            "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "chat",
            "choices": [{"index": 0, "text": " Paris.", "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}).encode())

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(mean_logprob_below=-1.0))
    prompt = {"model": "chat", "prompt": "The capital of France is", "max_tokens": 2}
    async with replica(edge) as edge_url, gateway(cascade_of(first, [endpoint("edge-paris", "edge", edge_url)])) as http:
        wanted = await http.post(f"{openai_routes.PREFIX}/completions", json={**prompt, "logprobs": 0})
        unasked = await http.post(f"{openai_routes.PREFIX}/completions", json=prompt)
    assert asked == [0, 1]  # the caller's own 0: no alternatives; the judge's 1 when the caller asked for none
    assert wanted.status_code == 200 and wanted.headers["x-edgeplane-cascade-stage"] == "small", wanted.text
    assert wanted.json()["choices"][0]["logprobs"]["token_logprobs"] == [-0.01, -0.02]
    assert unasked.status_code == 200 and unasked.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("mode", ["on", "off"])  # judged at stage 1, or relayed as a plain model
async def test_an_answer_generated_for_longer_than_the_first_token_timeout_is_waited_for(mode: str) -> None:
    asked: list[str] = []

    def generating(site: str) -> Handle:
        async def handle(request: httpmessages.Request) -> httpmessages.Response:
            asked.append(site)
            await asyncio.sleep(0.6)  # the whole answer is generated before its head is sent
            return httpmessages.Response(200, chat_answer("a long answer"))
        return handle

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(generating("edge-paris")) as paris, replica(generating("edge-lyon")) as lyon:
        fleet = [endpoint("edge-paris", "edge", paris), endpoint("edge-lyon", "edge", lyon, lat=45.76, lon=4.84)]
        table = cascade_of(first, fleet)
        async with gateway(table, first_token_timeout=0.2) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT,
                                   headers={"x-edgeplane-cascade": mode, "x-edgeplane-location": "48.85,2.35"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "a long answer"
    assert asked == ["edge-paris"] and not table.ejected()


@pytest.mark.parametrize("mode", ["on", "off"])  # judged at stage 1, or relayed as a plain model
async def test_a_caller_that_leaves_stops_the_stage_generating_for_it(mode: str) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def generating(request: httpmessages.Request) -> httpmessages.Response:
        started.set()
        try:
            await asyncio.Event().wait()  # a long answer, never finished here
        finally:
            stopped.set()  # the gateway closed the connection: the replica stops
        raise AssertionError("unreachable")

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(generating) as url, gateway_app(cascade_of(first, [endpoint("edge-paris", "edge", url)])) as app, \
            loopback.serving(app) as port:
        body = json.dumps(CHAT).encode()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
                     b"x-edgeplane-cascade: %s\r\ncontent-length: %d\r\n\r\n%s" % (mode.encode(), len(body), body))
        async with asyncio.timeout(10):
            await started.wait()
        writer.close()  # the caller leaves while the stage generates
        async with asyncio.timeout(10):
            await stopped.wait()


@pytest.mark.parametrize("silent", ["before its head", "after its head"])
async def test_a_replica_silent_past_the_first_token_timeout_is_skipped_and_ejected_only_at_the_fifth_in_a_row(silent: str) -> None:
    asked: list[str] = []

    async def nothing() -> AsyncIterator[bytes]:
        await asyncio.Event().wait()  # a long prompt on slow hardware: no token yet
        yield b""

    async def paris(request: httpmessages.Request) -> httpmessages.Response | httpstream.StreamingResponse:
        asked.append("edge-paris")
        if silent == "after its head":
            return httpstream.StreamingResponse(200, nothing())
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def lyon(request: httpmessages.Request) -> httpmessages.Response:
        asked.append("edge-lyon")
        return chat_reply(request, "from Lyon")

    async with replica(paris) as paris_url, replica(lyon) as lyon_url:
        fleet = [endpoint("edge-paris", "edge", paris_url), endpoint("edge-lyon", "edge", lyon_url, lat=45.76, lon=4.84)]
        table = endpoints.EndpointTable()
        table.replace(fleet)
        async with gateway(table, first_token_timeout=0.1) as http:
            for i in range(5):
                resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": True},
                                       headers={"x-edgeplane-location": "48.85,2.35"})
                assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-lyon", resp.text
                assert asked[-2:] == ["edge-paris", "edge-lyon"]
                assert (paris_url in table.ejected()) == (i == 4), f"after request {i + 1}"


@pytest.mark.parametrize("token_first", [False, True])
async def test_a_replica_that_never_ends_an_event_is_cut_off_not_buffered(token_first: bool) -> None:
    """Replicas are trusted only so far: one that streams bytes and never the blank line that
    ends an event would have the gateway hold them all. Past ``MAX_EVENT_BYTES`` the stream
    is cut: before its first token the caller gets a 502 that says why (no other replica
    here) and the replica is left out; after it, an error event ends the caller's stream."""
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            if token_first:
                yield b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
            yield b'data: {"choices":[{"index":0,"delta":{"content":"'
            for _ in range(8 * event_stream.MAX_EVENT_BYTES // 65536):
                yield b"x" * 65536
            await asyncio.Event().wait()  # and never a blank line
        finally:
            closed.set()

    async def paris(request: httpmessages.Request) -> httpstream.StreamingResponse:
        return httpstream.StreamingResponse(200, endless())

    async with replica(paris) as paris_url:
        table = endpoints.EndpointTable()
        table.replace([endpoint("edge-paris", "edge", paris_url)])
        async with gateway(table, first_token_timeout=5.0, idle_timeout=5.0) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": True})
        async with asyncio.timeout(10):
            await closed.wait()  # the gateway closed the replica's stream
    why = f"an event past {event_stream.MAX_EVENT_BYTES} bytes"
    if token_first:
        assert resp.status_code == 200 and resp.text.startswith('data: {"choices"'), resp.text[:200]
        assert why in resp.text and resp.text.endswith("data: [DONE]\n\n") and len(resp.content) < 4096
    else:
        assert resp.status_code == 502 and why in resp.json()["error"]["message"], resp.text[:200]
        assert paris_url in table.ejected()


async def test_a_stage_replica_silent_past_the_first_token_timeout_is_skipped_and_ejected_only_at_the_fifth_in_a_row() -> None:
    """A judged stage asks for the whole answer: a replica that sent its head and no body
    in time is slow at this request (a long prompt on edge hardware), not down."""
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))

    async def nothing() -> AsyncIterator[bytes]:
        await asyncio.Event().wait()
        yield b""

    async def paris(request: httpmessages.Request) -> httpstream.StreamingResponse:
        return httpstream.StreamingResponse(200, nothing())

    async with replica(paris) as paris_url, replica(answering("from Lyon")) as lyon_url, replica(answering("from the DC")) as dc_url:
        table = cascade_of(first, [endpoint("edge-paris", "edge", paris_url), endpoint("edge-lyon", "edge", lyon_url, lat=45.76, lon=4.84),
                                   endpoint("dc-paris", "datacenter", dc_url)])
        async with gateway(table, first_token_timeout=0.1) as http:
            for i in range(5):
                resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT, headers={"x-edgeplane-location": "48.85,2.35"})
                assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-lyon", resp.text
                assert resp.headers["x-edgeplane-cascade-sites"] == "edge-paris,edge-lyon"
                assert (paris_url in table.ejected()) == (i == 4), f"after request {i + 1}"


def at_capacity(retry_after: str) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:  # as the agent answers with its sequences full
        return httpmessages.Response(429, openai_routes.error_body("model 'chat' is at capacity (1 running, 0 queued); retry after 1s", 429,
                                                                 code="rate_limit_exceeded"), headers=(("retry-after", retry_after),))
    return handle


def answering(content: str) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return chat_reply(request, content)
    return handle


def answering_as(site: str, asked: list[str]) -> Handle:
    """A replica at ``site`` that answers ``from <site>`` and notes in ``asked`` that it was."""
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        asked.append(site)
        return chat_reply(request, f"from {site}")
    return handle


async def test_a_stage_at_capacity_hands_over_to_its_next_replica_then_to_the_next_stage() -> None:
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(at_capacity("1")) as paris, replica(answering("from Lyon")) as lyon, replica(answering("from the DC")) as dc:
        edge_paris = endpoint("edge-paris", "edge", paris)
        edge_lyon = endpoint("edge-lyon", "edge", lyon, lat=45.76, lon=4.84)
        dc_paris = endpoint("dc-paris", "datacenter", dc)
        where = {"x-edgeplane-location": "48.85,2.35"}
        async with gateway(cascade_of(first, [edge_paris, edge_lyon, dc_paris])) as http:
            lyon_answers = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT, headers=where)
        async with gateway(cascade_of(first, [edge_paris, dc_paris])) as http:
            dc_answers = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT, headers=where)
    assert lyon_answers.status_code == 200 and lyon_answers.headers["x-edgeplane-site"] == "edge-lyon", lyon_answers.text
    assert lyon_answers.headers["x-edgeplane-cascade-escalation"] == "none"
    assert dc_answers.status_code == 200 and dc_answers.headers["x-edgeplane-site"] == "dc-paris", dc_answers.text
    assert dc_answers.headers["x-edgeplane-cascade-escalation"] == "escalated"
    assert "'small' is at capacity (edge-paris: HTTP 429)" in dc_answers.headers["x-edgeplane-cascade-reason"]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_last_stage_at_capacity_hands_over_to_its_next_replica_streaming_or_not(stream: bool) -> None:
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    stats = cascade.CascadeStats()
    async with replica(at_capacity("1")) as edge, replica(at_capacity("7")) as paris, replica(answering("from Lyon")) as lyon:
        table = cascade_of(first, [endpoint("edge-paris", "edge", edge), endpoint("dc-paris", "datacenter", paris),
                                   endpoint("dc-lyon", "datacenter", lyon, lat=45.76, lon=4.84)])
        async with gateway(table, stats) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream},
                                   headers={"x-edgeplane-location": "48.85,2.35"})
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "dc-lyon" and "from Lyon" in resp.text, resp.text
    assert not table.ejected()
    [row] = stats.snapshot(table.cascades)
    assert row["answered"] == {"small": 0, "large": 1} and row["failed"] == 0


@pytest.mark.parametrize(("said", "passed_on"), [("7", "7"), ("999999999", "60"), ("Fri, 01 Jan 2100 00:00:00 GMT", "1")],
                         ids=["seconds", "31-years", "a-date"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_cascade_whose_last_stage_is_at_capacity_answers_429_with_its_retry_after(stream: bool, said: str, passed_on: str) -> None:
    """The replica's Retry-After within 1 to 60 s, as a 503's: a client that honours it waits no longer."""
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    stats = cascade.CascadeStats()
    async with replica(at_capacity("1")) as edge, replica(at_capacity(said)) as dc:
        table = cascade_of(first, [endpoint("edge-paris", "edge", edge), endpoint("dc-paris", "datacenter", dc)])
        async with gateway(table, stats) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream})
    assert resp.status_code == 429 and resp.headers["retry-after"] == passed_on, resp.text
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    message = resp.json()["error"]["message"]
    assert "'large' is at capacity (dc-paris: HTTP 429)" in message and "edge-paris: at capacity" in message and not table.ejected()
    [row] = stats.snapshot(table.cascades)  # no stage answered
    assert row["answered"] == {"small": 0, "large": 0} and row["failed"] == 1


def refusing(status: int) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(status, openai_routes.error_body(f"refused with {status}", status))
    return handle


def requests_counted(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    """``edgeplane_gateway_requests_total`` as /metrics shows it: by (model, site, code)."""
    return {(s.labels["model"], s.labels["site"], s.labels["code"]): s.value for metric in registry.collect()
            if metric.name == "edgeplane_gateway_requests" for s in metric.samples if s.name.endswith("_total")}


async def truncated(request: httpmessages.Request) -> httpmessages.Response:  # cut at max_tokens: escalate
    return chat_reply(request, "The answer is", finish="length")


@pytest.mark.parametrize(("edge", "dc", "counted"), [
    (truncated, answering("The answer is 42."), ("chat", "dc-paris", "200")),
    (at_capacity("1"), answering("The answer is 42."), ("chat", "dc-paris", "200")),
    (truncated, refusing(400), ("chat", "edge-paris", "200")),  # the earlier answer stands
    (at_capacity("1"), at_capacity("7"), ("chat", "", "429")),  # no stage answered: the gateway's own 429
], ids=["escalated", "edge at capacity", "later stage refuses", "every stage at capacity"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_cascaded_chat_is_one_request_in_the_gateway_requests_counter(edge: Handle, dc: Handle, counted: tuple[str, str, str],
                                                                             stream: bool) -> None:
    """As a v2 cascade counts: what the caller got, once, whichever stages ran for it."""
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    registry = CollectorRegistry()
    async with replica(edge) as edge_url, replica(dc) as dc_url:
        table = cascade_of(first, [endpoint("edge-paris", "edge", edge_url), endpoint("dc-paris", "datacenter", dc_url)])
        async with gateway(table, registry=registry) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream})
    assert str(resp.status_code) == counted[2], resp.text
    assert requests_counted(registry) == {counted: 1}


def failovers_counted(registry: CollectorRegistry) -> dict[str, float]:
    """``edgeplane_gateway_failovers_total`` of ``chat``, by the site the request moved on from."""
    return {s.labels["site"]: s.value for metric in registry.collect() for s in metric.samples
            if s.name == "edgeplane_gateway_failovers_total" and s.labels["model"] == "chat"}


@pytest.mark.parametrize("dc", [answering("The answer is 42."), at_capacity("7")], ids=["dc answers", "dc at capacity"])
@pytest.mark.parametrize("stream", [False, True])
async def test_each_replica_a_cascaded_chat_moves_on_from_counts_one_failover_as_on_the_plain_route(dc: Handle, stream: bool) -> None:
    """A failover is another replica tried for the same request: the stage's next one or
    the next stage's, never after the last replica tried."""
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    registry = CollectorRegistry()
    async with replica(refusing(503)) as paris_url, replica(at_capacity("1")) as lyon_url, replica(dc) as dc_url:
        table = cascade_of(first, [endpoint("edge-paris", "edge", paris_url), endpoint("edge-lyon", "edge", lyon_url, 45.76, 4.84),
                                   endpoint("dc-paris", "datacenter", dc_url)])
        async with gateway(table, registry=registry) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream})
    assert resp.status_code in (200, 429), resp.text
    assert failovers_counted(registry) == {"edge-paris": 1, "edge-lyon": 1}


@pytest.mark.parametrize("status", [429, 400])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_later_stage_refusing_keeps_the_earlier_answer_streaming_or_not(status: int, stream: bool) -> None:
    """Stage 2's stream is relayed to a streaming caller; its refusal must leave stage 1's
    answer standing there too, and the stats must say stage 1 answered."""
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))

    async def edge(request: httpmessages.Request) -> httpmessages.Response:  # cut at max_tokens: escalate
        return httpmessages.Response(200, chat_answer("The answer is", finish="length"))

    stats = cascade.CascadeStats()
    async with replica(edge) as edge_url, replica(refusing(status)) as dc_url:
        table = cascade_of(first, [endpoint("edge-paris", "edge", edge_url), endpoint("dc-paris", "datacenter", dc_url)])
        async with gateway(table, stats) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-edgeplane-site"] == "edge-paris" and resp.headers["x-edgeplane-cascade-stage"] == "small"
    assert resp.headers["x-edgeplane-cascade-escalation"] == "not-escalated"
    assert resp.headers["x-edgeplane-cascade-sites"] == "edge-paris,dc-paris"
    reason = resp.headers["x-edgeplane-cascade-reason"]
    assert reason.startswith("small: the answer stopped at max_tokens, but") and "'large'" in reason and f"HTTP {status}" in reason
    assert "The answer is" in resp.text
    [row] = stats.snapshot(table.cascades)
    assert row["answered"] == {"small": 1, "large": 0} and row["notEscalated"] == 1


async def test_a_chat_by_the_model_name_runs_the_cascade_of_the_deployment_the_caller_may_use() -> None:
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(answering("from France")) as fr, replica(answering("from Switzerland")) as ch:
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("chat", "chat-eu", "edge-fr", "edge", "FR", "", 48.85, 2.35, fr, api=routing.API_OPENAI),
                       routing.Endpoint("chat", "chat-ch", "edge-ch", "edge", "CH", "", 46.2, 6.14, ch, api=routing.API_OPENAI)])
        table.set_cascades({"chat": cascade_rules.CascadeRoute("chat", "chat-eu", (first, DC)),
                            "chat-eu": cascade_rules.CascadeRoute("chat", "chat-eu", (first, DC)),
                            "chat-ch": cascade_rules.CascadeRoute("chat", "chat-ch", (first, DC))})
        async with gateway(table) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT, headers={"x-edgeplane-residency": "CH"})
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-ch", resp.text
    assert resp.json()["edgeplane"]["cascade"] == "chat-ch"


def answering_42(generating_s: float) -> httpmessages.Handler:
    """A stage that answers "42": streamed, a token at once, ``generating_s`` of generation and
    the end; whole, after ``generating_s``."""
    async def tokens() -> AsyncIterator[bytes]:
        yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "42"}}]}\n\n'
        await asyncio.sleep(generating_s)
        yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        yield openai_routes.SSE_DONE

    async def handle(request: httpmessages.Request) -> httpmessages.Response | httpstream.StreamingResponse:
        if json.loads(request.body).get("stream"):
            return httpstream.StreamingResponse(200, tokens())
        await asyncio.sleep(generating_s)
        return httpmessages.Response(200, chat_answer("The answer is 42."))
    return handle


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cascaded_chat_is_timed_once_from_its_first_stage_to_the_end_of_its_answer(stream: bool) -> None:
    """``edgeplane_gateway_request_seconds`` holds the caller's request, every stage that ran
    for it, and a stream to its last event, as a plain stream is timed: once."""
    async def slow_and_cut(request: httpmessages.Request) -> httpmessages.Response:  # 0.2 s of generation, stopped at max_tokens
        await asyncio.sleep(0.2)
        return httpmessages.Response(200, chat_answer("The answer is", finish="length"))

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    registry = CollectorRegistry()
    async with replica(slow_and_cut) as edge_url, replica(answering_42(generating_s=0.2)) as dc_url:
        table = cascade_of(first, [endpoint("edge-paris", "edge", edge_url), endpoint("dc-paris", "datacenter", dc_url)])
        async with gateway(table, registry=registry) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream})
    assert resp.status_code == 200 and resp.headers["x-edgeplane-cascade-escalation"] == "escalated", resp.text
    assert registry.get_sample_value("edgeplane_gateway_request_seconds_count", {"model": "chat"}) == 1
    assert registry.get_sample_value("edgeplane_gateway_request_seconds_sum", {"model": "chat"}) >= 0.4  # both stages' 0.2 s


@pytest.mark.parametrize("escalated", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_cascaded_chat_times_its_first_token_from_the_callers_request(escalated: bool, stream: bool) -> None:
    """``edgeplane_gateway_time_to_first_token_seconds`` is the caller's wait for a first
    token, once: with every stage that ran before it, for a whole answer too (judged and
    sent whole, or replayed as a stream) as the plain route times a whole answer."""
    async def slow_edge(request: httpmessages.Request) -> httpmessages.Response:  # 0.2 s of generation, then sure or cut
        await asyncio.sleep(0.2)
        return httpmessages.Response(200, chat_answer("The answer is" if escalated else "42.", finish="length" if escalated else "stop"))

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    registry = CollectorRegistry()
    async with replica(slow_edge) as edge_url, replica(answering_42(generating_s=0.0)) as dc_url:
        table = cascade_of(first, [endpoint("edge-paris", "edge", edge_url), endpoint("dc-paris", "datacenter", dc_url)])
        async with gateway(table, registry=registry) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-edgeplane-cascade-escalation"] == ("escalated" if escalated else "none")
    assert registry.get_sample_value("edgeplane_gateway_time_to_first_token_seconds_count", {"model": "chat"}) == 1
    assert registry.get_sample_value("edgeplane_gateway_time_to_first_token_seconds_sum", {"model": "chat"}) >= 0.2  # stage 1's 0.2 s


@pytest.mark.parametrize("suffix", ["/chat/completions", "/completions"])
async def test_a_deployment_name_with_the_cascade_off_is_answered_by_that_deployment_only(suffix: str) -> None:
    """``chat-eu`` and ``chat-ch`` serve the same model, one in the EU, one in Switzerland: a
    caller near Geneva that names ``chat-eu`` is answered in the EU, never by the nearer Swiss one."""
    asked: list[str] = []

    def at(deployment: str, site: str, tier: str, country: str, url: str, lat: float, lon: float) -> routing.Endpoint:
        return routing.Endpoint("chat", deployment, site, tier, country, "", lat, lon, url, api=routing.API_OPENAI,
                                allowed_countries=frozenset({country}))

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(answering_as("edge-fr", asked)) as fr, replica(answering_as("edge-ch", asked)) as ch:
        table = endpoints.EndpointTable()
        table.replace([at("chat-eu", "edge-fr", "edge", "FR", fr, 48.85, 2.35), at("chat-ch", "edge-ch", "edge", "CH", ch, 46.2, 6.1)])
        eu = cascade_rules.CascadeRoute("chat", "chat-eu", (first, DC), {})
        table.set_cascades({"chat": eu, "chat-eu": eu, "chat-ch": cascade_rules.CascadeRoute("chat", "chat-ch", (first, DC), {})})
        async with gateway(table) as http:
            body = {"model": "chat-eu", "max_tokens": 4,
                    **({"messages": CHAT["messages"]} if suffix == "/chat/completions" else {"prompt": "hi"})}
            resp = await http.post(f"{openai_routes.PREFIX}{suffix}", json=body,
                                   headers={"x-edgeplane-cascade": "off", "x-edgeplane-location": "46.20,6.14"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-edgeplane-site"] == "edge-fr" and asked == ["edge-fr"]


async def test_a_call_by_the_model_name_is_served_by_a_deployment_without_a_cascade_when_only_it_may_serve_the_caller() -> None:
    asked: list[str] = []

    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(answering_as("edge-fr", asked)) as fr, replica(answering_as("edge-us", asked)) as us:
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("chat", "chat-eu", "edge-fr", "edge", "FR", "", 48.85, 2.35, fr, api=routing.API_OPENAI),
                       routing.Endpoint("chat", "chat-us", "edge-us", "edge", "US", "", 40.7, -74.0, us, api=routing.API_OPENAI)])
        eu = cascade_rules.CascadeRoute("chat", "chat-eu", (first, DC), {})
        table.set_cascades({"chat": eu, "chat-eu": eu})  # chat-us has no cascade
        async with gateway(table) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json=CHAT, headers={"x-edgeplane-residency": "US"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-edgeplane-site"] == "edge-us" and asked == ["edge-us"]


def unavailable(retry_after: str) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:  # as a draining agent answers
        return httpmessages.Response(503, openai_routes.error_body("the agent is draining", 503, code="draining"),
                                     headers=(("retry-after", retry_after),))
    return handle


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cascade_whose_last_stage_answers_503_everywhere_is_503_with_the_shortest_retry_after(stream: bool) -> None:
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    stats = cascade.CascadeStats()
    async with replica(unavailable("2")) as edge, replica(unavailable("9")) as paris, replica(unavailable("4")) as lyon, \
            replica(refusing(500)) as failing:
        fleet = [endpoint("edge-paris", "edge", edge), endpoint("dc-paris", "datacenter", paris),
                 endpoint("dc-lyon", "datacenter", lyon, lat=45.76, lon=4.84)]
        table = cascade_of(first, fleet)
        async with gateway(table, stats) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream},
                                   headers={"x-edgeplane-location": "48.85,2.35"})
        async with gateway(cascade_of(first, [*fleet[:2], endpoint("dc-lyon", "datacenter", failing, lat=45.76, lon=4.84)])) as http:
            one_failed = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": stream},
                                         headers={"x-edgeplane-location": "48.85,2.35"})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "4", resp.text
    assert resp.json()["error"]["code"] == "unavailable"
    [row] = stats.snapshot(table.cascades)  # no stage answered
    assert row["answered"] == {"small": 0, "large": 0} and row["failed"] == 1
    assert one_failed.status_code == 502 and "retry-after" not in one_failed.headers, one_failed.text


def failing_at_prefill() -> httpmessages.Handler:
    """A stage replica whose generation fails after it sent the head and the chat's opening, as the agent's does."""
    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
        yield (b'data: {"error": {"message": "failed to allocate the KV cache", "type": "server_error", "param": null, '
               b'"code": "generation_failed"}}\n\n' + openai_routes.SSE_DONE)

    async def handle(request: httpmessages.Request) -> httpstream.StreamingResponse:
        return httpstream.StreamingResponse(200, events())
    return handle


async def test_a_streamed_stage_replica_that_fails_before_its_first_token_hands_over_to_the_stages_next_replica() -> None:
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    stats = cascade.CascadeStats()
    async with replica(truncated) as edge, replica(failing_at_prefill()) as paris, replica(answering_42(generating_s=0)) as lyon:
        table = cascade_of(first, [endpoint("edge-paris", "edge", edge), endpoint("dc-paris", "datacenter", paris),
                                   endpoint("dc-lyon", "datacenter", lyon, lat=45.76, lon=4.84)])
        async with gateway(table, stats) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": True},
                                   headers={"x-edgeplane-location": "48.85,2.35"})
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "dc-lyon", resp.text
    assert '"42"' in resp.text and '"error"' not in resp.text, resp.text
    [row] = stats.snapshot(table.cascades)
    assert row["answered"] == {"small": 0, "large": 1} and row["failed"] == 0
