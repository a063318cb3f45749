"""A v2 cascade whose stage replicas answer 429 (at capacity), against loopback replicas at
the gateway: such a stage is overloaded, as on the OpenAI routes, so the request moves to
the stage's next replica, then to the next stage, and the caller gets the 429 only when
no stage answered and the stage the cascade ended on was at capacity; and each replica it
moved on from counts one failover, as on the plain routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from edge_agent import httpmessages
from edgeplane_proto import oip
from orchestrator.api import methods
from orchestrator.gateway import cascade, cascade_rules, endpoints, proxy, routing, upstream
from orchestrator.ports import free_port
from orchestrator.testing.loopback import replica

Handle = Callable[[httpmessages.Request], Awaitable[httpmessages.Response]]
RULE = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8)
ROUTE = cascade_rules.CascadeRoute("m", "dep", (cascade_rules.StageRoute("small", frozenset({"edge"}), RULE),
                                                cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)), {})
PARIS = {"x-edgeplane-location": "48.85,2.35"}
BODY = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}


def sure() -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        payload, _ = oip.encode_response(oip.InferResponse("m", (oip.Tensor("p", np.array([[0.9, 0.1]], dtype=np.float32)),)))
        return httpmessages.Response(200, payload)
    return handle


def at_capacity(retry_after: str) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(429, oip.error_body("model 'm' is at capacity; retry later"), headers=(("retry-after", retry_after),))
    return handle


def ep(site: str, tier: str, url: str, lat: float = 48.85, lon: float = 2.35) -> routing.Endpoint:
    return routing.Endpoint("m", "dep", site, tier, "FR", "fr", lat, lon, url)


@asynccontextmanager
async def gateway(fleet: list[routing.Endpoint], registry: CollectorRegistry | None = None
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, endpoints.EndpointTable, cascade.CascadeStats]]:
    """The gateway's v2 routes over ``fleet`` (its metrics in ``registry``)."""
    table = endpoints.EndpointTable()
    table.replace(fleet)
    table.set_cascades({"m": ROUTE})
    pool = upstream.UpstreamPool()
    registry = registry if registry is not None else CollectorRegistry()
    stats = cascade.CascadeStats()
    handler = cascade.CascadeHandler(table, pool, cascade.CascadeMetrics.create(registry), stats)
    app = Starlette(routes=proxy.Gateway(table, pool, proxy.GatewayMetrics.create(registry), cascade=handler).routes(),
                    exception_handlers=methods.EXCEPTION_HANDLERS)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30) as http:
            yield http, table, stats
    finally:
        await pool.close()


async def infer(http: httpx.AsyncClient, **headers: str) -> httpx.Response:
    return await http.post("/v2/models/m/infer", content=json.dumps(BODY), headers={**PARIS, **headers})


def row(stats: cascade.CascadeStats) -> dict[str, Any]:
    [only] = stats.snapshot({"m": ROUTE})
    return only


def failovers(registry: CollectorRegistry) -> dict[str, float]:
    """``edgeplane_gateway_failovers_total`` of model ``m``, by the site the request moved on from."""
    return {s.labels["site"]: s.value for metric in registry.collect() for s in metric.samples
            if s.name == "edgeplane_gateway_failovers_total" and s.labels["model"] == "m"}


def failing(status: int) -> Handle:
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        return httpmessages.Response(status, oip.error_body("the runtime failed"))
    return handle


async def test_a_stage_replica_at_capacity_hands_over_to_the_stage_next_replica() -> None:
    async with replica(at_capacity("1")) as paris, replica(sure()) as lyon, replica(sure()) as dc:
        fleet = [ep("edge-paris", "edge", paris), ep("edge-lyon", "edge", lyon, 45.76, 4.84), ep("dc-paris", "datacenter", dc)]
        async with gateway(fleet) as (http, table, stats):
            resp = await infer(http)
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-lyon", resp.text
    assert resp.headers["x-edgeplane-cascade-escalation"] == "none"
    assert resp.headers["x-edgeplane-cascade-sites"] == "edge-paris,edge-lyon"
    assert not table.ejected()  # full, not broken


async def test_a_stage_at_capacity_hands_over_to_the_next_stage() -> None:
    async with replica(at_capacity("1")) as edge, replica(sure()) as dc:
        async with gateway([ep("edge-paris", "edge", edge), ep("dc-paris", "datacenter", dc)]) as (http, table, stats):
            resp = await infer(http)
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "dc-paris", resp.text
    assert resp.headers["x-edgeplane-cascade-escalation"] == "escalated"
    assert "'small' is at capacity (edge-paris: HTTP 429)" in resp.headers["x-edgeplane-cascade-reason"]
    assert row(stats)["answered"] == {"small": 0, "large": 1} and row(stats)["escalations"] == {"overloaded": 1}
    assert not table.ejected()


@pytest.mark.parametrize(("said", "passed_on"), [("7", "7"), ("999999999", "60"), ("Fri, 01 Jan 2100 00:00:00 GMT", "60"),
                                                 ("Wed, 21 Oct 2015 07:28:00 GMT", "1")],
                         ids=["seconds", "31-years", "a-date-far-off", "a-date-past"])
async def test_a_cascade_whose_last_stage_is_at_capacity_answers_429_with_its_retry_after(said: str, passed_on: str) -> None:
    """The replica's Retry-After within 1 to 60 s, as a 503's: a client that honours it waits no longer."""
    async with replica(at_capacity("1")) as edge, replica(at_capacity(said)) as dc:
        async with gateway([ep("edge-paris", "edge", edge), ep("dc-paris", "datacenter", dc)]) as (http, table, stats):
            resp = await infer(http)
    assert resp.status_code == 429 and resp.headers["retry-after"] == passed_on, resp.text
    message = resp.json()["error"]
    assert "'large' is at capacity (dc-paris: HTTP 429)" in message and "edge-paris: at capacity" in message
    assert row(stats)["answered"] == {"small": 0, "large": 0} and row(stats)["failed"] == 1  # no stage answered
    assert not table.ejected()


async def test_a_forced_stage_at_capacity_answers_429() -> None:
    async with replica(at_capacity("3")) as edge, replica(sure()) as dc:
        async with gateway([ep("edge-paris", "edge", edge), ep("dc-paris", "datacenter", dc)]) as (http, _, stats):
            resp = await infer(http, **{"x-edgeplane-cascade": "force-first"})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "3", resp.text
    assert "X-Edgeplane-Cascade: force-first" in resp.json()["error"]
    assert row(stats)["failed"] == 1


async def test_a_later_stage_at_capacity_keeps_the_earlier_answer() -> None:
    async def unsure(request: httpmessages.Request) -> httpmessages.Response:
        payload, _ = oip.encode_response(oip.InferResponse("m", (oip.Tensor("p", np.array([[0.55, 0.45]], dtype=np.float32)),)))
        return httpmessages.Response(200, payload)

    async with replica(unsure) as edge, replica(at_capacity("7")) as dc:
        async with gateway([ep("edge-paris", "edge", edge), ep("dc-paris", "datacenter", dc)]) as (http, _, stats):
            resp = await infer(http)
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "edge-paris", resp.text
    assert resp.headers["x-edgeplane-cascade-escalation"] == "not-escalated"
    assert "'large' is at capacity (dc-paris: HTTP 429)" in resp.headers["x-edgeplane-cascade-reason"]
    assert row(stats)["answered"] == {"small": 1, "large": 0}


async def test_each_replica_a_cascade_moves_on_from_counts_one_failover_as_on_the_plain_route() -> None:
    registry = CollectorRegistry()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the connection is refused
    async with replica(at_capacity("1")) as paris, replica(failing(503)) as lyon, replica(sure()) as dc:
        fleet = [ep("edge-paris", "edge", paris), ep("edge-lyon", "edge", lyon, 45.76, 4.84),
                 ep("edge-nice", "edge", dead, 43.70, 7.27), ep("dc-paris", "datacenter", dc)]
        async with gateway(fleet, registry) as (http, _, _):
            resp = await infer(http)
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == "dc-paris", resp.text
    # at capacity, failing, refusing: each moved the request on, to the stage's next replica or to the next stage
    assert failovers(registry) == {"edge-paris": 1, "edge-lyon": 1, "edge-nice": 1}


async def test_a_cascade_that_ends_on_a_failed_replica_counts_no_failover_from_it() -> None:
    registry = CollectorRegistry()
    async with replica(failing(503)) as edge, replica(at_capacity("7")) as dc:
        async with gateway([ep("edge-paris", "edge", edge), ep("dc-paris", "datacenter", dc)], registry) as (http, _, _):
            resp = await infer(http)
    assert resp.status_code == 429, resp.text
    assert failovers(registry) == {"edge-paris": 1}  # dc-paris, the last tried, moved the request nowhere
