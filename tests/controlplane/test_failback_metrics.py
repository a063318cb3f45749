"""An edge site lost and back, on a real fleet (a control plane in-process, two
``edgeplane-agent`` processes on loopback, ``--failback-after`` 1 s): its replica moves to
the other site, and back once the site has stayed healthy for the hold-down; the control
plane's ``/metrics`` counts the replica moved back, where an operator's alert reads it."""

from __future__ import annotations

import pathlib
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.testing import harness, manifests, onnx_models

SITES = {"edge-a": 48.0, "edge-b": 49.0}


async def failed_back(cp: Any) -> float:
    """``edgeplane_failback_replicas_total`` as the control plane's ``/metrics`` gives it."""
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        text = (await http.get("/metrics")).text
    (value,) = [s.value for f in text_string_to_metric_families(text) if f.name == "edgeplane_failback_replicas"
                for s in f.samples if s.name == "edgeplane_failback_replicas_total"]
    return value


def placed_on(cp: Any) -> set[str]:
    return {r.site for r in cp.store.placements() if r.deployment == "intent-fr" and r.replicas}


async def test_a_replica_moved_back_after_the_hold_down_is_counted_on_metrics(tmp_path: pathlib.Path) -> None:
    model = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    fleet_yaml = manifests.bundle(
        *(manifests.edge_site(name, "FR", lat, 2.35, region="fr") for name, lat in SITES.items()),
        manifests.onnx_model("intent", model.path.name, model.sha256),
        manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}))
    agents = {name: dict(country="FR", region="fr", lat=lat, lon=2.35) for name, lat in SITES.items()}

    def serving(cp: Any) -> set[str]:
        return {e.site for e in cp.table.endpoints("intent") if e.healthy}

    async with harness.serving_fleet(tmp_path, fleet_yaml, agents, artifact_roots=(model.path.parent,), ready=serving,
                                     timeout=90, what="the replica", failback_after_s=1.0, resync_s=0.3) as fleet:
        cp = fleet.cp
        assert cp is not None
        (home,) = serving(cp)
        (other,) = set(SITES) - {home}
        assert await failed_back(cp) == 0

        fleet.agents[home].kill()
        await harness.wait_until(lambda: serving(cp) == {other} and placed_on(cp) == {other}, 60, what=f"the replica moved to {other}")
        assert await failed_back(cp) == 0  # a loss is no failback

        await fleet.restart_agent(home)
        await harness.wait_until(lambda: serving(cp) == {home} and placed_on(cp) == {home}, 60, what=f"the replica back on {home}")
        assert await failed_back(cp) == 1
