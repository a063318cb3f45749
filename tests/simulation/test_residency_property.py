"""Property: whatever a scenario does to a fleet, no simulated replica leaves its residency.

Fleets, deployments and scenarios are generated (sites in a handful of countries, some
deployments bound to one or two of them, failures, capacity cuts, demand surges, added
sites); the check reads each simulated replica's site country directly, independent of the
report's own audit.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.scheduler import model as sched
from orchestrator.simulation import scenario, sweep, whatif

from .fleets import SMALL

COUNTRIES = {"FR": (46.6, 2.4), "DE": (51.1, 10.4), "ES": (40.4, -3.7), "IT": (42.8, 12.5), "PL": (52.0, 19.1)}


@st.composite
def sites(draw: st.DrawFn, prefix: str, min_size: int, max_size: int) -> list[sched.Site]:
    n = draw(st.integers(min_size, max_size))
    out = []
    for i in range(n):
        country = draw(st.sampled_from(sorted(COUNTRIES)))
        lat, lon = COUNTRIES[country]
        out.append(sched.Site(
            f"{prefix}{i}", draw(st.sampled_from(list(sched.Tier))), country, f"r-{country.lower()}",
            lat + draw(st.floats(-2, 2)), lon + draw(st.floats(-2, 2)), cpu=draw(st.sampled_from([1.0, 2.0, 4.0])), memory_gib=8,
            carbon_g_per_kwh=draw(st.floats(10, 800)),
        ))
    return out


@st.composite
def fleets(draw: st.DrawFn) -> tuple[whatif.State, scenario.Changes]:
    fleet = draw(sites("s", 2, 12))
    deployments = []
    for i in range(draw(st.integers(1, 6))):
        residency = draw(st.none() | st.sets(st.sampled_from(sorted(COUNTRIES)), min_size=1, max_size=2))
        n = draw(st.integers(1, 3))
        point = draw(st.sampled_from(sorted(COUNTRIES)))
        deployments.append(sched.Deployment(
            f"d{i}", f"m{i}", (SMALL,), min_replicas=n, max_replicas=n + 2,
            placement=sched.Placement(residency=frozenset(residency) if residency else None),
            demand=(sched.DemandPoint(rps=draw(st.floats(1, 300)), lat=COUNTRIES[point][0], lon=COUNTRIES[point][1]),),
        ))
    state = whatif.today(fleet, deployments)
    names = [s.name for s in fleet]
    added = tuple(draw(sites("new", 0, 3)))
    countries = sorted({s.country for s in (*fleet, *added)})  # a country with no site is refused
    changes = scenario.Changes(
        fail_sites=frozenset(draw(st.sets(st.sampled_from(names), max_size=len(names)))),
        fail_countries=frozenset(draw(st.sets(st.sampled_from(countries), max_size=2))),
        demand=tuple(scenario.DemandScale(f) for f in draw(st.lists(st.floats(0.1, 5), max_size=1))),
        edits={n: scenario.SiteEdit(capacity_factor=draw(st.sampled_from([0.0, 0.5, 3.0])))
               for n in draw(st.sets(st.sampled_from(names), max_size=3))},
        added=added,
    )
    return state, changes


def _crossings(sites: list[sched.Site] | tuple[sched.Site, ...], deployments: tuple[sched.Deployment, ...],
               replicas: tuple[sched.Replica, ...]) -> list[sched.Replica]:
    country = {s.name: s.country for s in sites}
    rules = {d.name: d.placement.residency for d in deployments}
    return [r for r in replicas if rules[r.deployment] is not None and country[r.site] not in rules[r.deployment]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_no_simulated_plan_crosses_residency(case: tuple[whatif.State, scenario.Changes]) -> None:
    state, changes = case
    assert not _crossings(state.sites, state.deployments, state.current)
    r = whatif.simulate(state, changes)
    assert r.crossings == ()
    assert not _crossings((*state.sites, *changes.added), state.deployments, r.replicas)
    failed = {s.name for s in (*state.sites, *changes.added) if whatif.failed(s, changes)}
    assert not {x.site for x in r.replicas} & failed  # nothing runs where the scenario failed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_a_sweep_never_loses_more_replicas_than_the_site_ran(case: tuple[whatif.State, scenario.Changes]) -> None:
    """Running replicas elsewhere keep their seats, so a loss leaves at most what it ran unplaced."""
    state, _ = case
    for impact in sweep.sweep(state, "site").impacts:
        assert impact.unschedulable <= impact.replicas_lost
