"""What-if simulation on small fleets: every kind of change, and what the report says."""

from __future__ import annotations

import dataclasses
import json

import pytest

from orchestrator.scheduler import model as sched
from orchestrator.simulation import measure, report, scenario, sweep, whatif

from .fleets import BERLIN, FRANKFURT, LYON, MADRID, PARIS, SITES, SMALL, deployment, site

PARIS_DEMAND = (sched.DemandPoint(rps=80, lat=48.86, lon=2.35),)


def state(*deployments: sched.Deployment, sites: tuple[sched.Site, ...] = SITES) -> whatif.State:
    return whatif.today(sites, deployments)


def where(st: whatif.State, name: str) -> list[str]:
    return sorted(r.site for r in st.current if r.deployment == name)


def test_failing_a_site_moves_its_replica_within_residency() -> None:
    st = state(deployment("fr", residency={"FR"}, demand=PARIS_DEMAND))
    assert where(st, "fr") == ["edge-paris"]
    r = whatif.simulate(st, scenario.Changes(fail_sites=frozenset({"edge-paris"})))
    assert [(m.from_site, m.to_site) for m in r.moved] == [("edge-paris", "edge-lyon")]
    assert r.unschedulable_replicas == 0 and r.crossings == ()
    assert r.after.p50_ms is not None and r.before.p50_ms is not None and r.after.p50_ms > r.before.p50_ms


@pytest.mark.parametrize("changes, reason_part", [
    (scenario.Changes(fail_regions=frozenset({"eu-west"})), "FR"),
    (scenario.Changes(fail_countries=frozenset({"FR"})), "FR"),
    (scenario.Changes(fail_sites=frozenset({"edge-paris", "edge-lyon"})), "FR"),
])
def test_losing_every_allowed_site_is_unschedulable_with_a_reason_and_never_crosses(changes: scenario.Changes, reason_part: str) -> None:
    st = state(deployment("fr", residency={"FR"}, demand=PARIS_DEMAND))
    r = whatif.simulate(st, changes)
    assert [(s.deployment, s.status, s.placed, s.new) for s in r.short] == [("fr", "Unschedulable", 0, 1)]
    assert r.short[0].reason  # the planner's binding constraint, in words
    assert r.unschedulable_replicas == 1 and r.crossings == ()
    assert r.after.unserved_rps == 80 and r.after.p50_ms is None


def test_failing_the_edge_tier_leaves_data_centres() -> None:
    st = state(deployment("any", demand=PARIS_DEMAND), deployment("edge-only", tiers=frozenset({sched.Tier.EDGE})))
    r = whatif.simulate(st, scenario.Changes(fail_tiers=frozenset({sched.Tier.EDGE})))
    short = {s.deployment for s in r.short}
    assert short == {"edge-only"}
    assert [m.to_site for m in r.moved if m.deployment == "any"] == ["dc-frankfurt"]


def test_scaling_demand_adds_replicas_and_power() -> None:
    d = deployment("grow", residency={"FR", "DE"}, demand=(sched.DemandPoint(rps=90, region="eu-west"),), replicas=1, max_replicas=10)
    st = state(d)
    r = whatif.simulate(st, scenario.Changes(demand=(scenario.DemandScale(3.0, region="eu-west"),)))
    assert len(r.added) == 2  # 270 rps at 100 rps per replica
    assert r.after.replicas == 3 and r.after.watts > r.before.watts
    assert [p.rps for p in r.after.points] == [270]


def test_demand_scale_matches_only_its_region_or_point() -> None:
    d = deployment("d", demand=(sched.DemandPoint(rps=10, region="eu-west"), sched.DemandPoint(rps=10, lat=48.86, lon=2.35)))
    scaled = whatif.scale_demand(d, (scenario.DemandScale(2.0, region="eu-west"), scenario.DemandScale(5.0, point=(48.86, 2.35))))
    assert [p.rps for p in scaled.demand] == [20, 50]
    everything = whatif.scale_demand(d, (scenario.DemandScale(0.5),))
    assert [p.rps for p in everything.demand] == [5, 5]
    autoscaled = whatif.scale_demand(sched.Deployment("a", "a", (), 1, 10, demand=d.demand, autoscaled_replicas=3), (scenario.DemandScale(2.0),))
    assert autoscaled.autoscaled_replicas == 6


def test_a_demand_change_at_coordinates_no_demand_point_has_is_refused_naming_the_nearest() -> None:
    """Lyon's demand is declared at 45.764,4.8357 and reported as 45.76,4.84: a change at the
    reported point (or at a mistyped one) must not be a silent "no change"."""
    lyon = sched.DemandPoint(rps=40, lat=45.764, lon=4.8357)
    st = state(deployment("fr", residency={"FR"}, demand=(lyon, *PARIS_DEMAND)))
    assert whatif.simulate(st, scenario.Changes(demand=(scenario.DemandScale(2, point=(45.764, 4.8357)),))).after.points[0].rps == 80
    with pytest.raises(scenario.ScenarioError) as refused:
        whatif.simulate(st, scenario.Changes(demand=(scenario.DemandScale(2, point=(45.76, 4.84)),)))
    assert str(refused.value) == ("spec.demand: no deployment has demand at 45.76,4.84 (a change by lat/lon scales the demand "
                                  "declared at those very coordinates); the nearest is at 45.764,4.8357")
    assert refused.value.field == ("spec", "demand")


def test_demand_changes_that_together_multiply_past_the_bound_are_refused_naming_spec_demand() -> None:
    grow = deployment("grow", demand=(sched.DemandPoint(rps=50, region="eu-west"),), replicas=1, max_replicas=4)
    autoscaled = dataclasses.replace(grow, name="auto", autoscaled_replicas=2)
    many = tuple(scenario.DemandScale(1000.0) for _ in range(110))  # each within its own bound; ×1e330 in all
    for d in (grow, autoscaled):
        with pytest.raises(scenario.ScenarioError, match=r"^spec.demand: the demand changes matching eu-west of deployment") as exc:
            whatif.simulate(state(d), scenario.Changes(demand=many))
        assert exc.value.field == ("spec", "demand")
    # what stays within the bound however large the partial products is answered
    back = tuple(scenario.DemandScale(0.001) for _ in range(110))
    r = whatif.simulate(state(grow), scenario.Changes(demand=many + back))
    assert [p.rps for p in r.after.points] == [pytest.approx(50)]


def test_demand_scaled_to_zero_after_huge_factors_is_no_demand() -> None:
    d = deployment("d", demand=(sched.DemandPoint(rps=50, region="eu-west"),), replicas=1, max_replicas=4)
    zero = tuple(scenario.DemandScale(1000.0) for _ in range(110)) + (scenario.DemandScale(0.0),)
    for each in (d, dataclasses.replace(d, autoscaled_replicas=2)):
        r = whatif.simulate(state(each), scenario.Changes(demand=zero))
        assert [p.rps for p in r.after.points] == [0] and r.after.replicas == 1  # min, not max
        json.dumps(report.report(r), allow_nan=False)  # what the API answers: no NaN or infinity
    # unchecked, scaling caps the product rather than making demand infinite
    capped = whatif.scale_demand(d, zero[:-1])
    assert capped.demand[0].rps == 50 * scenario.MAX_DEMAND_FACTOR


def test_a_dirtier_grid_moves_replicas_to_cleaner_sites_and_lowers_emissions() -> None:
    # Two sites equally far from the demand; the planner picks the cleaner one.
    a = site("edge-a", "FR", "r", 48.0, 2.0, carbon=50.0)
    b = site("edge-b", "FR", "r", 48.0, 2.0001, carbon=60.0)
    hungry = sched.Variant("hungry", sched.Runtime.ONNX, cpu=1, memory_mib=512, power_watts=200.0)
    st = state(deployment("d", demand=(sched.DemandPoint(rps=10, lat=48.0, lon=2.0),), variant=hungry), sites=(a, b))
    assert where(st, "d") == ["edge-a"]
    r = whatif.simulate(st, scenario.Changes(edits={"edge-a": scenario.SiteEdit(carbon_g_per_kwh=900.0)}))
    assert [(m.from_site, m.to_site) for m in r.moved] == [("edge-a", "edge-b")]
    assert r.before.g_co2_per_hour == pytest.approx(200 * 50 / 1000)
    assert r.after.g_co2_per_hour == pytest.approx(200 * 60 / 1000)  # at edge-b, not 200 W at 900 g/kWh


def test_capacity_cut_moves_what_no_longer_fits() -> None:
    st = state(deployment("d", residency={"FR"}, replicas=4, demand=PARIS_DEMAND))
    at_paris = where(st, "d").count("edge-paris")
    assert at_paris >= 1
    r = whatif.simulate(st, scenario.Changes(edits={"edge-paris": scenario.SiteEdit(capacity_factor=0.0)}))
    assert len(r.moved) == at_paris and all(m.from_site == "edge-paris" for m in r.moved)


def test_a_lowered_power_budget_moves_what_it_no_longer_covers_and_says_so() -> None:
    st = state(deployment("d", residency={"FR"}, replicas=4, demand=PARIS_DEMAND))
    at_paris = where(st, "d").count("edge-paris")
    assert at_paris >= 1
    budget = (at_paris - 0.5) * SMALL.watts  # room for one replica less
    changes = scenario.Changes(edits={"edge-paris": scenario.SiteEdit(power_budget_watts=budget)})
    assert changes.describe() == f"edge-paris power budget {budget:g} W"
    r = whatif.simulate(st, changes)
    assert [(m.from_site, m.to_site) for m in r.moved] == [("edge-paris", "edge-lyon")]
    assert "no longer within the power budget" in r.moved[0].reason


def test_a_sweep_places_a_lost_sites_replicas_within_the_others_power_budgets() -> None:
    """Lyon's budget holds one replica, which ``other`` runs: ``fr`` has nowhere to go."""
    lyon = dataclasses.replace(LYON, power_budget_watts=SMALL.watts, carbon_g_per_kwh=400)
    other = deployment("other", residency={"FR"}, demand=(sched.DemandPoint(rps=10, lat=LYON.lat, lon=LYON.lon),))
    st = state(deployment("fr", residency={"FR"}, replicas=2, demand=PARIS_DEMAND), other, sites=(PARIS, lyon, BERLIN))
    assert (where(st, "fr"), where(st, "other")) == (["edge-paris", "edge-paris"], ["edge-lyon"])
    assert _swept_and_simulated(st, "edge-paris") == (2, 2)


@pytest.mark.parametrize("lowered", [{"power_budget_watts": 100}, {"cpu": 2}])
def test_a_sweep_gives_a_site_holding_more_than_it_has_no_room_it_does_not_have(lowered: dict[str, float]) -> None:
    """Paris runs three replicas of 50 W and 1 CPU each with room for two (its power budget
    or its capacity lowered): ``a``'s two take it all, so ``b``'s there has no room once
    Lyon is lost, as a full simulation finds."""
    fifty = dataclasses.replace(SMALL, power_watts=50)
    paris = dataclasses.replace(PARIS, **lowered)
    a, b = (deployment(name, residency={"FR"}, replicas=2, variant=fifty) for name in ("a", "b"))
    running = (("a", PARIS), ("a", PARIS), ("b", PARIS), ("b", LYON))
    st = whatif.State((paris, LYON), (a, b), tuple(sched.Replica(d, s.name, "small") for d, s in running))
    assert _swept_and_simulated(st, LYON.name) == (2, 2)


def test_an_added_site_near_demand_attracts_the_replica() -> None:
    st = state(deployment("d", residency={"ES", "FR"}, demand=PARIS_DEMAND), sites=(MADRID,))
    new = site("edge-paris-2", "FR", "eu-west", 48.85, 2.36)
    r = whatif.simulate(st, scenario.Changes(added=(new,)))
    assert [(m.from_site, m.to_site) for m in r.moved] == [("edge-madrid", "edge-paris-2")]
    assert r.after.p50_ms is not None and r.before.p50_ms is not None and r.after.p50_ms < r.before.p50_ms / 3


@pytest.mark.parametrize("changes, message", [
    (scenario.Changes(fail_sites=frozenset({"edge-nowhere"})), "site 'edge-nowhere' is not in the fleet"),
    (scenario.Changes(fail_regions=frozenset({"mars"})), "region 'mars' has no site"),
    (scenario.Changes(fail_countries=frozenset({"GB"})), r"country 'GB' has no site \(countries: DE, ES, FR\)"),
    (scenario.Changes(edits={"nope": scenario.SiteEdit(carbon_g_per_kwh=1)}), "site 'nope' is not in the fleet"),
    (scenario.Changes(demand=(scenario.DemandScale(2, region="atlantis"),)), "demand region 'atlantis'"),
    (scenario.Changes(added=(PARIS,)), "already in the fleet"),
])
def test_a_scenario_naming_what_the_fleet_lacks_is_refused(changes: scenario.Changes, message: str) -> None:
    with pytest.raises(scenario.ScenarioError, match=message):
        whatif.simulate(state(deployment("d")), changes)


def test_simulation_is_deterministic_and_changes_nothing() -> None:
    st = state(deployment("fr", residency={"FR"}, replicas=2, demand=PARIS_DEMAND), deployment("eu", replicas=3))
    before = list(st.current)
    ch = scenario.Changes(fail_sites=frozenset({"edge-paris"}), demand=(scenario.DemandScale(2.0),))
    assert report.report(whatif.simulate(st, ch)) == report.report(whatif.simulate(st, ch))
    assert list(st.current) == before


def test_no_change_moves_nothing() -> None:
    st = state(deployment("fr", residency={"FR"}, replicas=2, demand=PARIS_DEMAND), deployment("eu", replicas=3))
    r = whatif.simulate(st, scenario.Changes())
    assert (r.moved, r.added, r.removed, r.short) == ((), (), (), ())
    assert r.after == r.before


@pytest.mark.parametrize("values, weights, q, expected", [
    ([1.0, 2.0, 3.0], [1, 1, 1], 0.5, 2.0),
    ([1.0, 2.0, 3.0], [1, 1, 1], 0.95, 3.0),
    ([10.0, 1.0], [1, 9], 0.5, 1.0),
    ([10.0, 1.0], [1, 9], 0.95, 10.0),
    ([1.0, float("inf")], [1, 1], 0.95, None),
    ([5.0], [0], 0.5, 5.0),
    ([], [], 0.5, None),
])
def test_weighted_percentile(values: list[float], weights: list[float], q: float, expected: float | None) -> None:
    assert measure.weighted_percentile(values, weights, q) == expected


def test_sweep_ranks_the_only_allowed_site_first() -> None:
    st = state(deployment("de", residency={"DE"}, tiers=frozenset({sched.Tier.EDGE})), deployment("fr", residency={"FR"}, demand=PARIS_DEMAND))
    result = sweep.sweep(st, "site")
    assert result.impacts[0].target == "edge-berlin"
    assert result.impacts[0].unschedulable == 1 and result.impacts[0].deployments_short == ("de",)
    empty = next(i for i in result.impacts if i.target == "edge-madrid")
    assert (empty.replicas_lost, empty.moved, empty.unschedulable) == (0, 0, 0)
    assert {i.target for i in result.impacts} == {s.name for s in SITES}


def test_sweep_agrees_with_a_full_simulation_on_what_no_longer_fits() -> None:
    st = state(deployment("de", residency={"DE"}, replicas=2), deployment("fr", residency={"FR"}, replicas=2, demand=PARIS_DEMAND),
               deployment("eu", replicas=3, demand=(sched.DemandPoint(rps=50, region="eu-south"),)))
    by_region = {i.target: i for i in sweep.sweep(st, "region").impacts}
    for region in ("eu-west", "eu-central", "eu-south"):
        full = whatif.simulate(st, scenario.Changes(fail_regions=frozenset({region})))
        assert by_region[region].unschedulable == full.unschedulable_replicas, region
        assert by_region[region].moved == len(full.moved), region


def _swept_and_simulated(st: whatif.State, lost: str) -> tuple[int, int]:
    """Replicas that no longer fit after losing site ``lost``: by the sweep, by a full simulation."""
    impact = {i.target: i for i in sweep.sweep(st, "site").impacts}[lost]
    return impact.unschedulable, whatif.simulate(st, scenario.Changes(fail_sites=frozenset({lost}))).unschedulable_replicas


def test_a_sweep_keeps_the_edge_sites_another_deployment_of_the_model_holds() -> None:
    """Paris serves model m for ``b`` (an edge agent serves a model for one deployment), so
    ``a`` has nowhere to go once Lyon is lost."""
    a = dataclasses.replace(deployment("a", tiers=frozenset({sched.Tier.EDGE}), residency={"FR"}), model="m")
    b = dataclasses.replace(deployment("b", tiers=frozenset({sched.Tier.EDGE}), residency={"FR"}), model="m")
    st = whatif.State(SITES, (a, b), (sched.Replica("a", LYON.name, "small"), sched.Replica("b", PARIS.name, "small")))
    assert _swept_and_simulated(st, LYON.name) == (1, 1)


def test_a_sweep_books_running_gpu_replicas_on_the_cards_of_their_model() -> None:
    """x's H100 replica holds dc-a's only H100, not its A100: losing dc-b leaves z no H100."""
    h100 = sched.Variant("h", sched.Runtime.RAY_SERVE, cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=40, gpu_model="H100")
    dc_a = dataclasses.replace(FRANKFURT, name="dc-a", gpus=(sched.GpuGroup("A100", 1, 80), sched.GpuGroup("H100", 1, 80)))
    dc_b = dataclasses.replace(FRANKFURT, name="dc-b", gpus=(sched.GpuGroup("H100", 1, 80),))
    x, z = deployment("x", variant=h100), deployment("z", variant=h100)
    st = whatif.State((dc_a, dc_b), (x, z), (sched.Replica("x", "dc-a", "h"), sched.Replica("z", "dc-b", "h")))
    assert _swept_and_simulated(st, "dc-b") == (1, 1)



def test_a_sweep_counts_every_gpu_a_site_of_mixed_cards_runs() -> None:
    """dc-a's 2 T4s run beta (2 GPUs) and its A100 alpha (1): losing dc-b leaves gamma no GPU."""
    one = sched.Variant("one", sched.Runtime.RAY_SERVE, cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=16)
    two = dataclasses.replace(one, name="two", gpus=2)
    dc_a = dataclasses.replace(FRANKFURT, name="dc-a", gpus=(sched.GpuGroup("T4", 2, 16), sched.GpuGroup("A100", 1, 80)))
    dc_b = dataclasses.replace(FRANKFURT, name="dc-b", gpus=(sched.GpuGroup("T4", 1, 16),))
    alpha, beta, gamma = deployment("alpha", variant=one), deployment("beta", variant=two), deployment("gamma", variant=one)
    running = (sched.Replica("alpha", "dc-a", "one"), sched.Replica("beta", "dc-a", "two"), sched.Replica("gamma", "dc-b", "one"))
    assert _swept_and_simulated(whatif.State((dc_a, dc_b), (alpha, beta, gamma), running), "dc-b") == (1, 1)


def test_a_sweep_under_a_scenario_starts_from_the_scenarios_plan() -> None:
    st = state(deployment("fr", residency={"FR"}, replicas=2, demand=PARIS_DEMAND), deployment("eu", replicas=2))
    changes = scenario.Changes(fail_sites=frozenset({"edge-paris"}), demand=(scenario.DemandScale(2.0),))
    result = sweep.sweep_under(st, "site", changes)
    assert result.scenario == "fail site edge-paris, demand all demand ×2"
    assert {i.target for i in result.impacts} == {s.name for s in SITES} - {"edge-paris"}  # what the scenario failed is not lost again
    assert result.before == whatif.simulate(st, changes).after  # measured against the scenario, not today
    # losing Lyon after Paris leaves "fr" no French site: what a full simulation of both failures says too
    lyon = next(i for i in result.impacts if i.target == "edge-lyon")
    both = whatif.simulate(st, scenario.Changes(fail_sites=frozenset({"edge-paris", "edge-lyon"}), demand=changes.demand))
    assert lyon.unschedulable == both.unschedulable_replicas == 2 and lyon.deployments_short == ("fr",)
    plain = sweep.sweep_under(st, "site", scenario.Changes())
    assert plain.scenario == "no change" and plain == sweep.sweep(st, "site")


def test_a_region_sweep_under_a_scenario_counts_only_the_sites_it_still_has() -> None:
    st = state(deployment("fr", residency={"FR"}, demand=PARIS_DEMAND), deployment("eu", replicas=2))
    west = sorted(s.name for s in SITES if s.region == "eu-west")
    assert len(west) >= 2
    plain = {i.target: i for i in sweep.sweep_under(st, "region", scenario.Changes()).impacts}
    after = {i.target: i for i in sweep.sweep_under(st, "region", scenario.Changes(fail_sites=frozenset({west[0]}))).impacts}
    assert plain["eu-west"].sites == len(west)
    assert after["eu-west"].sites == len(west) - 1  # the site the scenario failed is not lost twice
    assert {t: i.sites for t, i in after.items() if t != "eu-west"} == {t: i.sites for t, i in plain.items() if t != "eu-west"}


def test_sweep_of_an_unknown_target_is_refused() -> None:
    with pytest.raises(scenario.ScenarioError, match="site 'x' is not in the fleet"):
        sweep.sweep(state(deployment("d")), "site", ["x"])


def test_report_as_data_carries_every_part() -> None:
    st = state(deployment("fr", residency={"FR"}, demand=PARIS_DEMAND), sites=(PARIS, LYON, BERLIN, FRANKFURT))
    data = report.report(whatif.simulate(st, scenario.Changes(name="drill", fail_sites=frozenset({"edge-paris"}))))
    assert data["name"] == "drill" and data["scenario"] == "fail site edge-paris"
    assert data["summary"] == {"moved": 1, "added": 0, "removed": 0, "unschedulableReplicas": 0, "residencyCrossings": 0}
    assert data["moves"][0]["from"] == "edge-paris" and data["moves"][0]["to"] == "edge-lyon"
    assert data["before"]["demand"][0]["point"] == "48.86,2.35" and data["after"]["latencyP95Ms"] > data["before"]["latencyP95Ms"]
    assert data["residency"] == {"crossings": []}


def test_a_region_sweep_loses_no_site_that_declares_no_region() -> None:
    """Lyon (FR) and Berlin (DE) declare no region: they are in none, not in one named ''
    that a region sweep would lose at once, nor one a scenario may fail."""
    lyon, berlin = dataclasses.replace(LYON, region=""), dataclasses.replace(BERLIN, region="")
    st = state(deployment("eu", replicas=3), sites=(PARIS, lyon, berlin, MADRID))
    result = sweep.sweep(st, "region")
    assert [(i.target, i.sites) for i in sorted(result.impacts, key=lambda i: i.target)] == [("eu-south", 1), ("eu-west", 1)]
    assert [i.target for i in sweep.sweep_under(st, "region", scenario.Changes(fail_sites=frozenset({"edge-paris"}))).impacts] == ["eu-south"]
    with pytest.raises(scenario.ScenarioError, match=r"region '' has no site \(regions: eu-south, eu-west\)"):
        whatif.simulate(st, scenario.Changes(fail_regions=frozenset({""})))
