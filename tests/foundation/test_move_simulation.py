"""A what-if asked while a replica moves plans as the pass would: the room the moved
replica holds on the site it leaves until its replacement serves is not free to the
what-if either, so it never promises a placement the pass refuses."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from orchestrator.api import simulate as api_simulate
from orchestrator.manifests import loader, schema
from orchestrator.reconciler import inventory, planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.simulation import scenario, whatif
from orchestrator.testing import manifests

from . import test_reconcile_repair, test_views
from .test_maintenance_planning import _deployment_status, _rows


def _fleet(first: str, second: str | None, cores_a: int = 8) -> snap.Snapshot:
    """Three edge sites of 8 cores (zones a, b and c; edge-a of ``cores_a``) with their
    agents, and two 6-core models: one replica fills a site of 8. ``first`` runs in that
    zone; ``second`` in that zone, or anywhere in France (None)."""
    text = manifests.bundle(
        *(manifests.doc("Site", f"edge-{z}", {"tier": "edge", "location": {"country": "FR", "lat": 48.0, "lon": 2.3}},
                        labels={"zone": z}) for z in "abc"),
        *(manifests.doc("Model", m, {"variants": [{"name": "cpu", "runtime": "onnx", "artifact": {"uri": f"{m}.onnx", "sha256": "0" * 64},
                                                   "resources": {"cpu": 6, "memoryMiB": 1024}}]}) for m in ("m1", "m2")),
        manifests.deployment("first", "m1", 1, {"residency": ["FR"], "siteSelector": {"zone": first}}),
        manifests.deployment("second", "m2", 1, {"residency": ["FR"], **({"siteSelector": {"zone": second}} if second else {})}))
    s = test_views.example_snapshot(loader.load_text(text))
    agents = [test_reconcile_repair.joined(f"edge-{z}") for z in "abc"]
    agents[0] = dataclasses.replace(agents[0], capacity=dataclasses.replace(agents[0].capacity, cpu_cores=cores_a))
    return dataclasses.replace(s, agents=tuple(agents))


def _moving(cores_a: int = 8) -> snap.Snapshot:
    """first moves from edge-a to edge-b, where its replacement does not serve yet: edge-a
    holds its room meanwhile. second runs on edge-c and may run anywhere in France."""
    before = _fleet("a", "c", cores_a)
    before = dataclasses.replace(before, placements=_rows(planning.plan_pass(before), before))
    moved = dataclasses.replace(_fleet("b", None, cores_a), placements=before.placements)
    moving = dataclasses.replace(moved, placements=_rows(planning.plan_pass(moved), moved))
    assert Counter((r.deployment, r.site) for r in moving.placements) == Counter(
        {("first", "edge-a"): 1, ("first", "edge-b"): 1, ("second", "edge-c"): 1})
    return moving


def _watts(s: snap.Snapshot, model: str) -> float:
    """What one replica of ``model`` draws (its one variant's estimate; edge sites' PUE is 1)."""
    (variant,) = s.models[model].variants
    return inventory.to_variant(variant).watts


def _agent_lost(s: snap.Snapshot, site: str) -> snap.Snapshot:
    return dataclasses.replace(s, agents=tuple(dataclasses.replace(a, healthy=False) if a.site == site else a for a in s.agents))


def _budget(s: snap.Snapshot, site: str, watts: float) -> snap.Snapshot:
    return dataclasses.replace(s, sites=tuple(
        dataclasses.replace(r, spec=r.spec.model_copy(update={"energy": schema.Energy(carbonGramsPerKWh=50, powerBudgetWatts=watts)}))
        if r.name == site else r for r in s.sites))


@pytest.mark.parametrize("cores_a, what_if, happens", [
    (8, "spec: {fail: {sites: [edge-c]}}", lambda s: _agent_lost(s, "edge-c")),
    (8, "spec: {sites: {edge-c: {powerBudgetWatts: 1}}}", lambda s: _budget(s, "edge-c", 1)),
    # edge-a has the cores for both, and the what-if gives it the budget of one and a half
    (16, "spec: {fail: {sites: [edge-c]}, sites: {edge-a: {powerBudgetWatts: %s}}}",
     lambda s: _budget(_agent_lost(s, "edge-c"), "edge-a", 1.5 * _watts(s, "m1"))),
], ids=["fail-site", "power-budget", "power-budget-of-the-site-holding"])
def test_a_what_if_during_a_move_holds_the_moved_replica_s_room_as_the_pass_does(cores_a, what_if, happens) -> None:  # type: ignore[no-untyped-def]
    """second must leave edge-c; edge-b is full, and edge-a's room is first's until its
    replacement serves: the pass leaves second waiting, and the what-if says the same."""
    moving = _moving(cores_a)
    what_if = (what_if % (1.5 * _watts(moving, "m1")) if "%s" in what_if else what_if).encode()
    real = planning.plan_pass(happens(moving))
    assert real.result.deployments["second"].placed == 0
    status = _deployment_status(real, "second")
    assert status["phase"] == "Progressing" and "1 replica waits for room on site edge-a" in str(status["reason"]), status
    state = api_simulate.state_of(moving)
    report = whatif.simulate(state, scenario.load_text(what_if, "<test>"))
    assert Counter((r.deployment, r.site, r.variant) for r in report.replicas) == Counter(
        (r.deployment, r.site, r.variant) for r in real.result.replicas), report.replicas
    answer = api_simulate.answer(state, what_if)
    assert not [a for a in answer["added"] if a["deployment"] == "second"], answer["added"]
    (second,) = [x for x in answer["unschedulable"] if x["deployment"] == "second"]
    assert (second["phase"], second["placed"], second["newlyShort"]) == ("Progressing", 0, 0), second
    assert "1 replica waits for room on site edge-a" in second["reason"], second
    assert answer["summary"]["unschedulableReplicas"] == 0, answer["summary"]
