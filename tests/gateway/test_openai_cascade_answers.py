"""A generative cascade at the gateway against loopback replicas that answer as each test
tells them: what each stage is asked for, what the caller gets back, which deployment's
cascade runs for a name, and how the caller's one request is timed and counted."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages
from orchestrator.api import methods
from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_relay, openai_routes, proxy, routing, upstream
from orchestrator.testing.loopback import replica, serving
from tests.gateway.openai_cascades import (CHAT, DC, Handle, answering, answering_42, at_capacity, cascade_of, chat_answer, chat_reply,
                                        endpoint, gateway, gateway_app, refusing, truncated)


async def test_an_escalated_stage_on_vllm_is_asked_for_its_served_model_name() -> None:
    asked: list[str] = []

    async def edge(request: httpmessages.Request) -> httpmessages.Response:  # cut at max_tokens: escalate
        return httpmessages.Response(200, chat_answer("The answer is", finish="length"))

    async def vllm(request: httpmessages.Request) -> httpmessages.Response:  # serves its served model name only
        asked.append(json.loads(request.body)["model"])
        if asked[-1] != "org/large-chat":
            return httpmessages.Response(404, openai_relay.error_body(f"The model `{asked[-1]}` does not exist.", 404))
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


def answering_as(site: str, asked: list[str]) -> Handle:
    """A replica at ``site`` that answers ``from <site>`` and notes in ``asked`` that it was."""
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        asked.append(site)
        return chat_reply(request, f"from {site}")
    return handle


def requests_counted(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    """``edgeplane_gateway_requests_total`` as /metrics shows it: by (model, site, code)."""
    return {(s.labels["model"], s.labels["site"], s.labels["code"]): s.value for metric in registry.collect()
            if metric.name == "edgeplane_gateway_requests" for s in metric.samples if s.name.endswith("_total")}


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


async def test_the_sdk_finds_a_cascade_by_its_deployment_name_where_the_caller_may_reach_it() -> None:
    """A cascade is called by its deployment's name like any model: ``models.retrieve`` and
    ``models.list`` know that name too, for the callers whose residency one of its replicas
    serves (an application checks the name it was configured with before it chats)."""
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    async with replica(answering("from edge-fr")) as fr, replica(answering("from edge-ch")) as ch:
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("chat", "chat-eu", "edge-fr", "edge", "FR", "", 48.85, 2.35, fr, api=routing.API_OPENAI,
                                        allowed_countries=frozenset({"FR"})),
                       routing.Endpoint("chat", "chat-ch", "edge-ch", "edge", "CH", "", 46.2, 6.1, ch, api=routing.API_OPENAI,
                                        allowed_countries=frozenset({"CH"}))])
        eu = cascade_rules.CascadeRoute("chat", "chat-eu", (first, DC), {})
        table.set_cascades({"chat": eu, "chat-eu": eu, "chat-ch": cascade_rules.CascadeRoute("chat", "chat-ch", (first, DC), {})})
        async with gateway_app(table) as app, serving(app) as port:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0, timeout=30)
            try:
                assert (await sdk.models.retrieve("chat-eu")).id == "chat-eu"
                answer = await sdk.chat.completions.create(model="chat-eu", messages=CHAT["messages"], max_tokens=4)
                assert answer.choices[0].message.content == "from edge-fr"
                assert [m.id for m in (await sdk.models.list()).data] == ["chat", "chat-ch", "chat-eu"]
                swiss = {"X-Edgeplane-Residency": "CH"}
                assert [m.id for m in (await sdk.models.list(extra_headers=swiss)).data] == ["chat", "chat-ch"]
                with pytest.raises(openai.APIStatusError) as refused:  # its replicas are all outside the caller's residency
                    await sdk.models.retrieve("chat-eu", extra_headers=swiss)
                assert refused.value.status_code == 503
                with pytest.raises(openai.NotFoundError):
                    await sdk.models.retrieve("chat-us")
            finally:
                await sdk.close()
