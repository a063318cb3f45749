"""An independent check of the scheduler's hard rules, for tests and benchmarks.

Written apart from the planner on purpose: a property test or a quality benchmark that
used the planner's own feasibility code could not catch a bug in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from orchestrator.scheduler.model import Deployment, Replica, Site, Tier, Variant


def eligible(s: Site, d: Deployment) -> bool:
    """Whether ``s`` may hold a replica of ``d`` at all (what else runs there left aside)."""
    rules = d.placement
    if not s.healthy or s.tier not in rules.tiers:
        return False
    if rules.residency is not None and s.country not in rules.residency:
        return False
    if any(s.labels.get(k) != v for k, v in rules.site_selector.items()):
        return False
    return any(
        (s.runtimes is None or v.runtime in s.runtimes)
        and s.cpu >= v.cpu
        and s.memory_gib * 1024 >= v.memory_mib
        and (not v.gpus or any(g.count >= v.gpus and g.memory_gib >= v.gpu_memory_gib for g in s.gpus))
        and (s.power_budget_watts is None or v.watts * s.pue <= s.power_budget_watts + 1e-6)
        for v in d.variants_for(s.tier)
    )


def violations(sites: Sequence[Site], deployments: Sequence[Deployment], replicas: Iterable[Replica]) -> list[str]:
    """Hard-rule breaches of a placement (empty when it is valid)."""
    by_site = {s.name: s for s in sites}
    by_dep = {d.name: d for d in deployments}
    found = []
    replicas = list(replicas)
    use: dict[str, list[Variant]] = {}
    serving: dict[tuple[str, str], set[str]] = {}
    for r in replicas:
        s, d = by_site[r.site], by_dep[r.deployment]
        rules = d.placement
        if rules.residency is not None and s.country not in rules.residency:
            found.append(f"{r}: residency")
        if not s.healthy:
            found.append(f"{r}: unhealthy")
        if s.tier not in rules.tiers or r.variant not in {v.name for v in d.variants_for(s.tier)}:
            found.append(f"{r}: tier/variant")
        if any(s.labels.get(k) != v for k, v in rules.site_selector.items()):
            found.append(f"{r}: selector")
        variant = next(v for v in d.variants if v.name == r.variant)
        if s.runtimes is not None and variant.runtime not in s.runtimes:
            found.append(f"{r}: runtime {variant.runtime}")
        use.setdefault(r.site, []).append(variant)
        if s.tier is Tier.EDGE:
            serving.setdefault((r.site, d.model), set()).add(d.name)
    for (name, model), names in sorted(serving.items()):
        if len(names) > 1:  # an edge agent serves a model for one deployment
            found.append(f"{name}: model {model} for {', '.join(sorted(names))}")
    for name, variants in use.items():
        s = by_site[name]
        if sum(v.cpu for v in variants) > s.cpu + 1e-6:
            found.append(f"{name}: cpu")
        if sum(v.memory_mib for v in variants) > s.memory_gib * 1024 + 1e-6:
            found.append(f"{name}: memory")
        for floor in {v.gpu_memory_gib for v in variants if v.gpus}:
            need = sum(v.gpus for v in variants if v.gpus and v.gpu_memory_gib >= floor)
            if need > sum(g.count for g in s.gpus if g.memory_gib >= floor):
                found.append(f"{name}: gpu")
        if s.power_budget_watts is not None and sum(v.watts for v in variants) * s.pue > s.power_budget_watts + 1e-6:
            found.append(f"{name}: power budget")
    for d in deployments:
        if d.placement.spread is None:
            continue
        key = (lambda s: s.region) if d.placement.spread.by == "region" else (lambda s: s.name)
        domains = {key(s) for s in sites if eligible(s, d)}
        counts = dict.fromkeys(domains, 0)
        for r in replicas:
            if r.deployment == d.name:
                counts[key(by_site[r.site])] += 1
        if counts and max(counts.values()) - min(counts.values()) > d.placement.spread.max_skew:
            found.append(f"{d.name}: spread")
    return found
