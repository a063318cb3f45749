"""Property: for random fleets, callers and cascades, no stage of any request runs outside
the caller's residency (nor the deployment's), whatever the replicas answer.

The real ``CascadeHandler`` runs over a real ``EndpointTable``; only the upstream is an
in-memory transport (a constructor seam), which answers each replica's way drawn by
hypothesis: sure, unsure, 5xx or unreachable.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from orchestrator.gateway import cascade, cascade_rules, endpoints, routing

from .transport import Transport

COUNTRIES = ["FR", "DE", "ES", "IT", "US", "CH"]
BEHAVIOURS = ["sure", "unsure", "5xx", "down"]
RULE = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[routing.Endpoint], dict[str, str], cascade_rules.CascadeRoute, routing.Caller]:
    allowed = frozenset(draw(st.sets(st.sampled_from(COUNTRIES), max_size=3)))
    stage_tiers = draw(st.sampled_from([(("edge",), ("datacenter",)), (("datacenter",), ("edge",)), (("edge",), ("datacenter",), ())]))
    n_stages = len(stage_tiers)
    stages = tuple(cascade_rules.StageRoute(f"v{i}", frozenset(t), RULE if i < n_stages - 1 else None,
                                            max_inflight=draw(st.sampled_from([None, 1])) if i < n_stages - 1 else None, watts=10.0)
                   for i, t in enumerate(stage_tiers))
    route = cascade_rules.CascadeRoute("m", "dep", stages)
    fleet, behaviour = [], {}
    for i in range(draw(st.integers(0, 8))):
        url = f"http://site{i}"
        fleet.append(routing.Endpoint(
            model="m", deployment=draw(st.sampled_from(["dep", "dep", "other"])), site=f"site{i}",
            tier=draw(st.sampled_from(["edge", "datacenter"])), country=draw(st.sampled_from(COUNTRIES)), region="",
            lat=draw(st.floats(-60, 60)), lon=draw(st.floats(-170, 170)), url=url, healthy=draw(st.booleans()),
            inflight=draw(st.integers(0, 2)), allowed_countries=allowed))
        behaviour[url] = draw(st.sampled_from(BEHAVIOURS))
    residency = frozenset(draw(st.sets(st.sampled_from(COUNTRIES), max_size=2)))
    caller = routing.Caller(draw(st.floats(-60, 60)), draw(st.floats(-170, 170)), residency=residency)
    return fleet, behaviour, route, caller


def request(mode: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": [(b"x-edgeplane-cascade", mode.encode())]})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from(["on", "force-last", "force-first"]))
def test_no_stage_runs_outside_the_callers_residency(scenario: Any, mode: cascade_rules.Mode) -> None:
    fleet, behaviour, route, caller = scenario
    table = endpoints.EndpointTable()
    table.replace(fleet)
    table.cascades = {"m": route}
    transport = Transport(behaviour)
    handler = cascade.CascadeHandler(table, transport, cascade.CascadeMetrics.create(CollectorRegistry()))  # type: ignore[arg-type]

    async def plain() -> Any:
        raise AssertionError("only mode 'off' routes plainly")

    response = asyncio.run(handler.infer(route, mode, caller, request(mode), b"{}", plain))
    by_url = {e.url: e for e in fleet}
    for url in transport.calls:
        e = by_url[url]
        assert not caller.residency or e.country in caller.residency, (e, caller)
        assert not e.allowed_countries or e.country in e.allowed_countries, e
        assert e.deployment == "dep" and e.healthy
    ran = response.headers.get("x-edgeplane-cascade-sites")
    if response.status_code == 200:
        assert ran and set(ran.split(",")) <= {by_url[u].site for u in transport.calls}
        assert by_url[f"http://{response.headers['x-edgeplane-site']}"].country in (caller.residency or COUNTRIES)
    else:
        assert response.status_code in (502, 503) and not ran
