"""Request ids at the gateway: ``X-Request-Id`` kept (or made) once per caller request, sent
to every replica the request is tried at (failover and cascade stages alike) and returned on
every answer, success or error; W3C ``traceparent``/``tracestate`` passed on unchanged.

The gateway's routes (v2, OpenAI, both cascades) behind uvicorn on a loopback port, wrapped
as both servers wrap them (``correlation.Correlated``), in front of replicas on the agent's
own HTTP server that note what each request carried; callers are ``httpx`` and the official
``openai`` SDK. The reading of ids and trace context is table-tested."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable

import httpx
import numpy as np
import openai
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages
from edgeplane_proto import correlation as ids
from edgeplane_proto import oip
from orchestrator.api import methods
from orchestrator.gateway import cascade, cascade_rules, correlation, endpoints, openai_relay, openai_routes, proxy, routing, upstream
from orchestrator.testing import loopback
from tests.gateway.openai_cascades import chat_reply

PARIS = {"x-edgeplane-location": "48.85,2.35"}
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]})
USER = [{"role": "user", "content": "hi"}]
CALLERS_ID = "order-4711.attempt:2"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
NEW_ID = re.compile(r"[0-9a-f]{32}")
RULE = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8)

Answer = Callable[[httpmessages.Request], httpmessages.Response]


def v2_answer(p: float) -> Answer:
    def answer(request: httpmessages.Request) -> httpmessages.Response:
        payload, _ = oip.encode_response(oip.InferResponse("m", (oip.Tensor("p", np.array([[p, 1 - p]], dtype=np.float32)),)))
        return httpmessages.Response(200, payload)
    return answer


def status(code: int) -> Answer:
    def answer(request: httpmessages.Request) -> httpmessages.Response:
        retry = (("retry-after", "3"),) if code == 503 else ()
        if request.path.startswith("/v1/"):
            return httpmessages.Response(code, openai_relay.error_body(f"replica says {code}", code), headers=retry)
        return httpmessages.Response(code, oip.error_body(f"replica says {code}"), headers=retry)
    return answer


def chat(finish: str = "stop") -> Answer:
    return lambda request: chat_reply(request, "The answer is 42.", finish)


class Replica:
    """Answers as told, noting each request's id and trace context."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.seen: list[dict[str, str | None]] = []
        self.url = ""

    async def handle(self, request: httpmessages.Request) -> httpmessages.Response:
        self.seen.append({h: request.headers.get(h) for h in (ids.HEADER, ids.TRACEPARENT, ids.TRACESTATE)})
        return self.answer(request)

    def ids(self) -> list[str | None]:
        return [s[ids.HEADER] for s in self.seen]


@contextlib.asynccontextmanager
async def gateway(replicas: dict[str, list[tuple[str, Replica]]],
                  cascades: dict[str, cascade_rules.CascadeRoute] | None = None) -> AsyncIterator[str]:
    """The gateway's routes for ``replicas`` (model -> (tier, replica), the first nearest the
    caller; a model named ``chat...`` speaks OpenAI) on a loopback port: its base URL."""
    async with contextlib.AsyncExitStack() as stack:
        fleet = []
        for model, tiers in replicas.items():
            for i, (tier, r) in enumerate(tiers):
                r.url = await stack.enter_async_context(loopback.replica(r.handle))
                api = routing.API_OPENAI if model.startswith("chat") else routing.API_V2
                fleet.append(routing.Endpoint(model, f"{model}-dep", f"{model}-{i}", tier, "FR", "fr", 48.85, 2.35 + i / 100, r.url, api=api))
        table = endpoints.EndpointTable()
        table.replace(fleet)
        table.set_cascades(cascades or {})
        pool = upstream.UpstreamPool()
        stack.push_async_callback(pool.close)
        registry = CollectorRegistry()
        handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry))
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cascade=handler)
        app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes(),
                        exception_handlers=methods.EXCEPTION_HANDLERS)
        port = await stack.enter_async_context(loopback.serving(correlation.Correlated(app)))
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def sdk(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=0, timeout=30, default_headers=PARIS)
    try:
        yield client
    finally:
        await client.close()


async def post(url: str, path: str, **headers: str | bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await http.post(path, content=BODY, headers={**PARIS, **headers})


async def test_a_v2_request_keeps_the_callers_id_at_each_replica_it_fails_over_to_and_back() -> None:
    failing, answering = Replica(status(500)), Replica(v2_answer(0.9))
    async with gateway({"intent": [("edge", failing), ("edge", answering)]}) as url:
        resp = await post(url, "/v2/models/intent/infer", **{"X-Request-Id": CALLERS_ID})
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "intent-1", resp.text
    assert resp.headers["x-request-id"] == CALLERS_ID
    assert failing.ids() == [CALLERS_ID] and answering.ids() == [CALLERS_ID]


async def test_a_request_with_no_id_gets_one_the_replicas_and_the_caller_share() -> None:
    failing, answering = Replica(status(500)), Replica(v2_answer(0.9))
    async with gateway({"intent": [("edge", failing), ("edge", answering)]}) as url:
        first = await post(url, "/v2/models/intent/infer")
        second = await post(url, "/v2/models/intent/infer")
    made = first.headers["x-request-id"]
    assert NEW_ID.fullmatch(made) and second.headers["x-request-id"] != made
    assert failing.ids()[0] == answering.ids()[0] == made


@pytest.mark.parametrize("given", [
    pytest.param(b"", id="empty"),
    pytest.param(b"two words", id="a space"),
    pytest.param(b"a" * 129, id="longer than 128"),
    pytest.param(b"jane.doe@example.com", id="an e-mail address"),
    pytest.param(b"id;drop", id="a semicolon"),
    pytest.param("caf\u00e9".encode("latin-1"), id="not ASCII"),
    pytest.param(b'"quoted"', id="quotes"),
])
async def test_an_id_that_cannot_be_kept_is_replaced_by_a_new_one_everywhere(given: bytes) -> None:
    answering = Replica(v2_answer(0.9))
    async with gateway({"intent": [("edge", answering)]}) as url:
        resp = await post(url, "/v2/models/intent/infer", **{"X-Request-Id": given})
    assert resp.status_code == 200, resp.text
    assert NEW_ID.fullmatch(resp.headers["x-request-id"]) and answering.ids() == [resp.headers["x-request-id"]]


async def test_two_ids_given_are_replaced_by_one() -> None:
    answering = Replica(v2_answer(0.9))
    async with gateway({"intent": [("edge", answering)]}) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        resp = await http.post("/v2/models/intent/infer", content=BODY, headers=[*PARIS.items(), ("x-request-id", "a"), ("x-request-id", "b")])
    assert NEW_ID.fullmatch(resp.headers["x-request-id"]) and answering.ids() == [resp.headers["x-request-id"]]


async def test_the_gateways_own_v2_errors_carry_the_id_with_their_body_unchanged() -> None:
    down, unavailable = Replica(status(500)), Replica(status(503))
    async with gateway({"intent": [("edge", down)], "busy": [("edge", unavailable)]}) as url:
        failed = await post(url, "/v2/models/intent/infer", **{"X-Request-Id": CALLERS_ID})
        retry = await post(url, "/v2/models/busy/infer", **{"X-Request-Id": "busy-1"})
        unknown = await post(url, "/v2/models/nope/infer", **{"X-Request-Id": "nope-1"})
        bad_caller = await post(url, "/v2/models/intent/infer", **{"X-Request-Id": "where-1", "x-edgeplane-location": "north"})
        no_route = await post(url, "/v3/nothing", **{"X-Request-Id": "v3-1"})
    assert (failed.status_code, failed.headers["x-request-id"]) == (502, CALLERS_ID) and down.ids() == [CALLERS_ID]
    assert (retry.status_code, retry.headers["x-request-id"], retry.headers["retry-after"]) == (503, "busy-1", "3")
    assert (unknown.status_code, unknown.headers["x-request-id"]) == (404, "nope-1")
    assert (bad_caller.status_code, bad_caller.headers["x-request-id"]) == (400, "where-1")
    assert (no_route.status_code, no_route.headers["x-request-id"]) == (404, "v3-1")
    # the v2 error is {"error": message}, as KServe clients read it
    assert list(failed.json()) == ["error"] and failed.json()["error"].startswith("every replica tried failed")


async def test_a_replicas_own_refusal_reaches_the_caller_with_the_id() -> None:
    refusing = Replica(status(400))
    async with gateway({"intent": [("edge", refusing)]}) as url:
        resp = await post(url, "/v2/models/intent/infer", **{"X-Request-Id": CALLERS_ID})
    assert (resp.status_code, resp.headers["x-request-id"]) == (400, CALLERS_ID) and refusing.ids() == [CALLERS_ID]
    assert resp.json() == {"error": "replica says 400"}


async def test_metadata_reads_send_the_id_too() -> None:
    answering = Replica(status(404))
    async with gateway({"intent": [("edge", answering)]}) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        resp = await http.get("/v2/models/intent", headers={**PARIS, "X-Request-Id": CALLERS_ID})
    assert resp.headers["x-request-id"] == CALLERS_ID and answering.ids() == [CALLERS_ID]


async def test_the_openai_sdk_reads_the_id_of_an_answer_that_failed_over_whole_and_streamed() -> None:
    failing, answering = Replica(status(500)), Replica(chat())
    async with gateway({"chat": [("edge", failing), ("edge", answering)]}) as url, sdk(url) as client:
        whole = await client.chat.completions.create(model="chat", messages=USER, extra_headers={"X-Request-Id": CALLERS_ID})
        stream = await client.chat.completions.create(model="chat", messages=USER, stream=True, extra_headers={"X-Request-Id": "streamed-1"})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert whole._request_id == CALLERS_ID and whole.choices[0].message.content == "The answer is 42."
    assert stream.response.headers["x-request-id"] == "streamed-1" and text == "The answer is 42."
    assert failing.ids() == answering.ids() == [CALLERS_ID, "streamed-1"]


async def test_the_openai_sdk_reads_the_id_of_each_error_the_error_object_unchanged() -> None:
    failing, unavailable = Replica(status(500)), Replica(status(503))
    async with gateway({"chat": [("edge", failing)], "chat-busy": [("edge", unavailable)]}) as url, sdk(url) as client:
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="chat", messages=USER, extra_headers={"X-Request-Id": CALLERS_ID})
        with pytest.raises(openai.APIStatusError) as busy:
            await client.chat.completions.create(model="chat-busy", messages=USER, stream=True, extra_headers={"X-Request-Id": "busy-2"})
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="nope", messages=USER, extra_headers={"X-Request-Id": "nope-2"})
        with pytest.raises(openai.BadRequestError) as no_id:
            await client.chat.completions.create(model="chat", messages=USER, extra_body={"stream": "yes"})
    assert (failed.value.status_code, failed.value.request_id) == (502, CALLERS_ID) and failing.ids() == [CALLERS_ID]
    assert (busy.value.status_code, busy.value.request_id) == (503, "busy-2")
    assert unknown.value.request_id == "nope-2" and unknown.value.code == "model_not_found"
    assert NEW_ID.fullmatch(no_id.value.request_id or "") and no_id.value.param == "stream"
    assert set(failed.value.response.json()["error"]) == {"message", "type", "param", "code"}


async def test_every_stage_of_a_v2_cascade_gets_the_same_id() -> None:
    unsure, large = Replica(v2_answer(0.5)), Replica(v2_answer(0.99))
    route = cascade_rules.CascadeRoute("m", "m-dep", (cascade_rules.StageRoute("small", frozenset({"edge"}), RULE),
                                                       cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {})
    async with gateway({"m": [("edge", unsure), ("datacenter", large)]}, {"m": route}) as url:
        resp = await post(url, "/v2/models/m/infer", **{"X-Request-Id": CALLERS_ID})
    assert resp.status_code == 200 and resp.headers["x-edgeplane-cascade-escalation"] == "escalated", resp.text
    assert resp.headers["x-request-id"] == CALLERS_ID and unsure.ids() == large.ids() == [CALLERS_ID]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_every_stage_of_an_openai_cascade_gets_the_same_id(stream: bool) -> None:
    cut, large = Replica(chat(finish="length")), Replica(chat())
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    route = cascade_rules.CascadeRoute("chat", "chat-dep", (first, cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {})
    async with gateway({"chat": [("edge", cut), ("datacenter", large)]}, {"chat": route}) as url, sdk(url) as client:
        raw = await client.chat.completions.with_raw_response.create(model="chat", messages=USER, stream=stream,
                                                                     extra_headers={"X-Request-Id": CALLERS_ID})
    assert raw.headers["x-edgeplane-cascade-escalation"] == "escalated" and raw.headers["x-request-id"] == CALLERS_ID
    assert cut.ids() == large.ids() == [CALLERS_ID]


async def test_trace_context_is_passed_on_unchanged() -> None:
    failing, answering = Replica(status(500)), Replica(v2_answer(0.9))
    async with gateway({"intent": [("edge", failing), ("edge", answering)]}) as url:
        await post(url, "/v2/models/intent/infer", traceparent=TRACEPARENT, tracestate=TRACESTATE)
    assert [(s[ids.TRACEPARENT], s[ids.TRACESTATE]) for s in failing.seen + answering.seen] == [(TRACEPARENT, TRACESTATE)] * 2


async def test_invalid_trace_context_is_not_passed_on() -> None:
    answering = Replica(v2_answer(0.9))
    async with gateway({"intent": [("edge", answering)]}) as url:
        await post(url, "/v2/models/intent/infer", traceparent=TRACEPARENT.upper(), tracestate=TRACESTATE)
    assert answering.seen[0][ids.TRACEPARENT] is None and answering.seen[0][ids.TRACESTATE] is None


@pytest.mark.parametrize(("value", "kept"), [
    ("6f1c2a9e-3b7d-4c1e-9f0a-2d4b6c8e0a1b", True),  # a UUID
    ("01ARZ3NDEKTSV4RRFFQ69G5FAV", True),  # a ULID
    ("b64+id/with==", True),
    ("a" * 128, True),
    ("a" * 129, False),
    ("", False),
    ("has space", False),
    ("tab\tin", False),
    ("name@host", False),
    ("x,y", False),
    ("caf\u00e9", False),
    (None, False),
])
def test_which_request_ids_are_kept(value: str | None, kept: bool) -> None:
    assert ids.request_id(value) == (value if kept else None)


@pytest.mark.parametrize(("value", "kept"), [
    (TRACEPARENT, True),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", True),  # a later version may carry more
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more", False),  # version 00 has exactly four fields
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
    (TRACEPARENT.upper(), False),
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),
    ("", False),
    (None, False),
])
def test_which_traceparents_are_passed_on(value: str | None, kept: bool) -> None:
    assert ids.traceparent(value) == (value if kept else None)


@pytest.mark.parametrize(("values", "passed"), [
    ([TRACESTATE], TRACESTATE),
    (["congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7"], TRACESTATE),
    ([], None),
    (["a=" + "b" * 511], None),
    (["a=\u00e9"], None),
])
def test_which_tracestates_are_passed_on(values: list[str], passed: str | None) -> None:
    assert ids.tracestate(values) == passed


def test_what_the_gateway_sends_on_for_a_requests_headers() -> None:
    sent = correlation.read([(b"x-request-id", CALLERS_ID.encode()), (b"traceparent", TRACEPARENT.encode()),
                             (b"tracestate", b"congo=t61rcWkgMzE"), (b"tracestate", b"rojo=00f067aa0ba902b7")])
    assert sent == {"x-request-id": CALLERS_ID, "traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    alone = correlation.read([(b"tracestate", TRACESTATE.encode())])  # no traceparent: no tracestate either
    assert list(alone) == ["x-request-id"] and NEW_ID.fullmatch(alone["x-request-id"])
    two_parents = correlation.read([(b"traceparent", TRACEPARENT.encode())] * 2)
    assert list(two_parents) == ["x-request-id"]
