"""What of the caller's credentials reaches which replica when a request moves on: the token
the gateway verified goes to each attempt's replica that checks tokens (``auth: "token"``)
and to no other, a failover from one to a replica that does not included, whole and
streamed; a redirect is not followed; and nothing else of the caller's (cookies, other
keys, an Authorization the admission did not verify) reaches any replica (docs/security.md,
"Gateways in front of agents that check tokens"). The gateway's routes behind uvicorn on a
loopback port with the real admission; replicas are loopback servers noting every header."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import openai
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages
from orchestrator.gateway import endpoints, openai_routes, proxy, routing, upstream
from orchestrator.security import admission, ratelimit
from orchestrator.testing import loopback
from tests.gateway import test_cascade_token_forward as guarded
from tests.gateway import test_request_ids as ids_tests

BEARER = f"Bearer {guarded.GOOD}"
#: The caller's other credentials, which no replica may be sent.
OTHERS = {"cookie": "session=s3cret", "x-api-key": "k3y", "proxy-authorization": "Basic Zm9vOmJhcg=="}


class Replica:
    def __init__(self, answer: ids_tests.Answer) -> None:
        self.answer, self.url = answer, ""
        self.seen: list[dict[str, str]] = []

    async def handle(self, request: httpmessages.Request) -> httpmessages.Response:
        self.seen.append(dict(request.headers))
        return self.answer(request)


def redirect_to(where: Replica) -> ids_tests.Answer:
    return lambda request: httpmessages.Response(307, b"", headers=(("location", f"{where.url}{request.path}"),))


@contextlib.asynccontextmanager
async def gateway(model: str, replicas: list[tuple[str, Replica]], *, auth: bool = True,
                  unlisted: tuple[Replica, ...] = ()) -> AsyncIterator[str]:
    """A gateway (``--gateway-auth token``, or none) for ``model``'s replicas (auth, replica), nearest first;
    ``unlisted``: replicas served but in no endpoint table."""
    async with contextlib.AsyncExitStack() as stack:
        for r in unlisted:
            r.url = await stack.enter_async_context(loopback.replica(r.handle))
        fleet = []
        for i, (checks, r) in enumerate(replicas):
            r.url = await stack.enter_async_context(loopback.replica(r.handle))
            api = routing.API_OPENAI if model == "chat" else routing.API_V2
            fleet.append(routing.Endpoint(model, f"{model}-dep", f"{model}-{i}", "edge", "FR", "fr", 48.85, 2.35 + i / 100, r.url,
                                          api=api, auth=checks))
        table = endpoints.EndpointTable()
        table.replace(fleet)
        pool = upstream.UpstreamPool()
        stack.push_async_callback(pool.close)
        registry = CollectorRegistry()
        admit = admission.GatewayAdmission(ratelimit.RateLimiter(ratelimit.RateLimit(0, 0)), guarded.verify if auth else None)
        gw = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), admit=admit.check)
        app = Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes())
        port = await stack.enter_async_context(loopback.serving(app))
        yield f"http://127.0.0.1:{port}"


def _credentials(*replicas: Replica) -> list[list[str | None]]:
    """For each replica, the Authorization of each request it was sent; and no other credential anywhere."""
    for r in replicas:
        assert all(not OTHERS.keys() & head.keys() for head in r.seen), r.seen
    return [[head.get("authorization") for head in r.seen] for r in replicas]


async def test_a_v2_failover_from_an_agent_that_checks_tokens_sends_the_next_none() -> None:
    failing, answering = Replica(ids_tests.status(500)), Replica(ids_tests.v2_answer(0.9))
    async with gateway("m", [("token", failing), ("none", answering)]) as url:
        resp = await ids_tests.post(url, "/v2/models/m/infer", authorization=BEARER, **OTHERS)
    assert (resp.status_code, resp.headers["x-edgeplane-site"]) == (200, "m-1"), resp.text
    assert _credentials(failing, answering) == [[BEARER], [None]]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_openai_failover_from_an_agent_that_checks_tokens_sends_the_next_none(stream: bool) -> None:
    failing, answering = Replica(ids_tests.status(500)), Replica(ids_tests.chat())
    async with gateway("chat", [("token", failing), ("none", answering)]) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=guarded.GOOD, max_retries=0, timeout=30,
                                      default_headers={**ids_tests.PARIS, **OTHERS}) as client:
            raw = await client.chat.completions.with_raw_response.create(model="chat", messages=ids_tests.USER, stream=stream)
    assert raw.headers["x-edgeplane-site"] == "chat-1"
    assert _credentials(failing, answering) == [[BEARER], [None]]


async def test_a_redirect_from_an_agent_that_checks_tokens_is_not_followed() -> None:
    elsewhere, answering = Replica(ids_tests.v2_answer(0.9)), Replica(ids_tests.v2_answer(0.9))
    redirecting = Replica(redirect_to(elsewhere))
    async with gateway("m", [("token", redirecting), ("none", answering)], unlisted=(elsewhere,)) as url:
        resp = await ids_tests.post(url, "/v2/models/m/infer", authorization=BEARER)
    assert (resp.status_code, resp.headers["x-edgeplane-site"]) == (200, "m-1"), resp.text
    assert _credentials(redirecting, answering, elsewhere) == [[BEARER], [None], []]


async def test_a_basic_authorization_reaches_no_replica() -> None:
    replica = Replica(ids_tests.v2_answer(0.9))
    async with gateway("m", [("none", replica)], auth=False) as url:
        open_answer = await ids_tests.post(url, "/v2/models/m/infer", authorization=OTHERS["proxy-authorization"])
    async with gateway("m", [("none", replica)]) as url:
        guarded_answer = await ids_tests.post(url, "/v2/models/m/infer", authorization=OTHERS["proxy-authorization"])
    assert (open_answer.status_code, guarded_answer.status_code) == (200, 401)
    assert _credentials(replica) == [[None]]
