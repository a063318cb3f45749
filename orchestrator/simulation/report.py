"""Reports as plain data: the JSON the API returns and ``-o json|yaml`` prints.

Field names follow the manifests' camelCase; times are milliseconds, power watts, and
emissions grams of CO2 per hour.
"""

from __future__ import annotations

from typing import Any

from orchestrator.simulation import measure, sweep, whatif


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def metrics(m: measure.Metrics) -> dict[str, Any]:
    return {
        "replicas": m.replicas,
        "watts": _r(m.watts, 1),
        "gramsCO2PerHour": _r(m.g_co2_per_hour, 1),
        "latencyP50Ms": _r(m.p50_ms),
        "latencyP95Ms": _r(m.p95_ms),
        "demandRps": _r(m.demand_rps, 3),
        "unservedRps": _r(m.unserved_rps, 3),
        "demand": [{"point": p.point, "rps": _r(p.rps, 3), "unservedRps": _r(p.unserved_rps, 3), "p50Ms": _r(p.p50_ms),
                    "p95Ms": _r(p.p95_ms)} for p in m.points],
    }


def report(r: whatif.Report) -> dict[str, Any]:
    return {
        "name": r.name,
        "scenario": r.scenario,
        "method": r.method,
        "summary": {
            "moved": len(r.moved),
            "added": len(r.added),
            "removed": len(r.removed),
            "unschedulableReplicas": r.unschedulable_replicas,
            "residencyCrossings": len(r.crossings),
        },
        "before": metrics(r.before),
        "after": metrics(r.after),
        "moves": [{"deployment": m.deployment, "from": m.from_site, "to": m.to_site, "variant": m.variant, "reason": m.reason} for m in r.moved],
        "added": [{"deployment": a.deployment, "site": a.site, "variant": a.variant, "reason": a.reason} for a in r.added],
        "removed": [{"deployment": a.deployment, "site": a.site, "variant": a.variant, "reason": a.reason} for a in r.removed],
        "unschedulable": [
            {"deployment": s.deployment, "phase": s.status, "wanted": s.wanted, "placed": s.placed,
             "shortToday": s.short_today, "newlyShort": s.new, "waiting": s.waiting, "reason": s.reason}
            for s in r.short
        ],
        "residency": {
            "crossings": [{"deployment": c.deployment, "site": c.site, "country": c.country, "allowed": list(c.allowed)} for c in r.crossings],
        },
    }


def sweep_result(s: sweep.SweepResult, top: int | None = None) -> dict[str, Any]:
    impacts = s.impacts[:top] if top else s.impacts
    return {
        "by": s.by,
        "scenario": s.scenario,
        "before": metrics(s.before),
        "ranked": [
            {"rank": n + 1, "target": i.target, "sites": i.sites, "replicasLost": i.replicas_lost, "moved": i.moved,
             "unschedulableReplicas": i.unschedulable, "deploymentsShort": list(i.deployments_short),
             "unservedRps": _r(i.unserved_rps, 3), "latencyP95Ms": _r(i.p95_ms), "latencyP95DeltaMs": _r(i.p95_delta_ms),
             "gramsCO2PerHour": _r(i.g_co2_per_hour, 1)}
            for n, i in enumerate(impacts)
        ],
        "swept": len(s.impacts),
    }
