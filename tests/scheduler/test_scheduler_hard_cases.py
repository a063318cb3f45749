"""Small reproductions of the instances where the planner once fell far behind the MILP.

Each is the shape of a seeded ``bench.scheduler_quality`` instance cut down to the sites
and deployments that made it hard, with the planner's gap to ``exact.solve`` before the
change that fixed it in the comment. The MILP runs in milliseconds at this size.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from scheduler_builders import deployment, site

from orchestrator.scheduler import MoveReplica, Replica, Variant, exact, plan, repair

ONE_GPU = Variant("one-gpu", "ray-serve", cpu=4, memory_mib=8192, gpus=1, gpu_memory_gib=24)
TWO_GPU = Variant("two-gpu", "ray-serve", cpu=8, memory_mib=16384, gpus=2, gpu_memory_gib=80)


def wants(dep, n: int):
    return dataclasses.replace(dep, autoscaled_replicas=n)


def gap(ours: float, best: float) -> float:
    return (ours - best) / abs(best)


def test_large_replicas_give_way_to_twice_as_many_small_ones():
    # quality seed 160: one data centre, 8 GPUs; the 2-GPU deployment was planned first
    # (scarcest) and grew to 3 replicas, leaving the 1-GPU one at its min: 6 replicas
    # short where the MILP is 4 short (+44.6 %).
    dc = site("dc", "paris", tier="datacenter", cpu=128, memory_gib=512, gpus=((8, 80),))
    big = wants(deployment("big", variants=(TWO_GPU,), replicas=(1, 5), demand=(("paris", 10),)), 5)
    small = wants(deployment("small", variants=(ONE_GPU,), replicas=(2, 6), demand=(("paris", 10),)), 6)
    ours = plan([dc], [big, small])
    best = exact.solve([dc], [big, small])
    assert best.optimal
    placed = Counter(r.deployment for r in ours.as_running())
    assert placed == {"big": 1, "small": 6}
    assert ours.objective.shortfall == best.objective.shortfall == 4 * 1000
    assert gap(ours.objective.total, best.objective.total) <= 0.10


def test_a_lost_replica_is_replaced_without_moving_the_others():
    # quality seed 181: the replica on the lost site was replaced in phase 2 only; in
    # phase 1 the greedy moved a kept replica towards the lost one's demand, another
    # deployment took the seat it freed, and the replacement landed elsewhere: two moves
    # where one was due (+13.5 % over the MILP, all of it move charges).
    sites = [
        site("berlin-lost", "berlin", healthy=False),
        site("berlin-2", "berlin", cpu=1),
        site("paris-1", "paris", cpu=3),
        site("lyon-1", "lyon", cpu=8),
    ]
    a = wants(deployment("a", replicas=(1, 4), demand=(("berlin", 10),)), 4)
    b = deployment("b", replicas=(1, 1), demand=(("paris", 10),))
    running = [Replica("a", "berlin-lost", "small")] + [Replica("a", "paris-1", "small")] * 3
    ours = plan(sites, [a, b], running)
    moves = [m for m in ours.actions if isinstance(m, MoveReplica)]
    assert [(m.from_site, m.to_site) for m in moves] == [("berlin-lost", "berlin-2")]
    assert Counter(r.site for r in ours.as_running() if r.deployment == "a") == {"berlin-2": 1, "paris-1": 3}
    best = exact.solve(sites, [a, b], running)
    assert gap(ours.objective.total, best.objective.total) <= 0.10


def test_milp_keep_seats_forbids_evicting_running_replicas_for_another_deployment():
    # quality seed 119: the MILP gave up two running replicas of a France-only deployment
    # so that a spread-by-site deployment could balance across both GPU sites and start
    # four more: 40 % below the planner, which never evicts a healthy replica for another
    # deployment. With keep_seats the MILP keeps that rule, and the planner matches it.
    sites = [
        site("dc-fr", "paris", tier="datacenter", cpu=64, memory_gib=512, gpus=((2, 24),)),
        site("dc-de", "frankfurt", tier="datacenter", cpu=64, memory_gib=512, gpus=((4, 24),)),
    ]
    fr = wants(deployment("fr", variants=(ONE_GPU,), replicas=(0, 2), residency={"FR"}, demand=(("paris", 10),)), 2)
    spread = wants(deployment("spread", variants=(ONE_GPU,), replicas=(0, 6), spread=("site", 1), demand=(("paris", 10),)), 6)
    running = [Replica("fr", "dc-fr", "one-gpu")] * 2
    free = exact.solve(sites, [fr, spread], running)
    kept = exact.solve(sites, [fr, spread], running, keep_seats=True)
    assert free.optimal and kept.optimal
    # one running replica given up (and its demand left to a spread replica) for two more
    assert Counter(r.deployment for r in free.replicas) == {"fr": 1, "spread": 3}
    assert Counter(r.deployment for r in kept.replicas) == {"fr": 2, "spread": 1}
    ours = plan(sites, [fr, spread], running)
    assert Counter(r.deployment for r in ours.as_running()) == {"fr": 2, "spread": 1}
    assert gap(ours.objective.total, kept.objective.total) <= 1e-6
    assert gap(ours.objective.total, free.objective.total) > 0.10  # the rule's price


def test_trade_down_never_evicts_a_running_replica():
    # the same contention as above, but the 2-GPU replicas run now: they keep their seats
    dc = site("dc", "paris", tier="datacenter", cpu=128, memory_gib=512, gpus=((8, 80),))
    big = wants(deployment("big", variants=(TWO_GPU,), replicas=(1, 5), demand=(("paris", 10),)), 5)
    small = wants(deployment("small", variants=(ONE_GPU,), replicas=(2, 6), demand=(("paris", 10),)), 6)
    running = [Replica("big", "dc", "two-gpu")] * 3
    ours = plan([dc], [big, small], running)
    assert Counter(r.deployment for r in ours.as_running()) == {"big": 3, "small": 2}
    assert not any(isinstance(a, MoveReplica) for a in ours.actions)


def test_trading_down_counts_the_giving_deployments_replicas_once_not_once_per_trade(monkeypatch):
    # 2,000 CPUs on two sites, taken by 1,000 two-CPU replicas; each trade gives one back
    # for two one-CPU replicas of the other deployment. Work is counted, not timed: the
    # giver's replicas recounted for every trade were 1,000 trades × ~500 replicas.
    counted: list[int] = []

    class CountingCounter(Counter):
        def __init__(self, items=()):
            items = list(items)
            counted.append(len(items))
            super().__init__(items)

    monkeypatch.setattr(repair, "Counter", CountingCounter)
    sites = [site(f"dc{i}", city, tier="datacenter", cpu=1000, memory_gib=10**6) for i, city in enumerate(("paris", "lyon"))]
    big = wants(deployment("a", variants=(Variant("two", "ray-serve", cpu=2, memory_mib=1),), replicas=(0, 1000)), 1000)
    small = wants(deployment("b", variants=(Variant("one", "ray-serve", cpu=1, memory_mib=1),), replicas=(0, 4000)), 4000)
    result = plan(sites, [big, small])
    assert Counter(r.deployment for r in result.as_running()) == {"b": 2000}
    assert sum(counted) <= 1000


FULL = Variant("full", "ray-serve", cpu=4, memory_mib=4096)
SMALL_OF_A = Variant("small", "onnx", cpu=1, memory_mib=1024)


def test_a_replica_this_plan_started_switches_to_its_smaller_variant_so_a_short_deployment_fits():
    # One German data centre. ``a`` may run anywhere in the EU and was planned first: its
    # ``full`` variant filled the site (a distilled one in a data centre is a misfit), and
    # the German-only ``b`` found no room. No other site takes ``a``, so no move helps, and
    # ``a`` at its min gives nothing back; run as ``small``, both fit. Before switches were
    # tried: 12,008 points against the MILP's 34.5 (``b`` short, below its min).
    dc = site("dc-de", "frankfurt", tier="datacenter", cpu=4, memory_gib=32)
    far = site("dc-us", "virginia", tier="datacenter", cpu=64, memory_gib=256)
    a = deployment("a", variants=(FULL, SMALL_OF_A), residency={"FR", "DE"}, demand=(("frankfurt", 10),))
    b = deployment("b", residency={"DE"}, demand=(("frankfurt", 10),))
    best = exact.solve([dc, far], [a, b])
    assert best.optimal
    assert Counter((r.deployment, r.variant) for r in best.replicas) == {("a", "small"): 1, ("b", "small"): 1}
    ours = plan([dc, far], [a, b])
    assert Counter((r.deployment, r.site, r.variant) for r in ours.as_running()) == {
        ("a", "dc-de", "small"): 1,
        ("b", "dc-de", "small"): 1,
    }
    assert ours.deployments["b"].shortfall is None
    assert gap(ours.objective.total, best.objective.total) <= 1e-6
