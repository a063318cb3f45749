"""The caller's position as the gateway reads it: query parameters of the endpoint list and
the ``X-Edgeplane-Region`` header, table-tested, and the gateway's routes that run a cascade
or wake a cold model refusing an unknown region before they do (over an in-memory upstream
that must not be called)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from orchestrator.api import methods
from orchestrator.gateway import cascade, cascade_rules, endpoints, openai_routes, proxy, routing, scoping


@pytest.mark.parametrize(("lat", "lon", "region", "residency", "expected"), [
    (None, None, None, None, routing.Caller()),
    ("48.85", "2.35", None, None, routing.Caller(48.85, 2.35)),
    ("-90", "180", " fr ", "FR", routing.Caller(-90.0, 180.0, "fr", frozenset({"FR"}))),
    ("90.0001", "0", None, None, "query parameter lat must be a number in [-90, 90], not '90.0001'"),
    ("0", "-180.5", None, None, "query parameter lon must be a number in [-180, 180], not '-180.5'"),
    ("", "0", None, None, "query parameter lat must be a number in [-90, 90], not ''"),
    ("NaN", "0", None, None, "query parameter lat must be a number in [-90, 90], not 'NaN'"),
    ("0", "-inf", None, None, "query parameter lon must be a number in [-180, 180], not '-inf'"),
    ("1", None, None, None, "query parameter lat is given without lon: give both (e.g. lat=48.85&lon=2.35) or neither"),
    (None, "1", None, None, "query parameter lon is given without lat: give both (e.g. lat=48.85&lon=2.35) or neither"),
    (None, None, None, "Narnia", "query parameter residency: "),
])
def test_query_caller(lat: str | None, lon: str | None, region: str | None, residency: str | None, expected: Any) -> None:
    got = routing.parse_query_caller(lat, lon, region, residency)
    if isinstance(expected, routing.Caller):
        assert got == expected
    else:
        assert isinstance(got, routing.NoRoute) and got.status == 400 and got.reason.startswith(expected)


UNKNOWN = "is neither an ISO 3166 alpha-2 country code (e.g. FR, DE) nor a known group (EU)"


def test_a_token_and_a_caller_refuse_a_residency_code_alike() -> None:
    """A token's residency (POST /v1/tokens) and a caller's (the query parameter, the header)
    are read by one rule: trimmed, in any case, ISO 3166 alpha-2 codes and groups."""
    assert scoping.invalid_residency([" fr", "eu ", "de"]) is None
    assert scoping.invalid_residency(["FR", " uk "]) == f"residency: 'UK' {UNKNOWN}"
    query = routing.parse_query_caller(None, None, None, "FR, uk ")
    assert isinstance(query, routing.NoRoute) and query.reason == f"query parameter residency: 'uk' {UNKNOWN}"


MANY = [f"r{i:02d}" for i in range(25)]


@pytest.mark.parametrize(("region", "known", "expected"), [
    ("fr", {"fr", "de"}, None),
    ("FR", {"fr", "de"}, "H: unknown region 'FR' (known regions: de, fr); give L instead"),
    ("fr", set(), "H: unknown region 'fr' (known regions: none, no site declares one); give L instead"),
    ("x", set(MANY), f"H: unknown region 'x' (known regions: {', '.join(MANY[:20])}, …); give L instead"),
    ("x", set(MANY[:20]), f"H: unknown region 'x' (known regions: {', '.join(MANY[:20])}); give L instead"),
])
def test_check_region(region: str, known: set[str], expected: str | None) -> None:
    got = routing.check_region(region, known, "H", "L")
    assert (got.reason if got is not None else None) == expected
    assert got is None or got.status == 400


def ep(site: str, region: str, model: str = "m", tier: str = "edge") -> routing.Endpoint:
    return routing.Endpoint(model=model, deployment="dep", site=site, tier=tier, country="FR", region=region, lat=48.8, lon=2.3,
                            url=f"http://{site}")


def test_the_table_knows_the_regions_of_its_sites_and_endpoints() -> None:
    table = endpoints.EndpointTable()
    assert table.unknown_region("anything") is None  # no table yet: the model's answer says so
    table.replace([ep("paris", "fr"), ep("nowhere", "")], routing.RegionIndex({"de": (52.5, 13.4)}))
    assert table.unknown_region("de") is None  # a site declares it; no replica runs there
    assert table.unknown_region("fr") is None  # an endpoint is in it
    refused = table.unknown_region("es")
    assert refused is not None and refused.status == 400
    assert refused.reason == "X-Edgeplane-Region: unknown region 'es' (known regions: de, fr); give X-Edgeplane-Location: lat,lon instead"
    table.replace([], routing.RegionIndex())
    assert table.unknown_region("fr") is not None  # the sites were deleted


class NoUpstream:
    """Every call is a failure of the test: a refused caller reaches no replica."""

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"called a replica: {args}")

    async def stream(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"called a replica: {args}")


STUDENT = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8))
TEACHER = cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)
GENERATIVE = cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.GenerativeRule(-1.0, True, ()))


def gateway_app(table: endpoints.EndpointTable) -> Starlette:
    registry = CollectorRegistry()
    upstream: Any = NoUpstream()
    handler = cascade.CascadeHandler(table, upstream, cascade.CascadeMetrics.create(registry))
    gw = proxy.Gateway(table, upstream, proxy.GatewayMetrics.create(registry), cascade=handler, cold_start_s=0.05)
    return Starlette(routes=gw.routes() + openai_routes.OpenAIGateway(gw, registry=registry).routes(),
                     exception_handlers=methods.EXCEPTION_HANDLERS)


@pytest.mark.asyncio
async def test_cascades_and_cold_models_refuse_an_unknown_region_before_they_run() -> None:
    table = endpoints.EndpointTable()
    table.replace([ep("paris", "fr"), ep("paris", "fr", model="chat"), ep("dc", "fr", tier="datacenter")],
                  routing.RegionIndex({"fr": (48.8, 2.3)}), deployed={"cold": "scaled to zero"}, cold=["cold"])
    table.set_cascades({"m": cascade_rules.CascadeRoute("m", "dep", (STUDENT, TEACHER), {}),
                        "chat": cascade_rules.CascadeRoute("chat", "chat-dep", (GENERATIVE, TEACHER), {})})
    said = "X-Edgeplane-Region: unknown region 'es' (known regions: fr); give X-Edgeplane-Location: lat,lon instead"
    es = {"x-edgeplane-region": "es"}
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway_app(table)), base_url="http://gateway") as http:
        cascaded = await http.post("/v2/models/m/infer", json={}, headers=es)
        plain = await http.post("/v2/models/m/infer", json={}, headers={**es, "x-edgeplane-cascade": "off"})
        generative = await http.post("/openai/v1/chat/completions", json=chat, headers=es)
        cold = await http.post("/v2/models/cold/infer", json={}, headers=es)
        cold_chat = await http.post("/openai/v1/chat/completions", json={**chat, "model": "cold"}, headers=es)
    for resp in (cascaded, plain, cold):
        assert (resp.status_code, resp.json()) == (400, {"error": said})
    for resp in (generative, cold_chat):
        assert resp.status_code == 400 and resp.json()["error"]["message"] == said
    assert table.wakes == {}  # a refused caller starts no replica
