"""A cascade whose deployment was scaled to zero wakes like a plain model, whichever name
it is called by (its model's or its deployment's): the request asks for a replica, waits
for it, then runs the cascade. The gateway's routes and table are real; the upstream is
the in-memory transport (a constructor seam)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from orchestrator.gateway import cascade, cascade_rules, endpoints, proxy, routing

from .transport import Transport

pytestmark = pytest.mark.asyncio

RULE = cascade_rules.TensorRule("p", logits=False, measure="top", below=0.8)
ROUTE = cascade_rules.CascadeRoute("m", "dep", (
    cascade_rules.StageRoute("small", frozenset({"edge"}), RULE),
    cascade_rules.StageRoute("large", frozenset({"datacenter"}), None),
))
EDGE = routing.Endpoint(model="m", deployment="dep", site="edge-fr", tier="edge", country="FR", region="", lat=48.8, lon=2.3,
                        url="http://edge-fr")
BODY = b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'


def cold_gateway(cold_start_s: float = 30.0) -> tuple[Starlette, endpoints.EndpointTable]:
    table = endpoints.EndpointTable()
    table.replace([], deployed={"m": "scaled to zero"}, cold=["m"])
    table.set_cascades({"m": ROUTE, "dep": ROUTE})
    transport = Transport({"http://edge-fr": "sure"})
    registry = CollectorRegistry()
    handler = cascade.CascadeHandler(table, transport, cascade.CascadeMetrics.create(registry))  # type: ignore[arg-type]
    gateway = proxy.Gateway(table, transport, proxy.GatewayMetrics.create(registry), cold_start_s=cold_start_s,  # type: ignore[arg-type]
                            cascade=handler)
    return Starlette(routes=gateway.routes()), table


@pytest.mark.parametrize("name", ["m", "dep"])
async def test_a_cold_cascade_is_woken_and_answers_by_either_name(name: str) -> None:
    app, table = cold_gateway()
    # the autoscaler's replica, published as the wake asks for it
    table.on_wake = lambda model: asyncio.get_running_loop().call_soon(table.replace, [EDGE], None, {"m": ""}, [])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        resp = await http.post(f"/v2/models/{name}/infer", content=BODY, headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-edgeplane-cascade-stage"] == "small" and resp.headers["x-edgeplane-site"] == "edge-fr"
    assert table.wakes == {"m": 1}


async def test_a_cold_cascade_with_no_replica_in_time_says_retry_by_either_name() -> None:
    app, table = cold_gateway(cold_start_s=0.05)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        answers = [await http.post(f"/v2/models/{name}/infer", content=BODY) for name in ("m", "dep")]
    for resp in answers:
        assert resp.status_code == 503 and resp.headers["retry-after"] == "5", resp.text
        assert "was scaled to zero" in resp.json()["error"]
    assert table.wakes == {"m": 2}
