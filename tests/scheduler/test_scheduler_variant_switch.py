"""A deployment short of room gets it by switching another's new replica to a smaller
variant in its seat (``repair.switch_variant``), within every hard rule.

Each case fills one German data centre with two EU deployments, ``a`` and ``a2``, planned
before the German-only ``b``, both on their large variant. ``a`` is tried first; where a
rule forbids switching it, ``a2`` is switched instead, so each case shows the rule held
and the room still found. The last test checks random small fleets with the independent
rule checker.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler_builders import deployment, site

from orchestrator.scheduler import (
    Deployment,
    GpuGroup,
    Placement,
    Replica,
    Site,
    Spread,
    Tier,
    Variant,
    Weights,
    plan,
    repair,
)
from orchestrator.scheduler.standing import Standing
from orchestrator.testing.placement_rules import violations

FULL = Variant("full", "ray-serve", cpu=4, memory_mib=4096)
SMALL = Variant("small", "onnx", cpu=1, memory_mib=1024)
EU = {"FR", "DE"}


def dc(**changes) -> Site:
    return dataclasses.replace(site("dc-de", "frankfurt", tier="datacenter", cpu=8, memory_gib=64), **changes)


def occupant(name: str, variants=(FULL, SMALL), **changes) -> Deployment:
    return dataclasses.replace(deployment(name, variants=variants, residency=EU, demand=(("frankfurt", 10),)), **changes)


def short(variant: Variant = SMALL, wanted: int = 1) -> Deployment:
    b = deployment("b", variants=(variant,), residency={"DE"}, replicas=(1, wanted), demand=(("frankfurt", 10),))
    return dataclasses.replace(b, autoscaled_replicas=wanted)


def wanting(d: Deployment) -> Deployment:
    """``d`` wanting its ``replicas.max``."""
    return dataclasses.replace(d, autoscaled_replicas=d.max_replicas)


def held(result) -> Counter:
    return Counter((r.deployment, r.variant) for r in result.as_running())


def test_a_new_replica_switches_to_its_smaller_variant_and_the_short_deployment_fills_the_room():
    result = plan([dc()], [occupant("a"), occupant("a2"), short(wanted=4)])
    # ``a`` switched frees 3 CPUs: three of ``b``'s four; the fourth needs ``a2`` switched too
    assert held(result) == {("a", "small"): 1, ("a2", "small"): 1, ("b", "small"): 4}
    assert violations([dc()], [occupant("a"), occupant("a2"), short(wanted=4)], result.as_running()) == []


def test_gpus_freed_by_a_switch_go_to_the_short_deployment():
    two = Variant("two-gpu", "ray-serve", cpu=1, memory_mib=1024, gpus=2, gpu_memory_gib=24)
    one = Variant("one-gpu", "ray-serve", cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=24, distilled=True)
    b_gpu = Variant("b-gpu", "ray-serve", cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=24)
    site_ = dc(gpus=(GpuGroup("gpu", 2, 24),))
    result = plan([site_], [occupant("a", variants=(two, one)), short(b_gpu)])
    assert held(result) == {("a", "one-gpu"): 1, ("b", "b-gpu"): 1}


CASES = {
    # ``a`` runs now: switching it would stop a serving replica for another deployment
    "running": dict(current=[Replica("a", "dc-de", "full")]),
    # ``a`` may run ``small`` only at the edge
    "variant by tier": dict(a=dict(variant_by_tier={Tier.DATACENTER: "full", Tier.EDGE: "small"})),
    # the cordoned site admits no ``small`` of ``a``
    "cordon": dict(site=dict(admits={("a", "full"): 1, ("a2", "full"): 1, ("a2", "small"): 1, ("b", "small"): 1})),
    # ``a``'s small variant draws so much that ``b`` would pass the budget
    "power budget": dict(
        a=dict(variants=(dataclasses.replace(FULL, power_watts=40), dataclasses.replace(SMALL, power_watts=39))),
        a2=dict(variants=(dataclasses.replace(FULL, power_watts=40), dataclasses.replace(SMALL, power_watts=10))),
        b=dataclasses.replace(SMALL, power_watts=25),
        site=dict(power_budget_watts=100),
    ),
    # a spread deployment's balance is left alone
    "spread": dict(a=dict(placement=Placement(residency=frozenset(EU), spread=Spread("site", 1)))),
    # ``a`` weighs a misfit above ``b``'s missing replica (below its min too)
    "weights": dict(a=dict(weights=Weights(variant_fit_per_replica=50_000))),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_switch_the_rules_forbid_falls_to_the_next_occupant(case):
    sites = [dc(**case.get("site", {}))]
    a, a2 = occupant("a", **case.get("a", {})), occupant("a2", **case.get("a2", {}))
    deployments = [a, a2, short(case.get("b", SMALL))]
    result = plan(sites, deployments, case.get("current", ()))
    assert held(result) == {("a", "full"): 1, ("a2", "small"): 1, ("b", "small"): 1}
    assert violations(sites, deployments, result.as_running()) == []


def test_a_repair_switches_the_replica_it_placed_and_never_a_kept_one():
    # The second German site is lost with ``a2`` and ``b`` on it; ``a2``'s replacement
    # takes the room ``a`` leaves on the first. ``a`` runs there now and is kept as it runs;
    # ``a2``'s new replica switches, and ``b`` fits beside both.
    sites = [dc(), dataclasses.replace(dc(), name="dc-de-2", cpu=5)]
    deployments = [occupant("a"), occupant("a2"), short()]
    running = [Replica("a", "dc-de", "full"), Replica("a2", "dc-de-2", "full"), Replica("b", "dc-de-2", "small")]
    standing = Standing(sites, deployments, running)
    result = standing.repair([sites[0], dataclasses.replace(sites[1], healthy=False)])
    assert result is not None
    assert Counter((r.deployment, r.site, r.variant) for r in result.as_running()) == {
        ("a", "dc-de", "full"): 1,
        ("a2", "dc-de", "small"): 1,
        ("b", "dc-de", "small"): 1,
    }


def test_room_a_switch_leaves_over_goes_to_the_switched_deployment_when_it_is_short():
    # ``d1`` (planned first: its large variant wants a GPU) finds the German site full of
    # ``d0``'s ``l``, ``s``, ``s``, one short of four. Switching the ``l`` to ``s`` frees 3
    # CPUs; ``d1``'s ``m`` takes 2, and the one left is ``d0``'s fourth ``s``: five replicas,
    # as many as the plan without the switch finds (it trades ``d0``'s ``l`` away instead).
    large, small = Variant("l", "ray-serve", cpu=4, memory_mib=4096), Variant("s", "onnx", cpu=1, memory_mib=1024)
    gpu = Variant("xl", "ray-serve", cpu=6, memory_mib=8192, gpus=1, gpu_memory_gib=24)
    medium = Variant("m", "onnx", cpu=2, memory_mib=2048, power_watts=30)
    sites = [dc(cpu=6), dataclasses.replace(site("dc-fr", "paris", tier="datacenter", cpu=4), labels={})]
    d0 = deployment("d0", variants=(large, small), residency={"DE"}, replicas=(2, 4))
    d1 = deployment("d1", variants=(gpu, medium), residency={"DE"}, replicas=(0, 2))
    deployments = [dataclasses.replace(d0, autoscaled_replicas=4), dataclasses.replace(d1, autoscaled_replicas=2)]
    result = plan(sites, deployments)
    assert held(result) == {("d0", "s"): 4, ("d1", "m"): 1}
    assert violations(sites, deployments, result.as_running()) == []


def test_a_switch_is_not_kept_where_trading_the_large_replica_down_places_more():
    # ``a`` (planned first: its large variant wants a GPU) fills the 6-CPU German site with
    # ``xl``. Switching it to ``s`` lets ``b``'s 4-CPU ``l`` in (``b`` spreads: it never gives
    # a replica back) and leaves 1 CPU: ``c`` then trades ``a``'s ``s`` down for two of its
    # own, three replicas in all. Without the switch, ``c`` trades ``a``'s ``xl`` down for
    # four: the plan places four.
    xl = Variant("xl", "ray-serve", cpu=6, memory_mib=8192, gpus=1, gpu_memory_gib=24)
    large, small = Variant("l", "ray-serve", cpu=4, memory_mib=4096), Variant("s", "onnx", cpu=1, memory_mib=1024)
    sites = [dc(cpu=6, gpus=(GpuGroup("gpu", 2, 24),), carbon_g_per_kwh=0.0)]
    deployments = [
        wanting(deployment("a", variants=(xl, small), replicas=(0, 1))),
        wanting(deployment("b", variants=(large,), replicas=(0, 1), spread=("site", 1))),
        wanting(deployment("c", variants=(small,), replicas=(0, 4))),
    ]
    result = plan(sites, deployments)
    assert held(result) == {("c", "s"): 4}
    assert violations(sites, deployments, result.as_running()) == []


def test_a_switch_is_not_kept_where_it_makes_a_new_replica_one_that_runs_now():
    # ``a`` runs ``m`` on the 4-CPU site; the plan starts its ``l`` there instead (``m`` is
    # an edge variant). Switching that ``l`` back to ``m`` for short ``b`` makes room for two
    # of ``b``'s ``s``, and the ``m`` is then the replica running now, which no trade gives
    # back: three replicas. Without the switch, ``b`` trades the new ``l`` down for four.
    large, medium = Variant("l", "ray-serve", cpu=4, memory_mib=4096), Variant("m", "onnx", cpu=2, memory_mib=2048)
    small = Variant("s", "onnx", cpu=1, memory_mib=1024)
    sites = [dc(cpu=4, carbon_g_per_kwh=0.0)]
    deployments = [
        wanting(deployment("a", variants=(large, medium), replicas=(0, 1))),
        wanting(deployment("b", variants=(small,), replicas=(0, 4))),
    ]
    result = plan(sites, deployments, [Replica("a", "dc-de", "m")])
    assert held(result) == {("b", "s"): 4}
    assert violations(sites, deployments, result.as_running()) == []


# -- random small fleets: hard rules hold, and no plan places fewer replicas ---------------

VARIANTS = [
    Variant("xl", "ray-serve", cpu=6, memory_mib=8192, gpus=1, gpu_memory_gib=24),
    Variant("l", "ray-serve", cpu=4, memory_mib=4096),
    Variant("m", "onnx", cpu=2, memory_mib=2048, power_watts=30),
    Variant("s", "onnx", cpu=1, memory_mib=1024),
]


@st.composite
def fleets(draw):
    count = draw(st.integers(1, 4))
    names = [f"d{i}" for i in range(count)]
    sites = []
    for i in range(draw(st.integers(1, 3))):
        sites.append(Site(
            name=f"s{i}", tier=draw(st.sampled_from([Tier.DATACENTER, Tier.DATACENTER, Tier.EDGE])), country=draw(st.sampled_from(["FR", "DE"])),
            region=f"r{i}", lat=50.0, lon=8.0 + i, cpu=draw(st.integers(4, 12)), memory_gib=32,
            gpus=draw(st.sampled_from([(), (GpuGroup("g", 1, 24),), (GpuGroup("g", 2, 24),)])),
            carbon_g_per_kwh=draw(st.floats(0, 500)), labels={"zone": draw(st.sampled_from(["a", "b"]))},
            power_budget_watts=draw(st.one_of(st.none(), st.floats(20, 150))),
            admits=draw(st.one_of(st.none(), st.dictionaries(
                st.tuples(st.sampled_from(names), st.sampled_from([v.name for v in VARIANTS])), st.integers(1, 3),
            ))),
        ))
    # The rule checker counts a spread over every site it may use, a cordoned one too,
    # where the planner leaves out those its cordon shuts to it: no spread with cordons.
    spreads = [None] if any(s.admits is not None for s in sites) else [None, Spread("site", 1)]
    deployments = []
    for name in names:
        variants = draw(st.lists(st.sampled_from(VARIANTS), min_size=2, max_size=3, unique_by=lambda v: v.name))
        low = draw(st.integers(0, 2))
        wanted = low + draw(st.integers(0, 4))
        by_tier = draw(st.one_of(st.just({}), st.fixed_dictionaries({Tier.DATACENTER: st.sampled_from([v.name for v in variants])})))
        deployments.append(Deployment(
            name=name, model=draw(st.sampled_from([name, name, "shared"])), variants=tuple(variants),
            min_replicas=low, max_replicas=wanted, autoscaled_replicas=wanted, variant_by_tier=by_tier,
            placement=Placement(
                residency=draw(st.sampled_from([None, frozenset({"DE"}), frozenset({"FR"})])),
                site_selector=draw(st.sampled_from([{}, {"zone": "a"}])),
                spread=draw(st.sampled_from(spreads)),
            ),
        ))
    # About half the fleets run nothing yet; the others run 1 to 3 replicas, mostly of a
    # variant their deployment has (a switch to the variant running there is one case).
    current = []
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            d = draw(st.sampled_from(deployments))
            variant = draw(st.one_of(st.sampled_from(d.variants), st.sampled_from(VARIANTS)))
            current.append(Replica(d.name, draw(st.sampled_from([s.name for s in sites])), variant.name))
    return sites, deployments, current


@st.composite
def crowded(draw):
    """One data centre of 4 to 8 CPUs that two or three deployments, none held at a
    minimum, all want more of than fits: the room a switch and a trade-down both want."""
    sites = [Site(
        name="s0", tier=Tier.DATACENTER, country="DE", region="r0", lat=50.0, lon=8.0, cpu=draw(st.integers(4, 8)), memory_gib=32,
        gpus=draw(st.sampled_from([(), (GpuGroup("g", 1, 24),)])), labels={"zone": "a"},
    )]
    deployments = []
    for i in range(draw(st.integers(2, 3))):
        size = draw(st.integers(1, 3))
        variants = draw(st.lists(st.sampled_from(VARIANTS), min_size=size, max_size=size, unique_by=lambda v: v.name))
        wanted = draw(st.integers(1, 5))
        deployments.append(Deployment(
            name=f"d{i}", model=f"d{i}", variants=tuple(variants), min_replicas=0, max_replicas=wanted, autoscaled_replicas=wanted,
            placement=Placement(spread=draw(st.sampled_from([None, Spread("site", 1)]))),
        ))
    current = []
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            d = draw(st.sampled_from(deployments))
            current.append(Replica(d.name, "s0", draw(st.sampled_from(d.variants)).name))
    return sites, deployments, current


def admitted(sites, replicas) -> list[str]:
    """Cordon breaches: more of a (deployment, variant) on a cordoned site than it admits."""
    found = []
    for s in sites:
        if s.admits is not None:
            here = Counter((r.deployment, r.variant) for r in replicas if r.site == s.name)
            found += [f"{s.name}: {pair} over its cordon" for pair, n in here.items() if n > s.admits.get(pair, 0)]
    return found


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(fleet=st.one_of(fleets(), crowded()))
def test_switching_variants_never_breaks_a_rule_nor_places_fewer_replicas(fleet):
    sites, deployments, current = fleet
    result = plan(sites, deployments, current)
    replicas = result.as_running()
    assert violations(sites, deployments, replicas) == []
    assert admitted(sites, replicas) == []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(repair, "switch_variant", lambda *args: None)
        without = plan(sites, deployments, current)
    assert len(replicas) >= len(without.as_running())
