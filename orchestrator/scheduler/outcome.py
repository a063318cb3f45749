"""Turns the planner's raw placement into the ``PlanResult`` people and the executor read.

Kept apart from the search so the search stays about costs and this stays about words and
bookkeeping: which replicas are kept, moved, added or removed (and why), each deployment's
status, the predicted latency per demand point and the energy drawn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.scheduler.fleet import Fleet
from orchestrator.scheduler.model import Replica
from orchestrator.scheduler.objective import score_deployment
from orchestrator.scheduler.result import (
    Action,
    DemandLatency,
    DeploymentPlan,
    Energy,
    MoveReplica,
    Objective,
    PlaceReplica,
    PlannedReplica,
    PlanResult,
    RemoveReplica,
    Status,
)

if TYPE_CHECKING:
    from orchestrator.scheduler.job import Job


def build(
    fleet: Fleet,
    jobs: Sequence[Job],
    current: Sequence[Replica],
    dropped: Mapping[Replica, str],
    returned: Mapping[str, Counter[tuple[str, str]]] | None = None,
) -> PlanResult:
    replicas: list[PlannedReplica] = []
    actions: list[Action] = []
    plans: dict[str, DeploymentPlan] = {}
    energy = Energy()
    objective = Objective()
    for job in sorted(jobs, key=lambda j: j.deployment.name):
        one, cost = build_one(fleet, job, dropped)
        plans[job.deployment.name] = one
        replicas.extend(one.replicas)
        actions.extend(actions_of(fleet, job, one, dropped, (returned or {}).get(job.deployment.name)))
        energy = energy + one.energy
        objective = objective + cost
    known = {job.deployment.name for job in jobs}
    for replica in current:  # replicas no plan can keep: deleted or on vanished sites
        if replica.deployment not in known or replica.site not in fleet.index:
            actions.append(RemoveReplica(replica.deployment, replica.site, replica.variant, dropped[replica]))
    return PlanResult(
        replicas=tuple(replicas),
        actions=tuple(actions),
        deployments=plans,
        energy=energy,
        objective=objective,
    )


def build_one(fleet: Fleet, job: Job, dropped: Mapping[Replica, str]) -> tuple[DeploymentPlan, Objective]:
    deployment = job.deployment
    placed = Counter((site, variant.name) for site, variant, _ in job.placed)
    variants = {v.name: v for v in deployment.variants}
    open_sites = np.array(sorted({site for site, _ in placed}), dtype=np.int64)

    latency: list[DemandLatency] = []
    serves: dict[int, list[str]] = {}
    if open_sites.size and job.demand:
        table = fleet.rtt_table([d.point for d in job.demand], [(d.lat, d.lon) for d in job.demand], open_sites)
        closest = table.argmin(axis=0).tolist()
        rtts = table.min(axis=0).tolist()
    for p, demand in enumerate(job.demand):
        if open_sites.size == 0:
            latency.append(DemandLatency(deployment.name, demand.point.label, demand.point.rps, None, None))
            continue
        site = int(open_sites[closest[p]])
        latency.append(DemandLatency(deployment.name, demand.point.label, demand.point.rps, fleet.names[site], rtts[p]))
        serves.setdefault(site, []).append(f"{demand.point.label} ({rtts[p]:.0f} ms)")

    planned: list[PlannedReplica] = []
    watts = grams = 0.0
    power = {name: v.watts for name, v in variants.items()}
    names = fleet.names
    why = _Why(job)
    for (site, name), n in sorted(placed.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        draw = power[name] * fleet.pue.item(site)
        co2 = power[name] * fleet.intensity.item(site)
        watts += n * draw
        grams += n * co2
        running = job.running.get((site, name), 0) if job.running else 0
        # Copies past the first read alike; being immutable, they share one object.
        for kept, first, copies in _copies(n, running):
            copy = 0 if first else 1
            replica = PlannedReplica(
                deployment=deployment.name,
                site=names[site],
                variant=name,
                kept=kept,
                reason=why.replica(kept, serves.get(site), copy, co2),
            )
            planned.extend([replica] * copies)
    status, reason = _status(job)
    nearest = [point.rtt_ms for point in latency]
    cost = score_deployment(fleet, deployment, job.weights, placed, job.running, nearest, job.demand)
    return (
        DeploymentPlan(
            name=deployment.name,
            status=status,
            wanted=job.wanted,
            placed=len(job.placed),
            reason=reason,
            replicas=tuple(planned),
            latency=tuple(latency),
            energy=Energy(watts, grams),
            notes=tuple(job.notes),
            shortfall=job.shortfall if len(job.placed) < job.wanted else None,
        ),
        cost,
    )


def _copies(n: int, running: int) -> list[tuple[bool, bool, int]]:
    """The ``n`` copies at one (site, variant) as runs of equal replicas: (kept, first
    copy, how many), in copy order; the first ``running`` copies are kept."""
    runs: list[tuple[bool, bool, int]] = []
    for kept, start, end in ((True, 0, min(n, running)), (False, min(n, running), n)):
        if start == 0 and end > 0:
            runs.append((kept, True, 1))
            start = 1
        if end > start:
            runs.append((kept, False, end - start))
    return runs


class _Why:
    """A replica's reason, with the parts shared by a deployment's replicas made once."""

    def __init__(self, job: Job) -> None:
        if job.demand:
            self.rest = f"capacity for {job.deployment.total_rps:g} rps"
        else:
            self.rest = "lowest cost among eligible sites (no demand given)"

    def replica(self, kept: bool, serves: list[str] | None, copy: int, co2: float) -> str:
        head = "kept, already running here" if kept else "new"
        if serves and copy == 0:
            shown = ", ".join(serves[:3]) + (f" and {len(serves) - 3} more" if len(serves) > 3 else "")
            return f"{head}; nearest replica for {shown}; {co2:.1f} gCO2/h"
        return f"{head}; {self.rest}; {co2:.1f} gCO2/h"


def _status(job: Job) -> tuple[Status, str]:
    deployment = job.deployment
    placed = len(job.placed)
    if placed >= job.wanted:
        return Status.SCHEDULED, f"{placed} replica(s): {_why_count(job)}" + (
            f"; {placed - job.wanted} more placed than wanted" if placed > job.wanted else "")
    status = Status.DEGRADED if placed >= deployment.min_replicas else Status.UNSCHEDULABLE
    return status, str(job.shortfall or "")


def _why_count(job: Job) -> str:
    """How the wanted count was reached, with every number a reader needs to redo it."""
    deployment = job.deployment
    bounds = f"replicas [{deployment.min_replicas}, {deployment.max_replicas}]"
    rate, need = deployment.slowest_rps(), deployment.demand_replicas()
    if deployment.autoscaled_replicas is not None:
        declared = f"; declared demand ({deployment.total_rps:g} rps) is not used while the autoscaler has a count" \
            if need is not None else ""
        return f"autoscaler's count from observed load = {_clamped(deployment.autoscaled_replicas, job.wanted, bounds)}{declared}"
    if need is not None and rate is not None:
        return f"ceil({deployment.total_rps:g} rps / {rate:g} rps per replica) = {_clamped(need, job.wanted, bounds)}"
    return f"replicas.min = {deployment.min_replicas}"


def _clamped(asked: int, wanted: int, bounds: str) -> str:
    if asked > wanted:
        return f"{asked}, capped to {wanted} by {bounds}"
    if asked < wanted:
        return f"{asked}, raised to {wanted} by {bounds}"
    return f"{asked}, within {bounds}"


def actions_of(fleet: Fleet, job: Job, plan: DeploymentPlan, dropped: Mapping[Replica, str],
               returned: Counter[tuple[str, str]] | None = None) -> list[Action]:
    """Count differences per (site, variant) → moves first, then places, then removals.
    ``returned``: the seats the deployment's stand-ins stood in for (``planner.plan``'s
    ``returning``), by (site, variant): a move there says it is a failback."""
    back = Counter(returned or ())
    name = job.deployment.name
    placed = Counter((r.site, r.variant) for r in plan.replicas)
    running = Counter({(fleet.names[s], v): n for (s, v), n in job.running.items()})
    gone: list[tuple[str, str, str]] = []
    for (site, variant), n in sorted(running.items()):
        why = dropped.get(Replica(name, site, variant))
        if why is None:
            why = f"scale down to {plan.placed}" if plan.placed < sum(running.values()) else "a better site was found"
        gone.extend([(site, variant, why)] * max(0, n - placed.get((site, variant), 0)))
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in plan.replicas:
        if not r.kept:
            reasons.setdefault((r.site, r.variant), []).append(r.reason)
    for queue in reasons.values():
        queue.reverse()  # popped from the end, first replica first
    new = [(site, variant) for (site, variant), n in sorted(placed.items()) for _ in range(max(0, n - running.get((site, variant), 0)))]
    # Replicas leaving a broken site pair first, so their replacements read as moves.
    gone.sort(key=lambda g: (g[2].startswith(("scale", "a better")), g[0], g[1]))
    out: list[Action] = []
    pairs = min(len(gone), len(new))
    for (from_site, from_variant, why), (to_site, to_variant) in zip(gone[:pairs], new[:pairs]):
        if back[(to_site, to_variant)] > 0 and why == "a better site was found":
            back[(to_site, to_variant)] -= 1
            why = f"failback: site {to_site} is back, where it ran before the site was lost"
        out.append(
            MoveReplica(
                name,
                from_site,
                from_variant,
                to_site,
                to_variant,
                f"{why}; now on {to_site}: {reasons[(to_site, to_variant)].pop().removeprefix('new; ')}",
            )
        )
    last: PlaceReplica | None = None
    for site, variant in new[pairs:]:
        reason = reasons[(site, variant)].pop()
        if last is None or (last.site, last.variant, last.reason) != (site, variant, reason):
            last = PlaceReplica(name, site, variant, reason)
        out.append(last)
    for site, variant, why in gone[pairs:]:
        out.append(RemoveReplica(name, site, variant, why))
    return out
