"""Running replicas that still obey every hard rule keep their seats.

Their capacity is reserved before anything new is placed, so a re-plan never evicts a
healthy replica to make room for another deployment. Replicas that broke a rule (site
unhealthy or gone, residency, tier or selector changed, its agent does not run the variant's
runtime, no longer fits, over a lowered power budget, another deployment of the model on the
same edge site) are released, each with its reason. The full plan (``planner``) and the
plan in force (``standing``) seat incumbents this one way, so a repair keeps exactly what a
full plan would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from orchestrator.scheduler import diagnosis, seating
from orchestrator.scheduler.capacity import Capacity
from orchestrator.scheduler.fleet import Fleet
from orchestrator.scheduler.job import Job
from orchestrator.scheduler.model import Replica, Variant


def seat_incumbents(fleet: Fleet, capacity: Capacity, jobs: Mapping[str, Job], current: Sequence[Replica]) -> dict[Replica, str]:
    """Reserve capacity for running replicas that still obey every hard rule.

    Returns, per replica that must go regardless of the plan, the reason (counted once
    per copy by the caller through ``Job.running``).
    """
    dropped: dict[Replica, str] = {}
    serving: dict[tuple[str, int], str] = {}  # (model, edge site) → the deployment seated there
    standing: list[tuple[Replica, Job, int, Variant]] = []
    for replica in current:
        job = jobs.get(replica.deployment)
        if job is None:
            dropped[replica] = "deployment deleted"
            continue
        site = fleet.index.get(replica.site)
        if site is None:
            dropped[replica] = f"site {replica.site} left the inventory"
            continue
        job.running[(site, replica.variant)] += 1
        reason = _broken_rule(fleet, capacity, job, site, replica.variant)
        if reason is not None:
            dropped[replica] = reason
            continue
        standing.append((replica, job, site, next(v for v in job.deployment.variants if v.name == replica.variant)))
    # The GPU groups of a site's replicas are seated together, not in the order of names:
    # one by one, a one-GPU replica can take a card of the pair a two-GPU one holds.
    at: dict[int, list[int]] = {}
    for n, (_, _, site, variant) in enumerate(standing):
        if variant.gpus:
            at.setdefault(site, []).append(n)
    groups: dict[int, int | None] = {}
    for site, seated in at.items():
        groups.update(zip(seated, seating.seat(capacity, site, [standing[n][3] for n in seated])))
    for n, (replica, job, site, variant) in enumerate(standing):
        claim = (job.deployment.model, site)
        owner = serving.get(claim, replica.deployment)
        if owner != replica.deployment:  # the first by name keeps the edge site, as its agent does
            dropped[replica] = (f"model {claim[0]} runs on edge site {replica.site} for deployment {owner} "
                                "(an edge agent serves a model for one deployment)")
            continue
        seat = groups.get(n, -1)
        group = None if seat is None else capacity.take(site, variant, replica.deployment, seat)
        if group is None:
            dropped.setdefault(replica, f"no longer within the power budget: {diagnosis.power_reason(fleet, capacity, site, variant)}"
                               if capacity.power_short(site, variant) else f"site {replica.site} no longer has room for it")
            continue
        if fleet.is_edge[site]:
            serving[claim] = replica.deployment
        job.seats.append((site, variant, group))
    return dropped


def _broken_rule(fleet: Fleet, capacity: Capacity, job: Job, site: int, variant: str) -> str | None:
    name = fleet.names[site]
    if not job.allowed[site]:  # residency, tiers, selector or health: say which
        rules = job.deployment.placement
        if not fleet.healthy[site]:
            return fleet.sites[site].why_closed()
        if not fleet.residency_mask(rules.residency)[site]:
            return f"residency no longer allows {fleet.sites[site].country}"
        if not fleet.tier_mask(rules.tiers)[site]:
            return f"tier {fleet.sites[site].tier} no longer allowed"
        return f"site {name} no longer matches the site selector"
    if variant not in job.eligible or not job.eligible[variant][site]:
        runtime = next((v.runtime for v in job.deployment.variants if v.name == variant), None)
        if runtime is not None and not fleet.runtime_mask(runtime)[site]:
            return diagnosis.runtime_reason(fleet, site, {runtime})
        size = next((v for v in job.variants() if v.name == variant), None)
        if size is not None and capacity.power_short(site, size) and _sized(fleet, site, size):  # the budget, not the hardware
            return f"no longer within the power budget: {diagnosis.power_reason(fleet, capacity, site, size)}"
        return f"variant {variant} no longer allowed or no longer fits on {name}"
    return None


def _sized(fleet: Fleet, site: int, variant: Variant) -> bool:
    """Whether ``site``'s cores, memory and GPUs hold one replica of ``variant``, its budget aside."""
    at = np.array([site])
    return bool(fleet.cpu[site] >= variant.cpu - 1e-9 and fleet.memory_mib[site] >= variant.memory_mib - 1e-9
                and (not variant.gpus or (fleet.gpu_big(variant, at) & (fleet.gpu_count[at] >= variant.gpus)).any()))
