"""``POST /v1/simulate``: a what-if against the control plane's current state.

The fleet is taken as the reconciler sees it now (declared sites, each agent's measured
capacity and health, the stored placement as today's plan, the autoscaler's counts) and
handed to the pure simulation; nothing is written anywhere. The body is a scenario
document (YAML or JSON, see docs/simulation.md); ``?each=site|region`` runs an N-1 sweep
instead, ``?top=N`` keeps the N worst.

A read token is enough to ask, and the planning shares the control plane's cores with the
reconciler and the gateway, so :class:`Simulations` bounds it: a few at once (one by
default; another is refused with :class:`Busy`, never queued) and each within a work
budget counted before any planning (``simulation.budget``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from starlette.concurrency import run_in_threadpool

from orchestrator import views
from orchestrator.reconciler import planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import model as sched_model
from orchestrator.scheduler import standing as standing_mod
from orchestrator.simulation import budget, report, scenario, sweep, whatif

SWEEPS = ("site", "region")

#: Seconds a refused caller is told to wait: most what-ifs take a second or two (the largest
#: the default budget lets through, about a minute).
RETRY_AFTER_S = 5


class Busy(Exception):
    """Every simulation slot of this control plane is taken (answered 429)."""

    retry_after_s = RETRY_AFTER_S


def state_of(s: snap.Snapshot, standing: standing_mod.Standing | None = None) -> whatif.State:
    """The planner's inputs for ``s``, exactly as a reconcile pass builds them, planned as
    the pass would plan them whatever sites and demand a what-if gives
    (``planning.plan_as_pass``): where only sites are lost, the plan in force
    (``standing``, the reconciler's; None: the pass has none and plans in full) repaired,
    else in full, the room replicas moved off a site hold there until their replacements
    serve held. ``standing`` is not changed."""
    sites, deployments, current = planning.scheduler_inputs(s)

    def plan(sites: Sequence[sched_model.Site], deployments: Sequence[sched_model.Deployment],
             current: Sequence[sched_model.Replica]) -> whatif.Planned:
        result, waits, repaired = planning.plan_as_pass(s, standing, sites, deployments, current)
        return whatif.Planned(result, {name: whatif.Waiting(wait.replicas, **views.planned_phase(result.deployments[name], wait))
                                       for name, wait in waits.items()}, "repair" if repaired else "full")
    return whatif.State(tuple(sites), tuple(deployments), tuple(current), plan)


def run(s: snap.Snapshot, body: bytes, each: str | None = None, top: int | None = None,
        work_budget: int | None = None, standing: standing_mod.Standing | None = None) -> dict[str, Any]:
    """The report of one scenario, or of a sweep of the fleet as the scenario leaves it;
    raises ``scenario.ScenarioError`` (``budget.TooMuchWork`` over ``work_budget``, before
    any planning; None: no budget). While changes are on hold, ``hold`` says why.
    ``standing``: the reconciler's plan in force (``state_of``)."""
    return {**answer(state_of(s, standing), body, each, top, work_budget), **views.held(s)}


def answer(state: whatif.State, body: bytes, each: str | None = None, top: int | None = None,
           work_budget: int | None = None) -> dict[str, Any]:
    """:func:`run` of the planner's inputs themselves."""
    if each and each not in SWEEPS:
        raise scenario.ScenarioError(f"each must be one of {', '.join(SWEEPS)}")
    if top is not None and top < 1:  # a slice by 0 or less would keep all, or drop the last
        raise scenario.ScenarioError(f"top must be 1 or more (how many of the most harmful to keep), not {top}")
    changes = scenario.load_text(body, "<request>")
    whatif.check(state, changes)  # a typo is named before the work is counted
    if work_budget is not None:
        budget.check(state, changes, each, work_budget)
    if each:
        return report.sweep_result(sweep.sweep_under(state, each, changes), top)  # type: ignore[arg-type]
    return report.report(whatif.simulate(state, changes))


class Simulations:
    """The control plane's what-ifs: at most ``slots`` at once, each within ``work_budget``.

    ``plan`` is what runs in a slot (``run``; a test passes one it can hold)."""

    def __init__(self, slots: int = 1, work_budget: int = budget.DEFAULT_BUDGET,
                 registry: CollectorRegistry | None = None, plan: Callable[..., dict[str, Any]] = run) -> None:
        self.work_budget = work_budget
        self.plan = plan
        self._slots = threading.BoundedSemaphore(slots)
        self.refused = Counter("edgeplane_simulations_refused", "What-ifs refused before planning, by reason (busy, budget)",
                               ["reason"], registry=registry)

    async def run(self, read: Callable[[], Awaitable[snap.Snapshot]], body: bytes, each: str | None, top: int | None,
                  in_force: Callable[[], standing_mod.Standing | None] = lambda: None) -> dict[str, Any]:
        """``plan`` of the state ``read`` returns, in a free slot and off the event loop;
        ``Busy`` when no slot is free (before reading anything). ``in_force``: the plan in
        force the next pass would repair, asked on the loop once the state is read."""
        if not self._slots.acquire(blocking=False):
            self.refused.labels("busy").inc()
            raise Busy(f"a simulation is already running on this control plane; retry in {RETRY_AFTER_S} s")
        reading = asyncio.ensure_future(read())
        try:
            # A cancelled request leaves its slot taken until its work ends: the planning's
            # thread, which anyio waits for, and the store read, which goes on in its own
            # worker thread and is shielded here so that the slot goes only when it ends.
            state = await asyncio.shield(reading)
            return await run_in_threadpool(self.plan, state, body, each, top, self.work_budget, in_force())
        except budget.TooMuchWork:
            self.refused.labels("budget").inc()
            raise
        finally:
            if reading.done():
                self._release(reading)
            else:  # cancelled while the store is read: the slot goes when the read ends
                reading.add_done_callback(self._release)

    def _release(self, reading: asyncio.Future[snap.Snapshot]) -> None:
        if not reading.cancelled():
            reading.exception()  # retrieved: the request that wanted it is gone, or raised it
        self._slots.release()
