"""A live what-if of a site lost answers as the pass would act: a pass holding a plan in
force repairs it, moving the lost replicas only and where the repair puts them, which
need not be where a full plan would; the what-if repairs a copy of the same plan, says
so (``method``), and leaves the plan in force as it was."""

from __future__ import annotations

import dataclasses
from collections import Counter

from orchestrator.api import simulate as api_simulate
from orchestrator.manifests import loader
from orchestrator.reconciler import planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.testing import manifests

from . import test_views
from .test_maintenance_planning import _rows

LYON_DARK = b"spec: {fail: {sites: [dc-lyon]}}"


def _dc(name: str, lat: float, lon: float, cpu: int) -> str:
    return manifests.doc("Site", name, {"tier": "datacenter", "location": {"country": "FR", "lat": lat, "lon": lon},
                                        "capacity": {"cpu": cpu, "memoryGiB": 64}, "ray": {"address": "local"}})


def _at_rest() -> tuple[snap.Snapshot, planning.PassPlan]:
    """Three French data centres and one deployment of three 3-core replicas with demand in
    Lyon and Marseille, placed (one in Lyon, two in Marseille) and at rest: the second pass
    changes nothing and keeps its plan as the one in force."""
    text = manifests.bundle(
        _dc("dc-paris", 48.86, 2.35, 16), _dc("dc-lyon", 45.76, 4.84, 16), _dc("dc-marseille", 43.30, 5.37, 12),
        manifests.doc("Model", "m", {"variants": [{"name": "cpu", "runtime": "onnx", "artifact": {"uri": "m.onnx", "sha256": "0" * 64},
                                                   "resources": {"cpu": 3, "memoryMiB": 1024}}]}),
        manifests.doc("ModelDeployment", "d", {"model": "m", "replicas": {"min": 3, "max": 3}, "placement": {"residency": ["FR"]},
                                               "demand": [{"lat": 45.76, "lon": 4.84, "rps": 10}, {"lat": 43.30, "lon": 5.37, "rps": 10}]}))
    first = test_views.example_snapshot(loader.load_text(text))
    placed = dataclasses.replace(first, placements=_rows(planning.plan_pass(first), first))
    assert Counter((r.site, r.replicas) for r in placed.placements) == Counter({("dc-lyon", 1): 1, ("dc-marseille", 2): 1})
    second = planning.plan_pass(placed)
    assert second.standing is not None and _rows(second, placed) == placed.placements
    return placed, second


def _lost(s: snap.Snapshot, site: str) -> snap.Snapshot:
    return dataclasses.replace(s, datacentres={**s.datacentres, site: snap.DataCentreObservation(False, lost=True)})


def _where(replicas) -> Counter[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    return Counter((r.deployment, r.site, r.variant) for r in replicas)


def test_a_site_lost_moves_in_the_what_if_what_the_pass_moves_and_where() -> None:
    s, in_force = _at_rest()
    assert in_force.standing is not None
    real = planning.plan_pass(_lost(s, "dc-lyon"), _at_rest()[1].standing)
    moves = [(m.from_site, m.to_site) for m in real.result.actions]
    assert moves == [("dc-lyon", "dc-paris")], real.result.actions  # the repair's choice, not a full plan's (dc-marseille)

    state = api_simulate.state_of(s, in_force.standing)
    answer = api_simulate.answer(state, LYON_DARK)
    assert [(m["from"], m["to"]) for m in answer["moves"]] == moves, answer["moves"]
    assert answer["method"] == "repair"
    assert answer["summary"] == {"moved": 1, "added": 0, "removed": 0, "unschedulableReplicas": 0, "residencyCrossings": 0}
    # the plan in force is the reconciler's: the what-if repaired a copy of it
    assert in_force.standing.stands_for(state.deployments, state.current)
    again = planning.plan_pass(_lost(s, "dc-lyon"), in_force.standing)
    assert _where(again.result.replicas) == _where(real.result.replicas)


def test_without_a_plan_in_force_or_beyond_a_loss_the_what_if_plans_in_full_and_says_so() -> None:
    s, in_force = _at_rest()
    assert api_simulate.answer(api_simulate.state_of(s), LYON_DARK)["method"] == "full"  # a follower, or a pass under way
    changed = api_simulate.answer(api_simulate.state_of(s, in_force.standing),
                                  b"spec: {fail: {sites: [dc-lyon]}, sites: {dc-paris: {capacityFactor: 0.5}}}")
    assert changed["method"] == "full"  # a site's capacity changed: the pass plans in full too
