"""A generative cascade at the gateway (and the plain route beside it) against loopback
replicas that are slow, silent, at capacity, refusing or failing: a long answer is waited
for, a silent replica skipped and ejected only at the fifth time in a row, an endless event
cut off, a full or failing replica handed over to the stage's next one or the next stage's,
each move counted as a failover, and the caller's 429 or 503 carrying the shortest wait."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from edge_agent import httpmessages, httpstream
from orchestrator.gateway import cascade, cascade_rules, endpoints, event_stream, openai_relay, openai_routes
from orchestrator.testing import loopback
from orchestrator.testing.loopback import replica
from tests.gateway.openai_cascades import (CHAT, Handle, answering, answering_42, at_capacity, cascade_of, chat_answer, chat_reply,
                                        endpoint, gateway, gateway_app, refusing, truncated)


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


@pytest.mark.parametrize("token_first", [False, True])
async def test_a_whole_event_past_the_limit_is_cut_off_as_an_unfinished_one_is(token_first: bool) -> None:
    """An event past ``MAX_EVENT_BYTES`` that ends in the read that brings its end (a replica
    writing it at once) is held to the limit too: the reads before it hold less than the
    limit, so only a check of every event, not of the one still unfinished, finds it."""
    big = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * event_stream.MAX_EVENT_BYTES + b'"}}]}\n\n'
    token = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'

    async def paris(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(200, (token if token_first else b"") + big + b"data: [DONE]\n\n", content_type="text/event-stream")

    async with replica(paris) as paris_url:
        table = endpoints.EndpointTable()
        table.replace([endpoint("edge-paris", "edge", paris_url)])
        async with gateway(table, first_token_timeout=5.0, idle_timeout=5.0) as http:
            resp = await http.post(f"{openai_routes.PREFIX}/chat/completions", json={**CHAT, "stream": True})
    why = f"an event past {event_stream.MAX_EVENT_BYTES} bytes"
    if token_first:
        assert resp.status_code == 200 and resp.text.startswith('data: {"choices"'), resp.text[:200]
        assert why in resp.text and resp.text.endswith("data: [DONE]\n\n") and len(resp.content) < 4096, resp.text[-300:]
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


@pytest.mark.parametrize(("said", "passed_on"), [("7", "7"), ("999999999", "60"), ("Fri, 01 Jan 2100 00:00:00 GMT", "60"),
                                                 ("Wed, 21 Oct 2015 07:28:00 GMT", "1")],
                         ids=["seconds", "31-years", "a-date-far-off", "a-date-past"])
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


def unavailable(retry_after: str) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:  # as a draining agent answers
        return httpmessages.Response(503, openai_relay.error_body("the agent is draining", 503, code="draining"),
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
               b'"code": "generation_failed"}}\n\n' + openai_relay.SSE_DONE)

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
