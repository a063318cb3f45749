"""A site's power budget is a hard limit like its capacity: the replicas placed there never
draw more (estimated watts × PUE), on every path that places them (plan, repair of the plan
in force, making room, cordons, the exact baseline), and a deployment it keeps short says so
with the numbers."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from scheduler_builders import deployment, site

from orchestrator.scheduler import MoveReplica, RemoveReplica, Replica, Status, Variant, exact, plan
from orchestrator.scheduler.standing import Standing
from orchestrator.testing.placement_rules import violations

W24 = Variant("small", "onnx", cpu=1, memory_mib=1024, throughput_rps=50, power_watts=24)


def budgeted(name: str, city: str, watts: float | None, **kwargs) -> object:
    return dataclasses.replace(site(name, city, cpu=kwargs.pop("cpu", 64), memory_gib=256, **kwargs), power_budget_watts=watts)


def per_site(result) -> Counter[str]:
    return Counter(r.site for r in result.replicas)


def test_replicas_of_several_deployments_stay_within_a_site_power_budget() -> None:
    lyon = budgeted("lyon", "lyon", 150)
    a = deployment("a", variants=(W24,), replicas=(2, 4), demand=(("lyon", 200.0),))
    b = deployment("b", variants=(W24,), replicas=(2, 4), demand=(("lyon", 200.0),))
    result = plan([lyon], [a, b])
    assert per_site(result) == {"lyon": 6}  # 6 × 24 W = 144 W of 150 W; the CPU would hold 64
    assert violations([lyon], [a, b], result.as_running()) == []
    short = [p for p in result.deployments.values() if p.placed < 4]
    assert [p.status for p in short] == [Status.DEGRADED]
    assert short[0].reason.endswith("2 of 4 placed: site lyon: power budget 150 W, 144 W used, replica needs 24 W"), short[0].reason


@pytest.mark.parametrize(
    ("sites", "variant", "placed", "words"),
    [
        # PUE counts: a 150 W feed behind a PUE of 1.5 leaves 100 W for the replicas
        ([budgeted("lyon", "lyon", 150, pue=1.5)], W24, 4, "site lyon: power budget 150 W, 144 W used, replica needs 36 W"),
        # no powerWatts: 2 CPU × 12 W + 2 GiB × 0.4 W
        ([budgeted("lyon", "lyon", 50)], Variant("est", "onnx", cpu=2, memory_mib=2048), 2,
         "site lyon: power budget 50 W, 49.6 W used, replica needs 24.8 W"),
        # a budget too small for one replica
        ([budgeted("lyon", "lyon", 20)], W24, 0, "site lyon: power budget 20 W, 0 W used, replica needs 24 W"),
        ([budgeted("lyon", "lyon", 50), budgeted("paris", "paris", 30)], W24, 3,
         "the power budgets of all 2 FR sites are spent, the most left at site paris: power budget 30 W, 24 W used, replica needs 24 W"),
        # no budget feeds one replica: too small, not spent
        ([budgeted("lyon", "lyon", 20), budgeted("paris", "paris", 12)], W24, 0,
         "the power budgets of all 2 FR sites are too small for one replica, the largest at site lyon: power budget 20 W, 0 W used, replica needs 24 W"),
        # a data hall's megawatts in plain watts, every digit kept
        ([budgeted("hall", "paris", 1234567.8, tier="datacenter")],
         Variant("rack", "ray-serve", cpu=1, memory_mib=1024, power_watts=300000.5), 4,
         "site hall: power budget 1234567.8 W, 1200002 W used, replica needs 300000.5 W"),
    ],
    ids=["pue", "estimated-watts", "budget-below-one-replica", "several-sites", "several-sites-too-small", "megawatts"],
)
def test_a_deployment_short_of_power_says_which_budget_binds(sites, variant, placed, words) -> None:
    dep = deployment(variants=(variant,), replicas=(5, 5), residency={"FR"})
    result = plan(sites, [dep])
    status = result.deployments["d"]
    assert (status.placed, status.status) == (placed, Status.UNSCHEDULABLE)
    assert status.reason.endswith(words), status.reason


def test_sites_without_a_budget_take_what_a_budgeted_one_cannot() -> None:
    sites = [budgeted("lyon", "lyon", 48, carbon=10), budgeted("marseille", "marseille", None, carbon=500)]
    dep = deployment(variants=(W24,), replicas=(4, 4), demand=(("lyon", 10.0),))
    result = plan(sites, [dep])
    assert per_site(result) == {"lyon": 2, "marseille": 2}
    assert result.deployments["d"].status is Status.SCHEDULED


def test_a_lowered_budget_moves_the_replicas_it_no_longer_covers_before_removing_them() -> None:
    before = [budgeted("lyon", "lyon", 200, carbon=10), budgeted("marseille", "marseille", None, carbon=500)]
    dep = deployment(variants=(W24,), replicas=(4, 4), demand=(("lyon", 10.0),))
    running = plan(before, [dep]).as_running()
    assert Counter(r.site for r in running) == {"lyon": 4}
    lowered = [dataclasses.replace(before[0], power_budget_watts=50), before[1]]
    result = plan(lowered, [dep], running)
    assert per_site(result) == {"lyon": 2, "marseille": 2}
    moves = [a for a in result.actions if isinstance(a, MoveReplica)]
    assert len(moves) == len(result.actions) == 2  # started elsewhere before they stop at lyon
    assert all(m.from_site == "lyon" and m.to_site == "marseille" for m in moves)
    assert moves[0].reason.startswith("no longer within the power budget: site lyon: power budget 50 W, 48 W used, replica needs 24 W")


def test_a_lowered_budget_with_nowhere_else_to_go_reports_the_replicas_it_removes() -> None:
    lyon = budgeted("lyon", "lyon", 50)
    dep = deployment(variants=(W24,), replicas=(3, 4))
    running = [Replica("d", "lyon", "small")] * 4
    result = plan([lyon], [dep], running)
    removals = [a for a in result.actions if isinstance(a, RemoveReplica)]
    assert len(removals) == len(result.actions) == 2
    assert all("no longer within the power budget" in a.reason for a in removals)
    status = result.deployments["d"]
    assert status.status is Status.UNSCHEDULABLE
    assert status.reason.endswith("site lyon: power budget 50 W, 48 W used, replica needs 24 W"), status.reason


def test_repair_of_the_plan_in_force_makes_room_within_the_budget() -> None:
    """A lost site's replica may only land where the budget has room: another deployment's
    replica moves off the budgeted site to make it, as for CPU."""
    sites = [budgeted("lyon", "lyon", 48, carbon=10), budgeted("marseille", "marseille", None, cpu=1),
             budgeted("frankfurt", "frankfurt", None, carbon=500)]
    fr = deployment("fr", variants=(W24,), residency={"FR"}, demand=(("marseille", 10.0),))
    anywhere = deployment("any", variants=(W24,), replicas=(2, 2), demand=(("lyon", 10.0),))
    running = plan(sites, [fr, anywhere]).as_running()
    assert Counter((r.deployment, r.site) for r in running) == {("fr", "marseille"): 1, ("any", "lyon"): 2}
    standing = Standing(sites, [fr, anywhere], running)
    lost = [dataclasses.replace(s, healthy=False) if s.name == "marseille" else s for s in sites]
    result = standing.repair(lost)
    assert result is not None
    assert violations(lost, [fr, anywhere], result.as_running()) == []
    assert Counter((r.deployment, r.site) for r in result.replicas) == {("fr", "lyon"): 1, ("any", "lyon"): 1, ("any", "frankfurt"): 1}
    assert all(p.status is Status.SCHEDULED for p in result.deployments.values())


def test_a_cordoned_site_keeps_only_what_its_budget_covers() -> None:
    """A cordoned site is as big as what it holds, and its budget still binds: lowered while
    cordoned, the replicas past it move."""
    held = [Replica("d", "lyon", "small")] * 3
    lyon = dataclasses.replace(budgeted("lyon", "lyon", 50, cpu=3), admits={("d", "small"): 3})
    dep = deployment(variants=(W24,), replicas=(3, 3), demand=(("lyon", 10.0),))
    result = plan([lyon, budgeted("paris", "paris", None)], [dep], held)
    assert per_site(result) == {"lyon": 2, "paris": 1}
    assert [a.from_site for a in result.actions if isinstance(a, MoveReplica)] == ["lyon"]


def test_the_exact_baseline_respects_the_budget() -> None:
    sites = [budgeted("lyon", "lyon", 48, carbon=10), budgeted("paris", "paris", None, carbon=500)]
    best = exact.solve(sites, [deployment(variants=(W24,), replicas=(3, 3), demand=(("lyon", 10.0),))])
    assert Counter(r.site for r in best.replicas) == {"lyon": 2, "paris": 1}


def test_a_site_whose_budget_feeds_no_replica_is_no_spread_domain() -> None:
    # 20 W never feeds a 24 W replica, as 0.5 CPU never holds a 1-CPU one: the spread is over the hall alone
    spread = deployment(replicas=(2, 2), variants=(W24,), spread=("site", 1))
    sites = [budgeted("cabinet", "paris", 20, cpu=8), budgeted("hall", "lyon", None, cpu=8)]
    result = plan(sites, [spread])
    assert (result.deployments["d"].placed, result.deployments["d"].status) == (2, Status.SCHEDULED), result.deployments["d"].reason
    assert violations(sites, [spread], result.as_running()) == []
    assert len(exact.solve(sites, [spread]).replicas) == 2


def test_a_budget_that_feeds_exactly_n_replicas_takes_all_n_however_many_watts_are_drawn_down() -> None:
    """Thousands of 3.4 W replicas drawn from a budget one at a time leave a few 1e-8 W of
    float error: the last replica of a budget set to hold them exactly still fits."""
    w = Variant("w", "onnx", cpu=0.5, memory_mib=64, throughput_rps=1000, power_watts=3.4)
    hall = dataclasses.replace(site("hall", "paris", cpu=5000, memory_gib=1000), power_budget_watts=34_000.0)
    d = deployment("d", variants=(w,), replicas=(10_000, 10_000), demand=(("paris", 100.0),))
    result = plan([hall], [d])
    assert per_site(result) == {"hall": 10_000}, result.deployments["d"].reason
