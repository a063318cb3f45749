"""Why a deployment got fewer replicas than it wants, in words a platform team can act on.

The planner knows *that* it fell short; this module finds *which* rule binds by walking
the filters in the order a person would check them (countries, tiers, selector, health,
cordons, the runtimes agents run, hardware, free capacity, power budget, spread) and names
the first one that leaves too little, with the numbers: "needs 2×80 GiB GPU in FR
datacenter sites; FR datacenter sites have 1 free".
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from orchestrator import units
from orchestrator.scheduler.capacity import Capacity
from orchestrator.scheduler.fleet import WATTS_SLACK, Fleet
from orchestrator.scheduler.model import ALL_TIERS, Deployment, Runtime, Site, Variant
from orchestrator.scheduler.residency import EU_COUNTRIES
from orchestrator.scheduler.result import Shortfall

if TYPE_CHECKING:
    from orchestrator.scheduler.job import Job


def describe_countries(residency: frozenset[str] | None) -> str:
    if residency is None:
        return "any country"
    if residency == EU_COUNTRIES:
        return "EU"
    if len(residency) <= 5:
        return ", ".join(sorted(residency))
    return f"{len(residency)} allowed countries"


def describe_where(deployment: Deployment) -> str:
    """e.g. "FR datacenter sites", "EU edge sites", "DE, AT sites"."""
    rules = deployment.placement
    tiers = "" if rules.tiers == ALL_TIERS else "/".join(sorted(t.value for t in rules.tiers))
    countries = "" if rules.residency is None else describe_countries(rules.residency)
    return " ".join(p for p in (countries, tiers, "sites") if p)


def _no_variant(deployment: Deployment) -> str:
    """Why no variant may run on any allowed tier: a variant named per tier that the model
    lacks, or runtimes that need a data centre."""
    names = {v.name for v in deployment.variants}
    missing = sorted((tier.value, name) for tier, name in deployment.variant_by_tier.items()
                     if tier in deployment.placement.tiers and name not in names)
    if missing:
        listed = ", ".join(f"{name} for {tier}" for tier, name in missing)
        return f"model {deployment.model} has no variant {listed} (it has {', '.join(sorted(names)) or 'none'})"
    return f"no variant of {deployment.model} may run on the allowed tiers (ray-serve runs only in data centres, as does vllm)"


def explain(fleet: Fleet, capacity: Capacity, job: Job) -> Shortfall:
    """The binding constraint for ``job``, given the capacity left right after it ran."""
    deployment = job.deployment
    rules = deployment.placement
    countries = describe_countries(rules.residency)
    where = describe_where(deployment)

    def short(constraint: str, detail: str = "") -> Shortfall:
        return Shortfall(constraint, len(job.placed), job.wanted, detail)

    if rules.residency is not None and not rules.residency:
        return short("residency lists no country")
    mask = fleet.residency_mask(rules.residency) & ~capacity.gone  # sites deleted since the fleet was built: as a full plan
    if not mask.any():
        return short(f"no site in {countries}")
    mask = mask & fleet.tier_mask(rules.tiers)
    if not mask.any():
        return short(f"no {'/'.join(sorted(rules.tiers))} site in {countries}")
    if rules.site_selector:
        mask = mask & fleet.selector_mask(rules.site_selector)
        if not mask.any():
            selector = ",".join(f"{k}={v}" for k, v in sorted(rules.site_selector.items()))
            return short(f"no site among {where} matches selector {selector}")
    healthy = fleet.healthy & ~capacity.closed  # a site lost after the fleet was built counts as unhealthy
    if not (mask & healthy).any():
        draining = int((mask & fleet.draining & ~capacity.closed).sum())  # being emptied for maintenance, not broken
        state = "draining" if draining == int(mask.sum()) else f"unhealthy or draining, {draining} of them draining" if draining else "unhealthy"
        return short(f"all {int(mask.sum())} matching {where} are {state}")
    admitted = np.zeros(fleet.size, dtype=bool)
    for variant in deployment.variants:
        admitted |= fleet.admits_mask(deployment.name, variant.name)
    if not (mask & healthy & admitted).any():  # their capacity is what they hold: quoting it would mislead
        return short(_not_admitting(fleet, mask, healthy, where))
    healthy = healthy & admitted
    variant_tiers = np.zeros(fleet.size, dtype=bool)
    for variant in deployment.variants:
        variant_tiers |= fleet.variant_tiers_mask(deployment, variant)
    if not (mask & healthy & variant_tiers).any():
        return short(_no_variant(deployment))
    runs = np.zeros(fleet.size, dtype=bool)
    for variant in deployment.variants:
        runs |= fleet.variant_tiers_mask(deployment, variant) & fleet.runtime_mask(variant.runtime)
    if not (mask & healthy & runs).any():
        wanted = {v.runtime for v in deployment.variants if (mask & healthy & fleet.variant_tiers_mask(deployment, v)).any()}
        return short(runtime_reasons(fleet, np.flatnonzero(mask & healthy & variant_tiers), wanted))
    healthy = healthy & runs  # what the hardware is quoted of: sites whose agents run the model
    variants = job.variants()
    need = " or ".join(f"{v.name} ({v.describe()})" for v in variants)
    head = f"needs {job.wanted} × {need} in {where}"
    if not (job.any_eligible & healthy).any():
        for variant in variants if fleet.any_budget else ():
            sized = mask & healthy & fleet.variant_tiers_mask(deployment, variant) & fleet.sized_mask(variant)
            if sized.any():  # the hardware is there, no budget feeds one replica
                return short(head, _resource_reason(fleet, capacity, variant, sized, where))
        return short(head, f"no healthy one has the hardware ({_largest(fleet, mask & healthy)})")
    reasons = []
    taken = job.taken(fleet)
    for variant in variants:
        eligible = job.eligible[variant.name] & healthy
        if not eligible.any():
            continue
        room = eligible & capacity.fits_mask(variant)
        if capacity.slots:  # a cordoned site's room is for the replicas it held, not for more
            room &= ~capacity.spent(deployment.name, variant.name)
        if taken is not None and room.any() and not (room & ~taken).any():
            reasons.append(_taken_reason(fleet, job, room))
            continue
        if room.any():
            return short(head, _spread_reason(fleet, capacity, job))
        reasons.append(_resource_reason(fleet, capacity, variant, eligible, where))
    return short(head, "; ".join(reasons))


def _not_admitting(fleet: Fleet, matching: np.ndarray, healthy: np.ndarray, where: str) -> str:
    """Why no healthy ``matching`` site takes a deployment it does not run: each is cordoned,
    or a data centre out of reach, held as a cordoned site is but by no one's choice, which
    is said with since when (``Site.out_of_reach_since``), not as a cordon; or one another
    control plane owns (``Site.owned_by``), held alike, said as such: it answers."""
    held = np.flatnonzero(matching & healthy).tolist()
    away = [i for i in held if fleet.sites[i].out_of_reach]
    if not away:
        return f"all {len(held)} healthy matching {where} are cordoned (they take no new deployment)"
    shown = ", ".join(_since(fleet.sites[i]) for i in away[:3]) + (f" and {len(away) - 3} more" if len(away) > 3 else "")
    owned = all(fleet.sites[i].owned_by is not None for i in away)
    away_word = "owned by another control plane" if owned else "out of reach"
    total = int(matching.sum())
    closed = np.flatnonzero(matching & ~healthy)
    draining = int(fleet.draining[closed].sum())
    counts = [(total - len(held) - draining, "unhealthy"), (draining, "draining"), (len(held) - len(away), "cordoned")]
    others = [(n, word) for n, word in counts if n]
    if others:
        (first, word), rest = others[0], [f"{n} {w}" for n, w in others[1:]]
        listed = ", ".join([f"{first} {'is' if first == 1 else 'are'} {word}", *rest])
        head = f"of {total} matching {where}, {listed} and {len(away)} {away_word}"
    else:
        head = f"all {total} matching {where} are {away_word}"
    if owned:
        return f"{head} ({shown}); such a site takes no new deployment until the Site's spec.takeOverFrom takes it over"
    return f"{head} ({shown}); a site out of reach takes no new deployment until it answers"


def _since(site: Site) -> str:
    """``dc-paris since 2026-03-01T08:30:00Z``, ``dc-paris waiting for its first answer``,
    ``dc-paris by 53cea5e862184bd3`` (another control plane's), or the name alone when the
    outage's start is not known."""
    if site.owned_by is not None:
        return f"{site.name} by {site.owned_by}"
    if site.first_answer_awaited:
        return f"{site.name} waiting for its first answer"
    if site.out_of_reach_since is None:
        return site.name
    return f"{site.name} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(site.out_of_reach_since))}"


def runtime_reasons(fleet: Fleet, sites: np.ndarray, wanted: set[Runtime]) -> str:
    """e.g. "site edge-x: its agent cannot run onnx-genai (it runs: onnx)", of the first
    three of ``sites``, none of whose agents runs any of ``wanted``."""
    shown = "; ".join(runtime_reason(fleet, int(s), wanted) for s in sites[:3])
    return shown + (f"; and {sites.size - 3} more sites" if sites.size > 3 else "")


def runtime_reason(fleet: Fleet, site: int, wanted: set[Runtime]) -> str:
    runs = fleet.sites[site].runtimes or ()
    return (f"site {fleet.names[site]}: its agent cannot run {' or '.join(sorted(wanted))} "
            f"(it runs: {', '.join(sorted(runs)) or 'none'})")


def _taken_reason(fleet: Fleet, job: Job, room: np.ndarray) -> str:
    sites = np.flatnonzero(room).tolist()
    owners = sorted({rival.deployment.name for site in sites if (rival := job.rival_at(fleet, site)) is not None})
    shown = ", ".join(fleet.names[s] for s in sites[:3]) + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")
    return (f"the edge sites with room ({shown}) run model {job.deployment.model} for deployment "
            f"{', '.join(owners)} (an edge agent serves a model for one deployment)")


def _largest(fleet: Fleet, mask: np.ndarray) -> str:
    sites = np.flatnonzero(mask)
    cpu = float(fleet.cpu[sites].max())
    memory = float(fleet.memory_mib[sites].max()) / 1024
    gpu = float(fleet.gpu_memory[sites].max()) if fleet.gpu_groups else 0.0
    largest = f"largest has {cpu:g} CPU, {memory:g} GiB"
    if not gpu:
        return largest + ", no GPU"
    row = int(np.argmax(fleet.gpu_memory[sites].max(axis=1)))
    groups = [f"{int(c)}×{fleet.gpu_model[sites[row], k]} {m:g} GiB" for k, (c, m)
              in enumerate(zip(fleet.gpu_count[sites[row]], fleet.gpu_memory[sites[row]])) if c]
    return largest + ", GPUs " + " + ".join(groups)


def _resource_reason(fleet: Fleet, capacity: Capacity, variant: Variant, eligible: np.ndarray, where: str) -> str:
    """Which of CPU, memory, GPUs and power budget ``eligible`` sites have too little of
    free, and the room held there for replicas leaving them (``Site.held``), each site's
    named once: a budget's reason names what its site holds (``power_reason``)."""
    short, named = _short_of(fleet, capacity, variant, eligible, where)
    sites = np.flatnonzero(eligible)
    return short + _held(fleet, sites[sites != named] if named is not None else sites)


def _held(fleet: Fleet, sites: np.ndarray) -> str:
    """The room of replicas that leave ``sites`` once their replacements serve, which the
    sites' free room leaves out: what a reason must name, or it reads as a site smaller
    than it is."""
    holding = [i for i in sites.tolist() if i in fleet.held]
    if not holding:
        return ""
    n = sum(len(fleet.held[i]) for i in holding)
    names = ", ".join(fleet.names[i] for i in holding[:3]) + (f" and {len(holding) - 3} more" if len(holding) > 3 else "")
    return (f"; {'site' if len(holding) == 1 else 'sites'} {names} {'holds' if len(holding) == 1 else 'hold'} the room of "
            f"{'1 replica' if n == 1 else f'{n} replicas'} moved off until {'its replacement serves' if n == 1 else 'their replacements serve'}")


def _short_of(fleet: Fleet, capacity: Capacity, variant: Variant, eligible: np.ndarray, where: str) -> tuple[str, int | None]:
    """What ``eligible`` sites have too little of, and the site whose power budget it
    quotes (``power_reason``, which names the room that site holds), if one."""
    sites = np.flatnonzero(eligible)
    if variant.gpus:
        big = fleet.gpu_big(variant, sites)
        free = int((capacity.gpu_count[sites] * big).sum())
        best = int((capacity.gpu_count[sites] * big).max(initial=0))
        if best < variant.gpus:
            model = f"{variant.gpu_model} " if variant.gpu_model else ""
            return (
                f"{where} have {free} free {model}GPU(s) with ≥{variant.gpu_memory_gib:.4g} GiB "
                f"(at most {best} on one site), {variant.gpus} needed per replica"
            ), None
    cpu = float(capacity.cpu[sites].max())
    if cpu < variant.cpu - 1e-9:
        return f"{where} have at most {cpu:g} free CPU on one site, {variant.cpu:g} needed", None
    memory = float(capacity.memory_mib[sites].max()) / 1024
    if memory < variant.memory_mib / 1024 - 1e-9:
        return f"{where} have at most {memory:g} GiB free memory on one site, {variant.memory_mib / 1024:g} GiB needed", None
    if capacity.budgeted:
        best = int(sites[np.argmax(capacity.power[sites])])
        if capacity.power_short(best, variant):
            # the site with the most left is short: every site has a budget, all spent, or
            # none ever feeds one replica (a street cabinet's breaker below the model's draw)
            if sites.size == 1:
                return power_reason(fleet, capacity, best, variant), best
            if (fleet.power[sites] < variant.watts - WATTS_SLACK).all():
                largest = int(sites[np.argmax(fleet.power[sites])])
                head = f"the power budgets of all {sites.size} {where} are too small for one replica, the largest at "
                return head + power_reason(fleet, capacity, largest, variant), largest
            head = f"the power budgets of all {sites.size} {where} are spent, the most left at "
            return head + power_reason(fleet, capacity, best, variant), best
        return f"no one site among {where} has the CPU, memory, GPU and power budget free together", None
    return f"no one site among {where} has the CPU, memory and GPU free together", None


def power_reason(fleet: Fleet, capacity: Capacity, site: int, variant: Variant) -> str:
    """e.g. "site edge-lyon: power budget 150 W, 140 W used, replica needs 24 W": facility
    watts (the replicas' estimated draw × PUE), as the budget is given; what is used
    counts the room held for replicas leaving the site (``Site.held``), and says so."""
    pue = fleet.pue.item(site)
    budget = fleet.power.item(site) * pue
    used = budget - max(capacity.power.item(site), 0.0) * pue
    held = sum(v.watts for v in fleet.held.get(site, ())) * pue
    return (f"site {fleet.names[site]}: power budget {_watts(budget)}, {_watts(used)} used"
            + (f" ({_watts(held)} of it held by replicas moved off until replaced)" if held else "")
            + f", replica needs {_watts(variant.watts * pue)}")


def _watts(value: float) -> str:
    return f"{units.show_watts(value)} W"


def _spread_reason(fleet: Fleet, capacity: Capacity, job: Job) -> str:
    spread = job.spread
    rules = job.deployment.placement.spread
    if spread is None or rules is None:
        return "candidate sites ran out of room"
    room = np.zeros(fleet.size, dtype=bool)
    for variant in job.variants():
        room |= job.eligible[variant.name] & capacity.fits_mask(variant)
    with_room = set(np.unique(spread.keys[room]).tolist())
    low = spread.low()
    stuck = sorted(d for d in spread.domains.tolist() if spread.of(d) == low and d not in with_room)
    names = [fleet.region_names[d] if rules.by == "region" else fleet.names[d] for d in stuck]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"spread by {rules.by} maxSkew {rules.max_skew} over {spread.domains.size} eligible "
        f"{rules.by}s: {shown or 'some'} cannot take another replica"
    )
