"""A reconcile pass over the example fleet repairs a lost data centre from the plan in force:
only the replicas that ran there move, and a pass at rest keeps the plan for the next."""

from __future__ import annotations

import dataclasses

from orchestrator.reconciler import actions as act
from orchestrator.reconciler import planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import result as sched_result

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
    down = dataclasses.replace(s, datacentres={**s.datacentres, busiest: snap.DataCentreObservation(False)})
    repaired = planning.plan_pass(down, rest.standing)
    assert repaired.standing is rest.standing  # repaired, not planned again
    actions = repaired.result.actions
    # each lost replica moves, or is removed where its rules leave no other site (FR only)
    assert len(actions) == lost
    assert all(a.from_site == busiest if isinstance(a, sched_result.MoveReplica) else a.site == busiest for a in actions), actions
    assert any(isinstance(a, sched_result.MoveReplica) for a in actions)
    # here the full plan (what a pass without the standing plan runs) does the same
    assert planning.plan_pass(down).result.actions == actions


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


def test_edge_sites_still_rejoining_keep_their_replicas_and_are_sent_nothing() -> None:
    """Just after a restart no agent has rejoined. While their edge sites are awaited
    (``rejoining``) the plan keeps the replicas there and pushes those sites nothing; once
    they are no longer awaited, a site still without its agent loses its replicas and is
    pushed an empty set, which an agent returning then would unload from."""
    s = example_snapshot(examples())  # no agent at all
    edge = frozenset(r.name for r in s.sites if r.spec.tier == "edge")
    waiting = dataclasses.replace(s, rejoining=edge)
    first = planning.plan_pass(waiting)
    placed = {r.site for r in planning.placement_rows(first.result)} & edge
    assert placed, "replicas on edge sites while they are awaited"
    assert not [a for a in first.actions if isinstance(a, act.PushAssignments) and a.site in edge]
    statuses = {i.name: i.status for a in first.actions if isinstance(a, act.SetStatuses) for i in a.items if i.kind == "Site"}
    assert {statuses[site]["health"] for site in edge} == {"Rejoining"}
    at_rest = dataclasses.replace(waiting, placements=planning.placement_rows(first.result))
    again = planning.plan_pass(at_rest)
    assert {r.site for r in planning.placement_rows(again.result)} & edge == placed  # kept, pass after pass
    assert not [a for a in again.actions if isinstance(a, act.PushAssignments) and a.site in edge]
    given_up = planning.plan_pass(dataclasses.replace(at_rest, rejoining=frozenset()))
    assert not {r.site for r in planning.placement_rows(given_up.result)} & edge
    emptied = {a.site for a in given_up.actions if isinstance(a, act.PushAssignments) and not a.assignments}
    assert placed <= emptied
