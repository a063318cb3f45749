"""The keep step: a standing plan repaired after sites are lost or come back moves only the
lost replicas, keeps every other one where it is, and never breaks a hard rule."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.scheduler import GpuGroup, MoveReplica, PlaceReplica, RemoveReplica, Replica, Status, Variant, plan
from orchestrator.scheduler.standing import Standing
from orchestrator.testing.placement_rules import violations
from scheduler_builders import deployment, site
from test_scheduler_properties import deployments_st, sites_st

SMALL_GPU = Variant("gpu", "onnx", cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=16)
SITES = [
    site("paris-1", "paris"),
    site("paris-2", "paris"),
    site("lyon-1", "lyon"),
    site("marseille-1", "marseille"),
    site("berlin-1", "berlin"),
    site("frankfurt-1", "frankfurt"),
]
DEPLOYMENTS = [
    deployment("fr-a", replicas=(3, 3), residency={"FR"}, demand=(("paris", 10), ("lyon", 5))),
    deployment("fr-b", replicas=(2, 2), residency={"FR"}, demand=(("marseille", 10),)),
    deployment("de", replicas=(2, 2), residency={"DE"}, demand=(("berlin", 10),)),
    deployment("any", replicas=(4, 4), demand=(("paris", 5), ("berlin", 5))),
]


def down(sites, *names):
    return [dataclasses.replace(s, healthy=False) if s.name in names else s for s in sites]


def apply(current, actions):
    state = Counter(current)
    for a in actions:
        if isinstance(a, PlaceReplica):
            state[Replica(a.deployment, a.site, a.variant)] += 1
        elif isinstance(a, RemoveReplica):
            state[Replica(a.deployment, a.site, a.variant)] -= 1
        else:
            state[Replica(a.deployment, a.from_site, a.from_variant)] -= 1
            state[Replica(a.deployment, a.to_site, a.to_variant)] += 1
    assert all(n >= 0 for n in state.values())
    return +state


def standing_plan(sites=SITES, deployments=DEPLOYMENTS):
    running = plan(sites, deployments).as_running()
    return running, Standing(sites, deployments, running)


@pytest.mark.parametrize(
    "lost",
    [("paris-1",), ("lyon-1",), ("berlin-1",), ("paris-1", "berlin-1"), ("marseille-1", "lyon-1")],
)
def test_lost_sites_move_only_their_replicas(lost):
    running, standing = standing_plan()
    result = standing.repair(down(SITES, *lost))
    assert result is not None
    gone = [r for r in running if r.site in lost]
    assert gone  # every case loses something
    moves = [a for a in result.actions if isinstance(a, MoveReplica)]
    assert len(moves) == len(result.actions) == len(gone)
    assert all(a.from_site in lost and "unhealthy" in a.reason and a.to_site not in lost for a in moves)
    now = Counter(result.as_running())
    kept = Counter(r for r in running if r.site not in lost)
    assert now - kept == Counter(Replica(a.deployment, a.to_site, a.to_variant) for a in moves)
    assert not kept - now  # every replica elsewhere stays where it is
    assert apply(running, result.actions) == now
    assert violations(down(SITES, *lost), DEPLOYMENTS, result.as_running()) == []
    assert all(p.status is Status.SCHEDULED for p in result.deployments.values())


def test_unchanged_fleet_moves_nothing():
    running, standing = standing_plan()
    assert standing.result.actions == ()
    again = standing.repair(SITES)
    assert again is not None
    assert again.actions == ()
    assert Counter(again.as_running()) == Counter(running)
    assert all(r.kept for r in again.replicas)
    assert again.objective == standing.result.objective


def test_new_objects_equal_to_the_old_sites_move_nothing():
    _, standing = standing_plan()
    copies = [dataclasses.replace(s) for s in SITES]
    result = standing.repair(copies)
    assert result is not None and result.actions == ()


def test_site_leaving_the_inventory_moves_its_replicas():
    running, standing = standing_plan()
    lost = "paris-1"
    result = standing.repair([s for s in SITES if s.name != lost])
    assert result is not None
    gone = sum(r.site == lost for r in running)
    assert len(result.actions) == gone
    assert all(isinstance(a, MoveReplica) and "left the inventory" in a.reason for a in result.actions)


def test_site_back_moves_nothing_and_a_second_loss_moves_only_what_is_there():
    running, standing = standing_plan()
    first = standing.repair(down(SITES, "paris-1"))
    assert first is not None and first.actions
    back = standing.repair(SITES)
    assert back is not None and back.actions == ()  # nothing to move: every replica runs
    assert Counter(back.as_running()) == Counter(first.as_running())
    again = standing.repair(down(SITES, "paris-1"))
    assert again is not None and again.actions == ()  # nothing runs there any more
    later = standing.repair(down(SITES, "lyon-1"))
    assert later is not None
    assert len(later.actions) == sum(r.site == "lyon-1" for r in again.as_running())


def test_short_deployment_grows_when_its_site_comes_back():
    sites = [site("de-1", "berlin", cpu=2), site("de-2", "frankfurt", cpu=2)]
    dep = deployment("de", replicas=(1, 4), residency={"DE"}, demand=(("berlin", 200),))
    running, standing = standing_plan(sites, [dep])
    assert len(running) == 4
    lost = standing.repair(down(sites, "de-1"))
    assert lost is not None
    assert lost.deployments["de"].status is Status.DEGRADED
    assert sum(isinstance(a, RemoveReplica) for a in lost.actions) == 2
    back = standing.repair(sites)
    assert back is not None
    assert [type(a) for a in back.actions] == [PlaceReplica, PlaceReplica]
    assert back.deployments["de"].status is Status.SCHEDULED


@pytest.mark.parametrize("lost", [("de-1",), ("de-1", "de-2")], ids=["one of two", "both"])
def test_a_repair_explains_a_shortfall_as_a_full_plan_does(lost):
    """A lost site is unhealthy to the diagnosis too: never a site with negative free CPU."""
    sites = [site("de-1", "berlin", cpu=2), site("de-2", "frankfurt", cpu=2)]
    dep = deployment("de", replicas=(3, 4), residency={"DE"}, demand=(("berlin", 200),))
    _, standing = standing_plan(sites, [dep])
    repaired = standing.repair(down(sites, *lost))
    assert repaired is not None
    reason = repaired.deployments["de"].reason
    assert repaired.deployments["de"].status is Status.UNSCHEDULABLE
    assert reason == plan(down(sites, *lost), [dep]).deployments["de"].reason, reason
    assert "-1" not in reason


@pytest.mark.parametrize("deleted", [("de-1",), ("de-1", "de-2")], ids=["one of two", "both"])
def test_a_repair_after_sites_were_deleted_explains_as_a_full_plan_does(deleted):
    """A deleted site is not counted at all (a full plan does not know of it), where the
    repair said "all 2 matching DE sites are unhealthy" of sites that no longer exist."""
    sites = [site("de-1", "berlin", cpu=2), site("de-2", "frankfurt", cpu=2)]
    dep = deployment("de", replicas=(3, 4), residency={"DE"}, demand=(("berlin", 200),))
    _, standing = standing_plan(sites, [dep])
    left = [s for s in sites if s.name not in deleted]
    repaired = standing.repair(left)
    assert repaired is not None
    assert repaired.deployments["de"].reason == plan(left, [dep]).deployments["de"].reason, repaired.deployments["de"].reason


@pytest.mark.parametrize(
    "change",
    [
        lambda sites: [dataclasses.replace(s, cpu=s.cpu * 2) if s.name == "paris-1" else s for s in sites],
        lambda sites: [dataclasses.replace(s, carbon_g_per_kwh=900.0) if s.name == "lyon-1" else s for s in sites],
        lambda sites: [*down(sites, "lyon-1"), site("new-1", "paris")],
    ],
    ids=["capacity changed", "carbon changed", "new site and a site lost"],
)
def test_other_changes_need_a_full_plan(change):
    _, standing = standing_plan()
    assert standing.repair(change(SITES)) is None


def test_a_new_site_keeps_every_replica_and_lets_short_deployments_grow():
    sites = [site("de-1", "berlin", cpu=2)]
    deps = [deployment("de", replicas=(1, 4), residency={"DE"}, demand=(("berlin", 200),)), DEPLOYMENTS[0]]
    running, standing = standing_plan([*sites, *SITES[:3]], deps)
    assert sum(r.deployment == "de" for r in running) == 2  # de-1 holds two
    grown = standing.repair([*sites, *SITES[:3], site("de-2", "frankfurt", cpu=2)])
    assert grown is not None
    assert [(type(a), a.site) for a in grown.actions] == [(PlaceReplica, "de-2")] * 2
    assert not Counter(running) - Counter(grown.as_running())  # nothing moved or removed
    assert grown.deployments["de"].status is Status.SCHEDULED
    # the standing plan now covers the new site: losing it moves only what runs there
    lost = standing.repair(down([*sites, *SITES[:3], site("de-2", "frankfurt", cpu=2)], "de-2"))
    assert lost is not None and all(a.site == "de-2" for a in lost.actions)


def test_a_site_unhealthy_when_built_coming_back_needs_a_full_plan():
    sites = down(SITES, "marseille-1")
    _, standing = standing_plan(sites)
    assert standing.repair(SITES) is None


def test_spread_holds_after_a_repair():
    sites = [site(f"s{i}", city) for i, city in enumerate(["paris", "lyon", "marseille", "berlin", "frankfurt", "madrid"])]
    dep = deployment("spread", replicas=(4, 4), spread=("site", 1), demand=(("paris", 10),))
    running, standing = standing_plan(sites, [dep])
    lost = running[0].site
    result = standing.repair(down(sites, lost))
    assert result is not None
    per_site = Counter(r.site for r in result.as_running())
    assert len(result.actions) == 1 and max(per_site.values()) == 1 and lost not in per_site


def test_a_placement_that_cannot_stand_is_an_error():
    with pytest.raises(ValueError, match="cannot stand: residency"):
        Standing(SITES, DEPLOYMENTS, [Replica("de", "paris-1", "small")])
    with pytest.raises(ValueError, match="declared twice"):
        Standing(SITES, [DEPLOYMENTS[0], DEPLOYMENTS[0]], [])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_repairs_keep_every_rule_and_move_at_most_what_was_lost(data):
    sites = data.draw(sites_st)
    deployments = data.draw(deployments_st())
    running = plan(sites, deployments).as_running()
    standing = Standing(sites, deployments, running)
    lost = data.draw(st.sets(st.sampled_from([s.name for s in sites]), max_size=2))
    after = down(sites, *lost)
    result = standing.repair(after)
    assert result is not None
    now = result.as_running()
    assert violations(after, deployments, now) == []
    assert apply(running, result.actions) == Counter(now)
    # every replica off the lost sites that changed has an action saying so
    gone = sum(r.site in lost for r in running)
    stayed = Counter(r for r in running if r.site not in lost)
    left = sum(
        (isinstance(a, MoveReplica) and a.from_site not in lost) or (isinstance(a, RemoveReplica) and a.site not in lost)
        for a in result.actions
    )
    assert sum((stayed - Counter(now)).values()) <= left
    assert sum(isinstance(a, MoveReplica) and a.from_site in lost for a in result.actions) <= gone
    if not any(d.placement.spread for d in deployments):  # only a rebalanced spread moves more
        assert left == 0 or any(isinstance(a, MoveReplica) and "better" in a.reason for a in result.actions)
    for d in deployments:
        assert result.deployments[d.name].placed <= d.wanted_replicas()
    # the lost sites back: nothing is taken away, the rules still hold
    back = standing.repair(sites)
    assert back is not None
    if not any(d.placement.spread for d in deployments):  # nothing moves back but a spread's balance
        assert not any(isinstance(a, (MoveReplica, RemoveReplica)) for a in back.actions)
    assert violations(sites, deployments, back.as_running()) == []


def test_gpu_groups_are_taken_so_that_a_valid_plan_seats_again():
    # groups of 2 and 1 equal cards: the one-GPU replica must take the single card
    sites = [site("dc", "paris", tier="datacenter", cpu=8, memory_gib=32, gpus=((2, 16), (1, 16)))]
    two = dataclasses.replace(SMALL_GPU, name="pair", gpus=2)
    deps = [deployment("a-one", variants=(SMALL_GPU,)), deployment("b-two", variants=(two,))]
    running, standing = standing_plan(sites, deps)
    assert len(running) == 2
    assert plan(sites, deps, running).actions == ()
    again = standing.repair(sites)
    assert again is not None and again.actions == ()


def test_a_plan_seating_gpu_replicas_on_mixed_cards_can_stand():
    one = Variant("one", "ray-serve", cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=16)
    two = Variant("two", "ray-serve", cpu=1, memory_mib=1024, gpus=2, gpu_memory_gib=16)
    dc = dataclasses.replace(site("dc", tier="datacenter", cpu=64, memory_gib=256),
                             gpus=(GpuGroup("T4", 2, 16), GpuGroup("A100", 1, 80)))
    deps = [deployment("alpha", variants=(one,)), deployment("beta", variants=(two,))]
    standing = Standing([dc], deps, plan([dc], deps).as_running())
    assert {name: d.placed for name, d in standing.result.deployments.items()} == {"alpha": 1, "beta": 1}


def test_losing_a_full_spread_domain_lets_the_repair_place_what_it_held_short():
    # the cabinet, full of a deployment that may run nowhere else, held d to one replica
    # (maxSkew 1 over two sites); once it is lost, the hall alone is the spread
    cabinet = site("cabinet", "paris", cpu=4, labels={"zone": "a"})
    hall = site("hall", "lyon", cpu=8)
    spread = deployment("d", replicas=(2, 2), spread=("site", 1))
    filler = deployment("filler", variants=(Variant("big", "onnx", cpu=4, memory_mib=512),), selector={"zone": "a"})
    running = plan([cabinet, hall], [spread, filler]).as_running()
    standing = Standing([cabinet, hall], [spread, filler], running)
    held = standing.result.deployments["d"]
    assert held.placed == 1 and "spread by site maxSkew 1" in held.reason, held.reason
    lost = [dataclasses.replace(cabinet, healthy=False), hall]
    repaired = standing.repair(lost)
    assert repaired is not None and violations(lost, [spread, filler], repaired.as_running()) == []
    assert (repaired.deployments["d"].placed, repaired.deployments["d"].status) == (2, Status.SCHEDULED)
    assert any(isinstance(a, PlaceReplica) and a.deployment == "d" and a.site == "hall" for a in repaired.actions)


def test_a_plan_with_the_seats_stand_ins_stood_in_for_returning_puts_them_where_a_plan_from_nothing_does():
    """After a repair the stand-ins run and the lost seats do not: a full plan charges a move
    (and the keep margin) to go back, and keeps them for good. Counted as running
    (``returning``, a failback), neither going back nor staying costs a move, and the plan
    is the one a plan from nothing makes; the moves back say they are a failback."""
    running, standing = standing_plan()
    repaired = standing.repair(down(SITES, "paris-1"))
    assert repaired is not None and repaired.actions
    stand_ins = apply(running, repaired.actions)
    seats = [Replica(a.deployment, a.from_site, a.from_variant) for a in repaired.actions if isinstance(a, MoveReplica)]
    kept = plan(SITES, DEPLOYMENTS, list(stand_ins.elements()))
    assert not any(a.to_site == "paris-1" for a in kept.actions if isinstance(a, MoveReplica)), kept.actions
    back = plan(SITES, DEPLOYMENTS, list(stand_ins.elements()), returning=seats)
    assert Counter(back.as_running()) == Counter(plan(SITES, DEPLOYMENTS).as_running())
    moved = [a for a in back.actions if isinstance(a, MoveReplica)]
    assert moved and all(a.to_site == "paris-1" and a.reason.startswith("failback: site paris-1 is back") for a in moved), back.actions
    assert all(r.kept == (r.site != "paris-1") for r in back.replicas if r.deployment == "fr-a"), back.replicas


def test_a_failback_grows_no_deployment_past_what_runs_before_every_one_has_its_minimum():
    """``returning`` seats count for the costs alone: were they counted among the replicas
    a deployment ran, its first phase would grow it past them into the room another
    deployment's minimum needs, and hold it there in every plan after."""
    sites = [site("lyon-1", "lyon", cpu=1, memory_gib=2), site("paris-1", "paris", cpu=1, memory_gib=2),
             site("marseille-1", "marseille", cpu=1, memory_gib=2)]
    grown = dataclasses.replace(deployment("a", replicas=(1, 3), demand=(("lyon", 10),)), autoscaled_replicas=3)
    deployments = [grown, deployment("b", demand=(("paris", 1),))]
    stand_ins = [Replica("a", "paris-1", "small"), Replica("a", "marseille-1", "small")]
    back = plan(sites, deployments, stand_ins, returning=[Replica("a", "lyon-1", "small")])
    assert (back.deployments["b"].placed, back.deployments["a"].placed) == (1, 2), back.actions
    assert Replica("a", "lyon-1", "small") in back.as_running(), back.actions
