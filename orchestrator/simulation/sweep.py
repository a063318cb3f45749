"""N-1 sweeps: lose each site (or each region) in turn and rank the losses by harm.

A sweep runs one what-if per site, so it cannot afford a whole-fleet plan each time. It
re-plans only the deployments that had a replica on what was lost, and the other
deployments of their models (an edge site serves a model for one deployment: the planner
must see which edge sites those hold), against the capacity the other deployments leave:
their replicas keep their seats, which is what the planner does with a running replica
whose site is still healthy. Losing a site that hosts nothing
moves nothing, so it is reported without planning. The harm is ranked by replicas that no
longer fit, then demand left without any replica, then the rise in p95 latency, then
replicas moved.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from orchestrator.scheduler import model as sched
from orchestrator.scheduler import planner
from orchestrator.scheduler import result as sched_result
from orchestrator.scheduler import seating
from orchestrator.scheduler.capacity import Capacity, bound_gpu_models
from orchestrator.scheduler.fleet import Fleet
from orchestrator.simulation import measure as measure_mod
from orchestrator.simulation import whatif

By = Literal["site", "region"]


@dataclass(frozen=True)
class Impact:
    """What losing one site or region does, against today's plan."""

    target: str
    sites: int  # sites lost
    replicas_lost: int  # replicas today's plan runs there
    moved: int
    unschedulable: int  # replicas short of the wanted count afterwards (more than today)
    deployments_short: tuple[str, ...]
    unserved_rps: float
    p95_ms: float | None
    p95_delta_ms: float | None
    g_co2_per_hour: float

    def harm(self) -> tuple[float, float, float, float]:
        return (-self.unschedulable, -self.unserved_rps, -(self.p95_delta_ms or 0.0), -self.moved)


@dataclass(frozen=True)
class SweepResult:
    by: By
    before: measure_mod.Metrics
    impacts: tuple[Impact, ...]  # most harmful first
    scenario: str = "no change"  # what the fleet was put through before the sweep


def _usage(fleet: Fleet, state: whatif.State) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list[int]],
                                                     dict[str, list[tuple[int, int, int]]]]:
    """CPU, memory (GiB) and power (IT watts) each site's replicas take, the GPUs each
    site's groups have left (below zero where they hold more than fits), and the GPU group
    each replica takes: the one the planner seats it in."""
    cpu = np.zeros(len(state.sites))
    mem = np.zeros(len(state.sites))
    watts = np.zeros(len(state.sites))
    gpus = Capacity(fleet, bound_gpu_models(state.deployments))
    taken: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # deployment -> (site, group, gpus) per GPU replica
    variants = {d.name: {v.name: v for v in d.variants} for d in state.deployments}
    at: dict[int, list[tuple[str, sched.Variant]]] = defaultdict(list)
    for r in sorted(state.current, key=lambda r: (r.deployment, r.site, r.variant)):
        i = fleet.index.get(r.site)
        v = variants.get(r.deployment, {}).get(r.variant)
        if i is None or v is None:
            continue
        cpu[i] += v.cpu
        mem[i] += v.memory_mib / 1024
        watts[i] += v.watts
        if v.gpus and fleet.gpu_groups:
            at[i].append((r.deployment, v))
    for i, running in at.items():
        for (deployment, v), k in zip(running, seating.seat(gpus, i, [v for _, v in running])):
            if k is None:  # more than the site holds: its GPUs still count, below zero (``Sweeper.spare_gpus``)
                big = fleet.gpu_big(v, np.array([i]))[0]
                k = int(np.argmax(np.where(big, gpus.gpu_count[i], np.iinfo(np.int64).min)))
            gpus.gpu_count[i, k] -= v.gpus
            taken[deployment].append((i, k, v.gpus))
    free = {s.name: [int(gpus.gpu_count[i, k]) for k in range(len(s.gpus))] for i, s in enumerate(state.sites)}
    return cpu, mem, watts, free, taken


class Sweeper:
    """Today's state, measured once, and the capacity every running replica holds."""

    def __init__(self, state: whatif.State) -> None:
        self.state = state
        self.fleet = Fleet(state.sites)
        self.measures = measure_mod.measure(self.fleet, state.deployments, state.current)
        self.before = measure_mod.summarize(self.measures)
        self.by_name = {d.name: d for d in state.deployments}
        self.of_model: dict[str, list[str]] = defaultdict(list)
        for d in state.deployments:
            self.of_model[d.model].append(d.name)
        self.replicas_by_deployment: dict[str, list[sched.Replica]] = defaultdict(list)
        self.deployments_at: dict[str, set[str]] = defaultdict(set)
        for r in state.current:
            self.replicas_by_deployment[r.deployment].append(r)
            self.deployments_at[r.site].add(r.deployment)
        self.cpu, self.mem, self.watts, self.spare_gpus, self.gpu_taken = _usage(self.fleet, state)
        # What the running replicas leave, below zero where a site holds more than it has (a
        # power budget lowered below its draw, say): what a re-plan gives back fills that
        # first, and only the sum is clamped, or the re-planned deployments would be given
        # room the others already overdraw.
        self.spare_cpu = [s.cpu - float(self.cpu[i]) for i, s in enumerate(state.sites)]
        self.spare_mem = [s.memory_gib - float(self.mem[i]) for i, s in enumerate(state.sites)]
        self.spare_watts = [None if s.power_budget_watts is None else s.power_budget_watts - float(self.watts[i]) * s.pue
                            for i, s in enumerate(state.sites)]
        self.reserved = [
            dataclasses.replace(s, cpu=max(0.0, self.spare_cpu[i]), memory_gib=max(0.0, self.spare_mem[i]),
                                gpus=tuple(dataclasses.replace(g, count=max(0, self.spare_gpus[s.name][k])) for k, g in enumerate(s.gpus)),
                                power_budget_watts=_budget(self.spare_watts[i]))
            for i, s in enumerate(state.sites)
        ]
        self.short_before = {d.name: max(0, d.wanted_replicas() - len(self.replicas_by_deployment.get(d.name, [])))
                             for d in state.deployments}

    def lose(self, target: str, lost: Sequence[int]) -> Impact:
        """Fail the sites at indices ``lost`` and re-plan the deployments they hosted, with
        the other deployments of those deployments' models."""
        sites = self.state.sites
        affected = sorted({d for i in lost for d in self.deployments_at.get(sites[i].name, ())})
        replicas_lost = sum(1 for d in affected for r in self.replicas_by_deployment[d] if r.site in {sites[i].name for i in lost})
        if not affected:
            return Impact(target, len(lost), 0, 0, 0, (), self.before.unserved_rps, self.before.p95_ms, 0.0, self.before.g_co2_per_hour)
        # Give back what the affected deployments and their models' others hold, on top of
        # what the rest leave.
        replanned = sorted({other for d in affected for other in self.of_model[self.by_name[d].model]})
        back_cpu: dict[int, float] = defaultdict(float)
        back_mem: dict[int, float] = defaultdict(float)
        back_watts: dict[int, float] = defaultdict(float)
        back_gpu: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        current: list[sched.Replica] = []
        for d in replanned:
            variants = {v.name: v for v in self.by_name[d].variants}
            for r in self.replicas_by_deployment[d]:
                i = self.fleet.index.get(r.site)
                v = variants.get(r.variant)
                if i is None or v is None:
                    continue
                back_cpu[i] += v.cpu
                back_mem[i] += v.memory_mib / 1024
                back_watts[i] += v.watts
                current.append(r)
            for i, k, n in self.gpu_taken.get(d, ()):
                back_gpu[i][k] += n
        planned_sites = list(self.reserved)
        for i in set(back_cpu) | set(back_gpu):
            s = planned_sites[i]
            spare = self.spare_gpus[s.name]
            gpus = tuple(dataclasses.replace(g, count=max(0, spare[k] + back_gpu[i].get(k, 0))) for k, g in enumerate(s.gpus))
            planned_sites[i] = dataclasses.replace(s, cpu=max(0.0, self.spare_cpu[i] + back_cpu[i]),
                                                   memory_gib=max(0.0, self.spare_mem[i] + back_mem[i]), gpus=gpus,
                                                   power_budget_watts=_budget(self.spare_watts[i], back_watts[i] * s.pue))
        for i in lost:
            planned_sites[i] = dataclasses.replace(planned_sites[i], healthy=False)
        deployments = [self.by_name[d] for d in replanned]
        result = planner.plan(planned_sites, deployments, current)
        after_fleet = Fleet(planned_sites)
        measures = dict(self.measures)
        measures.update(measure_mod.measure(after_fleet, deployments, result.as_running()))
        after = measure_mod.summarize(measures)
        short = {p.name: p.wanted - p.placed for p in result.deployments.values() if p.placed < p.wanted}
        worse = {name: n - self.short_before.get(name, 0) for name, n in short.items() if n > self.short_before.get(name, 0)}
        moved = sum(1 for a in result.actions if isinstance(a, sched_result.MoveReplica))
        p95_delta = None if after.p95_ms is None or self.before.p95_ms is None else after.p95_ms - self.before.p95_ms
        return Impact(target, len(lost), replicas_lost, moved, sum(worse.values()), tuple(sorted(worse)),
                      after.unserved_rps, after.p95_ms, p95_delta, after.g_co2_per_hour)


def _budget(spare: float | None, back: float = 0.0) -> float | None:
    """The power budget handed to the planner: ``spare`` facility watts (below zero where a
    site overdraws) plus ``back`` given back, never below zero; None for none."""
    return None if spare is None else max(0.0, spare + back)


def _target_of(site: sched.Site, by: By) -> str | None:
    """What a sweep by ``by`` loses ``site`` with: the site itself, or its region (None for
    a site that declares no region: it is in none, so a region sweep does not lose it)."""
    return site.name if by == "site" else site.region or None


def sweep(state: whatif.State, by: By, targets: Iterable[str] | None = None,
          progress: Callable[[int, int], None] | None = None) -> SweepResult:
    """Lose each site (``by="site"``) or region in turn; impacts ranked most harmful first."""
    sweeper = Sweeper(state)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(state.sites):
        target = _target_of(s, by)
        if target is not None:
            groups[target].append(i)
    wanted = list(targets) if targets is not None else sorted(groups)
    for t in wanted:
        if t not in groups:
            raise whatif.ScenarioError(f"{by} {t!r} is not in the fleet")
    impacts = []
    for n, target in enumerate(wanted):
        # A site already down (today, or failed by the scenario swept under) is not lost again.
        impacts.append(sweeper.lose(target, [i for i in groups[target] if state.sites[i].open]))
        if progress is not None:
            progress(n + 1, len(wanted))
    impacts.sort(key=lambda x: (x.harm(), x.target))
    return SweepResult(by, sweeper.before, tuple(impacts))


def sweep_under(state: whatif.State, by: By, changes: whatif.Changes,
                progress: Callable[[int, int], None] | None = None) -> SweepResult:
    """:func:`sweep` of the fleet as a scenario leaves it (``whatif.under``): each site or
    region the scenario did not fail is lost in turn, and the harm is measured against the
    scenario's plan."""
    if changes.empty:
        return sweep(state, by, progress=progress)
    after = whatif.under(state, changes)
    targets = sorted({t for s in after.sites if not whatif.failed(s, changes) and (t := _target_of(s, by)) is not None})
    return dataclasses.replace(sweep(after, by, targets, progress), scenario=changes.describe())
