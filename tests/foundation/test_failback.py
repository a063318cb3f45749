"""An edge site lost and back: its replicas, moved to stand-ins while it was away, move back
once it has stayed healthy for the hold-down (``--failback-after``), where a plan from
nothing puts them; a site flapping within the hold-down draws nothing back, and with
failback off nothing moves back at all. Passes are planned as the reconciler plans them,
each with the time it gathered at (``Failback.now``): no clock is read."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from orchestrator import maintenance
from orchestrator.manifests import schema

from orchestrator.reconciler import actions as act
from orchestrator.reconciler import failback as failback_mod
from orchestrator.reconciler import failback_record
from orchestrator.reconciler import planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import model as sched_model
from orchestrator.scheduler import result as sched_result

from .test_reconcile_repair import joined
from .test_views import example_snapshot, examples

HOLD_S = 300.0
LYON = "edge-lyon"


class Fleet:
    """The example fleet with every edge agent joined, passed pass after pass as the
    reconciler passes it: the rows each pass writes and the failback memory it hands on."""

    def __init__(self, after_s: float) -> None:
        s = example_snapshot(examples())
        self.edge = sorted(r.name for r in s.sites if r.spec.tier == "edge")
        self.s = dataclasses.replace(s, agents=tuple(joined(site) for site in self.edge),
                                     failback=failback_mod.Failback(after_s))
        self.standing = None
        self.plans: list[planning.PassPlan] = []

    def step(self, now: float, *, lyon_healthy: bool = True) -> planning.PassPlan:
        agents = tuple(dataclasses.replace(joined(site), healthy=lyon_healthy or site != LYON) for site in self.edge)
        s = dataclasses.replace(self.s, agents=agents, failback=dataclasses.replace(self.s.failback, now=now))
        plan = planning.plan_pass(s, self.standing)
        written = [a for a in plan.actions if isinstance(a, act.RecordPlacement)]
        self.s = dataclasses.replace(s, placements=written[0].rows if written else s.placements, failback=plan.failback)
        self.standing = plan.standing
        self.plans.append(plan)
        return plan

    def settle(self, now: float, **health: bool) -> None:
        """Passes until one changes nothing (a handful at most)."""
        for _ in range(6):
            if not self.step(now, **health).result.actions:
                return
        raise AssertionError("the placement did not come to rest")

    def rows(self) -> set[tuple[str, str, str, int]]:
        return {(r.deployment, r.site, r.variant, r.replicas) for r in self.s.placements}


def on(rows: set[tuple[str, str, str, int]], site: str) -> set[tuple[str, str, str, int]]:
    return {r for r in rows if r[1] == site}


def moves(plan: planning.PassPlan) -> list[sched_result.MoveReplica]:
    return [a for a in plan.result.actions if isinstance(a, sched_result.MoveReplica)]


def lose_lyon(fleet: Fleet, at: float) -> set[tuple[str, str, str, int]]:
    """Settle the fleet, lose edge-lyon and settle again: the rows before the loss."""
    fleet.settle(0.0)
    good = fleet.rows()
    assert on(good, LYON), "the example fleet runs replicas on edge-lyon"
    lost = fleet.step(at, lyon_healthy=False)
    assert moves(lost) and all(m.from_site == LYON for m in moves(lost)), lost.result.actions
    fleet.settle(at, lyon_healthy=False)
    assert not on(fleet.rows(), LYON)
    return good


def test_replicas_move_back_once_the_site_has_stayed_healthy_for_the_hold_down() -> None:
    fleet = Fleet(HOLD_S)
    good = lose_lyon(fleet, 10.0)
    stood_in = fleet.rows()
    for now in (100.0, 200.0, 399.0):  # back at 100: held down until 400
        assert not fleet.step(now).result.actions
        assert fleet.rows() == stood_in
    back = fleet.step(400.0)
    assert moves(back) and all(m.to_site == LYON and m.reason.startswith("failback: site edge-lyon is back") for m in moves(back)), \
        back.result.actions
    (written,) = [a for a in back.actions if isinstance(a, act.RecordPlacement)]
    (event,) = [e for e in written.events if e.action == "failback"]
    assert (event.kind, event.name, event.details["replicas"]) == ("Site", LYON, len(moves(back))), event
    # where a plan from nothing puts them: the placement before the loss
    fresh = planning.plan_pass(dataclasses.replace(fleet.s, placements=(), failback=failback_mod.Failback()))
    assert set(planning.placement_rows(back.result)) == set(planning.placement_rows(fresh.result))
    assert {(r.deployment, r.site, r.variant, r.replicas) for r in planning.placement_rows(back.result)} == good
    # make before break: a stand-in leaving a site is kept there until its replacement serves
    assert any(r.site != LYON and (r.deployment, r.site, r.variant, r.replicas) not in good for r in written.rows), written.rows
    # and the passes after, replacements still loading, do not move anything back again
    for now in (405.0, 410.0, 1000.0):
        again = fleet.step(now)
        assert not [m for m in moves(again) if m.from_site == LYON], again.result.actions
        assert on({(r.deployment, r.site, r.variant, r.replicas) for r in planning.placement_rows(again.result)}, LYON) == on(good, LYON)


def test_a_site_flapping_within_the_hold_down_draws_nothing_back() -> None:
    fleet = Fleet(HOLD_S)
    lose_lyon(fleet, 10.0)
    stood_in = fleet.rows()
    # back at 100, lost again at 300, back at 350, lost at 600, back at 700: never 300 s healthy until 1000
    for now, healthy in ((100.0, True), (300.0, False), (350.0, True), (600.0, False), (700.0, True), (999.0, True)):
        plan = fleet.step(now, lyon_healthy=healthy)
        assert not plan.result.actions, (now, plan.result.actions)
        assert fleet.rows() == stood_in
        assert not [e for a in plan.actions if isinstance(a, act.RecordPlacement) for e in a.events if e.action == "failback"]
    assert [m.to_site for m in moves(fleet.step(1000.0))] and on(fleet.rows(), LYON)


def test_with_failback_off_nothing_moves_back() -> None:
    fleet = Fleet(0.0)
    lose_lyon(fleet, 10.0)
    stood_in = fleet.rows()
    for now in (100.0, 400.0, 10_000.0, 1e6):
        assert not fleet.step(now).result.actions
    assert fleet.rows() == stood_in and not on(stood_in, LYON)
    assert fleet.s.failback == failback_mod.Failback(0.0, 1e6)  # nothing remembered


def test_a_site_deleted_while_lost_is_forgotten() -> None:
    fleet = Fleet(HOLD_S)
    lose_lyon(fleet, 10.0)
    assert LYON in fleet.s.failback.seats
    fleet.s = dataclasses.replace(fleet.s, sites=tuple(r for r in fleet.s.sites if r.name != LYON))
    fleet.step(20.0, lyon_healthy=False)
    assert LYON not in fleet.s.failback.seats



def test_a_site_cordoned_when_its_hold_down_ends_gets_its_replicas_back_once_uncordoned() -> None:
    """A cordoned (or drained) site takes nothing new: a failback planned then would move
    nothing back and forget the seats, and the stand-ins would stay for good."""
    fleet = Fleet(HOLD_S)
    good = lose_lyon(fleet, 10.0)
    assert not fleet.step(100.0).result.actions  # back at 100
    cordon = maintenance.Maintenance(LYON, maintenance.Mode.CORDON, "disk check", "admin", 350.0)
    fleet.s = dataclasses.replace(fleet.s, maintenance={LYON: cordon})
    for now in (400.0, 450.0):
        assert not moves(fleet.step(now)), now
    assert LYON in fleet.s.failback.seats
    fleet.s = dataclasses.replace(fleet.s, maintenance={})
    back = fleet.step(500.0)
    assert moves(back) and all(m.to_site == LYON and m.reason.startswith("failback: site edge-lyon is back") for m in moves(back)), \
        back.result.actions
    assert {(r.deployment, r.site, r.variant, r.replicas) for r in planning.placement_rows(back.result)} == good


def seats(fb: failback_mod.Failback, site: str = LYON) -> Counter[tuple[str, str]]:
    return Counter((r.deployment, r.variant) for r in fb.seats.get(site, ()))


def test_a_site_lost_again_and_again_remembers_no_more_seats_than_one_loss_left() -> None:
    """Each loss of a site that was back remembers, per deployment and variant, the larger
    of what it left and what was remembered: the memory holds a placement the site had,
    not the sum of all it ever had, and stays bounded however often it flaps."""
    s = example_snapshot(examples())
    (lyon,) = [site for site in planning.scheduler_inputs(s)[0] if site.name == LYON]
    any_result = planning.plan_pass(s).result

    def step(fb: failback_mod.Failback, now: float, healthy: bool, *left: tuple[str, str]) -> failback_mod.Failback:
        off = tuple(sched_result.MoveReplica(d, LYON, v, "dc-paris", v, "site edge-lyon is unhealthy") for d, v in left)
        site = dataclasses.replace(lyon, healthy=healthy)
        return dataclasses.replace(fb, now=now).after([site], dataclasses.replace(any_result, actions=off), ())

    a, b = ("intent-eu", "distilled"), ("assistant", "small")
    # one loss, its moves over two passes: they add up
    fb = step(step(failback_mod.Failback(HOLD_S), 10.0, False, a, b), 11.0, False, a)
    assert seats(fb) == Counter({a: 2, b: 1})
    now = 20.0
    for _ in range(50):  # back, a replica placed there again, lost again, within the hold-down
        fb = step(fb, now, True)
        fb = step(fb, now + 5, False, a)
        now += 10
        assert seats(fb) == Counter({a: 2, b: 1}), seats(fb)
    # a loss that leaves more than was remembered remembers that, its passes adding up
    fb = step(step(step(fb, now, True), now + 1, False, a, a), now + 2, False, a)
    assert seats(fb) == Counter({a: 3, b: 1})
    fb = step(fb, now + 3, True)
    assert seats(fb) == Counter({a: 3, b: 1}) and fb.back_since == {LYON: now + 3}


def scaled(s: snap.Snapshot, name: str, replicas: int) -> snap.Snapshot:
    return dataclasses.replace(s, deployments=tuple(
        dataclasses.replace(d, generation=d.generation + 1, spec=d.spec.model_copy(update={"replicas": schema.Replicas(min=replicas, max=3)}))
        if d.name == name else d for d in s.deployments))


def test_a_site_flapping_with_replicas_placed_on_it_between_losses_gets_back_what_a_fresh_plan_puts_there() -> None:
    fleet = Fleet(HOLD_S)
    good = lose_lyon(fleet, 10.0)
    held = Counter({(d, v): n for d, _, v, n in on(good, LYON)})  # the most edge-lyon ran at once
    now = 20.0
    for cycle in range(6):  # back; doc-fields-fr scaled up, a plan puts replicas on edge-lyon; lost again; scaled down
        fleet.step(now)
        fleet.s = scaled(fleet.s, "doc-fields-fr", 2 + cycle % 2)
        fleet.step(now + 1)
        assert on(fleet.rows(), LYON), "a plan puts replicas on edge-lyon while it is back"
        held |= Counter({(d, v): n for d, _, v, n in on(fleet.rows(), LYON)})
        assert moves(fleet.step(now + 2, lyon_healthy=False))
        fleet.s = scaled(fleet.s, "doc-fields-fr", 1)
        fleet.step(now + 3, lyon_healthy=False)
        assert seats(fleet.s.failback) <= held, (cycle, seats(fleet.s.failback), held)
        now += 10
    fleet.step(now)
    back = fleet.step(now + HOLD_S)
    assert moves(back) and all(m.to_site == LYON for m in moves(back)), back.result.actions
    fresh = planning.plan_pass(dataclasses.replace(fleet.s, placements=(), failback=failback_mod.Failback()))
    planned = {(r.deployment, r.site, r.variant, r.replicas) for r in planning.placement_rows(back.result)}
    assert on(planned, LYON) == {(r.deployment, r.site, r.variant, r.replicas) for r in planning.placement_rows(fresh.result) if r.site == LYON}
    assert on(planned, LYON) == on(good, LYON)
    assert LYON not in fleet.s.failback.seats


def test_the_memory_kept_in_the_store_reads_back_as_it_was_written_on_another_clock() -> None:
    fleet = Fleet(HOLD_S)
    lose_lyon(fleet, at=10.0)
    memory = fleet.s.failback
    assert memory.seats[LYON]
    memory = dataclasses.replace(memory, back_since={LYON: 30.0})
    text = failback_record.to_text(memory, lambda local: local + 1_000.0)  # the store's time, 1,000 s ahead
    back = failback_record.from_text(text, lambda stored: stored - 1_500.0)  # a new leader's clock, 500 s behind the old one's
    assert (Counter(back.seats[LYON]), Counter(back.losing.get(LYON, ()))) == (Counter(memory.seats[LYON]), Counter(memory.losing.get(LYON, ())))
    assert back.back_since == {LYON: -470.0}


@pytest.mark.parametrize("text", ["", "{", "[]", '{"format": 2, "sites": {}}', '{"format": 1, "sites": {"x": {}}}',
                                  '{"format": 1, "sites": {"x": {"seats": [["d", "v"]]}}}'])
def test_a_stored_memory_that_does_not_read_says_so(text: str) -> None:
    with pytest.raises(ValueError, match="the stored failback memory does not read"):
        failback_record.from_text(text, lambda stored: stored)


@pytest.mark.parametrize(("now", "has_agent", "kept"), [
    (15.0, False, True),  # a new leader's first passes, its agent not joined yet: neither back nor lost
    (20.0, False, False),  # the time the leader gives its agents to join is up: lost, its hold-down starts over
    (15.0, True, False),  # its agent joined, and is unhealthy: lost
])
def test_a_site_back_when_the_leader_changed_keeps_its_return_until_its_agent_could_have_joined(
        now: float, has_agent: bool, kept: bool) -> None:
    s = example_snapshot(examples())
    (lyon,) = [site for site in planning.scheduler_inputs(s)[0] if site.name == LYON]
    lyon = dataclasses.replace(lyon, healthy=False)
    stored = failback_mod.Failback(HOLD_S, now, {LYON: (sched_model.Replica("intent-eu", LYON, "distilled"),)}, {LYON: 5.0},
                                   rejoin_until=20.0)
    agents = (dataclasses.replace(joined(LYON), healthy=False),) if has_agent else ()
    after = stored.observing(agents).after([lyon], planning.plan_pass(s).result, ())
    assert after.back_since == ({LYON: 5.0} if kept else {})
    assert LYON in after.seats


@pytest.mark.parametrize(("seen", "says", "sessions", "restarted"), [
    ({LYON: 100}, 100, {}, False),  # the agent the last pass (of this leader or the last) saw
    ({LYON: 100}, 200, {}, True),  # restarted, as a new leader finds it: no session of its own to compare
    ({LYON: 100}, 200, {LYON: 0.0}, True),  # restarted, rejoining while still counted live: its healthy-since kept
    ({LYON: 100}, 0, {}, False),  # an agent of an earlier version says nothing: as before
    ({}, 200, {}, False),  # nothing seen yet (a memory an earlier version stored): taken as it is found
])
def test_an_agent_that_restarted_starts_its_sites_hold_down_over(seen: dict[str, int], says: int, sessions: dict[str, float],
                                                                   restarted: bool) -> None:
    s = example_snapshot(examples())
    (lyon,) = [site for site in planning.scheduler_inputs(s)[0] if site.name == LYON]
    lyon = dataclasses.replace(lyon, healthy=True)
    stored = failback_mod.Failback(HOLD_S, 50.0, {LYON: (sched_model.Replica("intent-eu", LYON, "distilled"),)}, {LYON: 5.0},
                                   sessions=sessions, started_seen=seen)
    agent = dataclasses.replace(joined(LYON), started_unix_ms=says)
    observed = stored.observing((agent,))
    assert observed.flapped() == ({LYON} if restarted else set())
    after = observed.after([lyon], planning.plan_pass(s).result, ())
    assert after.back_since == {LYON: 50.0 if restarted else 5.0}
    assert after.started_seen == ({LYON: says} if says else seen)  # what the next pass, or the next leader, compares


def test_the_start_time_of_a_remembered_sites_agent_is_kept_in_the_store() -> None:
    memory = failback_mod.Failback(HOLD_S, 50.0, {LYON: (sched_model.Replica("intent-eu", LYON, "distilled"),)}, {LYON: 5.0},
                                   started_seen={LYON: 1_765_000_000_123})
    back = failback_record.from_text(failback_record.to_text(memory, lambda local: local), lambda stored: stored)
    assert back.started_seen == {LYON: 1_765_000_000_123}
    older = failback_record.to_text(dataclasses.replace(memory, started_seen={}), lambda local: local)
    assert failback_record.from_text(older, lambda stored: stored).started_seen == {}  # as an earlier version wrote it
