"""A model with two deployments, each with its cascade, in different jurisdictions: a call
by the model's name runs the cascade of the deployment plain routing would send the caller
to, as a model without cascades is served by any of its deployments. The gateway's routes
and table are real; the upstream is the in-memory transport (a constructor seam)."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from orchestrator.gateway import cascade, cascade_rules, endpoints, proxy, routing

from .transport import Transport

pytestmark = pytest.mark.asyncio

RULE = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8)


def route(deployment: str) -> cascade_rules.CascadeRoute:
    return cascade_rules.CascadeRoute("task", deployment, (
        cascade_rules.StageRoute("small", frozenset({"edge"}), RULE),
        cascade_rules.StageRoute("large", frozenset({"datacenter"}), None),
    ))


EU, CH = route("task-eu"), route("task-ch")


def ep(deployment: str, site: str, tier: str, country: str, lat: float, lon: float) -> routing.Endpoint:
    return routing.Endpoint(model="task", deployment=deployment, site=site, tier=tier, country=country, region="", lat=lat, lon=lon,
                            url=f"http://{site}")


FLEET = [ep("task-eu", "edge-fr", "edge", "FR", 48.85, 2.35), ep("task-eu", "dc-de", "datacenter", "DE", 50.1, 8.7),
         ep("task-ch", "edge-ch", "edge", "CH", 46.2, 6.1), ep("task-ch", "dc-ch", "datacenter", "CH", 47.4, 8.5)]


def gateway(fleet: list[routing.Endpoint] = FLEET,
            cascades: tuple[cascade_rules.CascadeRoute, ...] = (EU, CH)) -> tuple[Starlette, Transport]:
    table = endpoints.EndpointTable()
    table.replace(fleet)
    # as the reconciler publishes them: each under its deployment's name, the model's name to the first
    table.set_cascades({"task": cascades[0], **{c.deployment: c for c in cascades}})
    transport = Transport({e.url: "sure" for e in fleet})
    registry = CollectorRegistry()
    handler = cascade.CascadeHandler(table, transport, cascade.CascadeMetrics.create(registry))  # type: ignore[arg-type]
    gw = proxy.Gateway(table, transport, proxy.GatewayMetrics.create(registry), cascade=handler)  # type: ignore[arg-type]
    return Starlette(routes=gw.routes()), transport


@pytest.mark.parametrize(("where", "residency", "site"), [
    ("46.20,6.14", "CH", "edge-ch"),  # only task-ch runs in the caller's residency
    ("48.85,2.35", "FR", "edge-fr"),  # only task-eu does
    ("46.50,6.60", None, "edge-ch"),  # either may serve: the nearest
])
async def test_a_call_by_the_model_name_runs_the_cascade_the_caller_may_use(where: str, residency: str | None, site: str) -> None:
    app, transport = gateway()
    headers = {"x-edgeplane-location": where, **({"x-edgeplane-residency": residency} if residency else {})}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        resp = await http.post("/v2/models/task/infer", content=b"{}", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-edgeplane-site"] == site and transport.calls == [f"http://{site}"]


async def test_a_call_by_a_deployment_name_runs_that_deployment_cascade_only() -> None:
    app, transport = gateway()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        resp = await http.post("/v2/models/task-eu/infer", content=b"{}", headers={"x-edgeplane-residency": "CH"})
    assert resp.status_code == 503 and transport.calls == [], resp.text
    assert "cascade 'task-eu'" in resp.json()["error"]


GENEVA = {"x-edgeplane-location": "46.20,6.14"}  # nearest to task-ch's replicas, stating no residency


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("POST", "/v2/models/task-eu/infer", {"x-edgeplane-cascade": "off"}),  # plain routing, by the deployment's name
    ("POST", "/v2/models/task-eu/versions/0123456789ab/infer", {}),
    ("GET", "/v2/models/task-eu", {}),
    ("GET", "/v2/models/task-eu/versions/0123456789ab/ready", {}),
    ("GET", "/v2/models/task-eu/ready", {}),
])
async def test_every_route_by_a_deployment_name_is_answered_by_that_deployment_only(method: str, path: str,
                                                                                    headers: dict[str, str]) -> None:
    app, transport = gateway()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        resp = await http.request(method, path, content=b"{}" if method == "POST" else None, headers={**GENEVA, **headers})
    assert resp.status_code == 200, resp.text
    # task-ch's Swiss replicas are nearer, but task-eu's residency is the EU's
    assert resp.headers["x-edgeplane-site"] in ("edge-fr", "dc-de")
    assert set(transport.calls) <= {"http://edge-fr", "http://dc-de"}, transport.calls


async def test_a_deployment_name_whose_replicas_are_all_down_is_not_answered_by_another_deployment() -> None:
    app, transport = gateway([dataclasses.replace(e, healthy=e.deployment != "task-eu") for e in FLEET])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        resp = await http.post("/v2/models/task-eu/infer", content=b"{}", headers={**GENEVA, "x-edgeplane-cascade": "off"})
    assert resp.status_code == 503 and transport.calls == [], resp.text


async def test_a_call_by_the_model_name_is_served_by_a_deployment_without_a_cascade_when_only_it_may_serve_the_caller() -> None:
    us = dataclasses.replace(ep("task-us", "edge-us", "edge", "US", 40.7, -74.0), allowed_countries=frozenset({"US"}))
    app, transport = gateway([*FLEET[:2], us], cascades=(EU,))  # task-us has no cascade
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        resp = await http.post("/v2/models/task/infer", content=b"{}", headers={"x-edgeplane-residency": "US"})
        anyone = await http.post("/v2/models/task/infer", content=b"{}", headers={"x-edgeplane-location": "40.7,-74.0"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-edgeplane-site"] == "edge-us" and "x-edgeplane-cascade-stage" not in resp.headers
    # a caller task-eu may serve still runs its cascade, however near task-us is
    assert anyone.status_code == 200 and anyone.headers["x-edgeplane-cascade-stage"] == "small", anyone.text
    assert transport.calls == ["http://edge-us", "http://edge-fr"]
