"""Answers the gateway makes itself before any replica is asked are counted in
``edgeplane_gateway_requests`` like those it gets from one, on the v2 and the OpenAI
routes alike, over real HTTP: a body over ``--gateway-max-body`` (or once inflated), a
body or headers it cannot read, the refusals of token auth and of the rate limit, and a
cold start that found no replica in time. An error ratio or a request rate read from
/metrics missed every one of them. They are not timed: the request time is of the
answers replicas gave."""

from __future__ import annotations

import dataclasses
import gzip
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_routes, proxy, routing
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.security import admission, ratelimit
from orchestrator.testing import loopback

pytestmark = pytest.mark.asyncio

PARIS = routing.Endpoint("m", "d", "paris", "edge", "FR", "west", 48.85, 2.35, "http://127.0.0.1:9")
CASCADE = routing.Endpoint("casc", "casc-dep", "paris", "edge", "FR", "west", 48.85, 2.35, "http://127.0.0.1:9")
GOOD, DOWN = "good-token", "while-the-store-is-down"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@dataclasses.dataclass(frozen=True)
class Token:
    id: str


async def verify(secret: str) -> Token | None:
    if secret == DOWN:
        raise admission.TokenCheckUnavailable("the store does not answer")
    return Token("t1") if secret == GOOD else None


def known(secret: str) -> Token | None:  # once checked: a kept verdict
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


def sampled(registry: CollectorRegistry, name: str) -> float:
    """The sum of ``name``'s samples, every label."""
    return sum(s.value for f in registry.collect() for s in f.samples if s.name == name)


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
    table.replace([PARIS, CASCADE], deployed={"cold": "deployment c is ScaledToZero"}, cold={"cold"})
    stages = (cascade_rules.StageRoute("small", frozenset({"edge"}), None), cascade_rules.StageRoute("large", frozenset({"datacenter"}), None))
    route = cascade_rules.CascadeRoute("casc", "casc-dep", stages, {})
    table.set_cascades({"casc": route, "casc-dep": route})  # called by its model's name or its deployment's
    pool = UpstreamPool()
    handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry))
    gateway = proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), max_body=1024, cold_start_s=0.05,
                            admit=admit.check if admit is not None else None, cascade=handler)
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
    async for served in serve(admission.GatewayAdmission(ratelimit.RateLimiter(ratelimit.RateLimit(0.001, 4)), verify, known)):
        yield served


async def test_a_body_over_the_limit_is_counted_under_its_model(open_gateway: Served) -> None:
    http, registry = open_gateway.http, open_gateway.registry
    assert (await http.post("/v2/models/m/infer", content=b"x" * 4096)).status_code == 413
    assert (await http.post("/v2/models/not-deployed/infer", content=b"x" * 4096)).status_code == 413
    assert (await http.post("/openai/v1/chat/completions", content=b"x" * 4096)).status_code == 413  # its model is in the body
    assert counted(registry) == {("m", "413"): 1, (proxy.UNKNOWN_MODEL, "413"): 2}
    assert latency_count(registry) == 0  # counted, not timed: the request time is of the answers replicas gave


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
    # a burst of 4: the refusals above spent the address's, a valid token has its own
    assert (await http.post("/v2/models/m/infer", content=b"{}", headers=bearer("wrong"))).status_code == 429
    codes = [(await http.post("/v2/models/m/infer", content=b"x" * 4096, headers=bearer(GOOD))).status_code for _ in range(5)]
    assert codes == [413, 413, 413, 413, 429]
    assert (await http.post("/openai/v1/chat/completions", json=CHAT, headers=bearer(GOOD))).status_code == 429
    assert counted(registry) == {("m", "401"): 1, (proxy.UNKNOWN_MODEL, "401"): 2, ("m", "503"): 1, ("m", "413"): 4,
                                 ("m", "429"): 2, (proxy.UNKNOWN_MODEL, "429"): 1}


async def test_refused_metadata_reads_are_not_counted_as_inference_requests(guarded_gateway: Served) -> None:
    """``edgeplane_gateway_requests`` counts inference requests: a model's metadata read that
    admission refuses is no more one than a metadata read answered."""
    http, registry = guarded_gateway.http, guarded_gateway.registry
    reads = ["/v2/models/m", "/v2/models/m/ready", "/v2/models/m/versions/1", "/openai/v1/models", "/openai/v1/models/m"]
    assert [(await http.get(path)).status_code for path in reads] == [401] * 4 + [429]
    assert counted(registry) == {}


async def test_metadata_reads_count_no_failover_and_no_cold_start(open_gateway: Served) -> None:
    """A metadata read is no inference request, so neither the replicas it moved on from nor
    the cold start it waited for are counted: failovers would outnumber requests. The
    inference requests after them are."""
    http, registry, table = open_gateway.http, open_gateway.registry, open_gateway.table
    lyon = dataclasses.replace(PARIS, site="lyon", url="http://127.0.0.1:7")  # both refuse the connection
    table.replace([PARIS, lyon], deployed={"cold": "deployment c is ScaledToZero"}, cold={"cold"})
    assert [(await http.get(path)).status_code for path in ("/v2/models/m", "/v2/models/m/versions/1/ready")] == [502, 502]
    assert (await http.get("/v2/models/cold")).status_code == 503
    assert sampled(registry, "edgeplane_gateway_failovers_total") == 0
    assert sampled(registry, "edgeplane_gateway_cold_starts_total") == 0
    assert (await http.post("/v2/models/m/infer", content=b"{}")).status_code == 502
    assert (await http.post("/v2/models/cold/infer", content=b"{}")).status_code == 503
    assert sampled(registry, "edgeplane_gateway_failovers_total") == 1
    assert sampled(registry, "edgeplane_gateway_cold_starts_total") == 1


async def test_bad_caller_or_cascade_headers_are_counted_on_a_v2_cascade_as_on_a_plain_model(open_gateway: Served) -> None:
    http, registry = open_gateway.http, open_gateway.registry
    assert (await http.post("/v2/models/m/infer", content=b"{}", headers={"x-edgeplane-location": "north"})).status_code == 400
    assert (await http.post("/v2/models/casc/infer", content=b"{}", headers={"x-edgeplane-location": "north"})).status_code == 400
    assert (await http.post("/v2/models/casc-dep/infer", content=b"{}", headers={"x-edgeplane-cascade": "sometimes"})).status_code == 400
    assert counted(registry) == {("m", "400"): 1, ("casc", "400"): 2}


async def test_bodies_and_headers_the_openai_routes_cannot_read_are_counted(open_gateway: Served) -> None:
    http, registry = open_gateway.http, open_gateway.registry
    bad = [
        ({"content": b"{not json"}, 400),
        ({"json": ["a", "list"]}, 400),
        ({"json": {"messages": CHAT["messages"]}}, 400),  # no model
        ({"content": gzip.compress(b" " * 4096), "headers": {"content-encoding": "gzip"}}, 413),  # over the limit once inflated
        ({"content": b"{}", "headers": {"content-encoding": "br"}}, 415),
        ({"json": {**CHAT, "stream": "yes"}}, 400),
        ({"json": CHAT, "headers": {"x-edgeplane-location": "north"}}, 400),
        ({"json": {**CHAT, "model": "casc"}, "headers": {"x-edgeplane-cascade": "sometimes"}}, 400),
    ]
    for request, status in bad:
        assert (await http.post("/openai/v1/chat/completions", **request)).status_code == status, request
    assert counted(registry) == {(proxy.UNKNOWN_MODEL, "400"): 3, (proxy.UNKNOWN_MODEL, "413"): 1, (proxy.UNKNOWN_MODEL, "415"): 1,
                                 ("m", "400"): 2, ("casc", "400"): 1}


async def test_a_generative_cascade_that_no_stage_answered_is_counted(open_gateway: Served) -> None:
    """Its one edge replica refuses the connection and no data centre serves it: the
    cascade's own 503 is counted as plain routing's is."""
    http, registry = open_gateway.http, open_gateway.registry
    open_gateway.table.replace([dataclasses.replace(CASCADE, api=routing.API_OPENAI)])
    resp = await http.post("/openai/v1/chat/completions", json={**CHAT, "model": "casc"})
    assert resp.status_code == 503, resp.text
    assert counted(registry) == {("casc", "503"): 1}
    assert latency_count(registry) == 0  # no replica's answer: counted, not timed
