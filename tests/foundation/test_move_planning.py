"""A replica the plan moves off a site that does not drain (a changed siteSelector, tiers,
demand, spread or power budget) leaves it as a drained one does: only once its replacement
serves, counted in its site's room meanwhile; never where the deployment's residency no
longer allows it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from orchestrator import maintenance, views
from orchestrator.api import simulate as api_simulate
from orchestrator.manifests import loader, schema
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import inventory, planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.testing import manifests

from . import test_reconcile_repair, test_views

from .test_maintenance_planning import _at_rest, _deployment_status, _on, _rows, _serving, _with


def _placement(d: snap.DeploymentRecord, **changes: Any) -> snap.DeploymentRecord:
    return dataclasses.replace(d, spec=d.spec.model_copy(update={"placement": d.spec.placement.model_copy(update=changes)}))


def _changed(s: snap.Snapshot, name: str, **changes: Any) -> snap.Snapshot:
    return dataclasses.replace(s, deployments=tuple(_placement(d, **changes) if d.name == name else d for d in s.deployments))


def _published_sites(plan: planning.PassPlan, deployment: str) -> set[str]:
    (published,) = [a for a in plan.actions if isinstance(a, act.PublishEndpoints)]
    return {e.site for e in published.endpoints if e.deployment == deployment}


def test_a_replica_moved_by_its_site_selector_stays_until_its_replacement_serves() -> None:
    s = _at_rest()
    paris = {r for r in _on(s.placements, "dc-paris") if r.deployment == "intent-eu"}
    assert paris
    moved = _changed(s, "intent-eu", siteSelector={"zone": "eu-central"})  # Frankfurt only
    first = planning.plan_pass(moved)
    rows = _rows(first, moved)
    assert {r for r in _on(rows, "dc-paris") if r.deployment == "intent-eu"} == paris  # kept: nothing new serves yet
    assert "dc-paris" in _published_sites(first, "intent-eu")  # and still routed to
    status = _deployment_status(first, "intent-eu")
    assert status["phase"] == "Progressing", status
    assert f"{sum(r.replicas for r in paris)} replicas stay on site dc-paris until their replacements serve" in str(status["reason"])
    # a pass repeated before they serve keeps the same (level-based: a restarted control plane too)
    again = dataclasses.replace(moved, placements=rows)
    assert _rows(planning.plan_pass(again), again) == rows
    # once every replica in Frankfurt serves, Paris is let go
    serving = _serving(dataclasses.replace(moved, placements=rows))
    done = planning.plan_pass(serving)
    assert not {r for r in _on(_rows(done, serving), "dc-paris") if r.deployment == "intent-eu"}
    assert _published_sites(done, "intent-eu") == {"dc-frankfurt"}
    assert _deployment_status(done, "intent-eu")["phase"] != "Progressing"


@pytest.mark.parametrize("drained", [False, True])
def test_a_replica_outside_a_narrowed_residency_leaves_at_once(drained: bool) -> None:
    s = _with(_at_rest(), "dc-paris", maintenance.Mode.DRAIN) if drained else _at_rest()
    narrowed = _changed(s, "intent-eu", residency=["DE"])
    plan = planning.plan_pass(narrowed)
    assert not {r for r in _on(_rows(plan, narrowed), "dc-paris") if r.deployment == "intent-eu"}
    assert "dc-paris" not in _published_sites(plan, "intent-eu")
    assert "stay on site" not in str(_deployment_status(plan, "intent-eu")["reason"])


def _edge_fleet(*deployments: tuple[str, str, str]) -> snap.Snapshot:
    """Two edge sites of 8 cores (zones a and b) with their agents, and a 6-core model per
    deployment (name, model, zone): one replica fills a site."""
    models = sorted({m for _, m, _ in deployments})
    text = manifests.bundle(
        *(manifests.doc("Site", f"edge-{z}", {"tier": "edge", "location": {"country": "FR", "lat": 48.0, "lon": 2.3}},
                        labels={"zone": z}) for z in "ab"),
        *(manifests.doc("Model", m, {"variants": [{"name": "cpu", "runtime": "onnx", "artifact": {"uri": f"{m}.onnx", "sha256": "0" * 64},
                                                   "resources": {"cpu": 6, "memoryMiB": 1024}}]}) for m in models),
        *(manifests.deployment(name, m, 1, {"residency": ["FR"], "siteSelector": {"zone": z}}) for name, m, z in deployments))
    s = test_views.example_snapshot(loader.load_text(text))
    return dataclasses.replace(s, agents=tuple(test_reconcile_repair.joined(site) for site in ("edge-a", "edge-b")))


def _placed(s: snap.Snapshot) -> snap.Snapshot:
    return dataclasses.replace(s, placements=_rows(planning.plan_pass(s), s))


def test_a_moved_replica_keeps_its_room_from_a_deployment_placed_beside_it() -> None:
    before = _placed(_edge_fleet(("first", "m1", "a")))
    assert {(r.deployment, r.site) for r in before.placements} == {("first", "edge-a")}
    moved = _edge_fleet(("first", "m1", "b"))
    rows = _rows(planning.plan_pass(dataclasses.replace(moved, placements=before.placements)), moved)
    assert {(r.deployment, r.site) for r in rows} == {("first", "edge-a"), ("first", "edge-b")}  # kept on edge-a meanwhile
    # a deployment new to edge-a, which cannot hold both, waits for the room: edge-a's callers
    # keep the moved replica until its replacement serves, and the site never holds both
    crowded = dataclasses.replace(_edge_fleet(("first", "m1", "b"), ("second", "m2", "a")), placements=before.placements)
    plan = planning.plan_pass(crowded)
    rows = _rows(plan, crowded)
    assert {(r.deployment, r.site) for r in rows} == {("first", "edge-a"), ("first", "edge-b")}
    assert plan.result.deployments["second"].placed == 0
    status = _deployment_status(plan, "second")
    assert status["phase"] == "Progressing", status  # it comes once the room is free: not Unschedulable
    assert "1 replica waits for room on site edge-a" in str(status["reason"]), status
    # level-based: the pass repeated before the replacement serves decides the same
    again = dataclasses.replace(crowded, placements=rows)
    assert _rows(planning.plan_pass(again), again) == rows


def test_plan_previews_a_deployment_that_waits_for_a_moved_replica_s_room_as_the_pass_leaves_it() -> None:
    before = _placed(_edge_fleet(("first", "m1", "a")))
    crowded = dataclasses.replace(_edge_fleet(("first", "m1", "b"), ("second", "m2", "a")), placements=before.placements)
    previewed = views.preview(crowded, [])
    assert not [c for c in previewed["changes"] if c["deployment"] == "second" and c["after"]], previewed["changes"]
    (second,) = [d for d in previewed["deployments"] if d["name"] == "second"]
    assert (second["phase"], second["replicas"]) == ("Progressing", 0), second
    assert "1 replica waits for room on site edge-a" in second["reason"], second
    assert second["phase"] == _deployment_status(planning.plan_pass(crowded), "second")["phase"]
    # the plan a drain's preview starts from holds the room alike
    assert planning.schedule(crowded).deployments["second"].placed == 0


def test_a_deployment_kept_out_of_a_moved_replica_s_room_is_told_the_room_is_held_not_that_the_site_is_smaller() -> None:
    before = _placed(_edge_fleet(("first", "m1", "a")))
    crowded = dataclasses.replace(_edge_fleet(("first", "m1", "b"), ("second", "m2", "a")), placements=before.placements)
    reason = planning.plan_pass(crowded).result.deployments["second"].reason
    assert "hardware" not in reason, reason  # edge-a has its 8 cores: 6 of them are held
    assert reason.endswith("FR sites have at most 2 free CPU on one site, 6 needed; "
                           "site edge-a holds the room of 1 replica moved off until its replacement serves"), reason


def _budget(s: snap.Snapshot, site: str, watts: float) -> snap.Snapshot:
    return dataclasses.replace(s, sites=tuple(
        dataclasses.replace(r, spec=r.spec.model_copy(update={"energy": schema.Energy(carbonGramsPerKWh=50, powerBudgetWatts=watts)}))
        if r.name == site else r for r in s.sites))


def test_a_power_budget_held_for_a_moved_replica_reads_as_used_of_the_declared_budget() -> None:
    before = _budget(_gpu_fleet(("mover", "m-one", "a")), "dc-x", 200)  # one replica's 136.4 W
    before = dataclasses.replace(before, placements=_rows(planning.plan_pass(before), before))
    after = dataclasses.replace(_budget(_gpu_fleet(("mover", "m-one", "b"), ("other", "m-one", "a")), "dc-x", 200),
                                placements=before.placements)
    plan = planning.plan_pass(after)
    assert plan.result.deployments["other"].placed == 0
    reason = plan.result.deployments["other"].reason
    assert ("site dc-x: power budget 200 W, 136.4 W used (136.4 W of it held by replicas moved off until replaced), "
            "replica needs 136.4 W") in reason, reason


def test_a_replica_moved_off_a_lowered_power_budget_stays_until_its_replacement_serves() -> None:
    before = _placed(_edge_fleet(("first", "m1", "a")))
    budgeted = dataclasses.replace(before, sites=tuple(
        dataclasses.replace(r, spec=r.spec.model_copy(update={"energy": schema.Energy(carbonGramsPerKWh=50, powerBudgetWatts=1)}))
        if r.name == "edge-a" else r for r in before.sites))
    budgeted = _changed(budgeted, "first", siteSelector={})
    plan = planning.plan_pass(budgeted)
    assert plan.result.deployments["first"].replicas[0].site == "edge-b"
    assert {(r.deployment, r.site) for r in _rows(plan, budgeted)} == {("first", "edge-a"), ("first", "edge-b")}


def _paris_cpu(s: snap.Snapshot, cpu: float) -> snap.Snapshot:
    return dataclasses.replace(s, sites=tuple(
        dataclasses.replace(r, spec=r.spec.model_copy(update={"capacity": r.spec.capacity.model_copy(update={"cpu": cpu})}))
        if r.name == "dc-paris" else r for r in s.sites))


def _intent_eu(rows: tuple[Any, ...]) -> set[tuple[str, str, int]]:
    return {(r.site, r.variant, r.replicas) for r in rows if r.deployment == "intent-eu"}


def test_a_replica_moved_off_a_site_that_keeps_others_of_its_deployment_stays_until_its_replacement_serves() -> None:
    """Paris's room lowered: the plan keeps 2 of intent-eu's 3 replicas there and places the
    third in Frankfurt. The one leaving Paris answers until Frankfurt's new one does."""
    s = _at_rest()
    assert _intent_eu(s.placements) == {("dc-paris", "full", 3), ("dc-frankfurt", "full", 2)}
    lowered = _paris_cpu(s, 1.0)
    first = planning.plan_pass(lowered)
    rows = _rows(first, lowered)
    assert _intent_eu(rows) == {("dc-paris", "full", 3), ("dc-frankfurt", "full", 3)}, rows
    status = _deployment_status(first, "intent-eu")
    assert status["phase"] == "Progressing" and "1 replica stays on site dc-paris until its replacement serves" in str(status["reason"]), status
    serving = _serving(dataclasses.replace(lowered, placements=rows))
    assert _intent_eu(_rows(planning.plan_pass(serving), serving)) == {("dc-paris", "full", 2), ("dc-frankfurt", "full", 3)}


def test_plan_s_power_now_counts_a_replica_kept_until_its_replacement_serves() -> None:
    """While intent-eu's third replica moves from Paris to Frankfurt, the one leaving Paris
    still runs and draws: `plan`'s "now" is the placement in force, as `simulate` measures
    it today, and above what the plan leads to by that one replica."""
    lowered = _paris_cpu(_at_rest(), 1.0)
    moving = dataclasses.replace(lowered, placements=_rows(planning.plan_pass(lowered), lowered))
    assert _intent_eu(moving.placements) == {("dc-paris", "full", 3), ("dc-frankfurt", "full", 3)}
    energy = views.preview(moving, [])["energy"]
    today = api_simulate.answer(api_simulate.state_of(moving), b"")["before"]
    assert (round(energy["currentWatts"], 1), round(energy["currentGramsCO2PerHour"], 1)) == (today["watts"], today["gramsCO2PerHour"])
    (full,) = [v for v in moving.models[moving.deployment_by_name["intent-eu"].spec.model].variants if v.name == "full"]
    paris = moving.site_by_name["dc-paris"].spec.energy
    assert paris is not None
    assert energy["currentWatts"] - energy["watts"] == pytest.approx(inventory.to_variant(full).watts * paris.pue)


def test_a_replica_switching_variant_on_its_data_centre_stays_until_the_new_variant_serves() -> None:
    s = _at_rest()
    switched = dataclasses.replace(s, deployments=tuple(
        dataclasses.replace(d, spec=d.spec.model_copy(update={"variant": {"edge": "distilled", "datacenter": "distilled"}}))
        if d.name == "intent-eu" else d for d in s.deployments))
    first = planning.plan_pass(switched)
    rows = _rows(first, switched)
    assert _intent_eu(rows) == {("dc-paris", "full", 3), ("dc-frankfurt", "full", 2),
                                ("dc-paris", "distilled", 3), ("dc-frankfurt", "distilled", 2)}, rows
    assert "3 replicas stay on site dc-paris until their replacements serve" in str(_deployment_status(first, "intent-eu")["reason"])
    serving = _serving(dataclasses.replace(switched, placements=rows))
    assert _intent_eu(_rows(planning.plan_pass(serving), serving)) == {("dc-paris", "distilled", 3), ("dc-frankfurt", "distilled", 2)}


def _gpu_fleet(*deployments: tuple[str, str, str]) -> snap.Snapshot:
    """Two data centres of 2 × 16 GiB T4 + 1 × 80 GiB A100, told apart by their zone label;
    ``deployments``: (name, model, zone) with model m-one (1 GPU) or m-two (2 GPUs)."""
    def dc(name: str, zone: str) -> str:
        return manifests.doc("Site", name, {
            "tier": "datacenter", "location": {"country": "FR", "lat": 48.8, "lon": 2.3},
            "capacity": {"cpu": 64, "memoryGiB": 256, "gpus": [{"model": "T4", "count": 2, "memoryGiB": 16},
                                                              {"model": "A100", "count": 1, "memoryGiB": 80}]},
            "ray": {"address": "local"}}, labels={"zone": zone})

    def model(name: str, gpus: int) -> str:
        return manifests.doc("Model", name, {"variants": [{
            "name": "gpu", "runtime": "ray-serve", "importPath": "pkg.mod:app",
            "resources": {"cpu": 1, "memoryMiB": 1024, "gpus": gpus, "gpuMemoryGiB": 16}}]})
    return test_views.example_snapshot(loader.load_text(manifests.bundle(
        dc("dc-x", "a"), dc("dc-y", "b"), model("m-one", 1), model("m-two", 2),
        *(manifests.deployment(n, m, 1, {"siteSelector": {"zone": z}}) for n, m, z in deployments))))


def test_a_replica_kept_until_replaced_holds_its_gpu_until_its_replacement_serves() -> None:
    before = _gpu_fleet(("mover", "m-one", "a"))
    before = dataclasses.replace(before, placements=_rows(planning.plan_pass(before), before))
    assert [(r.deployment, r.site) for r in before.placements] == [("mover", "dc-x")]
    # mover now belongs in zone b, and three newcomers want dc-x's 3 GPUs: the card mover
    # holds is not theirs until mover's replacement serves, so one of them waits
    newcomers = [(name, "m-one", "a") for name in ("alpha", "beta", "gamma")]
    after = dataclasses.replace(_gpu_fleet(("mover", "m-one", "b"), *newcomers), placements=before.placements)
    plan = planning.plan_pass(after)
    rows = _rows(plan, after)
    on_x = {r.deployment: r.replicas for r in _on(rows, "dc-x")}
    assert on_x.pop("mover") == 1 and sum(on_x.values()) == 2, rows  # never past the GPUs dc-x has
    assert {r.deployment: r.replicas for r in _on(rows, "dc-y")} == {"mover": 1}
    assert sorted(plan.result.deployments[name].placed for name, _, _ in newcomers) == [0, 1, 1]
    # once mover serves in dc-y, its room on dc-x goes to the newcomer that waited
    serving = _serving(dataclasses.replace(after, placements=rows))
    on_x = {r.deployment: r.replicas for r in _on(_rows(planning.plan_pass(serving), serving), "dc-x")}
    assert on_x == {"alpha": 1, "beta": 1, "gamma": 1}


def _events(plan: planning.PassPlan) -> list[tuple[str, str, dict[str, Any]]]:
    (recorded,) = [a for a in plan.actions if isinstance(a, act.RecordPlacement)]
    return [(e.action, e.reason, dict(e.details)) for e in recorded.events]


def test_a_moved_replica_is_logged_as_replaced_when_its_replacement_serves() -> None:
    before = _gpu_fleet(("mover", "m-one", "a"))
    before = dataclasses.replace(before, placements=_rows(planning.plan_pass(before), before))
    after = dataclasses.replace(_gpu_fleet(("mover", "m-one", "b")), placements=before.placements)
    first = planning.plan_pass(after)
    # the move starts: its replacement is placed, the replica it replaces stays
    ((action, reason, details),) = _events(first)
    assert (action, details) == ("replica-placed", {"site": "dc-y", "variant": "gpu"}), reason
    assert reason.startswith("replacing a replica on site dc-x, which stays until this one serves"), reason
    serving = _serving(dataclasses.replace(after, placements=_rows(first, after)))
    ((action, reason, details),) = _events(planning.plan_pass(serving))
    assert (action, details) == ("replica-removed", {"site": "dc-x", "variant": "gpu"})
    assert reason == "replaced by dc-y, serving (site dc-x no longer matches the site selector)", reason


def test_a_moved_replica_is_logged_as_removed_once_when_it_leaves_not_while_it_stays() -> None:
    before = _gpu_fleet(("mover", "m-one", "a"))
    before = dataclasses.replace(before, placements=_rows(planning.plan_pass(before), before))
    after = dataclasses.replace(_gpu_fleet(("mover", "m-one", "b")), placements=before.placements)
    rows = _rows(planning.plan_pass(after), after)
    # before dc-y serves, another deployment is applied: the placement changes, and mover's
    # replica on dc-x, still placed and routed to, is not logged as removed
    busier = dataclasses.replace(_gpu_fleet(("mover", "m-one", "b"), ("other", "m-two", "a")), placements=rows)
    meanwhile = planning.plan_pass(busier)
    rows = _rows(meanwhile, busier)
    assert ("mover", "dc-x") in {(r.deployment, r.site) for r in rows}
    assert [(a, d) for a, _, d in _events(meanwhile) if a == "replica-removed"] == []
    serving = _serving(dataclasses.replace(busier, placements=rows))
    removed = [(r, d) for a, r, d in _events(planning.plan_pass(serving)) if a == "replica-removed"]
    assert removed == [("replaced by dc-y, serving (site dc-x no longer matches the site selector)",
                        {"site": "dc-x", "variant": "gpu"})], removed
