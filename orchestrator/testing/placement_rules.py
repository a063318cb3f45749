"""An independent check of the scheduler's hard rules, for tests and benchmarks.

Written apart from the planner on purpose: a property test or a quality benchmark that
used the planner's own feasibility code could not catch a bug in it.
"""

from __future__ import annotations

from orchestrator.scheduler.model import Deployment, Site


def eligible(s: Site, d: Deployment) -> bool:
    """Whether ``s`` may hold a replica of ``d`` at all (capacity left aside)."""
    rules = d.placement
    if not s.healthy or s.tier not in rules.tiers:
        return False
    if rules.residency is not None and s.country not in rules.residency:
        return False
    if any(s.labels.get(k) != v for k, v in rules.site_selector.items()):
        return False
    return any(
        s.cpu >= v.cpu
        and s.memory_gib * 1024 >= v.memory_mib
        and (not v.gpus or any(g.count >= v.gpus and g.memory_gib >= v.gpu_memory_gib for g in s.gpus))
        for v in d.variants_for(s.tier)
    )
