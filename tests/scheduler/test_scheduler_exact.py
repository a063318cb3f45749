"""The MILP baseline on hand-made cases whose optimum is known, and the planner beside it."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from scheduler_builders import LARGE, SMALL, deployment, site

from orchestrator.scheduler import Replica, Weights, evaluate, exact, plan
from orchestrator.scheduler.geo import rtt_ms


def placed(result):
    return sorted((r.deployment, r.site) for r in result.replicas)


def test_single_replica_goes_next_to_its_demand():
    sites = [site("paris-1", "paris"), site("berlin-1", "berlin")]
    dep = deployment(demand=(("berlin", 10),))
    best = exact.solve(sites, [dep])
    assert best.optimal and placed(best) == [("d", "berlin-1")]
    carbon = 0.2 * SMALL.watts * 100 / 1000
    assert best.objective.total == pytest.approx(2.0 + carbon + 5.0)


def test_two_replicas_cover_two_cities_p_median():
    sites = [site("paris-1", "paris"), site("lyon-1", "lyon"), site("berlin-1", "berlin")]
    dep = deployment(replicas=(2, 2), demand=(("paris", 50), ("lyon", 10), ("berlin", 40)))
    best = exact.solve(sites, [dep])
    # covering paris and berlin leaves lyon at paris–lyon RTT; any other pair costs more
    assert placed(best) == [("d", "berlin-1"), ("d", "paris-1")]
    lyon = rtt_ms(45.76, 4.84, 48.86, 2.35)
    assert best.objective.latency == pytest.approx(0.5 * 2 + 0.1 * lyon + 0.4 * 2, rel=1e-3)


def test_capacity_contention_is_solved_globally():
    # one slot in berlin: the deployment whose demand is only in berlin should get it
    sites = [site("berlin-1", "berlin", cpu=1), site("paris-1", "paris", cpu=4)]
    deps = [
        deployment("both", demand=(("berlin", 10), ("paris", 10))),
        deployment("berlin-only", demand=(("berlin", 10),)),
    ]
    best = exact.solve(sites, deps)
    assert placed(best) == [("berlin-only", "berlin-1"), ("both", "paris-1")]


def test_spread_and_gpu_memory_are_modelled():
    dc24 = site("dc24", "paris", tier="datacenter", cpu=64, memory_gib=512, gpus=((8, 24),))
    dc80 = site("dc80", "frankfurt", tier="datacenter", cpu=64, memory_gib=512, gpus=((2, 80),))
    best = exact.solve([dc24, dc80], [deployment(variants=(LARGE,), replicas=(2, 2))])
    assert placed(best) == [("d", "dc80")]  # only one fits: 2 GPUs per replica
    assert best.objective.shortfall == pytest.approx(1000 + 10_000)
    sites = [site(f"s{i}", c, cpu=64) for i, c in enumerate(["paris", "paris", "lyon"])]
    spread = exact.solve(sites, [deployment(replicas=(4, 4), spread=("region", 1))])
    per_region = {"paris": 0, "lyon": 0}
    for r in spread.replicas:
        per_region["lyon" if r.site == "s2" else "paris"] += 1
    assert per_region == {"paris": 2, "lyon": 2}


def test_move_cost_keeps_running_replicas():
    sites = [site("paris-1", "paris"), site("lyon-1", "lyon")]
    dep = deployment(demand=(("paris", 10),))
    stay = exact.solve(sites, [dep], [Replica("d", "lyon-1", "small")])
    assert placed(stay) == [("d", "lyon-1")]
    go = exact.solve(sites, [dep], [Replica("d", "lyon-1", "small")], weights=Weights(move_per_replica=1.0))
    assert placed(go) == [("d", "paris-1")]


def test_a_cordoned_site_keeps_no_more_of_a_deployment_than_it_admits():
    """Room for two, but cordoned holding one: the baseline places no replica there that the
    planner would not, so they are compared on the same problem."""
    paris = dataclasses.replace(site("paris-1", "paris", cpu=2), admits={("d", "small"): 1})
    dep = deployment(replicas=(2, 2), demand=(("paris", 10),))
    current = [Replica("d", "paris-1", "small")]
    best = exact.solve([paris], [dep], current)
    assert placed(best) == placed(plan([paris], [dep], current)) == [("d", "paris-1")]
    lyon = site("lyon-1", "lyon", cpu=2)
    best = exact.solve([paris, lyon], [dep], current)
    assert placed(best) == [("d", "lyon-1"), ("d", "paris-1")]


def test_milp_matches_brute_force_and_planner_is_close():
    sites = [
        site("p1", "paris", cpu=2),
        site("p2", "paris", carbon=500),
        site("l1", "lyon"),
        site("b1", "berlin", cpu=1),
        site("m1", "madrid"),
    ]
    deps = [
        deployment("a", replicas=(2, 3), demand=(("paris", 60), ("berlin", 40))),
        deployment("b", replicas=(1, 2), demand=(("madrid", 30), ("lyon", 30))),
    ]
    names = [s.name for s in sites]
    best_brute = float("inf")
    for a in itertools.combinations_with_replacement(names, 2):
        for b in itertools.combinations_with_replacement(names, 2):
            replicas = [Replica("a", s, "small") for s in a] + [Replica("b", s, "small") for s in b]
            use = {n: 0 for n in names}
            for r in replicas:
                use[r.site] += 1
            if any(use[s.name] > s.cpu for s in sites):
                continue
            best_brute = min(best_brute, evaluate(sites, deps, (), replicas).total)
    milp = exact.solve(sites, deps)
    assert milp.objective.total == pytest.approx(best_brute)
    ours = plan(sites, deps)
    assert ours.objective.total <= milp.objective.total * 1.02
