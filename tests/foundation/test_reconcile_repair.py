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
