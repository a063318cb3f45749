"""Cordon and drain as a reconcile pass decides them, over the example fleet: a cordoned site
takes nothing new and keeps what it runs; a draining site's replicas are re-placed on
allowed sites and leave it only once their replacements serve; one with nowhere allowed
to go stays and is reported; a forced drain removes it."""

from __future__ import annotations

import dataclasses

from orchestrator import maintenance
from orchestrator.agents import model as agent_model
from orchestrator.adapters import serve_config
from orchestrator.manifests import schema
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import inventory
from orchestrator.reconciler import maintenance as drain
from orchestrator.reconciler import applications, planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import result as sched_result
from orchestrator.store import sqlite as store_mod

from .test_reconcile_repair import joined
from .test_views import example_snapshot, examples


def _at_rest() -> snap.Snapshot:
    s = example_snapshot(examples())
    s = dataclasses.replace(s, placements=planning.placement_rows(planning.plan_pass(s).result))
    return _serving(s)


def _serving(s: snap.Snapshot) -> snap.Snapshot:
    """Every placed data-centre replica runs (their Serve applications report them all)."""
    apps: dict[str, dict[str, serve_config.ServeAppStatus]] = {}
    for row in s.placements:
        if s.site_by_name[row.site].spec.tier != "datacenter":
            continue
        name = applications.app_name(row.site, row.deployment, row.variant)
        apps.setdefault(row.site, {})[name] = serve_config.ServeAppStatus(
            name, serve_config.ServeAppState.RUNNING, "", row.replicas, row.replicas, f"http://{row.site}.test/{name}")
    return dataclasses.replace(s, datacentres={site: snap.DataCentreObservation(True, apps.get(site, {})) for site in s.datacentres})


def _with(s: snap.Snapshot, site: str, mode: maintenance.Mode, force: bool = False) -> snap.Snapshot:
    return dataclasses.replace(s, maintenance={**s.maintenance, site: maintenance.Maintenance(site, mode, "disk swap", "admin", 1.0e9, force)})


def _rows(plan: planning.PassPlan, s: snap.Snapshot) -> tuple[store_mod.PlacementRow, ...]:
    (recorded,) = [a for a in plan.actions if isinstance(a, act.RecordPlacement)] or [act.RecordPlacement(s.placements, ())]
    return recorded.rows


def _site_status(plan: planning.PassPlan, site: str) -> dict[str, object]:
    return next(i.status for a in plan.actions if isinstance(a, act.SetStatuses) for i in a.items if (i.kind, i.name) == ("Site", site))


def _deployment_status(plan: planning.PassPlan, name: str) -> dict[str, object]:
    return next(i.status for a in plan.actions if isinstance(a, act.SetStatuses) for i in a.items if (i.kind, i.name) == ("ModelDeployment", name))


def _on(rows: tuple[store_mod.PlacementRow, ...], site: str) -> set[store_mod.PlacementRow]:
    return {r for r in rows if r.site == site}


def test_a_site_cordoned_before_planning_gets_no_replica() -> None:
    s = _with(example_snapshot(examples()), "dc-paris", maintenance.Mode.CORDON)
    plan = planning.plan_pass(s)
    assert not _on(_rows(plan, s), "dc-paris")
    # French-only documents have nowhere else to go: unschedulable, never placed outside France
    fr = plan.result.deployments["doc-fields-fr"]
    assert fr.placed == 0 and str(fr.status) == "Unschedulable"
    assert _site_status(plan, "dc-paris")["maintenance"]["state"] == "Cordoned"  # type: ignore[index]


def test_a_cordoned_site_keeps_what_it_runs_and_takes_nothing_more() -> None:
    s = _at_rest()
    before = _on(s.placements, "dc-paris")
    assert before
    cordoned = _with(s, "dc-paris", maintenance.Mode.CORDON)
    plan = planning.plan_pass(cordoned)
    assert _on(_rows(plan, cordoned), "dc-paris") == before
    assert not [a for a in plan.actions if isinstance(a, act.RecordPlacement)]  # nothing moved
    # more replicas wanted of a deployment that runs there: they go elsewhere
    record = next(d for d in cordoned.deployments if d.name == "intent-eu")
    more = record.spec.model_copy(update={"replicas": record.spec.replicas.model_copy(update={"min": 6, "max": 6})})
    grown = dataclasses.replace(cordoned, deployments=tuple(dataclasses.replace(d, spec=more) if d.name == "intent-eu" else d
                                                            for d in cordoned.deployments))
    rows = _rows(planning.plan_pass(grown), grown)
    assert _on(rows, "dc-paris") == before
    status = _site_status(plan, "dc-paris")
    assert status["schedulable"] is False and status["maintenance"] == {  # type: ignore[comparison-overlap]
        "state": "Cordoned", "mode": "cordon", "reason": "disk swap", "by": "admin", "since": "2001-09-09T01:46:40Z"}


def test_room_a_replica_leaving_a_cordoned_site_frees_is_not_taken_by_a_deployment_it_runs() -> None:
    """assistant-dc must leave dc-paris (its residency is now Germany only) in the pass in
    which intent-eu, which also runs there, wants more replicas: none of them lands there."""
    cordoned = _with(_at_rest(), "dc-paris", maintenance.Mode.CORDON)
    before = {(r.deployment, r.variant, r.replicas) for r in _on(cordoned.placements, "dc-paris")}
    assert {"assistant-dc", "intent-eu"} <= {d for d, _, _ in before}

    def changed(d: snap.DeploymentRecord) -> snap.DeploymentRecord:
        if d.name == "assistant-dc":
            return dataclasses.replace(d, spec=d.spec.model_copy(update={"placement": d.spec.placement.model_copy(update={"residency": ["DE"]})}))
        if d.name == "intent-eu":
            return dataclasses.replace(d, spec=d.spec.model_copy(update={"replicas": d.spec.replicas.model_copy(update={"min": 6, "max": 6})}))
        return d

    changed_s = dataclasses.replace(cordoned, deployments=tuple(changed(d) for d in cordoned.deployments))
    plan = planning.plan_pass(changed_s)
    after = {(r.deployment, r.variant, r.replicas) for r in _on(_rows(plan, changed_s), "dc-paris")}
    assert after == {x for x in before if x[0] != "assistant-dc"}, after
    assert plan.result.deployments["intent-eu"].placed == 6  # the three more go elsewhere


def test_a_deployment_applied_while_a_site_is_cordoned_gets_no_replica_there() -> None:
    # the new deployment would rather have dc-paris: a replica moving off it must not free its room for one
    cordoned = _with(_at_rest(), "dc-paris", maintenance.Mode.CORDON)
    intent = next(d for d in cordoned.deployments if d.name == "intent-eu")
    spec = intent.spec.model_copy(update={"replicas": intent.spec.replicas.model_copy(update={"min": 4, "max": 4}), "autoscaling": None})
    applied = dataclasses.replace(cordoned, deployments=(*cordoned.deployments, dataclasses.replace(intent, name="intent-new", spec=spec)))
    plan = planning.plan_pass(applied)
    on_paris = _on(_rows(plan, applied), "dc-paris")
    assert {r.deployment for r in on_paris} <= {r.deployment for r in _on(cordoned.placements, "dc-paris")}, on_paris
    assert plan.result.deployments["intent-new"].placed == 4


def test_a_drained_site_s_replicas_leave_only_once_their_replacements_serve() -> None:
    s = _at_rest()
    before = _on(s.placements, "dc-frankfurt")
    assert before
    draining = _with(s, "dc-frankfurt", maintenance.Mode.DRAIN)
    first = planning.plan_pass(draining)
    rows = _rows(first, draining)
    assert _on(rows, "dc-frankfurt") == before  # kept: the replacements do not serve yet
    def count(rows: tuple[store_mod.PlacementRow, ...], site: str) -> int:
        return sum(r.replicas for r in rows if r.site == site)
    # each placed again on the one other allowed data centre, beside those it holds
    assert count(rows, "dc-paris") == count(s.placements, "dc-paris") + count(s.placements, "dc-frankfurt")
    (published,) = [a for a in first.actions if isinstance(a, act.PublishEndpoints)]
    assert {e.site for e in published.endpoints} >= {"dc-frankfurt"}  # still routed to
    status = _site_status(first, "dc-frankfurt")["maintenance"]
    assert status["state"] == "Draining" and status["replicasLeft"] == sum(r.replicas for r in before)  # type: ignore[index]
    events = next(a.events for a in first.actions if isinstance(a, act.RecordPlacement))
    assert events and {e.action for e in events} == {"replica-placed"}  # nothing removed yet
    # the same pass again (nothing serves yet): the same placement, nothing written
    pending = dataclasses.replace(draining, placements=rows)
    assert not [a for a in planning.plan_pass(pending).actions if isinstance(a, act.RecordPlacement)]
    # the replacements serve: the drained site's replicas leave the placement and the table
    served = _serving(pending)
    second = planning.plan_pass(served)
    rows = _rows(second, served)
    assert not _on(rows, "dc-frankfurt")
    (published,) = [a for a in second.actions if isinstance(a, act.PublishEndpoints)]
    assert "dc-frankfurt" not in {e.site for e in published.endpoints}
    removed = [e for e in next(a.events for a in second.actions if isinstance(a, act.RecordPlacement))]
    assert removed and {(e.action, e.details["site"]) for e in removed} == {("replica-removed", "dc-frankfurt")}
    assert _site_status(second, "dc-frankfurt")["maintenance"]["state"] == "Draining"  # type: ignore[index]  # apps still applied
    apps = {a.site: a.apps for a in second.actions if isinstance(a, act.ApplyServeApps)}
    assert apps["dc-frankfurt"] == ()  # its applications are removed
    done = dataclasses.replace(served, placements=rows, applied_apps={"dc-frankfurt": ()},
                               datacentres={**served.datacentres, "dc-frankfurt": snap.DataCentreObservation(True)})
    assert _site_status(planning.plan_pass(done), "dc-frankfurt")["maintenance"]["state"] == "Drained"  # type: ignore[index]


def test_a_replica_with_nowhere_allowed_to_go_stays_and_is_reported() -> None:
    s = _at_rest()
    fr = {r for r in _on(s.placements, "dc-paris") if r.deployment == "doc-fields-fr"}
    assert fr  # France only, and the French edge site has no agent: dc-paris is its one site
    draining = _with(s, "dc-paris", maintenance.Mode.DRAIN)
    plan = planning.plan_pass(_serving(dataclasses.replace(draining, placements=_rows(planning.plan_pass(draining), draining))))
    rows = _rows(plan, draining)
    assert {r for r in _on(rows, "dc-paris") if r.deployment == "doc-fields-fr"} == fr
    assert not [r for r in rows if r.deployment == "doc-fields-fr" and r.site != "dc-paris"]  # never outside France
    status = _site_status(plan, "dc-paris")["maintenance"]
    (stuck,) = [x for x in status["stuck"] if x["deployment"] == "doc-fields-fr"]  # type: ignore[index]
    assert stuck["replicas"] == sum(r.replicas for r in fr) and "FR" in stuck["reason"], stuck
    assert status["state"] == "Draining"  # type: ignore[index]
    # the deployment is short of nothing: its replica is placed and serves where it was
    kept = _deployment_status(plan, "doc-fields-fr")
    assert (kept["phase"], kept["replicas"], kept["readyReplicas"]) == ("Running", 1, 1), kept
    # the French edge site has no agent; dc-paris is draining, not unhealthy
    assert "1 replica stays on draining site dc-paris: all 2 matching FR sites are unhealthy or draining, 1 of them draining" in kept["reason"], kept  # type: ignore[operator]
    forced = _with(s, "dc-paris", maintenance.Mode.DRAIN, force=True)
    plan = planning.plan_pass(forced)
    assert not _on(_rows(plan, forced), "dc-paris")
    assert (_deployment_status(plan, "doc-fields-fr")["phase"], _deployment_status(plan, "doc-fields-fr")["replicas"]) == ("Unschedulable", 0)


def test_replicas_a_drain_keeps_are_not_reported_as_unplaced() -> None:
    """The one French replica stays on the draining site: the deployment and the site say
    why no other site takes it, without the scheduler's count ("0 of 1 placed"), which
    leaves out the replica that stays; a deployment still short with them says the count
    that includes them."""
    s = _at_rest()
    draining = _with(s, "dc-paris", maintenance.Mode.DRAIN)
    plan = planning.plan_pass(_serving(dataclasses.replace(draining, placements=_rows(planning.plan_pass(draining), draining))))
    why = "all 2 matching FR sites are unhealthy or draining, 1 of them draining"
    (stuck,) = [x for x in _site_status(plan, "dc-paris")["maintenance"]["stuck"] if x["deployment"] == "doc-fields-fr"]  # type: ignore[index]
    assert stuck["reason"] == why, stuck
    assert _deployment_status(plan, "doc-fields-fr")["reason"] == f"1 replica stays on draining site dc-paris: {why}"
    # two wanted: the one that stays counts, and the reason says so
    record = draining.deployment_by_name["doc-fields-fr"]
    more = record.spec.model_copy(update={"replicas": record.spec.replicas.model_copy(update={"min": 2, "max": 2})})
    grown = dataclasses.replace(draining, deployments=tuple(dataclasses.replace(d, spec=more) if d.name == "doc-fields-fr" else d
                                                            for d in draining.deployments))
    status = _deployment_status(planning.plan_pass(_serving(grown)), "doc-fields-fr")
    assert (status["phase"], status["replicas"]) == ("Unschedulable", 1), status
    assert status["reason"] == f"1 replica stays on draining site dc-paris: {why}; 1 of 2 placed", status


def test_a_draining_site_that_is_lost_keeps_nothing() -> None:
    s = _at_rest()
    down = dataclasses.replace(_with(s, "dc-frankfurt", maintenance.Mode.DRAIN),
                               datacentres={**s.datacentres, "dc-frankfurt": snap.DataCentreObservation(False, error="unreachable", lost=True)})
    plan = planning.plan_pass(down)
    assert not _on(_rows(plan, down), "dc-frankfurt")  # placed elsewhere at once, as for any lost site
    assert _site_status(plan, "dc-frankfurt")["maintenance"]["replicasLeft"] == 0  # type: ignore[index]


def test_a_draining_edge_site_whose_agent_is_lost_is_drained() -> None:
    s = example_snapshot(examples())
    edge = sorted(r.name for r in s.sites if r.spec.tier == "edge")
    s = dataclasses.replace(s, agents=tuple(joined(site) for site in edge))
    s = dataclasses.replace(s, placements=planning.placement_rows(planning.plan_pass(s).result))
    site, row = next((site, r) for site in edge for r in _on(s.placements, site))
    model = s.deployment_by_name[row.deployment].spec.model
    serving = agent_model.ModelState(model, "a" * 64, agent_model.ModelPhase.READY, serving_sha256="a" * 64,
                                     deployment=row.deployment, variant=row.variant)
    # its agent's last report said it served the model; then it went silent
    agents = tuple(dataclasses.replace(a, healthy=False, models={model: serving}) if a.site == site else a for a in s.agents)
    draining = _with(dataclasses.replace(s, agents=agents), site, maintenance.Mode.DRAIN)
    plan = planning.plan_pass(draining)
    assert not _on(_rows(plan, draining), site)
    m = _site_status(plan, site)["maintenance"]
    assert (m["state"], m["replicasLeft"]) == ("Drained", 0), m  # type: ignore[index]


def test_a_dry_run_says_where_each_replica_would_go_and_which_would_stay() -> None:
    s = _at_rest()
    preview = planning.drain_preview(s, "dc-paris")
    assert preview["replicas"] == sum(r.replicas for r in _on(s.placements, "dc-paris"))
    assert {m["to"] for m in preview["moves"]} == {"dc-frankfurt"}
    assert [x["deployment"] for x in preview["stays"]] == ["doc-fields-fr"]
    assert s.maintenance == {}  # nothing changed


def test_a_dry_run_counts_each_replica_once_when_a_deployment_runs_two_variants_there() -> None:
    """Two variants of a deployment on the site, one short of somewhere to go: one replica
    stays, the other moves, never more than the site runs."""
    s = _at_rest()
    placements = (*(r for r in s.placements if r.deployment != "assistant-dc"),
                  store_mod.PlacementRow("assistant-dc", "dc-paris", "large", 1), store_mod.PlacementRow("assistant-dc", "dc-paris", "small", 1))
    s = dataclasses.replace(s, placements=placements)
    result = planning.schedule(_with(s, "dc-paris", maintenance.Mode.DRAIN))
    moved = sched_result.MoveReplica("assistant-dc", "dc-paris", "large", "dc-frankfurt", "large", "site dc-paris is draining")
    short = sched_result.DeploymentPlan("assistant-dc", sched_result.Status.DEGRADED, 2, 1, "no other allowed site has room")
    result = dataclasses.replace(result, actions=(*(a for a in result.actions if getattr(a, "deployment", "") != "assistant-dc"), moved),
                                 deployments={**result.deployments, "assistant-dc": short})
    preview = drain.preview(s, "dc-paris", result)
    assert [x for x in preview["stays"] if x["deployment"] == "assistant-dc"] == [
        {"deployment": "assistant-dc", "replicas": 1, "reason": "no other allowed site has room"}]
    assert [m for m in preview["moves"] if m["deployment"] == "assistant-dc"] == [
        {"deployment": "assistant-dc", "variant": "large", "to": "dc-frankfurt", "toVariant": "large"}]
    assert sum(x["replicas"] for x in preview["stays"]) + preview["moved"] <= preview["replicas"]


def test_a_cordoned_site_whose_power_budget_is_lowered_keeps_only_what_the_budget_covers() -> None:
    """A cordoned site is as big as what it holds; its power budget still binds, and the
    replicas past it move (the others stay, nothing new lands): once their replacements serve,
    as any move is made before it breaks."""
    s = _at_rest()
    paris = s.site_by_name["dc-paris"]
    variants = {(d.name, v.name): inventory.to_variant(v) for d in s.deployments for v in s.models[d.spec.model].variants}
    held = [variants[(r.deployment, r.variant)] for r in _on(s.placements, "dc-paris") for _ in range(r.replicas)]
    assert len(held) >= 2
    pue = paris.spec.energy.pue if paris.spec.energy else 1.0
    budget = (sum(v.watts for v in held) - min(v.watts for v in held) / 2) * pue  # one replica too many
    energy = schema.Energy(carbonGramsPerKWh=56, pue=pue, powerBudgetWatts=budget)
    lowered = dataclasses.replace(paris, spec=paris.spec.model_copy(update={"energy": energy}))
    cordoned = _with(dataclasses.replace(s, sites=tuple(lowered if r.name == "dc-paris" else r for r in s.sites)),
                     "dc-paris", maintenance.Mode.CORDON)
    plan = planning.plan_pass(cordoned)
    rows = _rows(plan, cordoned)
    assert sum(r.replicas for r in _on(rows, "dc-paris")) == len(held)  # until the replacements serve
    served = _serving(dataclasses.replace(cordoned, placements=rows))
    after = [variants[(r.deployment, r.variant)] for r in _on(_rows(planning.plan_pass(served), served), "dc-paris") for _ in range(r.replicas)]
    assert len(after) < len(held) and sum(v.watts for v in after) * pue <= budget
    moved = [a for a in plan.result.actions if isinstance(a, sched_result.MoveReplica)]
    assert moved and all(a.from_site == "dc-paris" and "no longer within the power budget" in a.reason for a in moved)


def test_a_draining_data_centre_owned_elsewhere_is_drained_once_nothing_is_placed_there() -> None:
    """Another control plane's, it is never declared lost, and nothing can be removed there:
    what this one last applied is not its to remove (as deleting the Site removes nothing
    there), so its drain ends once none of its replicas is placed there, saying whose it is."""
    s = _at_rest()
    applied = {"dc-frankfurt": (serve_config.ServeAppSpec(name="ep-d.v.dc-frankfurt", route_prefix="/ep/dc-frankfurt/d/v", model_name="m",
                                                          runtime="ray-serve", num_replicas=1, import_path="pkg.mod:app"),)}
    owned = snap.DataCentreObservation(False, error="owned by another", owned_by="b" * 16, last_apps=s.datacentres["dc-frankfurt"].apps)
    left = dataclasses.replace(_with(s, "dc-frankfurt", maintenance.Mode.DRAIN), applied_apps=applied,
                               placements=tuple(r for r in s.placements if r.site != "dc-frankfurt"),
                               datacentres={**s.datacentres, "dc-frankfurt": owned})
    m = _site_status(planning.plan_pass(left), "dc-frankfurt")["maintenance"]
    assert (m["state"], m["replicasLeft"]) == ("Drained", 0), m  # type: ignore[index]
    assert "another control plane's (" + "b" * 16 + ")" in m["note"] and "does not answer" not in m["note"], m  # type: ignore[index,operator]
