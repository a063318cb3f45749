"""Scale to zero and back with a real agent: an autoscaled deployment with ``min: 0``
runs nothing until a request comes; the gateway holds that request while the autoscaler
places a replica and the agent loads it, answers it from there, and the deployment goes
back to zero replicas once traffic stops and the scale-down delay has passed."""

from __future__ import annotations

import pathlib

import httpx
import numpy as np
import pytest_asyncio

from edgeplane_proto import oip
from orchestrator.gatewayd import server as gatewayd
from orchestrator.testing import harness, manifests, onnx_models

SITE = dict(country="FR", lat=48.8566, lon=2.3522)


@pytest_asyncio.fixture
async def fleet(tmp_path: pathlib.Path):
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "lazy.onnx", in_dim=8, hidden=16, out_dim=4, seed=4)
    body = manifests.bundle(
        manifests.edge_site("edge-paris", **SITE),
        manifests.onnx_model("lazy", "lazy.onnx", built.sha256),
        manifests.doc("ModelDeployment", "lazy-fr", {
            "model": "lazy",
            "replicas": {"min": 0, "max": 1},
            "placement": {"residency": ["FR"], "tiers": ["edge"]},
            "autoscaling": {"targetRps": 10, "scaleDownDelaySeconds": 1},
        }),
    )
    async with harness.serving_fleet(tmp_path, body, {"edge-paris": SITE}, resync_s=0.5) as f:
        yield f


def placed(cp) -> int:  # noqa: ANN001
    return sum(p.replicas for p in cp.store.placements() if p.deployment == "lazy-fr")


def phase(cp, deployment: str = "lazy-fr") -> str:  # noqa: ANN001
    obj = cp.store.get("ModelDeployment", deployment)
    return obj.status.get("phase", "") if obj is not None else ""


async def test_a_request_starts_a_replica_and_idleness_removes_it(fleet: harness.Fleet) -> None:
    cp = fleet.cp
    assert cp is not None
    await harness.wait_until(lambda: phase(cp) == "ScaledToZero", 30, what="the deployment at zero")
    assert placed(cp) == 0 and not cp.table.endpoints("lazy")

    x = np.full((2, 8), 0.25, dtype=np.float32)
    body, _ = oip.encode_request({"input": x})
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=60) as http:
        # the first request waits for its replica (cold start) and is answered by it
        resp = await http.post("/v2/models/lazy/infer", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-edgeplane-site"] == "edge-paris"
        assert np.asarray(resp.json()["outputs"][0]["data"]).size == 2 * 4
        assert placed(cp) == 1
        metrics = (await http.get("/metrics")).text
        assert 'edgeplane_gateway_cold_starts_total{model="lazy"} 1.0' in metrics
        # warm now: answered without waiting on anything
        resp = await http.post("/v2/models/lazy/infer", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 200

    # no more traffic: back to zero once the delay has passed, and the agent unloads it
    await harness.wait_until(lambda: placed(cp) == 0, 60, what="scale back to zero")
    await harness.wait_until(lambda: phase(cp) == "ScaledToZero", 30, what="phase ScaledToZero")

    def unloaded() -> bool:
        agent = cp.hub.status("edge-paris")
        return agent is not None and agent.healthy and "lazy" not in agent.models

    await harness.wait_until(unloaded, 30, what="the agent unloaded the model")


async def test_a_replica_that_cannot_start_gives_a_503_after_the_cold_start_timeout(fleet: harness.Fleet) -> None:
    cp = fleet.cp
    assert cp is not None
    cp.gateway.cold_start_s = 0.5
    body = manifests.bundle(manifests.doc("ModelDeployment", "lazy-de", {
        "model": "lazy",  # the same model, but only Germany may serve this deployment: no site there
        "replicas": {"min": 0, "max": 1},
        "placement": {"residency": ["DE"], "tiers": ["edge"]},
        "autoscaling": {"targetRps": 10},
    }))
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert (await http.delete("/v1/modeldeployments/lazy-fr")).status_code == 200
        assert (await http.post("/v1/apply", content=body)).status_code == 200
        # lazy-fr was cold too: wait for a pass that has seen lazy-de, not for the old state
        await harness.wait_until(lambda: phase(cp, "lazy-de") == "ScaledToZero" and cp.table.is_cold("lazy")
                                 and not cp.table.endpoints("lazy"), 30, what="lazy-de cold")
        x, _ = oip.encode_request({"input": np.zeros((1, 8), dtype=np.float32)})
        resp = await http.post("/v2/models/lazy/infer", content=x, headers={"content-type": "application/json"})
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "5"
    assert "scaled to zero" in resp.json()["error"]
    assert cp.table.wakes["lazy"] >= 1


async def test_a_request_at_a_standalone_gateway_wakes_the_model(fleet: harness.Fleet) -> None:
    cp = fleet.cp
    assert cp is not None
    await harness.wait_until(lambda: phase(cp) == "ScaledToZero", 30, what="the deployment at zero")
    gw = await gatewayd.StandaloneGateway(gatewayd.GatewayConfig(control_planes=(cp.http_url,), port=0)).start()
    try:
        assert await gw.follower.wait_snapshot(0, 60)
        await harness.wait_until(lambda: gw.table.is_cold("lazy"), 30, what="the gateway's table to show lazy cold")
        body, _ = oip.encode_request({"input": np.full((1, 8), 0.25, dtype=np.float32)})
        async with httpx.AsyncClient(base_url=gw.http_url, timeout=60) as http:
            # the wake goes to the control plane (POST /v1/wake/lazy); the replica comes back through the watch
            resp = await http.post("/v2/models/lazy/infer", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-edgeplane-site"] == "edge-paris"
        assert cp.table.wakes["lazy"] >= 1 and gw.table.wakes["lazy"] == 1
    finally:
        await gw.stop()
