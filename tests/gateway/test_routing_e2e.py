"""The gateway with real agents: nearest wins, residency is never crossed, failover."""

from __future__ import annotations

import asyncio
import signal

import httpx
import numpy as np
import pytest

from orchestrator import client as client_mod
from orchestrator.gatewayd import server as gatewayd
from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}


@pytest.mark.parametrize(
    "location, expected",
    [("48.9,2.4", "edge-paris"), ("52.4,13.3", "edge-berlin"), ("40.3,-3.6", "edge-madrid"), ("50.9,4.4", "edge-paris"), ("48.1,11.6", "edge-berlin")],
)
async def test_nearest_replica_answers(fleet: harness.Fleet, location: str, expected: str) -> None:
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        resp = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-location": location})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-edgeplane-site"] == expected
    out = resp.json()["outputs"][0]
    assert out["shape"] == [1, 4] and abs(sum(out["data"]) - 1.0) < 1e-5  # softmax


async def test_region_header_routes_to_that_region(fleet: harness.Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        resp = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-region": "es"})
    assert resp.headers["x-edgeplane-site"] == "edge-madrid"


async def test_caller_residency_is_respected_even_when_far(fleet: harness.Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        # A caller in Madrid whose data must stay in Germany is answered from Berlin.
        resp = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-location": "40.4,-3.7", "x-edgeplane-residency": "DE"})
        assert resp.headers["x-edgeplane-site"] == "edge-berlin"
        refused = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-residency": "PL"})
    assert refused.status_code == 503
    assert "residency" in refused.json()["error"]


async def test_bad_caller_headers_are_400(fleet: harness.Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        a = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-location": "north"})
        b = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-residency": "Narnia"})
        c = await http.post("/v2/models/nope/infer", json=BODY)
    assert (a.status_code, b.status_code, c.status_code) == (400, 400, 404)


async def test_a_residency_that_names_no_country_is_400_never_any_country(fleet: harness.Fleet) -> None:
    """Read as "no restriction", a list of commas would be served from anywhere; read as a
    country, a code that is none ("UK": ISO says GB) would be a 503 "no replica there"."""
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        answers = {value: await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-residency": value})
                   for value in (",", ", ,", ",,", "UK", "DE,XX")}
        listed = await http.get("/v1/endpoints/intent", params={"residency": ","})
    for value, resp in answers.items():
        assert resp.status_code == 400 and "x-edgeplane-site" not in resp.headers, (value, resp.status_code, resp.text)
    assert answers[","].json()["error"].startswith("X-Edgeplane-Residency: ',' names no country")
    assert answers["UK"].json()["error"].startswith("X-Edgeplane-Residency: 'UK' is neither an ISO 3166 alpha-2 country code")
    assert listed.status_code == 400 and "query parameter residency" in listed.text


async def test_a_tokens_residency_routes_its_requests_whatever_the_header_leaves_out(fleet: harness.Fleet) -> None:
    """A token scoped to DE, at a gateway with --gateway-auth token: a caller in Paris that
    sends no residency is answered from Berlin, not its nearest replica; the FR-only model
    has no replica it may reach; the endpoint list ranks Berlin alone. An unscoped token's
    caller is answered from Paris, as before."""
    secret, _ = fleet.cp.store.create_token("api", "read", None, "test", "tenant de", residency=["DE"])
    plain, _ = fleet.cp.store.create_token("api", "read", None, "test", "any")
    config = gatewayd.GatewayConfig(control_planes=(fleet.cp.http_url,), port=0, gateway_auth="token")
    gw = await gatewayd.StandaloneGateway(config).start()
    try:
        assert await gw.follower.wait_snapshot(0, 60)
        paris = {"x-edgeplane-location": "48.9,2.4"}
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=60, headers={"authorization": f"Bearer {secret}"}) as http:
            held = await http.post("/v2/models/intent/infer", json=BODY, headers=paris)
            fr_only = await http.post("/v2/models/fields/infer", json=BODY, headers=paris)
            listed = await http.get("/v1/endpoints/intent", params={"lat": "48.9", "lon": "2.4"})
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=60, headers={"authorization": f"Bearer {plain}"}) as http:
            free = await http.post("/v2/models/intent/infer", json=BODY, headers=paris)
    finally:
        await gw.stop()
    assert held.status_code == 200 and held.headers["x-edgeplane-site"] == "edge-berlin", held.text
    assert fr_only.status_code == 503 and "caller's residency (DE)" in fr_only.json()["error"]
    assert [e["site"] for e in listed.json()["endpoints"]] == ["edge-berlin"], listed.text
    assert free.status_code == 200 and free.headers["x-edgeplane-site"] == "edge-paris"


async def test_names_no_deployment_serves_add_no_metric_series(fleet: harness.Fleet) -> None:
    """The model label is the caller's text in the path: one series per made-up name would
    grow the gateway's memory and /metrics without bound."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        for i in range(20):
            assert (await http.post(f"/v2/models/scan-{i}/infer", json=BODY)).status_code == 404
            assert (await http.post(f"/v2/models/scan-{i}/infer", json=BODY, headers={"x-edgeplane-location": "north"})).status_code == 400
            assert (await http.post("/openai/v1/chat/completions", json={**chat, "model": f"scan-{i}"})).status_code == 404
        assert (await http.post("/v2/models/intent/infer", json=BODY)).status_code == 200
        metrics = (await http.get("/metrics")).text
    labelled = {line.split('model="', 1)[1].split('"', 1)[0] for line in metrics.splitlines()
                if line.startswith("edgeplane_gateway_") and 'model="' in line}
    assert "scan-0" not in labelled and {"intent", "_unknown"} <= labelled, sorted(labelled)
    assert 'edgeplane_gateway_requests_total{code="404",model="_unknown",site=""}' in metrics


async def test_wrong_shape_is_the_replicas_400_not_a_failover(fleet: harness.Fleet) -> None:
    bad = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0.1] * 3}]}
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        resp = await http.post("/v2/models/intent/infer", json=bad)
    assert resp.status_code == 400
    assert all(e.healthy for e in fleet.cp.table.endpoints("intent"))
    assert not fleet.cp.table.ejected()


async def test_v2_health_and_metadata(fleet: harness.Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.cp.http_url) as http:
        assert (await http.get("/v2/health/live")).status_code == 200
        assert (await http.get("/v2/health/ready")).status_code == 200
        meta = await http.get("/v2/models/intent", headers={"x-edgeplane-location": "52.5,13.4"})
        ready = await http.get("/v2/models/intent/ready")
        endpoints = await http.get("/v1/endpoints/intent", params={"lat": 40.4, "lon": -3.7})
        by_region = await http.get("/v1/endpoints/intent", params={"region": "es"})  # a caller who knows only its region
    assert meta.status_code == 200 and meta.json()["inputs"][0]["name"] == "input"
    assert meta.headers["x-edgeplane-site"] == "edge-berlin"
    assert ready.status_code == 200
    sites = [e["site"] for e in endpoints.json()["endpoints"]]
    assert sites[0] == "edge-madrid" and set(sites) == {"edge-paris", "edge-berlin", "edge-madrid"}
    times = [e["expectedMs"] for e in endpoints.json()["endpoints"]]
    assert times == sorted(times)
    assert by_region.json()["endpoints"][0]["site"] == "edge-madrid"


async def test_residency_never_crossed_when_the_only_allowed_replica_dies(fleet: harness.Fleet) -> None:
    """fields-fr may only run and answer in FR: with the FR agent gone it is 503, not Berlin."""
    cp = fleet.cp
    [endpoint] = cp.table.endpoints("fields")
    assert endpoint.site == "edge-paris"
    paris = fleet.agents["edge-paris"]
    paris.kill(signal.SIGSTOP)  # frozen: connections hang, heartbeats stop
    try:
        await harness.wait_until(lambda: not cp.hub.status("edge-paris").healthy, 15, what="paris unhealthy")
        await harness.wait_until(lambda: not any(e.healthy for e in cp.table.endpoints("fields")), 15, what="fields endpoint unhealthy")
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            resp = await http.post("/v2/models/fields/infer", json=BODY, headers={"x-edgeplane-location": "52.5,13.4"})
        assert resp.status_code == 503, resp.text
        assert "x-edgeplane-site" not in resp.headers
        placed = {(p.deployment, p.site) for p in cp.store.placements()}
        assert not any(d == "fields-fr" and s != "edge-paris" for d, s in placed)
    finally:
        paris.kill(signal.SIGCONT)
    await harness.wait_until(lambda: cp.hub.status("edge-paris").healthy, 20, what="paris back")
    await harness.wait_until(lambda: any(e.healthy for e in cp.table.endpoints("fields")), 20, what="fields endpoint back")


async def test_kill_9_during_a_stream_loses_no_client_request(fleet: harness.Fleet) -> None:
    cp = fleet.cp
    berlin = fleet.agents["edge-berlin"]
    x = np.full((1, 8), 0.2, dtype=np.float32)
    served: list[str] = []
    async with client_mod.AsyncClient(cp.http_url, location=(52.5, 13.4)) as c:
        first = await c.infer("intent", {"input": x})
        assert first.site == "edge-berlin"
        for i in range(120):
            if i == 20:
                berlin.kill(signal.SIGKILL)
            result = await c.infer("intent", {"input": x})
            served.append(result.site)
            await asyncio.sleep(0.01)
    assert len(served) == 120  # no exception: every request was answered
    assert served[:20] == ["edge-berlin"] * 20
    assert "edge-berlin" not in served[25:]
    # the gateway stops routing to it too
    await harness.wait_until(lambda: not any(e.healthy and e.site == "edge-berlin" for e in cp.table.endpoints("intent")), 15, what="berlin out of rotation")
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        resp = await http.post("/v2/models/intent/infer", json=BODY, headers={"x-edgeplane-location": "52.5,13.4"})
    assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] != "edge-berlin"
    # and the placement heals: berlin's replica moves elsewhere within the EU
    await harness.wait_until(lambda: all(p.site != "edge-berlin" for p in cp.store.placements() if p.deployment == "intent-eu"), 20, what="replica moved")


async def test_sync_client_calls_the_nearest_replica_directly(fleet: harness.Fleet) -> None:
    x = np.full((2, 8), 0.3, dtype=np.float32)

    def call(**where: object) -> client_mod.InferResult:
        with client_mod.Client(fleet.cp.http_url, binary=True, **where) as c:  # type: ignore[arg-type]
            first = c.infer("intent", {"input": x})
            assert c.cache.fresh(c.listing_key("intent"))
            return first

    by_region = await asyncio.to_thread(call, region="es")  # the endpoint list is ranked from the region too
    assert by_region.site == "edge-madrid" and by_region.url != fleet.cp.http_url
    result = await asyncio.to_thread(call, location=(40.4, -3.7))
    assert result.site == "edge-madrid" and result.attempts == 1
    assert result.url != fleet.cp.http_url  # direct, not through the gateway
    assert result["output"].shape == (2, 4)
    np.testing.assert_allclose(result["output"].sum(axis=1), 1.0, rtol=1e-5)


async def test_client_residency_refusal_is_no_endpoint(fleet: harness.Fleet) -> None:
    async with client_mod.AsyncClient(fleet.cp.http_url, residency="PL") as c:
        with pytest.raises(client_mod.NoEndpoint):
            await c.infer("intent", {"input": np.zeros((1, 8), dtype=np.float32)})
