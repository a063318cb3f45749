"""Every hard constraint, one small case per row: where replicas land, and the words used
when they cannot."""

from __future__ import annotations

import dataclasses

import pytest
from scheduler_builders import LARGE, SMALL, deployment, site

from orchestrator.scheduler import GpuGroup, Site, Status, Tuning, Variant, plan

FR_EDGE = site("fr-edge", "paris")
DE_EDGE = site("de-edge", "frankfurt")
FR_DC = site("fr-dc", "paris", tier="datacenter", cpu=64, memory_gib=512, gpus=((4, 80),))
DE_DC_24 = site("de-dc", "frankfurt", tier="datacenter", cpu=64, memory_gib=512, gpus=((8, 24),))
GPU_24 = Variant("mid", "onnx", cpu=2, memory_mib=4096, gpus=1, gpu_memory_gib=24)
BIG_CPU = Variant("bigcpu", "onnx", cpu=16, memory_mib=1024)
BIG_MEM = Variant("bigmem", "onnx", cpu=1, memory_mib=64 * 1024)

# (case id, sites, deployment, sites that may be used, status)
PLACEMENT_CASES = [
    (
        "residency-FR",
        [FR_EDGE, DE_EDGE],
        deployment(residency={"FR"}),
        {"fr-edge"},
        Status.SCHEDULED,
    ),
    (
        "residency-DE",
        [FR_EDGE, DE_EDGE],
        deployment(residency={"DE"}),
        {"de-edge"},
        Status.SCHEDULED,
    ),
    ("residency-none", [FR_EDGE], deployment(residency={"US"}), set(), Status.UNSCHEDULABLE),
    ("tier-edge", [FR_EDGE, FR_DC], deployment(tiers={"edge"}), {"fr-edge"}, Status.SCHEDULED),
    ("tier-dc", [FR_EDGE, FR_DC], deployment(tiers={"datacenter"}), {"fr-dc"}, Status.SCHEDULED),
    (
        "ray-serve-dc-only",
        [FR_EDGE, FR_DC],
        deployment(variants=(Variant("r", "ray-serve", cpu=1, memory_mib=512),)),
        {"fr-dc"},
        Status.SCHEDULED,
    ),
    (
        "ray-serve-no-dc",
        [FR_EDGE],
        deployment(variants=(Variant("r", "ray-serve", cpu=1, memory_mib=512),)),
        set(),
        Status.UNSCHEDULABLE,
    ),
    (
        "selector",
        [site("a", labels={"zone": "x"}), site("b", labels={"zone": "y"})],
        deployment(selector={"zone": "y"}),
        {"b"},
        Status.SCHEDULED,
    ),
    (
        "selector-none",
        [site("a", labels={"zone": "x"})],
        deployment(selector={"zone": "y"}),
        set(),
        Status.UNSCHEDULABLE,
    ),
    (
        "unhealthy",
        [site("a", healthy=False), site("b", "lyon")],
        deployment(),
        {"b"},
        Status.SCHEDULED,
    ),
    ("all-unhealthy", [site("a", healthy=False)], deployment(), set(), Status.UNSCHEDULABLE),
    (
        "cpu",
        [site("a", cpu=8), site("b", cpu=32)],
        deployment(variants=(BIG_CPU,)),
        {"b"},
        Status.SCHEDULED,
    ),
    (
        "memory",
        [site("a", memory_gib=32), site("b", memory_gib=128)],
        deployment(variants=(BIG_MEM,)),
        {"b"},
        Status.SCHEDULED,
    ),
    (
        "gpu-memory-80-not-24",
        [DE_DC_24, FR_DC],
        deployment(variants=(LARGE,)),
        {"fr-dc"},
        Status.SCHEDULED,
    ),
    ("gpu-memory-only-24", [DE_DC_24], deployment(variants=(LARGE,)), set(), Status.UNSCHEDULABLE),
    (
        "gpu-count",
        [site("g1", tier="datacenter", gpus=((1, 80),)), FR_DC],
        deployment(variants=(LARGE,)),
        {"fr-dc"},
        Status.SCHEDULED,
    ),
    ("gpu-24-fits-80", [FR_DC], deployment(variants=(GPU_24,)), {"fr-dc"}, Status.SCHEDULED),
    ("no-gpu-on-edge", [FR_EDGE], deployment(variants=(GPU_24,)), set(), Status.UNSCHEDULABLE),
    (
        "degraded",
        [site("a", cpu=2)],
        deployment(replicas=(1, 5), demand=(("paris", 250),)),
        {"a"},
        Status.DEGRADED,
    ),
    ("min-not-met", [site("a", cpu=2)], deployment(replicas=(3, 3)), {"a"}, Status.UNSCHEDULABLE),
]


@pytest.mark.parametrize(
    ("sites", "dep", "allowed", "status"),
    [case[1:] for case in PLACEMENT_CASES],
    ids=[case[0] for case in PLACEMENT_CASES],
)
def test_hard_constraint(sites, dep, allowed, status):
    result = plan(sites, [dep])
    used = {r.site for r in result.replicas}
    assert used <= allowed
    if allowed and status is Status.SCHEDULED:
        assert used, "a feasible deployment must be placed"
    assert result.deployments[dep.name].status is status


# (case id, sites, deployment, words the reason must contain)
REASON_CASES = [
    ("no-country", [FR_EDGE], deployment(residency={"US"}), "no site in US"),
    (
        "no-tier",
        [FR_EDGE],
        deployment(residency={"FR"}, tiers={"datacenter"}),
        "no datacenter site in FR",
    ),
    ("selector", [FR_EDGE], deployment(selector={"zone": "y"}), "matches selector zone=y"),
    ("unhealthy", [site("a", healthy=False)], deployment(), "are unhealthy"),
    (
        "ray-serve-edge",
        [FR_EDGE],
        deployment(variants=(Variant("r", "ray-serve", cpu=1, memory_mib=512),)),
        "ray-serve runs only in data centres",
    ),
    (
        "variant-by-tier-missing",
        [FR_EDGE],
        deployment(variant_by_tier={"edge": "tiny"}),
        "model d has no variant tiny for edge (it has small)",
    ),
    ("hardware", [DE_DC_24], deployment(variants=(LARGE,)), "no healthy one has the hardware"),
    (
        "gpu-free",
        [FR_DC],
        deployment(variants=(LARGE,), replicas=(3, 3), residency={"FR"}, tiers={"datacenter"}),
        "FR datacenter sites have 0 free GPU(s) with ≥80 GiB",
    ),
    (
        "cpu-free",
        [site("a", cpu=2)],
        deployment(replicas=(3, 3)),
        "at most 0 free CPU on one site, 1 needed",
    ),
    (
        "memory-free",
        [site("a", memory_gib=2)],
        deployment(replicas=(3, 3)),
        "GiB free memory on one site, 1 GiB needed",
    ),
    (
        "spread",
        [site("a", "paris", cpu=1), site("b", "lyon", cpu=64)],
        deployment(replicas=(5, 5), spread=("region", 1)),
        "spread by region maxSkew 1",
    ),
    ("min-shortfall-count", [site("a", cpu=2)], deployment(replicas=(3, 3)), "2 of 3 placed"),
]


@pytest.mark.parametrize(
    ("sites", "dep", "words"),
    [case[1:] for case in REASON_CASES],
    ids=[case[0] for case in REASON_CASES],
)
def test_reason_names_the_binding_constraint(sites, dep, words):
    result = plan(sites, [dep])
    status = result.deployments[dep.name]
    assert status.status is not Status.SCHEDULED
    assert words in status.reason, status.reason


def test_gpu_reason_counts_free_cards():
    dc = site("fr-dc", tier="datacenter", cpu=64, memory_gib=512, gpus=((3, 80),))
    dep = deployment(variants=(LARGE,), replicas=(2, 2), residency={"FR"}, tiers={"datacenter"})
    result = plan([dc], [dep])
    reason = result.deployments["d"].reason
    assert reason.startswith("needs 2 × large (2×80 GiB GPU")
    assert "FR datacenter sites have 1 free GPU(s) with ≥80 GiB" in reason
    assert result.deployments["d"].placed == 1


@pytest.mark.parametrize("skew", [1, 2])
@pytest.mark.parametrize("replicas", [3, 4, 7])
def test_spread_max_skew_by_region(skew, replicas):
    sites = [site(f"s{i}-{c}", c, cpu=64) for c in ("paris", "lyon", "marseille") for i in range(2)]
    dep = deployment(replicas=(replicas, replicas), spread=("region", skew), demand=(("paris", 10),))
    result = plan(sites, [dep])
    per_region = {c: 0 for c in ("paris", "lyon", "marseille")}
    for r in result.replicas:
        per_region[r.site.split("-", 1)[1]] += 1
    assert sum(per_region.values()) == replicas
    assert max(per_region.values()) - min(per_region.values()) <= skew


def test_spread_by_site():
    sites = [site(f"s{i}", cpu=64) for i in range(3)]
    dep = deployment(replicas=(6, 6), spread=("site", 1))
    counts = plan(sites, [dep]).counts()
    assert sorted(counts.values()) == [2, 2, 2]


def test_capacity_is_shared_across_deployments():
    a = site("a", cpu=3)
    deps = [deployment(f"d{i}", replicas=(2, 2)) for i in range(3)]
    result = plan([a], deps)
    assert len(result.replicas) == 3
    assert sum(d.placed for d in result.deployments.values()) == 3


def test_gpus_are_whole_units_per_group():
    # two groups of one 80 GiB card each: a 2-GPU replica needs both cards in one group
    dc = site("dc", tier="datacenter", cpu=64, memory_gib=512, gpus=((1, 80), (1, 80)))
    result = plan([dc], [deployment(variants=(LARGE,))])
    assert result.replicas == ()


def gpu_dc(name: str, city: str, model: str) -> Site:
    return dataclasses.replace(site(name, city, tier="datacenter", cpu=128, memory_gib=1024), gpus=(GpuGroup(model, 8, 80),))


def on_gpu(model: str | None) -> Variant:
    return Variant("v", "vllm", cpu=8, memory_mib=65536, gpus=8, gpu_memory_gib=40, gpu_model=model)


@pytest.mark.parametrize(("first", "second"), [
    # no L4 anywhere: the first finds no site, and the second must not inherit that
    (deployment("first", variants=(on_gpu("L4"),), tiers={"datacenter"}), deployment("second", variants=(on_gpu("H100"),), tiers={"datacenter"})),
    # same size, any GPU model: the B200 the first needs is missing, yet the A100 and H100 fit the second
    (deployment("first", variants=(on_gpu("B200"),), residency={"DE"}), deployment("second", variants=(on_gpu(None),))),
])
def test_variants_of_the_same_size_on_other_gpu_models_fit_their_own_sites(first, second):
    sites = [gpu_dc("dc-a100", "frankfurt", "A100"), gpu_dc("dc-h100", "berlin", "H100")]
    result = plan(sites, [first, second])
    assert result.deployments["first"].status is Status.UNSCHEDULABLE
    assert result.deployments["second"].status is Status.SCHEDULED, result.deployments["second"].reason


def test_a_replica_of_any_gpu_model_leaves_the_cards_another_deployment_needs():
    two_models = dataclasses.replace(site("dc", tier="datacenter", cpu=64, memory_gib=512),
                                     gpus=(GpuGroup("L4", 1, 24), GpuGroup("H100", 1, 80)))
    any_gpu = Variant("any", "ray-serve", cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=16)
    l4_only = Variant("l4", "vllm", cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=16, gpu_model="L4")
    result = plan([two_models], [deployment("a", variants=(any_gpu,)), deployment("b", variants=(l4_only,))])
    assert {r.deployment: r.site for r in result.replicas} == {"a": "dc", "b": "dc"}
    assert all(p.status is Status.SCHEDULED for p in result.deployments.values())


def test_variant_by_tier_picks_distilled_at_edge_and_large_in_dc():
    dc = site("dc", "paris", tier="datacenter", cpu=64, memory_gib=512, gpus=((4, 80),))
    edge = site("edge", "lyon")
    dep = deployment(
        variants=(SMALL, LARGE),
        replicas=(2, 2),
        spread=("site", 1),
        variant_by_tier={"edge": "small", "datacenter": "large"},
    )
    placed = {(r.site, r.variant) for r in plan([dc, edge], [dep]).replicas}
    assert placed == {("dc", "large"), ("edge", "small")}


def test_distilled_preferred_at_edge_when_both_allowed():
    dc = site("dc", "paris", tier="datacenter", cpu=64, memory_gib=512, gpus=((4, 80),))
    edge = site("edge", "paris")
    both = Variant("large-onnx", "onnx", cpu=1, memory_mib=1024, distilled=False)
    dep = deployment(variants=(SMALL, both), demand=(("paris", 1),))
    (replica,) = plan([dc, edge], [dep]).replicas
    assert (replica.site, replica.variant) == ("edge", "small")


def test_replica_count_follows_demand_within_min_max():
    sites = [site("a", cpu=64)]
    for rps, want in [(0, 1), (40, 1), (60, 2), (200, 4), (240, 5), (10_000, 6)]:
        dep = deployment(replicas=(1, 6), demand=(("paris", rps),) if rps else ())
        assert plan(sites, [dep]).deployments["d"].placed == want, rps


def test_a_demand_too_large_for_a_float_count_asks_for_max():
    """A throughput so small that demand / throughput overflows to inf still plans: max replicas."""
    tiny = Variant("tiny", "onnx", cpu=1, memory_mib=1024, throughput_rps=1e-320)
    result = plan([site("a", cpu=64)], [deployment(variants=(tiny,), replicas=(1, 3), demand=(("paris", 100),))])
    assert result.deployments["d"].placed == 3
    assert result.deployments["d"].status is Status.SCHEDULED


def test_latency_prefers_nearest_site():
    sites = [site("paris-edge", "paris"), site("berlin-edge", "berlin")]
    dep = deployment(demand=(("berlin", 10),))
    result = plan(sites, [dep])
    assert [r.site for r in result.replicas] == ["berlin-edge"]
    (point,) = result.deployments["d"].latency
    assert point.site == "berlin-edge" and point.rtt_ms == pytest.approx(2.0, abs=0.5)


def test_carbon_breaks_ties_between_equally_near_sites():
    sites = [site("dirty", "paris", carbon=800), site("clean", "paris", carbon=20)]
    (replica,) = plan(sites, [deployment(demand=(("paris", 10),))]).replicas
    assert replica.site == "clean"


def test_every_replica_has_a_reason_and_energy_is_reported():
    sites = [site("a", carbon=200, pue=1.5)]
    result = plan(sites, [deployment(replicas=(2, 2), demand=(("paris", 1),))])
    assert all(r.reason for r in result.replicas)
    watts = 2 * SMALL.watts * 1.5
    assert result.energy.watts == pytest.approx(watts)
    assert result.energy.g_co2_per_hour == pytest.approx(watts * 200 / 1000)


def test_unlocatable_demand_is_noted_not_fatal():
    result = plan([site("a")], [deployment(demand=(("atlantis", 5),))])
    plan_d = result.deployments["d"]
    assert plan_d.status is Status.SCHEDULED
    assert any("atlantis" in note for note in plan_d.notes)


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="declared twice"):
        plan([site("a"), site("a")], [])
    with pytest.raises(ValueError, match="declared twice"):
        plan([site("a")], [deployment(), deployment()])


def test_a_search_of_no_candidates_is_refused_rather_than_never_widened():
    with pytest.raises(ValueError, match="candidates must be None or at least 1"):
        Tuning(candidates=0)
    assert plan([site("a")], [deployment()], tuning=Tuning(candidates=1)).deployments["d"].placed == 1
