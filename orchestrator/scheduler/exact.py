"""The exact baseline: the planner's problem as a mixed-integer program, solved by HiGHS.

It exists to measure the planner, not to run in production (it takes seconds where the
planner takes milliseconds). It models the same hard rules and the same objective as
``objective.score_deployment``:

- ``x[d,o]`` integer: replicas of deployment d at option o = (site, variant, GPU group);
  options exist only where residency, tiers, selector, health, the variant's tiers and
  the site's total hardware allow (the same masks as the planner);
- site capacity: CPU, memory, GPUs per GPU group and the power budget, summed over deployments;
- ``open[d,s]`` binary and ``y[d,p,s]`` the share of demand point p served from s: the
  classic facility-location form of "nearest replica"; ``u[d,p]`` charges the unserved
  RTT when nothing is placed;
- ``new[d,s,v] ≥ x - running``: the move charge;
- shortfall below the wanted count and below ``min`` priced as in ``Weights``;
- spread: ``lo[d] ≤ count(domain) ≤ lo[d] + maxSkew`` for every eligible domain;
- one deployment per model on an edge site (its agent serves a model once);
- a cordoned site (``Site.admits``) holds at most as many of each (deployment, variant)
  as it admits, as the planner's seats there do.

By default it does not model the planner's rule that running replicas keep their seats
against other deployments: the MILP is then free to reshuffle everything, and on contended
re-plans its optimum is a bound the planner may not reach by design (it would evict a
healthy replica of one deployment to start more of another). ``keep_seats=True`` adds
the rule in the form a placement shows it: no deployment ends with fewer replicas than it
has seated (running on a site that still obeys every hard rule and has room for them,
taken in the planner's order; capped at the wanted count). Replicas may still move, as
the planner's may; they may not be given up for another deployment's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, sparse

from orchestrator.scheduler.capacity import Capacity, bound_gpu_models
from orchestrator.scheduler.fleet import WATTS_SLACK, Fleet
from orchestrator.scheduler.model import DEFAULT_WEIGHTS, Deployment, Replica, Site, Weights
from orchestrator.scheduler.objective import evaluate, locate_demand, replica_cost
from orchestrator.scheduler.result import Objective


@dataclass(frozen=True)
class ExactResult:
    replicas: tuple[Replica, ...]
    objective: Objective  # scored by ``objective.evaluate``, like the planner's
    optimal: bool  # False when the time limit stopped the solver first
    mip_gap: float
    message: str


class _Builder:
    """Collects variables, bounds and sparse constraint rows."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.low: list[float] = []
        self.high: list[float] = []
        self.integer: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.row_low: list[float] = []
        self.row_high: list[float] = []

    def var(self, cost: float, low: float, high: float, integer: bool) -> int:
        self.cost.append(cost)
        self.low.append(low)
        self.high.append(high)
        self.integer.append(1 if integer else 0)
        return len(self.cost) - 1

    def row(self, terms: Iterable[tuple[int, float]], low: float, high: float) -> None:
        r = len(self.row_low)
        for col, val in terms:
            self.rows.append(r)
            self.cols.append(col)
            self.vals.append(val)
        self.row_low.append(low)
        self.row_high.append(high)


def solve(
    sites: Sequence[Site],
    deployments: Sequence[Deployment],
    current: Iterable[Replica] = (),
    *,
    weights: Weights = DEFAULT_WEIGHTS,
    region_locations: Mapping[str, tuple[float, float]] | None = None,
    time_limit_s: float = 60.0,
    keep_seats: bool = False,
) -> ExactResult:
    """Optimal placement for the same objective the planner minimises."""
    current = list(current)
    fleet = Fleet(sites, region_locations)
    running = Counter((r.deployment, fleet.index[r.site], r.variant) for r in current if r.site in fleet.index)
    seats = _seats(fleet, deployments, current) if keep_seats else Counter()
    b = _Builder()
    x_of: list[tuple[int, str, str, int]] = []  # (x column, deployment, variant, site)
    cpu_use: dict[int, list[tuple[int, float]]] = {}
    mem_use: dict[int, list[tuple[int, float]]] = {}
    gpu_use: dict[tuple[int, int], list[tuple[int, float]]] = {}
    power_use: dict[int, list[tuple[int, float]]] = {}
    edge_x: dict[tuple[str, int], dict[str, list[int]]] = {}  # (model, edge site) → deployment → x columns
    cordoned_x: dict[tuple[int, str, str], list[int]] = {}  # (cordoned site, deployment, variant) → x columns
    for dep in deployments:
        w = dep.weights or weights
        wanted = dep.wanted_replicas()
        xs_at: dict[int, list[int]] = {}
        all_x: list[int] = []
        new_terms: dict[tuple[int, str], list[int]] = {}
        runnable = dep.runnable_variants()
        for name, eligible in fleet.eligible_masks(dep).items():
            variant = runnable[name]
            gpu_fit = fleet.gpu_fit(fleet.gpu_count, variant)
            for s in np.flatnonzero(eligible).tolist():
                static = replica_cost(fleet, s, variant, w)
                now = running.get((dep.name, s, variant.name), 0)
                cost = static - w.shortfall_per_replica + (0.0 if now else w.move_per_replica)
                groups = np.flatnonzero(gpu_fit[s]).tolist() if variant.gpus else [-1]
                for k in groups:
                    col = b.var(cost, 0, wanted, True)
                    x_of.append((col, dep.name, variant.name, s))
                    xs_at.setdefault(s, []).append(col)
                    all_x.append(col)
                    cpu_use.setdefault(s, []).append((col, variant.cpu))
                    mem_use.setdefault(s, []).append((col, variant.memory_mib))
                    if fleet.budgeted[s]:
                        power_use.setdefault(s, []).append((col, variant.watts))
                    if k >= 0:
                        gpu_use.setdefault((s, k), []).append((col, float(variant.gpus)))
                    if now:
                        new_terms.setdefault((s, variant.name), []).append(col)
                    if fleet.is_edge[s]:
                        edge_x.setdefault((dep.model, s), {}).setdefault(dep.name, []).append(col)
                    if s in fleet.admits:
                        cordoned_x.setdefault((s, dep.name, variant.name), []).append(col)
        for (s, name), cols in new_terms.items():
            new = b.var(w.move_per_replica, 0, np.inf, False)
            now = running[(dep.name, s, name)]
            b.row([(new, 1.0)] + [(c, -1.0) for c in cols], -now, np.inf)
        kept = min(seats[dep.name], wanted)  # zero unless keep_seats
        b.row([(c, 1.0) for c in all_x], float(kept) if all_x else -np.inf, wanted)
        if dep.min_replicas > 0:
            below = b.var(w.below_min_per_replica, 0, np.inf, False)
            b.row([(below, 1.0)] + [(c, 1.0) for c in all_x], dep.min_replicas, np.inf)
        _spread_rows(b, fleet, dep, xs_at)
        _latency(b, fleet, dep, w, wanted, xs_at)
    _one_deployment_per_model(b, edge_x, {d.name: d.wanted_replicas() for d in deployments})
    for (s, name, variant_name), cols in cordoned_x.items():
        b.row([(c, 1.0) for c in cols], -np.inf, float(fleet.admits[s].get((name, variant_name), 0)))
    free = Capacity(fleet, bound_gpu_models(deployments))  # less the room sites hold for replicas leaving them
    for s, terms in cpu_use.items():
        b.row(terms, -np.inf, float(free.cpu[s]) + 1e-9)
    for s, terms in mem_use.items():
        b.row(terms, -np.inf, float(free.memory_mib[s]) + 1e-9)
    for (s, k), terms in gpu_use.items():
        b.row(terms, -np.inf, float(free.gpu_count[s, k]))
    for s, terms in power_use.items():
        b.row(terms, -np.inf, float(free.power[s]) + WATTS_SLACK)
    replicas, optimal, gap, message = _run(b, x_of, fleet, time_limit_s)
    return ExactResult(
        replicas=replicas,
        objective=evaluate(sites, deployments, current, replicas, weights, region_locations),
        optimal=optimal,
        mip_gap=gap,
        message=message,
    )


def _seats(fleet: Fleet, deployments: Sequence[Deployment], current: Sequence[Replica]) -> Counter[str]:
    """Running replicas per deployment that the planner seats: sorted, on sites that still
    obey every hard rule, while they fit."""
    by_name = {d.name: d for d in deployments}
    masks = {d.name: fleet.eligible_masks(d) for d in deployments}
    capacity = Capacity(fleet, bound_gpu_models(deployments))
    seats: Counter[str] = Counter()
    serving: dict[tuple[str, int], str] = {}  # (model, edge site) → the deployment seated there
    for replica in sorted(current, key=lambda r: (r.deployment, r.site, r.variant)):
        dep = by_name.get(replica.deployment)
        site = fleet.index.get(replica.site)
        if dep is None or site is None:
            continue
        mask = masks[dep.name].get(replica.variant)
        if mask is None or not mask[site]:
            continue
        if serving.get((dep.model, site), dep.name) != dep.name:
            continue
        if capacity.take(site, dep.runnable_variants()[replica.variant], dep.name) is not None:
            seats[dep.name] += 1
            if fleet.is_edge[site]:
                serving[(dep.model, site)] = dep.name
    return seats


def _one_deployment_per_model(b: _Builder, edge_x: Mapping[tuple[str, int], Mapping[str, list[int]]],
                              wanted: Mapping[str, int]) -> None:
    """An edge site serves a model for one deployment: ``x ≤ wanted·z``, ``Σ z ≤ 1``."""
    for by_deployment in edge_x.values():
        if len(by_deployment) < 2:
            continue
        owners = []
        for name, cols in by_deployment.items():
            z = b.var(0.0, 0, 1, True)
            b.row([(c, 1.0) for c in cols] + [(z, -float(wanted[name]))], -np.inf, 0.0)
            owners.append((z, 1.0))
        b.row(owners, -np.inf, 1.0)


def _spread_rows(b: _Builder, fleet: Fleet, dep: Deployment, xs_at: dict[int, list[int]]) -> None:
    spread = dep.placement.spread
    if spread is None or not xs_at:
        return
    domains: dict[int, list[int]] = {}
    for s, cols in xs_at.items():
        key = int(fleet.domains(spread.by)[s])
        domains.setdefault(key, []).extend(cols)
    lo = b.var(0.0, 0, np.inf, False)
    for cols in domains.values():
        terms = [(c, 1.0) for c in cols] + [(lo, -1.0)]
        b.row(terms, 0.0, float(spread.max_skew))


def _latency(
    b: _Builder,
    fleet: Fleet,
    dep: Deployment,
    w: Weights,
    wanted: int,
    xs_at: dict[int, list[int]],
) -> None:
    demand, _ = locate_demand(fleet, dep)
    if not demand:
        return
    sites = sorted(xs_at)
    opened = {}
    for s in sites:
        opened[s] = b.var(0.0, 0, 1, True)
        # open ⇔ at least one replica there: x ≤ wanted·open and x ≥ open
        b.row([(c, 1.0) for c in xs_at[s]] + [(opened[s], -float(wanted))], -np.inf, 0.0)
        b.row([(c, 1.0) for c in xs_at[s]] + [(opened[s], -1.0)], 0.0, np.inf)
    idx = np.array(sites, dtype=np.int64)
    for point in demand:
        rtt = fleet.rtt_to(point.point, (point.lat, point.lon), idx) if sites else []
        scale = w.latency_per_ms * point.share
        unserved = b.var(scale * w.unserved_rtt_ms, 0, 1, False)
        serve = [(unserved, 1.0)]
        for s, t in zip(sites, rtt):
            y = b.var(scale * float(t), 0, 1, False)
            serve.append((y, 1.0))
            b.row([(y, 1.0), (opened[s], -1.0)], -np.inf, 0.0)
        b.row(serve, 1.0, 1.0)


def _run(
    b: _Builder, x_of: list[tuple[int, str, str, int]], fleet: Fleet, time_limit_s: float
) -> tuple[tuple[Replica, ...], bool, float, str]:
    n = len(b.cost)
    if n == 0:
        return (), True, 0.0, "empty"
    matrix = sparse.csr_array((b.vals, (b.rows, b.cols)), shape=(len(b.row_low), n))
    constraints = [optimize.LinearConstraint(matrix, b.row_low, b.row_high)] if b.row_low else []
    res = optimize.milp(
        c=np.array(b.cost),
        integrality=np.array(b.integer),
        bounds=optimize.Bounds(np.array(b.low), np.array(b.high)),
        constraints=constraints,
        options={"time_limit": time_limit_s, "mip_rel_gap": 1e-6, "disp": False},
    )
    if res.x is None:
        raise RuntimeError(f"MILP found no solution: {res.message}")
    replicas: list[Replica] = []
    for col, dep, variant, s in x_of:
        replicas.extend([Replica(dep, fleet.names[s], variant)] * round(res.x[col]))
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    return tuple(replicas), res.status == 0, gap, str(res.message)
