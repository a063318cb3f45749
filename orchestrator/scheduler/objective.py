"""The one cost function: what the planner minimises and the exact baseline is judged by.

A placement's cost is a sum of weighted terms (units in ``model.Weights`` and
docs/scheduler.md): demand-weighted mean RTT per deployment, gCO2/h per replica, a charge
per replica started where it did not run, a charge for a variant of the wrong size for its
tier, and a penalty per replica short of the wanted count that outweighs all the rest.
The planner's incremental arithmetic and the MILP's coefficients are derived from the
helpers here, and ``evaluate`` scores any placement so the two can be compared honestly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.scheduler.fleet import Fleet
from orchestrator.scheduler.model import (
    DEFAULT_WEIGHTS,
    DemandPoint,
    Deployment,
    Replica,
    Site,
    Tier,
    Variant,
    Weights,
)
from orchestrator.scheduler.result import Objective


@dataclass(frozen=True)
class LocatedDemand:
    """A demand point with its coordinates and its share of the deployment's traffic."""

    point: DemandPoint
    lat: float
    lon: float
    share: float


def locate_demand(fleet: Fleet, deployment: Deployment) -> tuple[list[LocatedDemand], list[str]]:
    """Demand points the latency term can use, and notes about the ones it cannot."""
    found: list[tuple[DemandPoint, tuple[float, float]]] = []
    notes: list[str] = []
    for point in deployment.demand:
        where = fleet.locate(point)
        if where is None:
            notes.append(f"demand {point.label}: region has no site and no location; ignored")
        else:
            found.append((point, where))
    total = sum(max(0.0, p.rps) for p, _ in found)
    located = [
        LocatedDemand(
            point=p,
            lat=where[0],
            lon=where[1],
            share=(max(0.0, p.rps) / total) if total > 0 else 1.0 / len(found),
        )
        for p, where in found
    ]
    return located, notes


def misfits(variant: Variant, tier: Tier) -> bool:
    """Distilled variants belong at the edge, large ones in data centres."""
    return variant.is_distilled != (tier is Tier.EDGE)


def replica_cost(fleet: Fleet, site: int, variant: Variant, weights: Weights) -> float:
    """Cost points of one replica independent of where the others are: carbon and fit."""
    tier = Tier.EDGE if fleet.is_edge[site] else Tier.DATACENTER
    carbon = weights.carbon_per_g_per_hour * variant.watts * float(fleet.intensity[site])
    fit = weights.variant_fit_per_replica if misfits(variant, tier) else 0.0
    return carbon + fit


def shortfall_cost(deployment: Deployment, placed: int, weights: Weights) -> float:
    wanted = deployment.wanted_replicas()
    return weights.shortfall_per_replica * max(0, wanted - placed) + (
        weights.below_min_per_replica * max(0, deployment.min_replicas - placed)
    )


def score_deployment(
    fleet: Fleet,
    deployment: Deployment,
    weights: Weights,
    placed: Mapping[tuple[int, str], int],
    current: Mapping[tuple[int, str], int],
    nearest: Sequence[float | None] | None = None,
    located: Sequence[LocatedDemand] | None = None,
) -> Objective:
    """Cost of one deployment's placement; keys are (site index, variant name).

    ``nearest`` may pass the RTT from each located demand point to its nearest replica
    when the caller has it already (None where nothing is placed), and ``located`` the
    deployment's ``locate_demand`` points.
    """
    variants = {v.name: v for v in deployment.variants}
    open_sites = sorted({site for (site, _), n in placed.items() if n > 0})
    if located is None:
        located, _ = locate_demand(fleet, deployment)
    latency = 0.0
    for p, demand in enumerate(located):
        known = nearest[p] if nearest is not None else None
        if known is not None:
            latency += weights.latency_per_ms * demand.share * known
        elif open_sites:
            rtt = fleet.rtt_to(demand.point, (demand.lat, demand.lon), np.array(open_sites, dtype=np.int64))
            latency += weights.latency_per_ms * demand.share * float(rtt.min())
        else:
            latency += weights.latency_per_ms * demand.share * weights.unserved_rtt_ms
    carbon = fit = moves = 0.0
    for (site, name), n in placed.items():
        if n <= 0:
            continue
        variant = variants[name]
        tier = Tier.EDGE if fleet.is_edge.item(site) else Tier.DATACENTER
        carbon += n * weights.carbon_per_g_per_hour * variant.watts * fleet.intensity.item(site)
        if misfits(variant, tier):
            fit += n * weights.variant_fit_per_replica
        moves += max(0, n - current.get((site, name), 0)) * weights.move_per_replica
    total = sum(n for n in placed.values() if n > 0)
    return Objective(
        latency=latency,
        carbon=carbon,
        moves=moves,
        variant_fit=fit,
        shortfall=shortfall_cost(deployment, total, weights),
    )


def evaluate(
    sites: Sequence[Site],
    deployments: Sequence[Deployment],
    current: Iterable[Replica],
    replicas: Iterable[Replica],
    weights: Weights = DEFAULT_WEIGHTS,
    region_locations: Mapping[str, tuple[float, float]] | None = None,
) -> Objective:
    """Score any placement (the planner's, the MILP's, a hand-made one) the same way."""
    fleet = Fleet(sites, region_locations)
    now = _by_deployment(fleet, (r for r in current if r.site in fleet.index))
    new = _by_deployment(fleet, replicas)
    total = Objective()
    for deployment in deployments:
        placed, running = new.get(deployment.name, {}), now.get(deployment.name, {})
        total = total + score_deployment(fleet, deployment, deployment.weights or weights, placed, running)
    return total


def _by_deployment(fleet: Fleet, replicas: Iterable[Replica]) -> dict[str, Counter[tuple[int, str]]]:
    """Replica counts per deployment, keyed by (site index, variant)."""
    out: dict[str, Counter[tuple[int, str]]] = {}
    for r in replicas:
        out.setdefault(r.deployment, Counter())[(fleet.index[r.site], r.variant)] += 1
    return out
