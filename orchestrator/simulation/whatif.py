"""One what-if: today's fleet and placement, a scenario, and the plan the planner would make.

``simulate`` is a pure function of its arguments: it changes copies of the planner's input
values (sites failed, capacity or grid intensity changed, demand scaled, sites added),
plans them as the control plane does from today's placement (``State.plan``), and reports
the difference: replicas moved, replicas that no longer fit (with the planner's reason),
latency percentiles per demand point, power and emissions, and an independent audit that
no replica sits outside its deployment's residency.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from orchestrator.scheduler import model as sched
from orchestrator.scheduler import planner
from orchestrator.scheduler import result as sched_result
from orchestrator.scheduler.fleet import Fleet
from orchestrator.simulation import measure as measure_mod
from orchestrator.simulation.scenario import MAX_DEMAND_FACTOR, POINT_TOLERANCE, Changes, DemandScale, ScenarioError, SiteEdit


@dataclass(frozen=True)
class Waiting:
    """Replicas of a deployment that a plan leaves out only for the room replicas moved off
    a site hold there until their replacements serve: they come once it is free. ``phase``
    and ``reason``: the deployment's, as the control plane says them."""

    replicas: int
    phase: str
    reason: str


@dataclass(frozen=True)
class Planned:
    result: sched_result.PlanResult
    waiting: Mapping[str, Waiting]  # by deployment
    # How it was planned: "repair" (the plan in force repaired, only what was lost moving,
    # as a pass does when only sites were lost or came back) or "full" (``planner.plan``).
    method: str = "full"


#: How a fleet is planned from its running replicas: (sites, deployments, current) -> Planned.
Plan = Callable[[Sequence[sched.Site], Sequence[sched.Deployment], Sequence[sched.Replica]], Planned]


def plan_alone(sites: Sequence[sched.Site], deployments: Sequence[sched.Deployment],
               current: Sequence[sched.Replica]) -> Planned:
    """The planner's plan, where no replica moving holds room on the site it leaves."""
    return Planned(planner.plan(sites, deployments, current), {})


@dataclass(frozen=True)
class State:
    """The fleet as the planner sees it and the replicas running (today's plan).

    ``plan``: how the control plane plans it. While replicas move, those leaving a site keep
    their room there until their replacements serve, and a pass plans again with that room
    held; where only sites are lost, a pass repairs the plan in force rather than plan in
    full: the control plane gives its own (``api.simulate.state_of``), so that a what-if
    places each replica where the pass would."""

    sites: tuple[sched.Site, ...]
    deployments: tuple[sched.Deployment, ...]
    current: tuple[sched.Replica, ...]
    plan: Plan = field(default=plan_alone, compare=False, repr=False)


@dataclass(frozen=True)
class Move:
    deployment: str
    from_site: str
    to_site: str
    variant: str
    reason: str


@dataclass(frozen=True)
class Shortfall:
    """A deployment that ends with fewer replicas than it wants, and why."""

    deployment: str
    status: str
    wanted: int
    placed: int
    reason: str
    short_today: int  # replicas it was already short of in today's placement
    waiting: int = 0  # of those not placed, the ones that wait for held room (``Waiting``)

    @property
    def new(self) -> int:
        """Replicas short because of the scenario (not already short today, nor waiting
        for room that replicas moving hold until their replacements serve)."""
        return max(0, self.wanted - self.placed - self.waiting - self.short_today)


@dataclass(frozen=True)
class Crossing:
    """A replica on a site outside its deployment's residency (must never happen)."""

    deployment: str
    site: str
    country: str
    allowed: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    name: str
    scenario: str
    before: measure_mod.Metrics
    after: measure_mod.Metrics
    moved: tuple[Move, ...]
    added: tuple[sched_result.PlaceReplica, ...]
    removed: tuple[sched_result.RemoveReplica, ...]
    short: tuple[Shortfall, ...]
    crossings: tuple[Crossing, ...]
    replicas: tuple[sched.Replica, ...]  # the simulated placement
    method: str = "full"  # how it was planned (``Planned.method``)

    @property
    def unschedulable_replicas(self) -> int:
        """Replicas that no longer fit because of the scenario."""
        return sum(s.new for s in self.short)


def failed(site: sched.Site, changes: Changes) -> bool:
    return (site.name in changes.fail_sites or site.region in changes.fail_regions
            or site.country in changes.fail_countries or site.tier in changes.fail_tiers)


def check(state: State, changes: Changes) -> None:
    """Refuse a scenario that names what the fleet does not have (a typo must not look safe)."""
    names = {s.name for s in state.sites}
    regions = {s.region for s in (*state.sites, *changes.added) if s.region}  # a site without one is in none
    named = names | {s.name for s in changes.added}  # built once: a scenario may name many sites
    for name in sorted(changes.fail_sites | set(changes.edits)):
        if name not in named:
            raise ScenarioError(f"site {name!r} is not in the fleet")
    for region in sorted(changes.fail_regions):
        if region not in regions:
            raise ScenarioError(f"region {region!r} has no site (regions: {', '.join(sorted(regions)) or 'none'})")
    countries = {s.country for s in (*state.sites, *changes.added)}
    for country in sorted(changes.fail_countries):
        if country not in countries:
            raise ScenarioError(f"country {country!r} has no site (countries: {', '.join(sorted(countries)) or 'none'})")
    demand_regions = {p.region for d in state.deployments for p in d.demand if p.region}
    for scale in changes.demand:
        if scale.region is not None and scale.region not in demand_regions | regions:
            raise ScenarioError(f"demand region {scale.region!r} is neither a site region nor a deployment's demand region")
    if changes.demand:
        _check_demand_points(state.deployments, changes.demand)
        _check_demand_factors(state.deployments, changes.demand)
    added: set[str] = set()
    for site in changes.added:
        if site.name in names:
            raise ScenarioError(f"added site {site.name!r} is already in the fleet")
        if site.name in added:  # an aliased site repeated, say: one name, one site
            raise ScenarioError(f"added site {site.name!r} is given twice")
        added.add(site.name)


def _check_demand_points(deployments: Iterable[sched.Deployment], scales: Sequence[DemandScale]) -> None:
    """Refuse a change by lat/lon that matches no deployment's demand point: it would scale
    nothing, and a point mistyped (or copied from a report, which rounds it) must not look
    harmless. Names the nearest point declared."""
    wanted = [s.point for s in scales if s.point is not None]
    if not wanted:
        return
    declared = [(p.lat, p.lon) for d in deployments for p in d.demand if p.lat is not None and p.lon is not None]
    exact = set(declared)
    lats, lons = np.array([a for a, _ in declared]), np.array([b for _, b in declared])
    for lat, lon in wanted:
        if (lat, lon) in exact:
            continue
        off_lat, off_lon = np.abs(lats - lat), np.abs(lons - lon)
        if np.any((off_lat < POINT_TOLERANCE) & (off_lon < POINT_TOLERANCE)):  # as DemandScale.matches
            continue
        if declared:
            nearest = declared[int(np.hypot(off_lat, off_lon).argmin())]
            hint = f"; the nearest is at {nearest[0]:g},{nearest[1]:g}"
        else:
            hint = "; no deployment declares demand by lat/lon"
        reason = (f"no deployment has demand at {lat:g},{lon:g} (a change by lat/lon scales the demand declared at "
                  f"those very coordinates){hint}")
        raise ScenarioError(f"spec.demand: {reason}", ("spec", "demand"), reason)


def _check_demand_factors(deployments: Iterable[sched.Deployment], scales: Sequence[DemandScale]) -> None:
    """Refuse demand changes that together multiply a demand point past ``MAX_DEMAND_FACTOR``."""
    for d in deployments:
        for p in d.demand:
            factor = demand_factor(p, scales)
            if factor > MAX_DEMAND_FACTOR:
                reason = (f"the demand changes matching {p.label} of deployment {d.name!r} multiply it by "
                          f"{'more than 1e308' if factor == math.inf else f'{factor:.3g}'}; "
                          f"together they may multiply a demand point by at most {MAX_DEMAND_FACTOR:,.0f}")
                raise ScenarioError(f"spec.demand: {reason}", ("spec", "demand"), reason)


def apply_changes(state: State, changes: Changes) -> tuple[tuple[sched.Site, ...], tuple[sched.Deployment, ...]]:
    """The planner's inputs as they would be under ``changes``."""
    sites = []
    for site in (*state.sites, *changes.added):
        edit = changes.edits.get(site.name)
        if edit is not None:
            site = _edit(site, edit)
        if failed(site, changes):
            site = dataclasses.replace(site, healthy=False)
        sites.append(site)
    deployments = tuple(scale_demand(d, changes.demand) for d in state.deployments) if changes.demand else state.deployments
    return tuple(sites), deployments


def under(state: State, changes: Changes) -> State:
    """The fleet as ``changes`` leave it: its sites and demand, placed the way the planner
    would place them from today's replicas (what a sweep under a scenario starts from)."""
    sites, deployments, planned = _planned(state, changes)
    return State(sites, deployments, planned.result.as_running(), state.plan)


def _planned(state: State, changes: Changes) -> tuple[tuple[sched.Site, ...], tuple[sched.Deployment, ...], Planned]:
    """The planner's inputs under ``changes`` and their plan from today's replicas (``State.plan``)."""
    check(state, changes)
    sites, deployments = apply_changes(state, changes)
    return sites, deployments, state.plan(sites, deployments, state.current)


def _edit(site: sched.Site, e: SiteEdit) -> sched.Site:
    fields: dict[str, object] = {}
    if e.carbon_g_per_kwh is not None:
        fields["carbon_g_per_kwh"] = e.carbon_g_per_kwh
    if e.power_budget_watts is not None:
        fields["power_budget_watts"] = e.power_budget_watts
    if e.capacity_factor is not None:
        f = e.capacity_factor
        fields.update(cpu=site.cpu * f, memory_gib=site.memory_gib * f,
                      gpus=tuple(dataclasses.replace(g, count=int(g.count * f)) for g in site.gpus))
    elif e.cpu is not None:
        fields.update(cpu=e.cpu, memory_gib=e.memory_gib, gpus=e.gpus or ())
    return dataclasses.replace(site, **fields) if fields else site  # type: ignore[arg-type]


def demand_factor(p: sched.DemandPoint, scales: Sequence[DemandScale]) -> float:
    """The product of the factors of ``scales`` that match ``p``, as it is and not as floats
    multiplied in order make it: 0 when one of them is 0 (×1000 a hundred times, then ×0,
    is no demand, not NaN), ``inf`` only when the product itself is past the float range."""
    product, log = 1.0, 0.0
    for s in scales:
        if s.matches(p):
            if s.factor == 0:
                return 0.0
            product *= s.factor
            log += math.log(s.factor)
    if 0 < product < math.inf:
        return product
    return math.inf if log > _LOG_MAX_FLOAT else math.exp(log)  # a partial product left the float range


_LOG_MAX_FLOAT = math.log(sys.float_info.max)


def scale_demand(d: sched.Deployment, scales: Sequence[DemandScale]) -> sched.Deployment:
    """Demand multiplied where a scale matches; an autoscaled count follows the total.

    ``check`` refuses factors past ``MAX_DEMAND_FACTOR``; a caller that did not ask it (the
    work budget counts before the check's walk is worth it) gets them capped there: never
    infinite or undefined demand, which no replica count follows."""
    points = []
    for p in d.demand:
        factor = min(demand_factor(p, scales), MAX_DEMAND_FACTOR)
        points.append(dataclasses.replace(p, rps=p.rps * factor) if factor != 1.0 else p)
    if all(a is b for a, b in zip(points, d.demand)):
        return d
    old, new = d.total_rps, sum(p.rps for p in points)
    autoscaled = d.autoscaled_replicas
    if autoscaled is not None and old > 0:
        autoscaled = math.ceil(autoscaled * new / old - 1e-9)
    return dataclasses.replace(d, demand=tuple(points), autoscaled_replicas=autoscaled)


def audit_residency(sites: Iterable[sched.Site], deployments: Iterable[sched.Deployment],
                    replicas: Iterable[sched.Replica]) -> tuple[Crossing, ...]:
    """Every replica whose site's country its deployment does not allow (independent of the planner)."""
    country = {s.name: s.country for s in sites}
    allowed = {d.name: d.placement.residency for d in deployments}
    out = []
    for r in replicas:
        rule = allowed.get(r.deployment)
        where = country.get(r.site)
        if rule is not None and where is not None and where not in rule:
            out.append(Crossing(r.deployment, r.site, where, tuple(sorted(rule))))
    return tuple(out)


def simulate(state: State, changes: Changes, *, before: measure_mod.Metrics | None = None) -> Report:
    """Plan ``state`` under ``changes`` from today's placement and compare.

    ``before`` may pass today's metrics when the caller measured them already (a sweep).
    """
    sites, deployments, planned = _planned(state, changes)
    result = planned.result
    today_fleet = Fleet(state.sites)
    measured = measure_mod.measure(today_fleet, state.deployments, state.current)
    if before is None:
        before = measure_mod.summarize(measured)
    replicas = result.as_running()
    # Latency and energy of a deployment depend only on its replicas, its demand and the
    # sites; re-measure what the scenario touched (everything when sites changed).
    if changes.added or changes.edits:
        touched = list(deployments)
    else:
        was, now = _placed(state.current), _placed(replicas)
        old = {d.name: d for d in state.deployments}
        touched = [d for d in deployments if d is not old.get(d.name) or was.get(d.name) != now.get(d.name)]
    if touched:
        after_fleet = Fleet(sites) if (changes.added or changes.edits) else today_fleet
        names = {d.name for d in touched}
        measured = {**measured, **measure_mod.measure(after_fleet, touched, (r for r in replicas if r.deployment in names))}
    after = measure_mod.summarize(measured)
    running = replica_counts(state.current)
    short_today = {d.name: max(0, d.wanted_replicas() - running.get(d.name, 0)) for d in state.deployments}
    return _report(changes, before, after, planned, sites, deployments, replicas, short_today)


def _report(changes: Changes, before: measure_mod.Metrics, after: measure_mod.Metrics, planned: Planned,
            sites: Sequence[sched.Site], deployments: Sequence[sched.Deployment], replicas: Sequence[sched.Replica],
            short_today: Mapping[str, int]) -> Report:
    result = planned.result
    moved = tuple(Move(a.deployment, a.from_site, a.to_site, a.to_variant, a.reason)
                  for a in result.actions if isinstance(a, sched_result.MoveReplica))
    short = tuple(_shortfall(p, planned.waiting.get(p.name), short_today.get(p.name, 0))
                  for p in result.deployments.values() if p.placed < p.wanted)
    return Report(
        name=changes.name,
        scenario=changes.describe(),
        before=before,
        after=after,
        moved=moved,
        added=tuple(a for a in result.actions if isinstance(a, sched_result.PlaceReplica)),
        removed=tuple(a for a in result.actions if isinstance(a, sched_result.RemoveReplica)),
        short=short,
        crossings=audit_residency(sites, deployments, replicas),
        replicas=tuple(replicas),
        method=planned.method,
    )


def _shortfall(p: sched_result.DeploymentPlan, waiting: Waiting | None, short_today: int) -> Shortfall:
    if waiting is None:
        return Shortfall(p.name, str(p.status), p.wanted, p.placed, p.reason, short_today)
    return Shortfall(p.name, waiting.phase, p.wanted, p.placed, waiting.reason, short_today, waiting.replicas)


def today(sites: Sequence[sched.Site], deployments: Sequence[sched.Deployment]) -> State:
    """A fleet with nothing running yet, and today's plan planned from scratch (``-f``)."""
    result = planner.plan(sites, deployments)
    return State(tuple(sites), tuple(deployments), tuple(result.as_running()))


def _placed(replicas: Iterable[sched.Replica]) -> dict[str, Counter[tuple[str, str]]]:
    out: dict[str, Counter[tuple[str, str]]] = {}
    for r in replicas:
        counts = out.get(r.deployment)
        if counts is None:
            counts = out[r.deployment] = Counter()
        counts[(r.site, r.variant)] += 1
    return out


def replica_counts(replicas: Iterable[sched.Replica]) -> Counter[str]:
    return Counter(r.deployment for r in replicas)
