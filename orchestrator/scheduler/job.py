"""One deployment while it is being planned: ``Job``, the mutable scratch every step of a
plan reads and changes, how it is built from a deployment (``prepare``), the deployments
of one model told of each other (``pair_rivals``), and the order deployments are planned
in (``scarcity``).

It is its own module because every step shares it: the greedy (``planner``), the seating
of running replicas (``incumbents``), ``relocation``, ``repair``, ``candidates``,
``diagnosis``, ``outcome`` and the repair of the plan in force (``standing``). None of it
is returned: ``outcome`` turns the jobs into the ``PlanResult``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from orchestrator.scheduler import candidates
from orchestrator.scheduler.fleet import BoolArray, Fleet, IntArray
from orchestrator.scheduler.model import Deployment, Variant, Weights
from orchestrator.scheduler.objective import LocatedDemand, locate_demand
from orchestrator.scheduler.result import Shortfall
from orchestrator.scheduler.spread import DomainCounts


@dataclass(eq=False)  # identity: jobs are compared and hashed as themselves
class Job:
    """One deployment while it is being planned (mutable scratch, never returned)."""

    deployment: Deployment
    weights: Weights
    wanted: int
    allowed: BoolArray  # residency, tiers, selector, health
    eligible: dict[str, BoolArray]  # per variant: allowed, tier fits variant, hardware fits
    demand: list[LocatedDemand]
    notes: list[str]
    running: Counter[tuple[int, str]] = field(default_factory=Counter)  # all replicas now
    seats: list[tuple[int, Variant, int]] = field(default_factory=list)  # valid, reserved
    placed: list[tuple[int, Variant, int]] = field(default_factory=list)  # site, variant, gpu
    spread: DomainCounts | None = None
    options: candidates.Options | None = None  # the candidates, kept between the two phases
    complete: bool = False  # the candidates are every feasible site
    shortfall: Shortfall | None = None  # why fewer than wanted were placed
    keep_margin: float = 0.0  # extra cost points a running replica's move must save
    eligible_count: int = 0  # sites eligible for any variant
    # Deployments of the same model: on an edge site only one of them may hold replicas.
    rivals: list[Job] = field(default_factory=list)
    started: bool = False  # planned in this call: ``placed`` is what it holds, not ``seats``
    _eligible_sites: dict[str, IntArray] = field(default_factory=dict)
    _any_eligible: BoolArray | None = None

    def eligible_sites(self, fleet: Fleet, variant: str) -> IntArray:
        """Indices of the sites eligible for ``variant`` (fixed for one plan call)."""
        found = self._eligible_sites.get(variant)
        if found is None:
            found = self._eligible_sites[variant] = fleet.sites_of(self.eligible[variant])
        return found

    @property
    def any_eligible(self) -> BoolArray:
        if self._any_eligible is None:
            masks = list(self.eligible.values())
            if not masks:
                self._any_eligible = np.zeros_like(self.allowed)
            elif len(masks) == 1:
                self._any_eligible = masks[0]  # shared and read-only: no copy needed
            else:
                self._any_eligible = np.logical_or.reduce(masks)
        return self._any_eligible

    @property
    def move_cost(self) -> float:
        """What the search charges a replica started where none ran: the move itself, and
        for a deployment already running, the margin that keeps it where it runs unless
        a move clearly pays (``Tuning.keep_margin``)."""
        return self.weights.move_per_replica + (self.keep_margin if self.running else 0.0)

    def variants(self) -> list[Variant]:
        names = self.eligible.keys()
        return [v for v in self.deployment.variants if v.name in names]

    @property
    def holding(self) -> list[tuple[int, Variant, int]]:
        """The replicas this deployment holds capacity for now."""
        return self.placed if self.started else self.seats

    def taken(self, fleet: Fleet) -> BoolArray | None:
        """Edge sites where another deployment of the same model holds replicas (None: no
        such site). An edge agent serves a model once, for one deployment: a second
        deployment's replica there would never be sent."""
        if not self.rivals:
            return None
        held = [site for rival in self.rivals for site, _, _ in rival.holding]
        if not held:
            return None
        mask = np.zeros(fleet.size, dtype=bool)
        mask[held] = True
        mask &= fleet.is_edge
        return mask if mask.any() else None

    def rival_at(self, fleet: Fleet, site: int) -> Job | None:
        """The other deployment of the same model holding replicas on edge ``site``."""
        if not fleet.is_edge[site]:
            return None
        return next((r for r in self.rivals if any(s == site for s, _, _ in r.holding)), None)


def pair_rivals(jobs: Iterable[Job]) -> None:
    """Tell the deployments of one model about each other (``Job.rivals``)."""
    by_model: dict[str, list[Job]] = {}
    for job in jobs:
        by_model.setdefault(job.deployment.model, []).append(job)
    for same in by_model.values():
        for job in same:
            job.rivals = [other for other in same if other is not job]

def prepare(fleet: Fleet, deployment: Deployment, weights: Weights) -> Job:
    demand, notes = locate_demand(fleet, deployment)
    job = Job(
        deployment=deployment,
        weights=weights,
        wanted=deployment.wanted_replicas(),
        allowed=fleet.placement_mask(deployment),
        eligible=fleet.eligible_masks(deployment),
        demand=demand,
        notes=notes,
    )
    masks = list(job.eligible.values())
    if len(masks) > 1:  # shared by the deployments with the same rules and sizes
        job._any_eligible = fleet.any_of(masks)
    job.eligible_count = int(fleet.sites_of(job.any_eligible).size)
    return job


def scarcity(job: Job) -> tuple[int, int, str]:
    gpus = max((v.gpus for v in job.deployment.variants), default=0)
    return (-gpus, job.eligible_count, job.deployment.name)
