"""Answers the gateway makes itself before any replica is asked are counted in
``edgeplane_gateway_requests`` like those it gets from one, on the v2 and the OpenAI
routes alike, over real HTTP: a body over ``--gateway-max-body``, the refusals of token
auth and of the rate limit, and a cold start that found no replica in time. An error
ratio or a request rate read from /metrics missed every one of them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from orchestrator.gateway import endpoints, openai_routes, proxy, routing
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.security import admission, ratelimit
from orchestrator.testing import loopback

pytestmark = pytest.mark.asyncio

PARIS = routing.Endpoint("m", "d", "paris", "edge", "FR", "west", 48.85, 2.35, "http://127.0.0.1:9")
GOOD, DOWN = "good-token", "while-the-store-is-down"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@dataclasses.dataclass(frozen=True)
class Token:
    id: str


async def verify(secret: str) -> Token | None:
    if secret == DOWN:
        raise admission.TokenCheckUnavailable("the store does not answer")
    return Token("t1") if secret == GOOD else None


def counted(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """edgeplane_gateway_requests_total by (model, code)."""
    out: dict[tuple[str, str], float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == "edgeplane_gateway_requests_total":
                key = (s.labels["model"], s.labels["code"])
                out[key] = out.get(key, 0) + s.value
    return out


def latency_count(registry: CollectorRegistry) -> float:
    return sum(s.value for f in registry.collect() for s in f.samples if s.name == "edgeplane_gateway_request_seconds_count")


@dataclasses.dataclass
class Served:
    http: httpx.AsyncClient
    registry: CollectorRegistry
    table: endpoints.EndpointTable


async def serve(admit: admission.GatewayAdmission | None = None) -> AsyncIterator[Served]:
    registry = CollectorRegistry()
    table = endpoints.EndpointTable()
    table.replace([PARIS], deployed={"cold": "deployment c is ScaledToZero"}, cold={"cold"})
    pool = UpstreamPool()
    gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), max_body=1024, cold_start_s=0.05,
                            admit=admit.check if admit is not None else None)
    app = Starlette(routes=gateway.routes() + openai_routes.OpenAIGateway(gateway, registry=registry).routes())
    try:
        async with loopback.serving(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield Served(http, registry, table)
    finally:
        await pool.close()


@pytest.fixture
async def open_gateway() -> AsyncIterator[Served]:
    async for served in serve():
        yield served


@pytest.fixture
async def guarded_gateway() -> AsyncIterator[Served]:
    async for served in serve(admission.GatewayAdmission(ratelimit.RateLimiter(ratelimit.RateLimit(0.001, 2)), verify)):
        yield served


async def test_a_body_over_the_limit_is_counted_under_its_model(open_gateway: Served) -> None:
    http, registry = open_gateway.http, open_gateway.registry
    assert (await http.post("/v2/models/m/infer", content=b"x" * 4096)).status_code == 413
    assert (await http.post("/v2/models/not-deployed/infer", content=b"x" * 4096)).status_code == 413
    assert (await http.post("/openai/v1/chat/completions", content=b"x" * 4096)).status_code == 413  # its model is in the body
    assert counted(registry) == {("m", "413"): 1, (proxy.UNKNOWN_MODEL, "413"): 2}
    assert latency_count(registry) == 2  # the v2 requests' durations, as for any other answer


async def test_a_cold_start_that_times_out_is_counted_on_the_openai_route_as_on_v2(open_gateway: Served) -> None:
    http, registry = open_gateway.http, open_gateway.registry
    assert (await http.post("/v2/models/cold/infer", content=b"{}")).status_code == 503
    assert (await http.post("/openai/v1/chat/completions", json={**CHAT, "model": "cold"})).status_code == 503
    assert counted(registry) == {("cold", "503"): 2}


async def test_admission_refusals_are_counted(guarded_gateway: Served) -> None:
    http, registry = guarded_gateway.http, guarded_gateway.registry

    def bearer(secret: str) -> dict[str, str]:
        return {"authorization": f"Bearer {secret}"}

    assert (await http.post("/v2/models/m/infer", content=b"{}")).status_code == 401
    assert (await http.post("/v2/models/not-deployed/infer", content=b"{}", headers=bearer("wrong"))).status_code == 401
    assert (await http.post("/v2/models/m/infer", content=b"{}", headers=bearer(DOWN))).status_code == 503
    assert (await http.post("/openai/v1/chat/completions", json=CHAT, headers=bearer("wrong"))).status_code == 401
    codes = [(await http.post("/v2/models/m/infer", content=b"x" * 4096, headers=bearer(GOOD))).status_code for _ in range(3)]
    assert codes == [413, 413, 429]  # a burst of 2, then the token's bucket is spent
    assert (await http.post("/openai/v1/chat/completions", json=CHAT, headers=bearer(GOOD))).status_code == 429
    assert counted(registry) == {("m", "401"): 1, (proxy.UNKNOWN_MODEL, "401"): 2, ("m", "503"): 1, ("m", "413"): 2,
                                 ("m", "429"): 1, (proxy.UNKNOWN_MODEL, "429"): 1}
