"""Which sites a deployment's greedy looks at: the shortlist that keeps planning flat in
fleet size.

Scanning all 10,000 sites for every replica is what makes naive planners slow. Per
deployment this picks a few dozen feasible sites that can matter: the best near each
demand point (its latency share against carbon), the lowest-carbon sites of the variant's
own tier with room for every wanted replica, where the deployment runs now, and enough
per spread domain to balance. ``Options.outside`` remembers the best site left out, so
the greedy can tell when the shortlist is too short and ask for a wider one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.scheduler.capacity import Capacity
from orchestrator.scheduler.fleet import BoolArray, Fleet, IntArray
from orchestrator.scheduler.model import Variant, Weights
from orchestrator.scheduler.spread import DomainCounts

if TYPE_CHECKING:
    from orchestrator.scheduler.job import Job


@dataclass
class Options:
    """Candidate (site, variant) pairs for one deployment and their cost ingredients."""

    site: list[int]
    variant: list[Variant]
    static: np.ndarray  # carbon + variant fit, cost points per replica
    rtt: np.ndarray  # (options, demand points), ms
    running: list[int]  # replicas of this deployment running there now
    domain: list[int]
    keys: list[tuple[int, str]]  # (site, variant name) per option
    index: IntArray  # the sites again, as an array
    spans: list[tuple[Variant, int, int]]  # options [start, end) are of this variant
    # Lowest per-replica cost (carbon + fit) of a feasible site left out of the shortlist:
    # once every option costs more than a new replica there, the shortlist is too short.
    outside: float = math.inf
    _position: dict[tuple[int, str], int] | None = None
    _row: dict[int, int] | None = None
    _lists: tuple[list[list[float]], list[float], np.ndarray] | None = None

    @property
    def position(self) -> dict[tuple[int, str], int]:
        """Option index per (site, variant name) key (each key appears once)."""
        if self._position is None:
            self._position = {key: o for o, key in enumerate(self.keys)}
        return self._position

    @property
    def lists(self) -> tuple[list[list[float]], list[float], np.ndarray]:
        """``rtt`` and ``static`` as Python lists (the greedy reads them one value at a
        time, in both planning phases), and ``running`` as an array."""
        if self._lists is None:
            self._lists = (self.rtt.tolist(), self.static.tolist(), np.array(self.running, dtype=np.int64))
        return self._lists

    def rtt_rows(self, sites: Iterable[int]) -> np.ndarray:
        """The RTT rows of those of ``sites`` among the options (one row per site)."""
        if self._row is None:
            self._row = {}
            for o, site in enumerate(self.site):
                self._row.setdefault(site, o)
        row = self._row
        return self.rtt[[row[s] for s in sites if s in row]]


def build(fleet: Fleet, capacity: Capacity, job: Job, spread: DomainCounts | None, limit: int | None,
          taken: BoolArray | None = None) -> tuple[Options, bool]:
    """Pick the (site, variant) pairs the greedy looks at, leaving out the sites ``taken``
    by another deployment of the model; True when none were left out."""
    w = job.weights
    chosen: list[tuple[IntArray, Variant]] = []
    complete = True
    outside = math.inf
    used = {site for site, _, _ in job.placed}
    for variant in job.variants():
        eligible = job.eligible_sites(fleet, variant.name)
        fits = capacity.fits_mask(variant)  # kept up to date per changed site
        if taken is not None:
            fits = fits & ~taken  # a copy: the shared mask stays as it is
        if eligible.size * 4 > fleet.size:  # contiguous masks beat gathers when most qualify
            # Counting is enough to know whether a shortlist is due; the site indices of a
            # mask over most of 100,000 sites cost more than the shortlist that follows.
            free = _Free(job.eligible[variant.name] & fits)
        else:
            free = _Free(None, eligible[fits[eligible]], fleet.size)
        if limit is None or free.size <= limit:
            found = free.sites
        else:
            complete = False
            found, left_out = _shortlist(fleet, capacity, job, variant, free, limit, spread)
            outside = min(outside, left_out)
        if used:  # sites already holding replicas stay candidates even when full now
            held = np.fromiter(used, dtype=np.int64)
            found = fleet.union(found, held[job.eligible[variant.name][held]])
        chosen.append((found, variant))
    sites: list[int] = []
    variants: list[Variant] = []
    statics: list[np.ndarray] = []
    spans: list[tuple[Variant, int, int]] = []
    for picked, variant in chosen:
        spans.append((variant, len(sites), len(sites) + picked.size))
        sites.extend(picked.tolist())
        variants.extend([variant] * picked.size)
        statics.append(static_cost(fleet, w, variant, picked))
    idx = np.array(sites, dtype=np.int64)
    rtt = fleet.rtt_table([d.point for d in job.demand], [(d.lat, d.lon) for d in job.demand], idx)
    domain = (spread.keys[idx] if spread is not None else idx).tolist()
    return (
        Options(
            site=sites,
            variant=variants,
            static=np.concatenate(statics) if statics else np.zeros(0),
            rtt=rtt,
            running=[job.running.get((s, v.name), 0) for s, v in zip(sites, variants)] if job.running else [0] * len(sites),
            domain=domain,
            keys=list(zip(sites, [v.name for v in variants])),
            index=idx,
            spans=spans,
            outside=outside,
        ),
        complete,
    )


def with_room(capacity: Capacity, options: Options, taken: BoolArray | None = None) -> BoolArray:
    """Per option: its site has room for one more replica of its variant now (and is not
    ``taken`` by another deployment of the model)."""
    ok = np.zeros(len(options.site), dtype=bool)
    for variant, start, end in options.spans:
        ok[start:end] = capacity.fits(options.index[start:end], variant)
    if taken is not None:
        ok &= ~taken[options.index]
    return ok


class _Free:
    """The feasible sites of one variant: a mask and/or the indices, each made on demand."""

    def __init__(self, mask: BoolArray | None, sites: IntArray | None = None, n: int = 0) -> None:
        self._mask, self._sites = mask, sites
        self._n = n
        self.size = int(np.count_nonzero(mask)) if sites is None else int(sites.size)

    @property
    def mask(self) -> BoolArray:
        if self._mask is None:
            self._mask = np.zeros(self._n, dtype=bool)
            self._mask[self._sites] = True
        return self._mask

    @property
    def sites(self) -> IntArray:
        if self._sites is None:
            self._sites = np.flatnonzero(self._mask)
        return self._sites


def _shortlist(
    fleet: Fleet,
    capacity: Capacity,
    job: Job,
    variant: Variant,
    free: _Free,
    limit: int,
    spread: DomainCounts | None,
) -> tuple[IntArray, float]:
    """The few feasible sites worth a look: nearest per demand point, cheapest, running
    there now, and enough per spread domain for the counts to balance.

    The nearest and cheapest come from orders the fleet computes once per plan call and
    shares between deployments (the spatial index), filtered by this deployment's mask.
    """
    w = job.weights
    mask = free.mask
    running = [s for s, v in job.running if v == variant.name and mask[s]]
    picks: list[IntArray] = [np.array(running, dtype=np.int64)]
    per_point = max(4, limit // (len(job.demand) + 1))
    for demand in job.demand:
        order, order_rtt = fleet.nearest(demand.lat, demand.lon)
        feasible = mask[order]
        near = order[feasible]
        if near.size > per_point:
            # Among the nearby feasible sites, the best for this point alone: its latency
            # share against the site's carbon and variant fit.
            rtt = order_rtt[feasible]
            cost = w.latency_per_ms * demand.share * rtt + static_cost(fleet, w, variant, near)
            near = near[cost.argsort(kind="stable")[:per_point]]
        if near.size < min(per_point, free.size) and order.size < fleet.size:
            dots = fleet.xyz[free.sites] @ fleet.unit_vector(demand.lat, demand.lon)
            k = min(per_point, free.size)
            near = free.sites[np.argpartition(-dots, k - 1)[:k]]
        picks.append(near)
    k = max(limit - per_point * len(job.demand), job.wanted + 4)
    # The variant's own tier (distilled → edge) first, with room for every replica; the
    # other tier only as a fallback. Both walk this deployment's eligible sites, cheapest
    # first, a prefix at a time: most deployments find enough in the first.
    eligible = job.eligible[variant.name]
    right_order = fleet.cheapest_of(eligible, edge=variant.is_distilled)
    other_order = fleet.cheapest_of(eligible, edge=not variant.is_distilled)
    for n in (32 * k, None):
        chunk = right_order[:n]
        right_all = chunk[mask[chunk]]
        # enough sites to hold every wanted replica twice over, not just one each
        room = capacity.room(right_all[: 8 * k], variant).cumsum()
        right_tier = right_all[: max(k, int(room.searchsorted(2 * job.wanted)) + 1)]
        chunk = other_order[:n]
        other_all = chunk[mask[chunk]]
        other_tier = other_all[: k if right_tier.size < k else 4]
        whole = n is None or (right_order.size <= n and other_order.size <= n)
        if right_tier.size + other_tier.size >= min(k, free.size) or whole:
            break
    picks.extend([right_tier, other_tier])
    out = fleet.union(*picks)
    # the cheapest of each tier past the taken prefix (a lower bound for the left-out ones)
    rest = np.concatenate([right_all[right_tier.size :][:1], other_all[other_tier.size :][:1]])
    left_out = float(static_cost(fleet, w, variant, rest).min()) if rest.size else math.inf
    if spread is not None:
        covered = np.unique(spread.keys[out]).size
        if job.wanted > covered * spread.max_skew:  # must reach more domains to balance
            out = fleet.union(out, _best_per_domain(fleet, job, variant, free.sites, spread.keys, limit))
    return out, left_out


def static_cost(fleet: Fleet, w: Weights, variant: Variant, sites: IntArray) -> np.ndarray:
    """Carbon and variant-fit cost points of one replica at each of ``sites``."""
    return fleet.replica_cost(w.carbon_per_g_per_hour * variant.watts, w.variant_fit_per_replica, variant.is_distilled)[sites]


def _best_per_domain(fleet: Fleet, job: Job, variant: Variant, free: IntArray, domains: IntArray, limit: int) -> IntArray:
    cost = fleet.intensity[free] * variant.watts
    keys = domains[free]
    per_domain = math.ceil(job.wanted / max(1, np.unique(keys).size)) + 1
    order = np.lexsort((cost, keys))
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    rank = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    best = order[rank < per_domain]
    if best.size > 4 * limit:  # spread by site over a huge fleet: the cheapest suffice
        best = best[np.argsort(cost[best], kind="stable")[: 2 * job.wanted + limit]]
    return free[best]
