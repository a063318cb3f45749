"""A reconcile pass over the example fleet repairs a lost data centre from the plan in force:
only the replicas that ran there move, and a pass at rest keeps the plan for the next."""

from __future__ import annotations

import dataclasses
import json

import pytest

from orchestrator import views
from orchestrator.agents import model as agent_model
from orchestrator.gateway import routing
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import inventory, observed
from orchestrator.reconciler import planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import result as sched_result
from orchestrator.store import sqlite as store_mod

from .test_views import example_snapshot, examples


def _applied(s: snap.Snapshot, plan: planning.PassPlan) -> snap.Snapshot:
    return dataclasses.replace(s, placements=planning.placement_rows(plan.result))


def test_a_lost_data_centre_moves_only_its_replicas() -> None:
    s = example_snapshot(examples())
    first = planning.plan_pass(s)
    assert first.result.actions and first.standing is None  # not at rest yet
    s = _applied(s, first)
    rest = planning.plan_pass(s, first.standing)
    assert rest.result.actions == () and rest.standing is not None
    busiest = max(s.datacentres, key=lambda name: sum(r.replicas for r in s.placements if r.site == name))
    lost = sum(r.replicas for r in s.placements if r.site == busiest)
    assert lost
    down = dataclasses.replace(s, datacentres={**s.datacentres, busiest: snap.DataCentreObservation(False, lost=True)})
    repaired = planning.plan_pass(down, rest.standing)
    assert repaired.standing is rest.standing  # repaired, not planned again
    actions = repaired.result.actions
    # each lost replica moves, or is removed where its rules leave no other site (FR only)
    assert len(actions) == lost
    assert all(a.from_site == busiest if isinstance(a, sched_result.MoveReplica) else a.site == busiest for a in actions), actions
    assert any(isinstance(a, sched_result.MoveReplica) for a in actions)
    # here the full plan (what a pass without the standing plan runs) does the same
    assert planning.plan_pass(down).result.actions == actions


def test_a_data_centre_out_of_reach_keeps_its_replicas_and_takes_no_new_ones_until_it_is_declared_lost() -> None:
    """Its cluster most likely still serves (its API server restarting, a dropped
    connection): moving off would build everything it runs again elsewhere, then remove it
    there once it answers. So its replicas stay until it has been out of reach as long as an
    agent is given (``lost``), and one that does not answer is given nothing new meanwhile."""
    s = example_snapshot(examples())
    s = _applied(s, planning.plan_pass(s))
    there = {r for r in s.placements if r.site == "dc-paris"}
    assert any(r.deployment == "doc-fields-fr" for r in there)
    record = s.deployment_by_name["doc-fields-fr"]
    grown = record.spec.model_copy(update={"replicas": record.spec.replicas.model_copy(update={"min": 3, "max": 3})})
    s = dataclasses.replace(s, deployments=tuple(dataclasses.replace(d, spec=grown) if d is record else d for d in s.deployments))
    assert {r.replicas for r in planning.placement_rows(planning.plan_pass(s).result)
            if (r.site, r.deployment) == ("dc-paris", "doc-fields-fr")} == {3}  # where the two new ones go while it answers

    def planned(dc: snap.DataCentreObservation) -> tuple[set[store_mod.PlacementRow], dict[str, object]]:
        plan = planning.plan_pass(dataclasses.replace(s, datacentres={**s.datacentres, "dc-paris": dc}))
        status = next(i.status for a in plan.actions if isinstance(a, act.SetStatuses) for i in a.items if (i.kind, i.name) == ("Site", "dc-paris"))
        return {r for r in planning.placement_rows(plan.result) if r.site == "dc-paris"}, status

    kept, status = planned(snap.DataCentreObservation(False, error="HTTP 503: the API server is shutting down"))
    assert kept == there and status["health"] == "Unreachable", (kept, status)
    gone, _ = planned(snap.DataCentreObservation(False, error="HTTP 503: the API server is shutting down", lost=True))
    assert not gone


@pytest.mark.parametrize("dc", [
    snap.DataCentreObservation(False, error="owned by another", owned_by="b" * 16),  # its observation refused
    snap.DataCentreObservation(True, error="owned by another", refused=True, owned_by="b" * 16),  # its apply refused
], ids=["observing", "applying"])
def test_a_data_centre_owned_elsewhere_keeps_its_replicas_and_takes_no_new_ones(dc: snap.DataCentreObservation) -> None:
    """Another control plane's mark on its cluster: it answers, so it is not lost (its
    replicas moved away, and back once given back), and nothing can be applied there, so
    it takes nothing new. Its status says whose it is, not Unreachable."""
    s = example_snapshot(examples())
    s = _applied(s, planning.plan_pass(s))
    there = {r for r in s.placements if r.site == "dc-paris"}
    record = s.deployment_by_name["doc-fields-fr"]
    grown = record.spec.model_copy(update={"replicas": record.spec.replicas.model_copy(update={"min": 3, "max": 3})})
    s = dataclasses.replace(s, deployments=tuple(dataclasses.replace(d, spec=grown) if d is record else d for d in s.deployments),
                            datacentres={**s.datacentres, "dc-paris": dc})
    plan = planning.plan_pass(s)
    status = next(i.status for a in plan.actions if isinstance(a, act.SetStatuses) for i in a.items if (i.kind, i.name) == ("Site", "dc-paris"))
    assert {r for r in planning.placement_rows(plan.result) if r.site == "dc-paris"} == there
    assert (status["health"], status["ownedBy"]) == ("OwnedElsewhere", "b" * 16), status
    sites, _, _ = planning.scheduler_inputs(s)
    assert next(site for site in sites if site.name == "dc-paris").healthy  # kept, as a cordoned site's


def test_a_data_centre_owned_elsewhere_is_published_so_and_an_earlier_leaders_document_reads_as_before() -> None:
    """Followers and a new leader read whose it is from the leader's published observation;
    one published by a release before this has no ``ownedBy`` and reads as it did."""
    owned = snap.DataCentreObservation(False, error="owned by another", owned_by="b" * 16, unreachable_at=1.0)
    text = observed.to_text(observed.Observed(agents=(), datacentres={"dc-1": owned}))
    assert observed.from_text(text).datacentres["dc-1"] == owned
    doc = json.loads(text)
    del doc["datacentres"]["dc-1"]["ownedBy"]
    read = observed.from_text(json.dumps(doc)).datacentres["dc-1"]
    assert read == dataclasses.replace(owned, owned_by=None)
    dc = next(r for r in example_snapshot(examples()).sites if r.spec.tier == "datacenter")
    assert inventory.site_health(dc, None, read) == (True, "Unreachable")
    assert inventory.site_health(dc, None, owned) == (True, "OwnedElsewhere")


def test_a_changed_deployment_plans_in_full() -> None:
    s = example_snapshot(examples())
    s = _applied(s, planning.plan_pass(s))
    rest = planning.plan_pass(s)
    assert rest.standing is not None
    record = s.deployments[0]
    spec = record.spec.model_copy(update={"replicas": record.spec.replicas.model_copy(update={"max": record.spec.replicas.max + 1})})
    changed = dataclasses.replace(s, deployments=(dataclasses.replace(record, spec=spec), *s.deployments[1:]))
    assert not rest.standing.stands_for(*planning.scheduler_inputs(changed)[1:])


def test_a_data_centre_another_writer_changed_is_given_this_leader_s_apps_again() -> None:
    s = example_snapshot(examples())
    first = planning.plan_pass(s)
    given = {a.site: a.apps for a in first.actions if isinstance(a, act.ApplyServeApps)}
    assert given
    s = dataclasses.replace(_applied(s, first), applied_apps=given)
    assert not [a for a in planning.plan_pass(s).actions if isinstance(a, act.ApplyServeApps)]  # at rest
    site = next(iter(given))
    drifted = dataclasses.replace(s, datacentres={**s.datacentres, site: snap.DataCentreObservation(True, drift="missing: x")})
    again = [a for a in planning.plan_pass(drifted).actions if isinstance(a, act.ApplyServeApps)]
    assert again == [act.ApplyServeApps(site, given[site], "missing: x")]


def joined(site: str) -> agent_model.AgentStatus:
    """A healthy agent at ``site`` that measured 8 cores and 32 GiB, and runs generative models too."""
    capacity = agent_model.Capacity(8, 32 << 30, (), ("CPUExecutionProvider",), ("onnx", "onnx-genai"))
    return agent_model.AgentStatus(site, f"agt-{site}", "http://127.0.0.1:9", True, 0.0, 0.0, agent_model.Location("", "", None, None), {},
                                   "test", capacity, ("CPUExecutionProvider",), 0, 0.0, 16 << 30, {}, 0, 0.5)


def _on(sites: frozenset[str], rows: tuple[store_mod.PlacementRow, ...]) -> set[store_mod.PlacementRow]:
    return {r for r in rows if r.site in sites}


def test_edge_sites_still_rejoining_keep_their_replicas_and_are_sent_nothing() -> None:
    """Just after a restart no agent has rejoined. While their edge sites are awaited
    (``rejoining``) the plan keeps the replicas there, exactly, and pushes those sites
    nothing, even where a site declares no capacity (its agent registered it: only the
    agent's report said how big it is); once they are no longer awaited, a site still
    without its agent loses its replicas, and is still pushed nothing: its agent, were it
    handed the empty set as it rejoins, would unload at once what the pass its join starts
    may give straight back (tests/controlplane/test_restart_rejoin.py)."""
    s = example_snapshot(examples())
    edge = frozenset(r.name for r in s.sites if r.spec.tier == "edge")
    served = dataclasses.replace(s, agents=tuple(joined(site) for site in sorted(edge)))
    before = _on(edge, planning.placement_rows(planning.plan_pass(served).result))  # what the edge ran before the restart
    assert before, "replicas on edge sites before the restart"
    undeclared = tuple(dataclasses.replace(r, spec=r.spec.model_copy(update={"capacity": None})) if r.name in edge else r for r in s.sites)
    # where each replica answered before the restart, as the table the control plane started with says
    remembered = {site: tuple(routing.Endpoint(s.deployment_by_name[r.deployment].spec.model, r.deployment, site, "edge", "", "", 0.0, 0.0,
                                               f"http://{site}.test:8081") for r in before if r.site == site) for site in {r.site for r in before}}
    waiting = dataclasses.replace(s, sites=undeclared, placements=tuple(sorted(before, key=repr)), rejoining=edge, remembered=remembered)
    first = planning.plan_pass(waiting)
    assert _on(edge, planning.placement_rows(first.result)) == before
    (published,) = [a for a in first.actions if isinstance(a, act.PublishEndpoints)]
    # still routed to, with the rules of today's deployment (its residency)
    assert {(e.deployment, e.site, e.url) for e in published.endpoints if e.site in edge} == \
        {(r.deployment, r.site, f"http://{r.site}.test:8081") for r in before}
    assert all(e.allowed_countries for e in published.endpoints if e.site in edge)
    assert not [a for a in first.actions if isinstance(a, act.PushAssignments) and a.site in edge]
    statuses = {i.name: i.status for a in first.actions if isinstance(a, act.SetStatuses) for i in a.items if i.kind == "Site"}
    assert {statuses[site]["health"] for site in edge} == {"Rejoining"}
    at_rest = dataclasses.replace(waiting, placements=planning.placement_rows(first.result))
    again = planning.plan_pass(at_rest)
    assert _on(edge, planning.placement_rows(again.result)) == before  # kept, pass after pass
    assert not [a for a in again.actions if isinstance(a, act.PushAssignments) and a.site in edge]
    given_up = planning.plan_pass(dataclasses.replace(at_rest, rejoining=frozenset(), remembered={}))
    assert not _on(edge, planning.placement_rows(given_up.result))
    (published,) = [a for a in given_up.actions if isinstance(a, act.PublishEndpoints)]
    assert not [e for e in published.endpoints if e.site in edge]
    assert not [a for a in given_up.actions if isinstance(a, act.PushAssignments) and a.site in edge]


def test_a_lost_agent_of_a_deleted_site_is_forgotten_after_it_is_sent_nothing() -> None:
    """A deleted Site's agent is told to serve nothing; once it is lost it is forgotten (it
    was counted as an unhealthy agent for good), while one still connected is kept, as is
    the lost agent of a Site still stored. One is forgotten only in a pass after the one
    that sends it the empty set, whether it was sent a set before or none since this control
    plane started (it serves what it cached): forgetting it ends its watch stream, and the
    set on its way with it (tests/controlplane/test_agent_false_loss.py)."""
    s = example_snapshot(examples())
    edge = sorted(r.name for r in s.sites if r.spec.tier == "edge")
    kept_lost, deleted = edge[0], edge[1]
    gone = dataclasses.replace(joined("edge-gone"), healthy=False)
    agents = (dataclasses.replace(joined(kept_lost), healthy=False), joined(deleted), gone)
    plan = planning.plan_pass(dataclasses.replace(s, sites=tuple(r for r in s.sites if r.name != deleted), agents=agents))
    assert "edge-gone" not in s.assignments  # sent none so far
    assert act.PushAssignments("edge-gone", ()) in plan.actions
    assert [a for a in plan.actions if isinstance(a, act.ForgetAgent)] == [], "forgotten in the pass that sends it the empty set"
    serving = {"edge-gone": (agent_model.Assignment("m", "d", "v", "http://cp/m", "0" * 64),)}
    told = planning.plan_pass(dataclasses.replace(s, sites=tuple(r for r in s.sites if r.name != deleted), agents=agents,
                                                  assignments={**s.assignments, **serving}))
    assert act.PushAssignments("edge-gone", ()) in told.actions and act.ForgetAgent("edge-gone") not in told.actions
    after = planning.plan_pass(dataclasses.replace(s, sites=tuple(r for r in s.sites if r.name != deleted), agents=agents,
                                                   assignments={**s.assignments, "edge-gone": ()}))
    assert act.ForgetAgent("edge-gone") in after.actions


def test_a_deployment_a_reachable_data_centre_refuses_to_apply_is_failing_not_starting() -> None:
    """The cluster answers but refuses the Serve config (a 422, say): only the operator can
    fix that, so the deployment waiting on it is Failing, saying where and why, and its model
    is not among those starting (which gateways answer with Retry-After) while it lasts."""
    from .test_maintenance_planning import _at_rest, _deployment_status  # it imports this module

    s = _at_rest()
    refused = "the Serve config is refused: 422 Unprocessable Entity"
    paris = s.datacentres["dc-paris"]
    apps = {n: a for n, a in paris.apps.items() if "assistant-dc" not in n}  # its application never came
    s = dataclasses.replace(s, datacentres={**s.datacentres, "dc-paris": snap.DataCentreObservation(True, apps, error=refused, refused=True)})
    plan = planning.plan_pass(s)
    status = _deployment_status(plan, "assistant-dc")
    assert status["phase"] == "Failing" and f"dc-paris: {refused}" in str(status["reason"]), status
    (published,) = [a for a in plan.actions if isinstance(a, act.PublishEndpoints)]
    assert "assistant" not in published.starting and "assistant-dc is Failing" in published.deployed["assistant"], published
    assert _deployment_status(plan, "doc-fields-fr")["phase"] == "Running"  # its replica there serves still


def test_a_deployment_whose_data_centre_fails_an_apply_for_a_while_is_starting_not_failing() -> None:
    """The cluster answers, but the apply failed in a way that passes on its own (Ray still
    starting, a dropped connection): the apply is retried, so the deployment is not Failing
    and its model is among those starting (gateways answer 503 with Retry-After)."""
    from .test_maintenance_planning import _at_rest, _deployment_status  # it imports this module

    s = _at_rest()
    paris = s.datacentres["dc-paris"]
    apps = {n: a for n, a in paris.apps.items() if "assistant-dc" not in n}  # its application not there yet
    passing = "Ray dashboard at http://127.0.0.1:8265 is unreachable: connection refused"
    s = dataclasses.replace(s, datacentres={**s.datacentres, "dc-paris": snap.DataCentreObservation(True, apps, error=passing)})
    plan = planning.plan_pass(s)
    status = _deployment_status(plan, "assistant-dc")
    assert status["phase"] != "Failing", status
    (published,) = [a for a in plan.actions if isinstance(a, act.PublishEndpoints)]
    assert "assistant" in published.starting, published


def test_a_deployment_served_by_a_data_centre_out_of_reach_says_it_is_routed_there_as_last_observed() -> None:
    """Its placement said the replicas there were routed to as last observed, and the gateway
    answered from them, but the deployment said only the data centre's error, 0 ready: as
    if nothing answered. Both now say it, and count them alike (not seen, so not ready)."""
    from .test_maintenance_planning import _at_rest, _deployment_status  # it imports this module

    s = _at_rest()
    paris = s.datacentres["dc-paris"]
    error = "HTTP 503: the API server is shutting down"
    s = dataclasses.replace(s, datacentres={**s.datacentres, "dc-paris": snap.DataCentreObservation(False, error=error, last_apps=paris.apps)})
    rows = [r for r in s.placements if (r.site, r.deployment) == ("dc-paris", "doc-fields-fr")]
    assert rows
    routed = f"routed to as last observed (RUNNING, {rows[0].replicas} running) until it answers or is declared lost"
    status = _deployment_status(planning.plan_pass(s), "doc-fields-fr")
    assert f"dc-paris: {error}; {routed}" in str(status["reason"]), status
    [placed] = views.placements(s, rows)["items"]
    assert (placed["state"], placed["ready"], placed["reason"]) == ("Unreachable", 0, f"{error}; {routed}"), placed
    mine = [r for r in s.placements if r.deployment == "doc-fields-fr"]
    assert status["readyReplicas"] == sum(p["ready"] for p in views.placements(s, mine)["items"]), status


def test_a_data_centre_owned_elsewhere_says_its_replicas_are_routed_to_until_it_is_given_back() -> None:
    """Never declared lost, it is not routed to 'until it answers or is declared lost' (it
    answers, and is never lost): until it is given back."""
    from .test_maintenance_planning import _at_rest  # it imports this module

    s = _at_rest()
    paris = s.datacentres["dc-paris"]
    owned = snap.DataCentreObservation(False, error="owned by another", last_apps=paris.apps, owned_by="b" * 16)
    s = dataclasses.replace(s, datacentres={**s.datacentres, "dc-paris": owned})
    rows = [r for r in s.placements if (r.site, r.deployment) == ("dc-paris", "doc-fields-fr")]
    [placed] = views.placements(s, rows)["items"]
    routed = f"routed to as last observed (RUNNING, {rows[0].replicas} running) until it is given back"
    assert (placed["state"], placed["reason"]) == ("OwnedElsewhere", f"owned by another; {routed}"), placed
