"""What a placement delivers: latency per demand point, power and emissions.

Both sides of a what-if are measured here the same way (today's placement and the
simulated one), so a difference in the report is a difference in the placement and not in
how it was scored. Measured per deployment, so a sweep that re-plans a few deployments
re-measures only those.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.scheduler import model as sched
from orchestrator.scheduler.fleet import Fleet


@dataclass(frozen=True)
class PointLatency:
    """One demand point of one deployment and the RTT to its nearest replica."""

    deployment: str
    point: str
    rps: float
    site: str | None  # None: no replica serves it
    rtt_ms: float | None


@dataclass(frozen=True)
class DeploymentMeasure:
    replicas: int
    latency: tuple[PointLatency, ...]
    watts: float
    g_co2_per_hour: float


@dataclass(frozen=True)
class PointSummary:
    """Demand-weighted latency percentiles of every deployment's demand at one point.

    Demand no replica serves counts as the slowest (an infinite RTT), so a percentile never
    falls because demand is dropped: ``unserved_rps`` says how much of ``rps`` that is."""

    point: str
    rps: float
    p50_ms: float | None  # None: at least that share of the demand has no replica
    p95_ms: float | None
    unserved_rps: float = 0.0


@dataclass(frozen=True)
class Metrics:
    replicas: int
    watts: float
    g_co2_per_hour: float
    p50_ms: float | None
    p95_ms: float | None
    unserved_rps: float
    points: tuple[PointSummary, ...]
    demand_rps: float = 0.0  # all of it, served or not


def measure(fleet: Fleet, deployments: Iterable[sched.Deployment], replicas: Iterable[sched.Replica]) -> dict[str, DeploymentMeasure]:
    """Per deployment: RTT from each demand point to its nearest replica, and energy."""
    by_deployment: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for r in replicas:
        site = fleet.index.get(r.site)
        if site is not None:
            by_deployment[r.deployment].append((site, r.variant))
    return {d.name: measure_one(fleet, d, by_deployment.get(d.name, [])) for d in deployments}


def measure_one(fleet: Fleet, deployment: sched.Deployment, placed: Sequence[tuple[int, str]]) -> DeploymentMeasure:
    draw = {v.name: v.watts for v in deployment.variants}
    watts = co2 = 0.0
    pue, intensity = fleet.pue, fleet.intensity
    for site, name in placed:
        w = draw.get(name)
        if w is not None:
            watts += w * pue.item(site)
            co2 += w * intensity.item(site)
    sites = np.array(sorted({s for s, _ in placed}), dtype=np.int64)
    rows = []
    located = [(p, fleet.locate(p)) for p in deployment.demand]
    known = [(p, w) for p, w in located if w is not None]
    table = fleet.rtt_table([p for p, _ in known], [w for _, w in known], sites) if sites.size and known else None
    k = 0
    for point, where in located:
        if where is None or table is None:
            rows.append(PointLatency(deployment.name, point.label, point.rps, None, None))
            k += where is not None
            continue
        column = table[:, k]
        k += 1
        best = int(column.argmin())
        rows.append(PointLatency(deployment.name, point.label, point.rps, fleet.names[int(sites[best])], float(column[best])))
    return DeploymentMeasure(len(placed), tuple(rows), watts, co2)


def weighted_percentile(values: Sequence[float], weights: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` weighted by ``weights``; inf (unserved) gives None."""
    if not values:
        return None
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    v = np.asarray(values, dtype=np.float64)[order]
    w = np.asarray(weights, dtype=np.float64)[order]
    if w.sum() <= 0:
        w = np.ones_like(w)
    cum = np.cumsum(w) / w.sum()
    at = float(v[min(int(np.searchsorted(cum, q - 1e-12)), v.size - 1)])
    return None if math.isinf(at) else at


def summarize(measures: Mapping[str, DeploymentMeasure]) -> Metrics:
    rows = [row for m in measures.values() for row in m.latency]
    per_point: dict[str, list[PointLatency]] = defaultdict(list)
    for row in rows:
        per_point[row.point].append(row)

    def pct(items: Sequence[PointLatency], q: float) -> float | None:
        return weighted_percentile([math.inf if r.rtt_ms is None else r.rtt_ms for r in items], [r.rps for r in items], q)

    points = tuple(
        PointSummary(name, sum(r.rps for r in items), pct(items, 0.50), pct(items, 0.95),
                     sum(r.rps for r in items if r.rtt_ms is None))
        for name, items in sorted(per_point.items())
    )
    return Metrics(
        replicas=sum(m.replicas for m in measures.values()),
        watts=sum(m.watts for m in measures.values()),
        g_co2_per_hour=sum(m.g_co2_per_hour for m in measures.values()),
        p50_ms=pct(rows, 0.50),
        p95_ms=pct(rows, 0.95),
        unserved_rps=sum(r.rps for r in rows if r.rtt_ms is None),
        points=points,
        demand_rps=sum(r.rps for r in rows),
    )
