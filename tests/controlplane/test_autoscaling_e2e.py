"""Autoscaling with real agents: traffic through the client grows a deployment's replica
count to its max, and the count falls back to min once traffic stops and the scale-down
delay has passed."""

from __future__ import annotations

import asyncio
import pathlib

import httpx
import numpy as np
import pytest_asyncio

from orchestrator import client as client_mod
from orchestrator.testing import harness, manifests, onnx_models

SITES = {
    "edge-paris": dict(country="FR", lat=48.8566, lon=2.3522),
    "edge-berlin": dict(country="DE", lat=52.52, lon=13.405),
    "edge-madrid": dict(country="ES", lat=40.4168, lon=-3.7038),
}


def fleet_yaml(sha256: str) -> str:
    scaled = manifests.doc("ModelDeployment", "scaled-eu", {
        "model": "scaled",
        "replicas": {"min": 1, "max": 3},
        "placement": {"residency": ["EU"], "tiers": ["edge"], "spread": {"by": "site", "maxSkew": 1}},
        "autoscaling": {"targetRps": 20, "scaleDownDelaySeconds": 2},
    })
    return manifests.bundle(*(manifests.edge_site(n, **w) for n, w in SITES.items()),
                            manifests.onnx_model("scaled", "scaled.onnx", sha256), scaled)


@pytest_asyncio.fixture
async def fleet(tmp_path: pathlib.Path):
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "scaled.onnx", in_dim=8, hidden=16, out_dim=4, seed=9)
    f = harness.Fleet(tmp_path)
    try:
        cp = await f.start_control_plane(resync_s=0.5)
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            resp = await http.post("/v1/apply", content=fleet_yaml(built.sha256))
            assert resp.status_code == 200, resp.text
        for site, where in SITES.items():
            await f.start_agent(site, **where)
        yield f
    finally:
        await f.stop()


def replicas(cp) -> int:  # noqa: ANN001
    return sum(p.replicas for p in cp.store.placements() if p.deployment == "scaled-eu")


async def test_traffic_scales_a_deployment_up_to_max_and_back_down(fleet: harness.Fleet) -> None:
    cp = fleet.cp
    assert cp is not None
    await harness.wait_until(lambda: any(e.healthy for e in cp.table.endpoints("scaled")), 60, what="first replica")
    assert replicas(cp) == 1
    x = np.full((1, 8), 0.5, dtype=np.float32)
    stop = asyncio.Event()

    async def traffic() -> int:
        sent = 0
        async with client_mod.AsyncClient(cp.http_url, location=(48.85, 2.35)) as c:
            while not stop.is_set() and sent < 4000:  # ~80 rps: four times the target of one replica
                await c.infer("scaled", {"input": x})
                sent += 1
                await asyncio.sleep(0.0125)
        return sent

    sender = asyncio.create_task(traffic())
    try:
        await harness.wait_until(lambda: replicas(cp) == 3, 40, what="scale-up to max (3)")
        obj = cp.store.get("ModelDeployment", "scaled-eu")
        await harness.wait_until(lambda: (o := cp.store.get("ModelDeployment", "scaled-eu")) is not None
                                 and o.status.get("autoscaling", {}).get("desiredReplicas") == 3, 10, what="status")
        obj = cp.store.get("ModelDeployment", "scaled-eu")
        assert obj is not None
        scaling = obj.status["autoscaling"]
        assert scaling["metric"] == "rps" and scaling["target"] == 20 and scaling["observedPerReplica"] > 20 / 3
        assert replicas(cp) == 3  # never above max
    finally:
        stop.set()
        sent = await sender
    assert sent > 40
    await harness.wait_until(lambda: replicas(cp) == 1, 40, what="scale-down to min once traffic stopped")
