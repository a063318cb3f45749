"""Replica counts from observed load, for deployments with ``spec.autoscaling``.

Every edge agent reports, on each heartbeat, two counters per model since it started:
requests answered and their durations summed. Between two samples of a site at least
``MIN_INTERVAL_S`` apart, their deltas over the elapsed time give the site's request rate
and its mean number of requests in flight (busy seconds per second, Little's law), which
is steadier than sampling an in-flight gauge. For a deployment whose ``reporting``
replicas sit on edge sites with a rate and ``dc`` replicas in data centres::

    per_replica = observed total / reporting
    desired     = ceil(per_replica * (reporting + dc) / target), within [replicas.min, replicas.max]

A ratio within ``TOLERANCE`` of the target keeps the current count. Data-centre replicas,
whose load Ray Serve does not report here, are taken to carry what the reporting ones
carry on average; edge replicas without a rate yet (just placed, still loading) are taken
to carry nothing, so a scale-up is not counted twice while new replicas come up. When no
replica reports load for a while (agents restarting, a control plane that just started),
the count is held, not dropped. A site that serves the model for another deployment
credits its load to that one. A higher
count is adopted at once; a lower one only
once every recommendation of the last ``scaleDownDelaySeconds`` agreed (the highest of
them is used), so a dip in traffic does not tear replicas down. A lowered ``replicas.max``
bounds that at once. A deployment with no
reporting replica gets no recommendation and keeps what the scheduler would give it
without autoscaling (``min``, or what its declared demand asks).

With ``replicas.min: 0`` a deployment whose traffic stopped goes down to zero replicas
once the delay has passed. The gateway then holds a request for its model and counts it
as a *wake* (:attr:`EndpointTable.wakes`); a wake that came after the deployment was last
seen with replicas gets it ``max(1, min)`` at once, held for the delay like any scale-up.
The gateway counts per model: a deployment new to the autoscaler counts the wakes since
the pass before it, not those of a deployment of the model deleted earlier.

This class keeps the samples between passes and does no I/O; the reconciler calls
:meth:`Autoscaler.evaluate` once per pass with what it gathered.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.agents import model as agent_model
from orchestrator.manifests import schema
from orchestrator.store import sqlite as store_mod

MIN_INTERVAL_S = 1.0  # a rate spans at least this long
TOLERANCE = 0.1  # |per replica / target - 1| within this keeps the current count


@dataclass(frozen=True)
class Recommendation:
    replicas: int | None  # None: no load reported yet
    metric: str  # "inflight" | "rps"
    target: float
    current: int
    reporting: int = 0
    per_replica: float | None = None
    reason: str = ""  # why the count is what it is, when no load decided it

    def status(self) -> dict[str, Any]:
        """The deployment status's ``autoscaling`` block."""
        out: dict[str, Any] = {"metric": self.metric, "target": self.target, "currentReplicas": self.current}
        if self.reason:
            out["reason"] = self.reason
            if self.replicas is not None:
                out["desiredReplicas"] = self.replicas
            return out
        if self.replicas is None or self.per_replica is None:
            out["reason"] = "no replica reports load now: the count is held"
            if self.replicas is not None:
                out["desiredReplicas"] = self.replicas
            return out
        out.update(
            desiredReplicas=self.replicas,
            reportingReplicas=self.reporting,
            observedPerReplica=round(self.per_replica or 0.0, 3),
        )
        return out


@dataclass
class _Site:
    sample: agent_model.ModelLoad
    agent_id: str  # a restarted agent joins with a new id and counts from zero
    rps: float | None = None
    inflight: float | None = None


@dataclass
class Autoscaler:
    # the scale-down delay is a span of this process's time (the history lives only in memory):
    # the wall clock would end it early, or hold it, whenever NTP steps it
    clock: Callable[[], float] = time.monotonic
    latest: dict[str, Recommendation] = field(default_factory=dict)
    _sites: dict[tuple[str, str], _Site] = field(default_factory=dict)  # (deployment, site)
    _history: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    _wakes_seen: dict[str, int] = field(default_factory=dict)  # by deployment: wakes when it last had replicas
    _wakes_before: dict[str, int] = field(default_factory=dict)  # by model: the wakes the last pass was given

    def evaluate(
        self,
        deployments: Iterable[tuple[str, schema.ModelDeploymentSpec]],
        placements: Iterable[store_mod.PlacementRow],
        agents: Mapping[str, agent_model.AgentStatus],
        wakes: Mapping[str, int] | None = None,
    ) -> dict[str, Recommendation]:
        """One recommendation per autoscaled deployment, from the agents' latest counters
        and the gateway's wakes of models scaled to zero (by model)."""
        now = self.clock()
        rows: dict[str, list[store_mod.PlacementRow]] = {}
        for row in placements:
            rows.setdefault(row.deployment, []).append(row)
        out: dict[str, Recommendation] = {}
        seen: set[tuple[str, str]] = set()
        for name, spec in deployments:
            if spec.autoscaling is None:
                continue
            mine = rows.get(name, [])
            for row in mine:
                seen.add((name, row.site))
            out[name] = self._woken(now, name, spec, mine, (wakes or {}).get(spec.model, 0)) or \
                self._recommend(now, name, spec, mine, agents)
        for key in [k for k in self._sites if k not in seen]:
            del self._sites[key]
        for key in [k for k in self._history if k not in out]:
            del self._history[key]
        for key in [k for k in self._wakes_seen if k not in out]:
            del self._wakes_seen[key]
        self._wakes_before = dict(wakes or {})
        self.latest = out
        return out

    def _woken(self, now: float, name: str, spec: schema.ModelDeploymentSpec,
               rows: list[store_mod.PlacementRow], wakes: int) -> Recommendation | None:
        """A deployment at zero replicas that a request asked for since it last had some:
        ``max(1, min)`` now, held through the scale-down delay."""
        scaling = spec.autoscaling
        assert scaling is not None
        metric, target = _target(scaling)
        current = sum(r.replicas for r in rows)
        if current > 0 or spec.replicas.min > 0:
            self._wakes_seen[name] = wakes
            return None
        # The gateway counts wakes per model from its start: those of a deployment of the
        # model deleted before this one was applied are not requests for this one. What
        # came since the last pass is (a request held for the model now).
        seen = self._wakes_seen.setdefault(name, self._wakes_before.get(spec.model, 0))
        if wakes <= seen:
            history = self._history.get(name)
            if history is not None:
                self._expire(history, now, scaling.scaleDownDelaySeconds)
                if any(n for _, n in history):
                    return None  # woken a moment ago, not placed yet: the held count decides
            return Recommendation(0, metric, target, 0, reason="scaled to zero: the next request starts a replica")
        self._wakes_seen[name] = wakes
        replicas = min(spec.replicas.max, max(1, spec.replicas.min))
        self._history[name] = deque([(now, replicas)])
        return Recommendation(replicas, metric, target, 0, reason="scaled to zero and asked for: starting a replica")

    def _recommend(self, now: float, name: str, spec: schema.ModelDeploymentSpec,
                   rows: list[store_mod.PlacementRow], agents: Mapping[str, agent_model.AgentStatus]) -> Recommendation:
        scaling = spec.autoscaling
        assert scaling is not None
        metric, target = _target(scaling)
        current = sum(r.replicas for r in rows)
        total, reporting, unobservable = 0.0, 0, 0
        for row in rows:
            agent = agents.get(row.site)
            if agent is None:  # a data centre: Ray Serve's load is not reported here
                unobservable += row.replicas
                continue
            state = agent.models.get(spec.model)
            if state is not None and state.deployment and state.deployment != name:
                continue  # the site serves this model for another deployment: its load is that one's
            load = agent.model_load.get(spec.model) if agent.healthy else None
            rate = self._rate(name, row.site, load, agent.agent_id)
            if rate is not None:
                total += rate.inflight if metric == "inflight" else rate.rps  # type: ignore[operator]
                reporting += row.replicas
        history = self._history.get(name)
        if history is not None:  # what the delay holds is bounded by replicas.max as it is now, lowered or not
            _cap(history, spec.replicas.max)
        if reporting == 0:
            # No load known right now (agents restarting or silent, or this control plane
            # just started): hold the count rather than fall back and tear replicas down.
            if history is not None:
                self._expire(history, now, scaling.scaleDownDelaySeconds)
                held = max((n for _, n in history), default=current)
            else:
                held = current
            if held:  # none held: no recommendation, the scheduler's count (min, or from demand) stands
                held = max(spec.replicas.min, min(spec.replicas.max, held))
            return Recommendation(held or None, metric, target, current)
        # The delay runs from the first recommendation: the count the deployment had then
        # stands until the delay has passed.
        if history is None:
            history = self._history[name] = deque([(now, min(current, spec.replicas.max))])
        # Data-centre replicas are taken to carry what the reporting ones carry on average;
        # edge replicas without a rate yet (just placed, still loading) to carry nothing.
        per_replica = total / reporting
        if abs(per_replica / target - 1.0) <= TOLERANCE:
            raw = current
        else:
            wanted = per_replica * (reporting + unobservable) / target
            # a load past the maximum (even one that overflows to inf) asks for the maximum; ceil(inf)
            # would raise and fail the reconcile pass of the whole fleet
            raw = math.ceil(wanted - 1e-9) if wanted < spec.replicas.max else spec.replicas.max
        raw = max(spec.replicas.min, min(spec.replicas.max, raw))
        history.append((now, raw))
        self._expire(history, now, scaling.scaleDownDelaySeconds)
        replicas = max(max((n for _, n in history), default=raw), raw)
        return Recommendation(replicas, metric, target, current, reporting, per_replica)

    @staticmethod
    def _expire(history: deque[tuple[float, int]], now: float, delay: float) -> None:
        while history and history[0][0] < now - delay:
            history.popleft()

    def _rate(self, deployment: str, site: str, load: agent_model.ModelLoad | None, agent_id: str) -> _Site | None:
        """The site's latest rate (None until two samples far enough apart exist)."""
        key = (deployment, site)
        if load is None or not math.isfinite(load.busy_seconds_total):  # no rate from a counter that is not a number
            self._sites.pop(key, None)
            return None
        known = self._sites.get(key)
        if known is None or known.agent_id != agent_id or load.requests_total < known.sample.requests_total:
            self._sites[key] = _Site(load, agent_id)  # new, or the agent restarted: a first sample
            return None
        elapsed = load.at - known.sample.at
        if elapsed >= MIN_INTERVAL_S:
            known.rps = (load.requests_total - known.sample.requests_total) / elapsed
            known.inflight = max(0.0, load.busy_seconds_total - known.sample.busy_seconds_total) / elapsed
            known.sample = load
        return known if known.rps is not None else None


def _cap(history: deque[tuple[float, int]], most: int) -> None:
    """Lower the counts of ``history`` past ``most``: a replica count the deployment may no
    longer run is no count to hold (nor to return to if the maximum is raised again)."""
    for i, (at, n) in enumerate(history):
        if n > most:
            history[i] = (at, most)


def _target(scaling: schema.Autoscaling) -> tuple[str, float]:
    """The metric a deployment scales on and its per-replica target."""
    if scaling.targetInflight:
        return "inflight", float(scaling.targetInflight)
    return "rps", float(scaling.targetRps or 1.0)
