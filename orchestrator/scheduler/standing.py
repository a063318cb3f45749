"""The plan in force, kept indexed, so that a lost or returning site is repaired in
milliseconds instead of re-planned.

``planner.plan`` plans every deployment again: about a second at 10,000 sites × 1,000
deployments, and free to move a healthy replica where it finds a seat better by more
than a move costs. When the only change since the plan in force is capacity (sites lost,
being unhealthy or gone from the inventory; sites lost earlier coming back; new sites),
nothing but what was lost has to change. ``Standing.repair`` keeps every replica that still runs
exactly where it is (the keep step) and places only the lost ones, with the planner's
greedy, against the capacity the others hold: replicas moved = replicas lost, and the
work grows with the deployments that ran on the lost sites, not with the fleet.
Deployments short of their wanted count try again whenever capacity comes back; when a
lost replica finds no room, the planner's ``repair.make_room`` may shift another
deployment's replica, as a full plan would (and ``repair.switch_variant`` /
``trade_down`` touch only replicas the repair itself placed: the kept ones run now).

New sites (with no other change) rebuild the standing plan over the larger fleet, every
replica kept, and let short deployments grow into them. Anything else (a site whose
capacity, labels or carbon changed, a site that was already unhealthy when the standing
plan was built coming back, new sites along with other changes, changed deployments) is
no capacity change: ``repair`` returns None, the caller runs ``planner.plan`` and
builds a new ``Standing`` from its answer.

Pure like the planner: no I/O, no clock, no globals. A ``Standing`` is mutable on
purpose: after ``repair`` it holds the repaired plan, the one in force once applied. A
what-if asks how the plan in force would be repaired without changing it: ``fork`` copies
it, under the lock ``repair`` holds, so a pass repairing it meanwhile is waited for.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain

import numpy as np

from orchestrator.scheduler import diagnosis, gcpause, outcome, planner, repair
from orchestrator.scheduler.capacity import Capacity, bound_gpu_models
from orchestrator.scheduler.fleet import Fleet
from orchestrator.scheduler.incumbents import seat_incumbents
from orchestrator.scheduler.job import Job, pair_rivals, prepare, scarcity
from orchestrator.scheduler.model import (
    DEFAULT_TUNING,
    DEFAULT_WEIGHTS,
    Deployment,
    Replica,
    Site,
    Tuning,
    Weights,
)
from orchestrator.scheduler.result import Action, DeploymentPlan, Energy, Objective, PlanResult
from orchestrator.scheduler.spread import DomainCounts


class Standing:
    """A placement in force over ``sites`` and ``deployments``, ready to be repaired."""

    def __init__(
        self,
        sites: Sequence[Site],
        deployments: Sequence[Deployment],
        placement: Iterable[Replica],
        *,
        weights: Weights = DEFAULT_WEIGHTS,
        tuning: Tuning = DEFAULT_TUNING,
        region_locations: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        """``placement``: the replicas in force (``PlanResult.as_running()`` of a plan over
        the same sites and deployments). A replica that breaks a hard rule or finds no
        room is an error: a standing plan is one the planner could have made."""
        self.weights, self.tuning, self.region_locations = weights, tuning, region_locations
        self._lock = threading.Lock()  # held while repaired or forked
        with gcpause.paused():
            self._build(sites, deployments, placement)

    def _build(self, sites: Sequence[Site], deployments: Sequence[Deployment], placement: Iterable[Replica]) -> None:
        self.fleet = fleet = Fleet(sites, self.region_locations)
        weights = self.weights
        self.jobs = {d.name: prepare(fleet, d, d.weights or weights) for d in deployments}
        pair_rivals(self.jobs.values())
        if len(self.jobs) != len(deployments):
            names = [d.name for d in deployments]
            dup = sorted(n for n in self.jobs if names.count(n) > 1)
            raise ValueError(f"deployment {dup[0]!r} is declared twice")
        self.names = sorted(self.jobs)
        self.deployments = tuple(deployments)
        self.capacity = Capacity(fleet, bound_gpu_models(deployments))
        current = sorted(placement, key=lambda r: (r.deployment, r.site, r.variant))
        dropped = seat_incumbents(fleet, self.capacity, self.jobs, current)
        if dropped:
            replica, why = min(dropped.items(), key=lambda kv: (kv[0].deployment, kv[0].site, kv[0].variant))
            raise ValueError(f"replica of {replica.deployment!r} ({replica.variant}) on {replica.site!r} cannot stand: {why}")
        for job in self.jobs.values():  # the nearest sites per demand point, before any repair needs them
            for demand in job.demand:
                fleet.nearest(demand.lat, demand.lon)
        self.open = fleet.healthy.copy()  # sites that count: healthy when built, not lost since
        self.at: dict[int, set[str]] = {}  # deployments with a replica per site
        self.plans: dict[str, DeploymentPlan] = {}
        self.costs: dict[str, Objective] = {}
        for job in self.jobs.values():
            job.placed, job.seats, job.started = job.seats, [], True
            if len(job.placed) < job.wanted:
                job.spread = self._spread(job)  # a spread that holds it short says so, as the planner's reason does
                job.shortfall = diagnosis.explain(fleet, self.capacity, job)
            self._settle(job, ())

    @property
    def result(self) -> PlanResult:
        """The plan in force, every replica kept, no action."""
        return self._assemble(self.plans, self.costs, [])

    def stands_for(self, deployments: Sequence[Deployment], current: Iterable[Replica]) -> bool:
        """Whether this is the plan in force for ``deployments`` running ``current``: the
        same deployments, and every replica where this plan put it."""
        if len(deployments) != len(self.deployments) or any(
            a is not b and a != b for a, b in zip(deployments, self.deployments)
        ):
            return False
        names = self.fleet.names
        mine = {
            (name, names[site], variant): n
            for name, job in self.jobs.items()
            for (site, variant), n in job.running.items()
        }
        return Counter((r.deployment, r.site, r.variant) for r in current) == mine

    def fork(self) -> Standing:
        """A copy of this plan in force that repairs apart from it (the sites and
        deployments it was built over, immutable, are shared)."""
        with self._lock:
            shared: dict[int, object] = {id(x): x for x in (*self.fleet.sites, *self.deployments)}
            shared[id(self._lock)] = threading.Lock()
            return copy.deepcopy(self, shared)

    def repair(self, sites: Sequence[Site]) -> PlanResult | None:
        """The plan for ``sites``, keeping every replica that still stands; None when
        ``sites`` differ from the standing ones by more than sites lost, back or added."""
        with self._lock, gcpause.paused():
            change = self._capacity_change(sites)
            if change is not None:
                lost, back, gone = change
                return self._repair(lost, back, gone)
            known = [site for site in sites if site.name in self.fleet.index]
            if len(known) == len(sites):
                return None  # no new site: something else changed
            # New sites and nothing else: the standing plan is built again over the
            # larger fleet, every replica kept; short deployments may grow into them.
            change = self._capacity_change(known)
            if change is None or change[0] or change[1]:
                return None  # new sites along with other changes: plan in full
            placement = [
                Replica(name, self.fleet.names[site], variant)
                for name in self.names
                for (site, variant), n in sorted(self.jobs[name].running.items())
                for _ in range(n)
            ]
            self._build(sites, self.deployments, placement)
            return self._repair({}, [], grow_short=True)

    # -- what changed --------------------------------------------------------------------

    def _capacity_change(self, sites: Sequence[Site]) -> tuple[dict[int, str], list[int], frozenset[int]] | None:
        """``(lost, back, gone)``: the sites lost since the plan, with why; those back; and,
        of the lost, those no longer among ``sites`` at all. None for any other change."""
        fleet = self.fleet
        if len(sites) == fleet.size and [site.name for site in sites] == fleet.names:
            order = range(fleet.size)  # the common case, same sites in the same order
        else:
            found = [fleet.index.get(site.name) for site in sites]
            if None in found:
                return None  # a new site (``repair`` sees whether it is the only change)
            if len(set(found)) != len(found):
                dup = next(site.name for n, site in enumerate(sites) if found.index(found[n]) != n)
                raise ValueError(f"site {dup!r} is declared twice")
            order = found  # type: ignore[assignment]
        healthy = np.zeros(fleet.size, dtype=bool)
        seen = np.zeros(fleet.size, dtype=bool)
        healthy[list(order)] = [site.open for site in sites]
        seen[list(order)] = True
        built = fleet.sites
        for i, site in zip(order, sites):
            known = built[i]
            if site is not known and site != known and dataclasses.replace(known, healthy=site.healthy, draining=site.draining) != site:
                return None  # capacity, carbon, labels or place changed
        if (healthy & ~self.open & ~fleet.healthy).any():
            return None  # unhealthy when built: every mask leaves it out
        gone = frozenset(np.flatnonzero(self.open & ~seen).tolist())
        now = dict(zip(order, sites))
        lost = {i: now[i].why_closed() for i in np.flatnonzero(self.open & seen & ~healthy).tolist()}
        lost.update({i: f"site {fleet.names[i]} left the inventory" for i in gone})
        back = np.flatnonzero(healthy & ~self.open).tolist()
        return lost, back, gone

    # -- the keep step and the repair ------------------------------------------------------

    def _repair(self, lost: Mapping[int, str], back: Sequence[int], gone: frozenset[int] = frozenset(),
                grow_short: bool = False) -> PlanResult:
        fleet, capacity = self.fleet, self.capacity
        dropped: dict[Replica, str] = {}
        touched: dict[str, Job] = {}
        for i, why in sorted(lost.items()):
            self.open[i] = False
            capacity.close(i, gone=i in gone)
            for name in sorted(self.at.get(i, ())):
                job = touched[name] = self.jobs[name]
                job.placed = [p for p in job.placed if p[0] != i]
                for (site, variant), _ in job.running.items():
                    if site == i:
                        dropped[Replica(name, fleet.names[i], variant)] = why
        if lost:  # a spread domain lost, full or not, no longer caps the skew of what it held short
            closed = np.array(sorted(lost), dtype=np.int64)
            touched.update(
                (n, j)
                for n, j in self.jobs.items()
                if j.deployment.placement.spread is not None and len(j.placed) < j.wanted and j.any_eligible[closed].any()
            )
        for i in back:
            self.open[i] = True
            capacity.reopen(i)
        if back or grow_short:  # room came back or was added: the short deployments try again
            touched.update((n, j) for n, j in self.jobs.items() if len(j.placed) < j.wanted)
        if back:  # a spread domain back, empty, may put a deployment over its max skew
            returned = np.array(back, dtype=np.int64)
            touched.update(
                (n, j)
                for n, j in self.jobs.items()
                if j.deployment.placement.spread is not None and j.any_eligible[returned].any() and _skewed(self._spread(j))
            )
        before = {name: list(job.placed) for name, job in touched.items()}
        for job in sorted(touched.values(), key=scarcity):
            for attempt in range(2):
                job.options, job.complete, job.shortfall = None, False, None
                job.spread = self._spread(job)
                if attempt == 0 and not _skewed(job.spread):
                    planner.grow(fleet, capacity, job, self.tuning, upto=job.wanted)
                    if not _skewed(job.spread):
                        break
                    continue
                # Over its max skew (a domain came back empty, or the lost replicas found
                # no room where the balance needs them): this deployment is planned again
                # from no replica, as a full plan would, its running seats still free of
                # move cost; the others stay as they are.
                for site, variant, group in job.placed:
                    capacity.give_back(site, variant, group, job.deployment.name)
                job.placed = []
                job.spread = self._spread(job)
                planner.grow(fleet, capacity, job, self.tuning, upto=job.wanted)
                break
        short = [job for job in sorted(touched.values(), key=scarcity) if len(job.placed) < job.wanted]
        if short:
            # As a full plan would: shift another deployment's replica to make room.
            order = sorted(self.jobs.values(), key=scarcity)
            held = {job.deployment.name: list(job.placed) for job in order}
            repair.fill_short(fleet, capacity, short, order)
            for job in short:
                if len(job.placed) < job.wanted:
                    job.shortfall = diagnosis.explain(fleet, capacity, job)
            for name, placed in held.items():
                if self.jobs[name].placed != placed:
                    touched[name] = self.jobs[name]
                    before.setdefault(name, placed)
        plans, costs = dict(self.plans), dict(self.costs)
        actions: list[Action] = []
        lost_from = {replica.deployment for replica in dropped}
        for name in sorted(touched):
            job = touched[name]
            if name not in lost_from and job.placed == before[name]:
                continue  # tried to grow, found no room: unchanged
            plans[name], costs[name] = outcome.build_one(fleet, job, dropped)
            actions.extend(outcome.actions_of(fleet, job, plans[name], dropped))
            self._settle(job, {site for site, _ in job.running})
        return self._assemble(plans, costs, actions)

    def _spread(self, job: Job) -> DomainCounts | None:
        """The spread counts of ``job``'s kept replicas, over the sites still open."""
        rules = job.deployment.placement.spread
        if rules is None:
            return None
        fleet = self.fleet
        eligible = job.any_eligible & self.open
        if rules.by == "region":
            domains = np.flatnonzero(np.bincount(fleet.region[eligible], minlength=len(fleet.region_names)))
        else:
            domains = np.flatnonzero(eligible)
        keys = fleet.domains(rules.by)
        counts = DomainCounts(domains, rules.max_skew, keys)
        for site, _, _ in job.placed:
            counts.shift(int(keys[site]), +1)
        return counts

    def _settle(self, job: Job, was_at: Iterable[int]) -> None:
        """``job``'s placement is now the one in force: every replica kept."""
        name = job.deployment.name
        for site in was_at:
            self.at.get(site, set()).discard(name)
        job.running = Counter((site, variant.name) for site, variant, _ in job.placed)
        for site, _ in job.running:
            self.at.setdefault(site, set()).add(name)
        self.plans[name], self.costs[name] = outcome.build_one(self.fleet, job, {})

    def _assemble(self, plans: Mapping[str, DeploymentPlan], costs: Mapping[str, Objective], actions: list[Action]) -> PlanResult:
        energy, objective = Energy(), Objective()
        for name in self.names:
            energy = energy + plans[name].energy
            objective = objective + costs[name]
        return PlanResult(
            replicas=tuple(chain.from_iterable(plans[name].replicas for name in self.names)),
            actions=tuple(actions),
            deployments={name: plans[name] for name in self.names},
            energy=energy,
            objective=objective,
        )


def _skewed(counts: DomainCounts | None) -> bool:
    """Whether the spread counts are over their max skew (no spread rule: never)."""
    if counts is None:
        return False
    live = [c for c, n in counts.hist.items() if n > 0]
    return bool(live) and max(live) - min(live) > counts.max_skew
