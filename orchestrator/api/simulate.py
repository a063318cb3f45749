"""``POST /v1/simulate``: a what-if against the control plane's current state.

The fleet is taken as the reconciler sees it now (declared sites, each agent's measured
capacity and health, the stored placement as today's plan, the autoscaler's counts) and
handed to the pure simulation; nothing is written anywhere. The body is a scenario
document (YAML or JSON, see docs/simulation.md); ``?each=site|region`` runs an N-1 sweep
instead, ``?top=N`` keeps the N worst.
"""

from __future__ import annotations

from typing import Any

from orchestrator.reconciler import planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.simulation import report, scenario, sweep, whatif

SWEEPS = ("site", "region")


def state_of(s: snap.Snapshot) -> whatif.State:
    """The planner's inputs for ``s``, exactly as a reconcile pass builds them."""
    sites, deployments, current = planning.scheduler_inputs(s)
    return whatif.State(tuple(sites), tuple(deployments), tuple(current))


def run(s: snap.Snapshot, body: bytes, each: str | None = None, top: int | None = None) -> dict[str, Any]:
    """The report of one scenario, or of a sweep of the fleet as the scenario leaves it;
    raises ``scenario.ScenarioError``."""
    if each and each not in SWEEPS:
        raise scenario.ScenarioError(f"each must be one of {', '.join(SWEEPS)}")
    if top is not None and top < 1:  # a slice by 0 or less would keep all, or drop the last
        raise scenario.ScenarioError(f"top must be 1 or more (how many of the most harmful to keep), not {top}")
    state, changes = state_of(s), scenario.load_text(body, "<request>")
    if each:
        return report.sweep_result(sweep.sweep_under(state, each, changes), top)  # type: ignore[arg-type]
    return report.report(whatif.simulate(state, changes))
