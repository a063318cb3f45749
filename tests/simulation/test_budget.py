"""The work budget of a what-if: counted before any planning, an upper bound on the plans a
sweep makes, and a refusal that says what is too large and how to narrow it. Also the
scenario's own size limits (added sites, values once YAML aliases are expanded)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from orchestrator.api import simulate as simulate_api
from orchestrator.scheduler import model as sched
from orchestrator.scheduler import planner
from orchestrator.simulation import budget, scenario, sweep, whatif

from .fleets import SITES, deployment, site

PARIS_DEMAND = (sched.DemandPoint(rps=250, lat=48.86, lon=2.35, region="eu-west"),)

#: Five sites; three deployments on two to three replicas each.
STATE = whatif.today(SITES, (deployment("a", 2, demand=PARIS_DEMAND), deployment("b", 3), deployment("c", 2, residency={"FR", "DE"})))
S, D = len(SITES), 3
HOSTING = len({r.site for r in STATE.current})
PAIRS = len({(r.site, r.deployment) for r in STATE.current})


def added(n: int) -> str:
    """A scenario adding ``n`` edge sites, written out (no aliases)."""
    rows = "".join(f"  - {{metadata: {{name: new-{i}}}, spec: {{tier: edge, location: {{country: FR, region: eu-west, "
                   f"lat: 45, lon: 4}}, capacity: {{cpu: 4, memoryGiB: 8}}}}}}\n" for i in range(n))
    return "addSites:\n" + rows


@pytest.mark.parametrize("body, each, units", [
    ("", None, S * (budget.FLEET_UNITS + D)),
    ("fail: {sites: [edge-paris]}", None, S * (budget.FLEET_UNITS + D)),
    (added(5), None, (S + 5) * (budget.FLEET_UNITS + D)),
    ("demand: [{factor: 2}, {region: eu-west, factor: 2}]", None, S * (budget.FLEET_UNITS + D) + 1 * 2),
    ("", "site", S * (budget.FLEET_UNITS * HOSTING + PAIRS)),  # no scenario: only the sweep's plans
])
def test_the_work_is_sites_times_deployments_per_plan(body: str, each: str | None, units: int) -> None:
    work = budget.check(STATE, scenario.load_text(body), each, 10**12)
    assert work.units == units


@pytest.mark.parametrize("body", ["", "fail: {sites: [edge-paris]}", "fail: {regions: [eu-west]}", "demand: [{factor: 3}]",
                                  "sites: {edge-berlin: {capacityFactor: 0.5}}", added(3)])
@pytest.mark.parametrize("each", ["site", "region"])
def test_the_estimate_bounds_the_plans_a_sweep_makes(body: str, each: str, monkeypatch: pytest.MonkeyPatch) -> None:
    changes = scenario.load_text(body)
    work = budget.check(STATE, changes, each, 10**12)
    calls: list[int] = []
    plan = planner.plan
    monkeypatch.setattr(planner, "plan", lambda sites, deployments, *rest, **kw: (calls.append(len(deployments)),
                                                                                   plan(sites, deployments, *rest, **kw))[1])
    sweep.sweep_under(STATE, each, changes)  # type: ignore[arg-type]
    sites = len(SITES) + len(changes.added)
    assert len(calls) <= work.plans
    assert sum(sites * (budget.FLEET_UNITS + n) for n in calls) <= work.units


def test_the_estimate_counts_the_other_deployments_of_a_model_a_sweep_replans(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = (dataclasses.replace(deployment(name), model="m") for name in ("a", "b"))
    state = whatif.today(SITES, (a, b, deployment("c")))
    work = budget.check(state, scenario.Changes(), "site", 10**12)
    calls: list[int] = []
    plan = planner.plan
    monkeypatch.setattr(planner, "plan", lambda sites, deployments, *rest, **kw: (calls.append(len(deployments)),
                                                                                   plan(sites, deployments, *rest, **kw))[1])
    sweep.sweep(state, "site")
    assert 2 in calls  # losing a's site or b's plans both
    assert sum(len(SITES) * (budget.FLEET_UNITS + n) for n in calls) <= work.units


def test_demand_scaled_over_many_demand_points_counts_the_relocation_it_asks_for() -> None:
    """Relocating replicas scores each against each candidate site at each demand point,
    and the candidates grow with the points: 1,000 replicas between 1,000 points on 4,000
    sites is minutes of planning, though the fleet itself is small."""
    sites = tuple(site(f"s{i}", "FR", f"r{i % 50}", 35 + i % 25, -10 + i % 40) for i in range(4000))
    demand = tuple(sched.DemandPoint(rps=1.0, lat=35 + i % 25, lon=-10 + i % 37) for i in range(1000))
    d = dataclasses.replace(deployment("d", 1, demand=demand, max_replicas=1000), variants=(sched.Variant(
        "v", sched.Runtime.ONNX, cpu=1, memory_mib=512, throughput_rps=4.0),))  # wants 250, ×4: 1,000
    state = whatif.State(sites, (d,), tuple(sched.Replica("d", f"s{i}", "v") for i in range(250)))
    assert budget.check(state, scenario.Changes(), None, budget.DEFAULT_BUDGET).units > 10 * len(sites) * (budget.FLEET_UNITS + 1)
    with pytest.raises(budget.TooMuchWork, match="units relocating replicas between demand points"):
        budget.check(state, scenario.Changes(demand=(scenario.DemandScale(4.0),)), None, budget.DEFAULT_BUDGET)


def test_over_the_budget_is_refused_before_any_planning_with_how_to_narrow_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("planned although over the budget")

    monkeypatch.setattr(planner, "plan", never)
    for body, each in (("", "site"), (added(50), None), ("fail: {sites: [edge-lyon]}", "region")):
        with pytest.raises(budget.TooMuchWork) as refused:
            simulate_api.answer(STATE, body.encode(), each, None, work_budget=100)
        message = str(refused.value)
        assert "too large for the control plane" in message and "over its budget of 100 " in message
        assert "sweep by region instead of site" in message and "add fewer sites" in message
        assert "edgeplane simulate -f" in message


def test_a_site_sweep_of_a_large_fleet_is_refused_and_its_region_sweep_is_not() -> None:
    """The default budget, on 10,000 sites in 400 regions with 1,000 deployments of 20 replicas
    (each in one or two regions): a sweep by site plans 10,000 times, one by region 400 times."""
    sites = tuple(site(f"s{i}", "FR", f"r{i // 25}", 45 + (i % 100) / 100, 4 + (i // 100) / 100) for i in range(10_000))
    replicas = tuple(sched.Replica(f"d{d}", f"s{(d * 10 + k) % 10_000}", "small") for d in range(1_000) for k in range(20))
    state = whatif.State(sites, tuple(deployment(f"d{d}", 20) for d in range(1_000)), replicas)
    with pytest.raises(budget.TooMuchWork, match="an N-1 sweep by site: 10,000 plans"):
        budget.check(state, scenario.Changes(), "site", budget.DEFAULT_BUDGET)
    region = budget.check(state, scenario.Changes(), "region", budget.DEFAULT_BUDGET)
    assert region.plans == 400
    assert budget.check(state, scenario.Changes(fail_sites=frozenset({"s1"})), None, budget.DEFAULT_BUDGET).plans == 1


def test_a_scenario_adds_at_most_ten_thousand_sites() -> None:
    def as_json(n: int) -> str:  # as the CLI sends it (PyYAML would take ~10 s over 10,000 sites)
        spec = {"tier": "edge", "location": {"country": "FR", "region": "eu-west", "lat": 45, "lon": 4}}
        return json.dumps({"spec": {"addSites": [{"metadata": {"name": f"new-{i}"}, "spec": spec} for i in range(n)]}})

    with pytest.raises(scenario.ScenarioError, match="spec.addSites: List should have at most 10000 items"):
        scenario.load_text(as_json(10_001))
    assert len(scenario.load_text(as_json(10_000)).added) == 10_000


def alias_bomb(copies: int, labels: int = 1) -> str:
    """One added site, then ``copies`` more aliases of it: a few bytes each."""
    keys = ", ".join(f"k{i}: v" for i in range(labels))
    first = ("&s {metadata: {name: twin, labels: {" + keys + "}}, spec: {tier: edge, location: {country: FR, "
             "region: eu-west, lat: 45, lon: 4}, capacity: {cpu: 4, memoryGiB: 8}}}")
    return "addSites: [" + first + ", *s" * copies + "]"


def test_aliases_cannot_multiply_a_scenario_past_its_values_limit() -> None:
    body = alias_bomb(100_000)
    assert len(body) < 1_000_000
    with pytest.raises(scenario.ScenarioError, match="more than 500,000 values once YAML aliases are expanded"):
        scenario.load_text(body)
    # refused as the text is read, so the copies are never validated
    with pytest.raises(scenario.ScenarioError, match="more than 500,000 values"):
        scenario.load_data(body)
    with pytest.raises(scenario.ScenarioError, match="more than 500,000 values"):
        scenario.load_text(alias_bomb(1_000, labels=1_000))  # fewer sites, each with every label


def test_an_aliased_site_repeated_is_one_name_given_twice() -> None:
    with pytest.raises(scenario.ScenarioError, match="added site 'twin' is given twice"):
        whatif.check(STATE, scenario.load_text(alias_bomb(3)))
