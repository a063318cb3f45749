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
deployments of their models. Scaling demand
matches every demand change against every demand point (one unit each). Fitted to
``bench.simulate``'s fleets on the 2-core machine: about 5 million units a second (1
to 9 by shape, the small plans slowest; docs/simulation.md has the table).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from orchestrator.simulation import whatif
from orchestrator.simulation.scenario import Changes, ScenarioError

#: Units one what-if may take on a control plane by default (``edgeplane serve
#: --simulate-budget``), about a minute of one core: a region sweep of a 10,000-site fleet
#: (about 230 million) fits, a site sweep of it (billions) does not.
DEFAULT_BUDGET = 300_000_000
#: What walking the sites costs a plan, in deployments planned per site (fitted).
FLEET_UNITS = 40


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
    work = _scenario_work(state, changes, each)
    _refuse_over(work, budget)  # first: counting a sweep under a scenario scales its demand
    if each is not None:
        work = _with_sweep(work, state, changes, each)
        _refuse_over(work, budget)
    return work


def _scenario_work(state: whatif.State, changes: Changes, each: str | None) -> Work:
    """One plan of the fleet under the scenario (none for a sweep without one)."""
    sites = len(state.sites) + len(changes.added)
    what = f"{sites:,} sites × {len(state.deployments):,} deployments"
    demand = sum(len(d.demand) for d in state.deployments) * len(changes.demand)
    if demand:
        what += f", {len(changes.demand):,} demand changes × every demand point"
    if each is not None and changes.empty:
        return Work(0, 0, what)
    return Work(1, sites * (FLEET_UNITS + len(state.deployments)) + demand, what)


def _with_sweep(work: Work, state: whatif.State, changes: Changes, each: str) -> Work:
    """``work`` and then an N-1 sweep's plans: one per target hosting a replica."""
    sites = len(state.sites) + len(changes.added)
    plans, pairs = _hosted(state, changes, each)
    what = f"{work.what}; an N-1 sweep by {each}: {plans:,} plans, one per {each} hosting a replica"
    return Work(work.plans + plans, work.units + sites * (FLEET_UNITS * plans + pairs), what)


def _hosted(state: whatif.State, changes: Changes, each: str) -> tuple[int, int]:
    """How many targets (sites or regions) a sweep plans for, and how many deployments it
    plans in all: each target hosting a replica, with the deployments of the models that
    have one there.

    Today's placement tells both. Under a scenario, the replicas on a failed or edited site
    may land anywhere, and so may those a deployment wants beyond what it runs: each may
    add a target and its model's deployments to plan (a bound, not a guess at where they go)."""
    keeps = {s.name for s in state.sites if not whatif.failed(s, changes) and s.name not in changes.edits}
    target_of = {s.name: (s.name if each == "site" else s.region) for s in state.sites}
    model_of = {d.name: d.model for d in state.deployments}
    of_model = Counter(model_of.values())
    kept = [r for r in state.current if r.site in keeps]
    models_at = {(target_of[r.site], model_of.get(r.deployment, r.deployment)) for r in kept}
    targets = len(set(target_of.values()) | {(s.name if each == "site" else s.region) for s in changes.added})
    loose = loose_pairs = 0  # replicas that may land on a target without one of their deployment today
    if not changes.empty:
        running = Counter(r.deployment for r in kept)
        for d in state.deployments:
            wanted = whatif.scale_demand(d, changes.demand).wanted_replicas() if changes.demand else d.wanted_replicas()
            loose += max(0, wanted - running[d.name])
            loose_pairs += max(0, wanted - running[d.name]) * of_model[d.model]
    hosting = len({t for t, _ in models_at})
    pairs = sum(of_model.get(m, 1) for _, m in models_at)
    return min(targets, hosting + loose), min(targets * len(state.deployments), pairs + loose_pairs)


def _refuse_over(work: Work, budget: int) -> None:
    """Refuse ``work`` over ``budget``, saying what is too large and how to narrow it."""
    if work.units <= budget:
        return
    raise TooMuchWork(
        f"this what-if is too large for the control plane: about {work.units:,} units of planning "
        f"({work.what}), over its budget of {budget:,} (edgeplane serve --simulate-budget). "
        f"Narrow it: sweep by region instead of site, add fewer sites, give fewer demand changes, "
        f"or run it on your own machine with 'edgeplane simulate -f MANIFESTS', which has no budget")
