"""Properties over random fleets: no replica ever lands outside its allowed countries, on an
unhealthy site, or over capacity, and the actions always turn the old placement into the
new one."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.testing.placement_rules import violations
from orchestrator.scheduler import (
    DemandPoint,
    Deployment,
    GpuGroup,
    MoveReplica,
    Placement,
    PlaceReplica,
    RemoveReplica,
    Replica,
    Site,
    Spread,
    Tier,
    Variant,
    exact,
    plan,
)

COUNTRIES = ["FR", "DE", "ES", "CH", "US"]
REGIONS = ["r1", "r2", "r3", "r4"]

sites_st = st.lists(
    st.builds(
        lambda i, country, region, tier, cpu, mem, gpus, healthy, zone, lat, lon, carbon, budget: Site(
            name=f"s{i}",
            tier=tier,
            country=country,
            region=region,
            lat=lat,
            lon=lon,
            cpu=cpu,
            memory_gib=mem,
            gpus=gpus,
            carbon_g_per_kwh=carbon,
            healthy=healthy,
            labels={"zone": zone},
            power_budget_watts=budget,
        ),
        st.integers(0, 10**6),
        st.sampled_from(COUNTRIES),
        st.sampled_from(REGIONS),
        st.sampled_from(list(Tier)),
        st.integers(0, 16),
        st.integers(0, 64),
        st.lists(
            st.builds(GpuGroup, st.just("g"), st.integers(0, 4), st.sampled_from([16, 24, 80])),
            max_size=2,
        ).map(tuple),
        st.booleans(),
        st.sampled_from(["a", "b"]),
        st.floats(35, 60),
        st.floats(-10, 20),
        st.floats(0, 800),
        st.one_of(st.none(), st.floats(1, 400)),  # a power budget, often tighter than the hardware
    ),
    min_size=1,
    max_size=10,
    unique_by=lambda s: s.name,
)

variant_st = st.builds(
    Variant,
    name=st.sampled_from(["v1", "v2", "v3"]),
    runtime=st.sampled_from(["onnx", "ray-serve"]),
    cpu=st.integers(1, 6),
    memory_mib=st.sampled_from([512, 4096, 16384]),
    gpus=st.integers(0, 2),
    gpu_memory_gib=st.sampled_from([0, 16, 24, 80]),
    throughput_rps=st.one_of(st.none(), st.just(20.0)),
)


@st.composite
def deployments_st(draw):
    count = draw(st.integers(1, 4))
    out = []
    for i in range(count):
        variants = draw(st.lists(variant_st, min_size=1, max_size=2, unique_by=lambda v: v.name))
        low = draw(st.integers(0, 3))
        out.append(
            Deployment(
                name=f"d{i}",
                model="m",
                variants=tuple(variants),
                min_replicas=low,
                max_replicas=low + draw(st.integers(0, 3)),
                placement=Placement(
                    residency=draw(st.one_of(st.none(), st.frozensets(st.sampled_from(COUNTRIES), max_size=3))),
                    tiers=draw(st.frozensets(st.sampled_from(list(Tier)), min_size=1)),
                    site_selector=draw(st.sampled_from([{}, {"zone": "a"}])),
                    spread=draw(
                        st.one_of(
                            st.none(),
                            st.builds(Spread, st.sampled_from(["region", "site"]), st.integers(1, 2)),
                        )
                    ),
                ),
                demand=tuple(
                    draw(
                        st.lists(
                            st.builds(DemandPoint, rps=st.floats(0, 100), region=st.sampled_from(REGIONS)),
                            max_size=3,
                        )
                    )
                ),
            )
        )
    return out


def current_st(sites, deployments):
    return st.lists(
        st.builds(
            Replica,
            st.sampled_from([d.name for d in deployments] + ["gone"]),
            st.sampled_from([s.name for s in sites] + ["vanished"]),
            st.sampled_from(["v1", "v2", "v3"]),
        ),
        max_size=8,
    )


def check_hard_rules(sites, deployments, replicas):
    assert violations(sites, deployments, replicas) == []


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hard_rules_hold_over_random_fleets(data):
    sites = data.draw(sites_st)
    deployments = data.draw(deployments_st())
    current = data.draw(current_st(sites, deployments))
    result = plan(sites, deployments, current)
    replicas = result.as_running()
    check_hard_rules(sites, deployments, replicas)
    for d in deployments:
        placed = result.deployments[d.name].placed
        assert placed <= d.wanted_replicas()
    # applying the actions to the current placement gives the new placement
    state = Counter(current)
    for action in result.actions:
        if isinstance(action, PlaceReplica):
            state[Replica(action.deployment, action.site, action.variant)] += 1
        elif isinstance(action, RemoveReplica):
            state[Replica(action.deployment, action.site, action.variant)] -= 1
        else:
            assert isinstance(action, MoveReplica)
            state[Replica(action.deployment, action.from_site, action.from_variant)] -= 1
            state[Replica(action.deployment, action.to_site, action.to_variant)] += 1
    assert +state == Counter(replicas)
    assert all(n >= 0 for n in state.values())


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_exact_baseline_obeys_the_same_rules_and_is_never_worse(data):
    sites = data.draw(sites_st)
    deployments = data.draw(deployments_st())
    planner = plan(sites, deployments)
    best = exact.solve(sites, deployments, time_limit_s=20)
    check_hard_rules(sites, deployments, list(best.replicas))
    if best.optimal:
        assert best.objective.total <= planner.objective.total + 1e-6
