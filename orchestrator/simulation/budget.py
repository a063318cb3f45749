"""How much planning a what-if asks for, counted before any of it runs.

Anyone with a read token may ask the control plane for a what-if, and the planning runs on
the cores the reconciler and the gateway need, so the server refuses one that would take
too long instead of starting it. The estimate lives here, next to the code whose cost it
counts, so that the two change together.

The unit is one site visited once by one planner run. A plan walks every site in Python
to build the fleet's arrays and the capacity left (``FLEET_UNITS``), then builds masks and
candidates per deployment over every site (one unit each): one plan of ``D`` deployments
on ``S`` sites is ``S × (FLEET_UNITS + D)``. An N-1 sweep (``sweep``) plans once per lost
site or region that hosts a replica, and only the deployments it hosted with the other
deployments of their models. A deployment with several demand points adds its relocation
pass (``relocation.relocate``): each round scores every replica against every candidate
site at every demand point, and the candidates grow with the points, so a deployment of
many replicas and points costs more than its share of sites (``_relocation``). Scaling demand
matches every demand change against every demand point (one unit each). Fitted to
``bench.simulate``'s fleets on the 2-core machine: about 5 million units a second (2
to 10 by shape, the small plans slowest; docs/simulation.md has the table).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from orchestrator.scheduler import model as sched
from orchestrator.scheduler import relocation as sched_relocation
from orchestrator.simulation import whatif
from orchestrator.simulation.scenario import Changes, ScenarioError

#: Units one what-if may take on a control plane by default (``edgeplane serve
#: --simulate-budget``), about a minute of one core: a region sweep of a 10,000-site fleet
#: (about 230 million) fits, a site sweep of it (billions) does not.
DEFAULT_BUDGET = 300_000_000
#: What walking the sites costs a plan, in deployments planned per site (fitted).
FLEET_UNITS = 40
#: (replica, candidate, demand point) scores of the relocation pass per unit (measured).
RELOCATION_SCORES_PER_UNIT = 32


class TooMuchWork(ScenarioError):
    """A what-if over the work budget: refused before any planning."""


@dataclass(frozen=True)
class Work:
    """The estimate: planner runs and units in all, and where they go (for a message)."""

    plans: int
    units: int
    what: str


def check(state: whatif.State, changes: Changes, each: str | None, budget: int) -> Work:
    """The work of ``whatif.simulate`` (``each`` None) or of ``sweep.sweep_under``;
    ``TooMuchWork`` when it is over ``budget``."""
    scaled = [_scaled(d, changes) for d in state.deployments]  # once: points × changes each
    work = _scenario_work(state, changes, each, scaled)
    _refuse_over(work, budget)  # first: a sweep under a scenario plans many more
    if each is not None:
        work = _with_sweep(work, state, changes, each, scaled)
        _refuse_over(work, budget)
    return work


def _scenario_work(state: whatif.State, changes: Changes, each: str | None, scaled: list[sched.Deployment]) -> Work:
    """One plan of the fleet under the scenario (none for a sweep without one)."""
    sites = len(state.sites) + len(changes.added)
    what = f"{sites:,} sites × {len(state.deployments):,} deployments"
    demand = sum(len(d.demand) for d in state.deployments) * len(changes.demand)
    if demand:
        what += f", {len(changes.demand):,} demand changes × every demand point"
    if each is not None and changes.empty:
        return Work(0, 0, what)
    relocation = sum(_relocation(d, sites) for d in scaled)
    if relocation:
        what += f", {relocation:,} units relocating replicas between demand points"
    return Work(1, sites * (FLEET_UNITS + len(state.deployments)) + demand + relocation, what)


def _scaled(d: sched.Deployment, changes: Changes) -> sched.Deployment:
    return whatif.scale_demand(d, changes.demand) if changes.demand else d


def _relocation(d: sched.Deployment, sites: int) -> int:
    """What ``d``'s relocation pass may cost in one plan: per round, each replica against
    each candidate at each demand point; a shortlist keeps about 4 sites per point, the
    wanted count and ``Tuning.candidates`` more, per variant."""
    points = len(d.demand)
    if points < 2:  # one point: the planner skips the pass
        return 0
    wanted = d.wanted_replicas()
    candidates = min(sites, 4 * points + wanted + (sched.DEFAULT_TUNING.candidates or sites)) * len(d.variants)
    return wanted * candidates * points * sched_relocation.RELOCATION_ROUNDS // RELOCATION_SCORES_PER_UNIT


def _with_sweep(work: Work, state: whatif.State, changes: Changes, each: str, scaled: list[sched.Deployment]) -> Work:
    """``work`` and then an N-1 sweep's plans: one per target hosting a replica."""
    sites = len(state.sites) + len(changes.added)
    plans, pairs, relocation = _hosted(state, changes, each, sites, scaled)
    what = f"{work.what}; an N-1 sweep by {each}: {plans:,} plans, one per {each} hosting a replica"
    return Work(work.plans + plans, work.units + sites * (FLEET_UNITS * plans + pairs) + relocation, what)


def _hosted(state: whatif.State, changes: Changes, each: str, sites: int, scaled: list[sched.Deployment]) -> tuple[int, int, int]:
    """How many targets (sites or regions) a sweep plans for, how many deployments it
    plans in all, and their relocation passes' units: each target hosting a replica, with
    the deployments of the models that have one there.

    Today's placement tells both. Under a scenario, the replicas on a failed or edited site
    may land anywhere, and so may those a deployment wants beyond what it runs: each may
    add a target and its model's deployments to plan (a bound, not a guess at where they go)."""
    keeps = {s.name for s in state.sites if not whatif.failed(s, changes) and s.name not in changes.edits}
    target_of = {s.name: (s.name if each == "site" else s.region) for s in state.sites}
    model_of = {d.name: d.model for d in state.deployments}
    of_model = Counter(model_of.values())
    relocation_of: Counter[str] = Counter()  # per model, its deployments' relocation passes
    for d in scaled:
        relocation_of[d.model] += _relocation(d, sites)
    kept = [r for r in state.current if r.site in keeps]
    models_at = {(target_of[r.site], model_of.get(r.deployment, r.deployment)) for r in kept}
    targets = len(set(target_of.values()) | {(s.name if each == "site" else s.region) for s in changes.added})
    loose = loose_pairs = loose_relocation = 0  # replicas that may land on a target without one of their deployment today
    if not changes.empty:
        running = Counter(r.deployment for r in kept)
        for d in scaled:
            extra = max(0, d.wanted_replicas() - running[d.name])
            loose += extra
            loose_pairs += extra * of_model[d.model]
            loose_relocation += extra * relocation_of[d.model]
    hosting = len({t for t, _ in models_at})
    pairs = sum(of_model.get(m, 1) for _, m in models_at)
    relocation = sum(relocation_of[m] for _, m in models_at) + loose_relocation
    return min(targets, hosting + loose), min(targets * len(state.deployments), pairs + loose_pairs), relocation


def _refuse_over(work: Work, budget: int) -> None:
    """Refuse ``work`` over ``budget``, saying what is too large and how to narrow it."""
    if work.units <= budget:
        return
    raise TooMuchWork(
        f"this what-if is too large for the control plane: about {work.units:,} units of planning "
        f"({work.what}), over its budget of {budget:,} (edgeplane serve --simulate-budget). "
        f"Narrow it: sweep by region instead of site, add fewer sites, give fewer demand changes, "
        f"or run it on your own machine with 'edgeplane simulate -f MANIFESTS', which has no budget")
