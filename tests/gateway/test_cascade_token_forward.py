"""Both cascades pass the caller's verified token on to each stage's replicas that check tokens
(``auth: "token"``) and to no other, as the plain routes do (tests/security/test_gateway_token_forward.py
runs those against real agents). The gateway's routes behind uvicorn on a loopback port, with
the real admission; replicas are loopback servers that note each request's Authorization."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages
from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_routes, proxy, routing, upstream
from orchestrator.security import admission, ratelimit
from orchestrator.testing import loopback
from tests.gateway import test_request_ids as ids_tests

GOOD = "ep_good"


@dataclass(frozen=True)
class Token:
    id: str
    models: tuple[str, ...] = ()
    residency: tuple[str, ...] = ()


async def verify(secret: str) -> Token | None:
    return Token("t1") if secret == GOOD else None


class Replica:
    def __init__(self, answer: ids_tests.Answer) -> None:
        self.answer, self.seen, self.url = answer, [], ""  # type: ignore[var-annotated]

    async def handle(self, request: httpmessages.Request) -> httpmessages.Response:
        self.seen.append(request.headers.get("authorization"))
        return self.answer(request)


@contextlib.asynccontextmanager
async def gateway(model: str, stages: list[tuple[str, str, Replica]], route: cascade_rules.CascadeRoute) -> AsyncIterator[str]:
    """A guarded gateway (``--gateway-auth token``) for ``model``'s replicas (tier, auth, replica), the first nearest."""
    async with contextlib.AsyncExitStack() as stack:
        fleet = []
        for i, (tier, auth, r) in enumerate(stages):
            r.url = await stack.enter_async_context(loopback.replica(r.handle))
            api = routing.API_OPENAI if model.startswith("chat") else routing.API_V2
            fleet.append(routing.Endpoint(model, f"{model}-dep", f"{model}-{i}", tier, "FR", "fr", 48.85, 2.35 + i / 100, r.url,
                                          api=api, auth=auth))
        table = endpoints.EndpointTable()
        table.replace(fleet)
        table.set_cascades({model: route})
        pool = upstream.UpstreamPool()
        stack.push_async_callback(pool.close)
        registry = CollectorRegistry()
        admit = admission.GatewayAdmission(ratelimit.RateLimiter(ratelimit.RateLimit(0, 0)), verify)
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cascade=cascade.CascadeHandler(
            table, pool, cascade.CascadeMetrics.create(registry)), admit=admit.check)
        app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes())
        port = await stack.enter_async_context(loopback.serving(app))
        yield f"http://127.0.0.1:{port}"


async def test_each_stage_of_a_v2_cascade_gets_the_token_where_it_checks_tokens_alone() -> None:
    unsure, large = Replica(ids_tests.v2_answer(0.5)), Replica(ids_tests.v2_answer(0.99))
    route = cascade_rules.CascadeRoute("m", "m-dep", (cascade_rules.StageRoute("small", frozenset({"edge"}), ids_tests.RULE),
                                                       cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {})
    async with gateway("m", [("edge", "token", unsure), ("datacenter", "none", large)], route) as url:
        resp = await ids_tests.post(url, "/v2/models/m/infer", authorization=f"Bearer {GOOD}")
    assert resp.status_code == 200 and resp.headers["x-edgeplane-cascade-escalation"] == "escalated", resp.text
    assert (unsure.seen, large.seen) == ([f"Bearer {GOOD}"], [None])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_each_stage_of_an_openai_cascade_gets_the_token_where_it_checks_tokens_alone(stream: bool) -> None:
    cut, large = Replica(ids_tests.chat(finish="length")), Replica(ids_tests.chat())
    first = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(truncated=True))
    route = cascade_rules.CascadeRoute("chat", "chat-dep", (first, cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {})
    async with gateway("chat", [("edge", "none", cut), ("datacenter", "token", large)], route) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=GOOD, max_retries=0, timeout=30,
                                      default_headers=ids_tests.PARIS) as client:
            raw = await client.chat.completions.with_raw_response.create(model="chat", messages=ids_tests.USER, stream=stream)
    assert raw.headers["x-edgeplane-cascade-escalation"] == "escalated"
    assert (cut.seen, large.seen) == ([None], [f"Bearer {GOOD}"])
