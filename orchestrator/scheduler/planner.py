"""The placement planner: desired deployments + site inventory + running replicas → a plan.

A pure function of its arguments. The shape of the algorithm, and why:

1. Running replicas that still satisfy every hard rule keep their seats: their capacity is
   reserved before anything new is placed, so a re-plan never evicts a healthy replica to
   make room for another deployment. Replicas that broke a rule (site unhealthy or gone,
   residency or selector changed, capacity shrank) are released and replaced.
2. Deployments are planned one at a time, scarcest first (GPU variants, then fewest
   eligible sites), each against the capacity left by those before it.
3. Per deployment, the hard rules become vector masks over all sites (``fleet.Fleet``);
   a few dozen candidate sites are picked from the feasible ones (nearest to each demand
   point, cheapest to run, where it runs now, best per spread domain) so the search does
   not grow with the fleet, and a lazy greedy adds one replica at a time where it lowers
   the cost the most (``objective``: latency, carbon, moves, variant fit). The latency
   term is a facility-location objective whose gains only shrink as replicas are added,
   which is what makes the lazy greedy exact step by step and cheap.
4. A relocation pass then moves single replicas while that lowers the cost, which repairs
   the greedy's early choices.

When the hard rules leave room for fewer than ``replicas.min`` replicas, the planner still
places what fits and reports the deployment Unschedulable with the binding constraint:
tearing down replicas that serve traffic because a sibling cannot start would turn a
partial outage into a full one. Residency is never relaxed: a replica only ever lands on a
site in an allowed country.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from orchestrator.scheduler import candidates, diagnosis, gcpause, objective, outcome, repair, seating
from orchestrator.scheduler.spread import DomainCounts
from orchestrator.scheduler.capacity import Capacity, bound_gpu_models
from orchestrator.scheduler.fleet import BoolArray, Fleet, IntArray
from orchestrator.scheduler.model import (
    DEFAULT_TUNING,
    DEFAULT_WEIGHTS,
    Deployment,
    Replica,
    Site,
    Tuning,
    Variant,
    Weights,
)
from orchestrator.scheduler.objective import LocatedDemand, locate_demand
from orchestrator.scheduler.result import PlanResult, Shortfall


RELOCATION_ROUNDS = 4  # improving moves per deployment; later ones gain little
RELOCATION_CHUNK_BYTES = 32 << 20  # scratch per chunk of replicas scored by the relocation pass
WIDEN_MARGIN = 1.0  # cost points a left-out site must save per replica to widen the search


@dataclass(eq=False)  # identity: jobs are compared and hashed as themselves
class Job:
    """One deployment while it is being planned (mutable scratch, never returned)."""

    deployment: Deployment
    weights: Weights
    wanted: int
    allowed: BoolArray  # residency, tiers, selector, health
    eligible: dict[str, BoolArray]  # per variant: allowed, tier fits variant, hardware fits
    demand: list[LocatedDemand]
    notes: list[str]
    running: Counter[tuple[int, str]] = field(default_factory=Counter)  # all replicas now
    seats: list[tuple[int, Variant, int]] = field(default_factory=list)  # valid, reserved
    placed: list[tuple[int, Variant, int]] = field(default_factory=list)  # site, variant, gpu
    spread: DomainCounts | None = None
    options: candidates.Options | None = None  # the candidates, kept between the two phases
    complete: bool = False  # the candidates are every feasible site
    shortfall: Shortfall | None = None  # why fewer than wanted were placed
    keep_margin: float = 0.0  # extra cost points a running replica's move must save
    eligible_count: int = 0  # sites eligible for any variant
    # Deployments of the same model: on an edge site only one of them may hold replicas.
    rivals: list[Job] = field(default_factory=list)
    started: bool = False  # planned in this call: ``placed`` is what it holds, not ``seats``
    _eligible_sites: dict[str, IntArray] = field(default_factory=dict)
    _any_eligible: BoolArray | None = None

    def eligible_sites(self, fleet: Fleet, variant: str) -> IntArray:
        """Indices of the sites eligible for ``variant`` (fixed for one plan call)."""
        found = self._eligible_sites.get(variant)
        if found is None:
            found = self._eligible_sites[variant] = fleet.sites_of(self.eligible[variant])
        return found

    @property
    def any_eligible(self) -> BoolArray:
        if self._any_eligible is None:
            masks = list(self.eligible.values())
            if not masks:
                self._any_eligible = np.zeros_like(self.allowed)
            elif len(masks) == 1:
                self._any_eligible = masks[0]  # shared and read-only: no copy needed
            else:
                self._any_eligible = np.logical_or.reduce(masks)
        return self._any_eligible

    @property
    def move_cost(self) -> float:
        """What the search charges a replica started where none ran: the move itself, and
        for a deployment already running, the margin that keeps it where it runs unless
        a move clearly pays (``Tuning.keep_margin``)."""
        return self.weights.move_per_replica + (self.keep_margin if self.running else 0.0)

    def variants(self) -> list[Variant]:
        names = self.eligible.keys()
        return [v for v in self.deployment.variants if v.name in names]

    @property
    def holding(self) -> list[tuple[int, Variant, int]]:
        """The replicas this deployment holds capacity for now."""
        return self.placed if self.started else self.seats

    def taken(self, fleet: Fleet) -> BoolArray | None:
        """Edge sites where another deployment of the same model holds replicas (None: no
        such site). An edge agent serves a model once, for one deployment: a second
        deployment's replica there would never be sent."""
        if not self.rivals:
            return None
        held = [site for rival in self.rivals for site, _, _ in rival.holding]
        if not held:
            return None
        mask = np.zeros(fleet.size, dtype=bool)
        mask[held] = True
        mask &= fleet.is_edge
        return mask if mask.any() else None

    def rival_at(self, fleet: Fleet, site: int) -> Job | None:
        """The other deployment of the same model holding replicas on edge ``site``."""
        if not fleet.is_edge[site]:
            return None
        return next((r for r in self.rivals if any(s == site for s, _, _ in r.holding)), None)


def pair_rivals(jobs: Iterable[Job]) -> None:
    """Tell the deployments of one model about each other (``Job.rivals``)."""
    by_model: dict[str, list[Job]] = {}
    for job in jobs:
        by_model.setdefault(job.deployment.model, []).append(job)
    for same in by_model.values():
        for job in same:
            job.rivals = [other for other in same if other is not job]


def plan(
    sites: Sequence[Site],
    deployments: Sequence[Deployment],
    current: Iterable[Replica] = (),
    *,
    weights: Weights = DEFAULT_WEIGHTS,
    tuning: Tuning = DEFAULT_TUNING,
    region_locations: Mapping[str, tuple[float, float]] | None = None,
) -> PlanResult:
    """Plan where every replica of ``deployments`` runs, starting from ``current``.

    ``weights`` apply to deployments without their own; ``region_locations`` places
    demand regions that have no sites (others sit at the centroid of their sites).
    """
    # A plan allocates tens of thousands of short-lived, acyclic objects; the cyclic
    # collector would walk the whole heap several times over for nothing.
    with gcpause.paused():
        return _plan(sites, deployments, current, weights=weights, tuning=tuning, region_locations=region_locations)


def _plan(
    sites: Sequence[Site],
    deployments: Sequence[Deployment],
    current: Iterable[Replica],
    *,
    weights: Weights,
    tuning: Tuning,
    region_locations: Mapping[str, tuple[float, float]] | None,
) -> PlanResult:
    fleet = Fleet(sites, region_locations)
    names = [d.name for d in deployments]
    if len(set(names)) != len(names):
        dup = sorted(n for n in set(names) if names.count(n) > 1)
        raise ValueError(f"deployment {dup[0]!r} is declared twice")
    jobs = {d.name: prepare(fleet, d, d.weights or weights) for d in deployments}
    for job in jobs.values():
        job.keep_margin = tuning.keep_margin
    pair_rivals(jobs.values())
    fleet.prefetch_nearest([(d.lat, d.lon) for job in jobs.values() for d in job.demand])
    capacity = Capacity(fleet, bound_gpu_models(deployments))
    current = sorted(current, key=lambda r: (r.deployment, r.site, r.variant))
    dropped = seat_incumbents(fleet, capacity, jobs, current)
    order = sorted(jobs.values(), key=scarcity)
    # Phase 1: every deployment gets its min and as many replicas as ran before (the
    # replacements of lost ones included) before any grows, so a flexible deployment
    # cannot starve a constrained one of its minimum. Counting the lost ones here matters:
    # were only the kept seats re-placed, the greedy could move a kept replica towards
    # the lost one's demand, free its seat for another deployment, and leave the
    # replacement to phase 2 with that seat gone: two or three moves where one was due.
    for job in order:
        for site, variant, group in job.seats:
            capacity.give_back(site, variant, group, job.deployment.name)
        job.started = True
        ran = sum(job.running.values())
        grow(
            fleet,
            capacity,
            job,
            tuning,
            upto=max(job.deployment.min_replicas, min(job.wanted, ran)),
        )
    # Phase 2: grow to the wanted count, then polish.
    for job in order:
        grow(fleet, capacity, job, tuning, upto=job.wanted)
        # With one demand point the greedy's order is already right; relocation pays off
        # where it trades one point's latency against another's.
        if tuning.improve and len(job.demand) > 1 and job.placed and job.options is not None:
            _relocate(capacity, job, job.options, job.spread)
        _keep_if_no_better(fleet, capacity, job)
        job.options = None  # nothing after this phase reads them: free them as we go
    for job in order:
        if len(job.placed) < job.wanted:
            repair.make_room(fleet, capacity, job, order)
        if len(job.placed) < job.wanted:
            repair.trade_down(capacity, job, order)
    for job in order:
        if len(job.placed) < job.wanted:
            job.shortfall = diagnosis.explain(fleet, capacity, job)
    return outcome.build(fleet, list(jobs.values()), current, dropped)


def prepare(fleet: Fleet, deployment: Deployment, weights: Weights) -> Job:
    demand, notes = locate_demand(fleet, deployment)
    job = Job(
        deployment=deployment,
        weights=weights,
        wanted=deployment.wanted_replicas(),
        allowed=fleet.placement_mask(deployment),
        eligible=fleet.eligible_masks(deployment),
        demand=demand,
        notes=notes,
    )
    masks = list(job.eligible.values())
    if len(masks) > 1:  # shared by the deployments with the same rules and sizes
        job._any_eligible = fleet.any_of(masks)
    job.eligible_count = int(fleet.sites_of(job.any_eligible).size)
    return job


def scarcity(job: Job) -> tuple[int, int, str]:
    gpus = max((v.gpus for v in job.deployment.variants), default=0)
    return (-gpus, job.eligible_count, job.deployment.name)


def seat_incumbents(fleet: Fleet, capacity: Capacity, jobs: Mapping[str, Job], current: Sequence[Replica]) -> dict[Replica, str]:
    """Reserve capacity for running replicas that still obey every hard rule.

    Returns, per replica that must go regardless of the plan, the reason (counted once
    per copy by the caller through ``Job.running``).
    """
    dropped: dict[Replica, str] = {}
    serving: dict[tuple[str, int], str] = {}  # (model, edge site) → the deployment seated there
    standing: list[tuple[Replica, Job, int, Variant]] = []
    for replica in current:
        job = jobs.get(replica.deployment)
        if job is None:
            dropped[replica] = "deployment deleted"
            continue
        site = fleet.index.get(replica.site)
        if site is None:
            dropped[replica] = f"site {replica.site} left the inventory"
            continue
        job.running[(site, replica.variant)] += 1
        reason = _broken_rule(fleet, capacity, job, site, replica.variant)
        if reason is not None:
            dropped[replica] = reason
            continue
        standing.append((replica, job, site, next(v for v in job.deployment.variants if v.name == replica.variant)))
    # The GPU groups of a site's replicas are seated together, not in the order of names:
    # one by one, a one-GPU replica can take a card of the pair a two-GPU one holds.
    at: dict[int, list[int]] = {}
    for n, (_, _, site, variant) in enumerate(standing):
        if variant.gpus:
            at.setdefault(site, []).append(n)
    groups: dict[int, int | None] = {}
    for site, seated in at.items():
        groups.update(zip(seated, seating.seat(capacity, site, [standing[n][3] for n in seated])))
    for n, (replica, job, site, variant) in enumerate(standing):
        claim = (job.deployment.model, site)
        owner = serving.get(claim, replica.deployment)
        if owner != replica.deployment:  # the first by name keeps the edge site, as its agent does
            dropped[replica] = (f"model {claim[0]} runs on edge site {replica.site} for deployment {owner} "
                                "(an edge agent serves a model for one deployment)")
            continue
        seat = groups.get(n, -1)
        group = None if seat is None else capacity.take(site, variant, replica.deployment, seat)
        if group is None:
            dropped.setdefault(replica, f"no longer within the power budget: {diagnosis.power_reason(fleet, capacity, site, variant)}"
                               if capacity.power_short(site, variant) else f"site {replica.site} no longer has room for it")
            continue
        if fleet.is_edge[site]:
            serving[claim] = replica.deployment
        job.seats.append((site, variant, group))
    return dropped


def _broken_rule(fleet: Fleet, capacity: Capacity, job: Job, site: int, variant: str) -> str | None:
    name = fleet.names[site]
    if not job.allowed[site]:  # residency, tiers, selector or health: say which
        rules = job.deployment.placement
        if not fleet.healthy[site]:
            return fleet.sites[site].why_closed()
        if not fleet.residency_mask(rules.residency)[site]:
            return f"residency no longer allows {fleet.sites[site].country}"
        if not fleet.tier_mask(rules.tiers)[site]:
            return f"tier {fleet.sites[site].tier} no longer allowed"
        return f"site {name} no longer matches the site selector"
    if variant not in job.eligible or not job.eligible[variant][site]:
        size = next((v for v in job.variants() if v.name == variant), None)
        if size is not None and capacity.power_short(site, size) and _sized(fleet, site, size):  # the budget, not the hardware
            return f"no longer within the power budget: {diagnosis.power_reason(fleet, capacity, site, size)}"
        return f"variant {variant} no longer allowed or no longer fits on {name}"
    return None


def _sized(fleet: Fleet, site: int, variant: Variant) -> bool:
    """Whether ``site``'s cores, memory and GPUs hold one replica of ``variant``, its budget aside."""
    at = np.array([site])
    return bool(fleet.cpu[site] >= variant.cpu - 1e-9 and fleet.memory_mib[site] >= variant.memory_mib - 1e-9
                and (not variant.gpus or (fleet.gpu_big(variant, at) & (fleet.gpu_count[at] >= variant.gpus)).any()))


# -- one deployment ------------------------------------------------------------------------


def grow(fleet: Fleet, capacity: Capacity, job: Job, tuning: Tuning, upto: int) -> None:
    """Grow ``job.placed`` towards ``upto`` replicas (or as many as fit)."""
    if upto <= len(job.placed) or not job.eligible:
        return
    rules = job.deployment.placement
    if rules.spread is not None and job.spread is None:
        domains = fleet.domains_of(job.any_eligible, rules.spread.by)
        job.spread = DomainCounts(domains, rules.spread.max_skew, fleet.domains(rules.spread.by))
    limit = tuning.candidates
    fresh = False
    taken = job.taken(fleet)  # the other deployments of the model stay put meanwhile
    while True:
        if job.options is None:
            job.options, job.complete = candidates.build(fleet, capacity, job, job.spread, limit, taken)
            fresh = True
        _greedy(capacity, job, job.options, job.spread, upto, taken)
        if len(job.placed) >= upto:
            break
        if fresh and job.complete:
            break
        if fresh:  # the shortlist ran dry: look wider
            limit = None if limit is None or limit * 4 >= fleet.size else limit * 4
        # else: candidates from an earlier phase; capacity has moved since, rebuild them
        job.options = None


def _keep_if_no_better(fleet: Fleet, capacity: Capacity, job: Job) -> None:
    """Put ``job`` back on its running seats when the search found nothing better.

    The search starts each deployment over (its seats cost no move, every other site
    does), and a greedy is no optimiser: now and then it ends worse than where the
    replicas run, or better by less than ``Tuning.keep_margin`` per move. Moving them
    then would be churn, and planning the same fleet again would move them back.
    """
    if not job.seats or len(job.seats) != len(job.placed) or job.spread is not None:
        return
    seats = Counter((s, v.name) for s, v, _ in job.seats)
    placed = Counter((s, v.name) for s, v, _ in job.placed)
    if seats == placed:
        return
    moved = sum((placed - seats).values())
    new = objective.score_deployment(fleet, job.deployment, job.weights, placed, job.running, located=job.demand)
    old = objective.score_deployment(fleet, job.deployment, job.weights, seats, job.running, located=job.demand)
    if new.total + moved * job.keep_margin < old.total - 1e-9:
        return
    taken = job.taken(fleet)
    if taken is not None and any(taken[site] for site, _, _ in job.seats):
        return  # a deployment of the same model took one of the seats since
    for site, variant, group in job.placed:
        capacity.give_back(site, variant, group, job.deployment.name)
    back: list[tuple[int, Variant, int]] = []
    for site, variant, _ in job.seats:
        group = capacity.take(site, variant, job.deployment.name)
        if group is None:  # another deployment took the seat since: keep what was found
            for s, v, g in back:
                capacity.give_back(s, v, g, job.deployment.name)
            for s, v, g in job.placed:
                capacity.hold(s, v, g, job.deployment.name)
            return
        back.append((site, variant, group))
    job.placed = back
    job.options = None  # built around the placement given up


def _greedy(capacity: Capacity, job: Job, options: candidates.Options, spread: DomainCounts | None, upto: int,
            taken: BoolArray | None) -> None:
    """Add replicas one by one at the option that lowers the cost most (lazy greedy), on
    sites with room and not ``taken``."""
    w = job.weights
    weight = [w.latency_per_ms * d.share for d in job.demand]
    points = range(len(weight))
    best = _nearest(job, options)
    rtt, static, running_now = options.lists
    running = options.running
    keys = options.keys
    count: dict[tuple[int, str], int] = {}
    for s, v, _ in job.placed:
        count[(s, v.name)] = count.get((s, v.name), 0) + 1
    move_cost = job.move_cost

    def delta(o: int) -> float:
        cost = static[o] + (move_cost if count.get(keys[o], 0) >= running[o] else 0.0)
        for r, b, share in zip(rtt[o], best, weight):
            if r < b:
                cost -= share * (b - r)
        return cost

    move = np.where(running_now <= 0, move_cost, 0.0)  # as if nothing were placed
    for key, n in count.items():
        o = options.position.get(key)
        if o is not None:
            move[o] = move_cost if n >= running[o] else 0.0
    gain = np.maximum(np.array(best)[None, :] - options.rtt, 0.0) @ np.array(weight) if weight else np.zeros(len(static))
    ceiling = options.outside + move_cost + WIDEN_MARGIN
    # Options whose site is full now (other deployments filled it since the candidates
    # were picked) can only be popped and dropped: leave them out from the start.
    usable = candidates.with_room(capacity, options, taken).nonzero()[0]
    heap = list(zip((options.static + move - gain)[usable].tolist(), usable.tolist()))
    heapq.heapify(heap)
    blocked: list[int] = []
    while len(job.placed) < upto and heap:
        _, o = heapq.heappop(heap)
        fresh = delta(o)
        if heap and fresh > heap[0][0] + 1e-12:
            heapq.heappush(heap, (fresh, o))
            continue
        if fresh > ceiling:
            return  # a site outside the shortlist would do better: let grow widen it
        if spread is not None and not spread.allows(options.domain[o]):
            blocked.append(o)
            continue
        site, variant = options.site[o], options.variant[o]
        full = False
        # Stack here while it stays the cheapest: a second replica on the same site changes
        # no other option's cost, so the heap need not be consulted in between.
        while len(job.placed) < upto:
            if spread is not None and not spread.allows(options.domain[o]):
                break
            group = capacity.take(site, variant, job.deployment.name)
            if group is None:
                full = True  # capacity only shrinks while this deployment is planned
                break
            job.placed.append((site, variant, group))
            key = keys[o]
            count[key] = count.get(key, 0) + 1
            for p in points:
                best[p] = min(best[p], rtt[o][p])
            if spread is None:
                # Further copies here cost the same until the running count is passed:
                # place them without going back to the heap.
                same = running[o] - count[key] if count[key] < running[o] else 0
                fresh = delta(o)
                if fresh > ceiling or (heap and fresh > heap[0][0] + 1e-12):
                    break
                if same == 0:
                    continue
                for _ in range(min(same, upto - len(job.placed))):
                    group = capacity.take(site, variant, job.deployment.name)
                    if group is None:
                        full = True
                        break
                    job.placed.append((site, variant, group))
                    count[key] = count.get(key, 0) + 1
                if full:
                    break
                continue
            low = spread.low()
            spread.shift(options.domain[o], +1)
            if spread.low() != low:
                for b in blocked:
                    heapq.heappush(heap, (delta(b), b))
                blocked = []
            fresh = delta(o)
            if heap and fresh > heap[0][0] + 1e-12 or fresh > ceiling:
                break
        if not full and len(job.placed) < upto:
            # every way out of the loop above that gets here (not full, not done) follows
            # a ``fresh = delta(o)`` with nothing placed since: it is the current cost
            heapq.heappush(heap, (fresh, o))


def _nearest(job: Job, options: candidates.Options) -> list[float]:
    """Current RTT from each demand point to its nearest placed replica."""
    best = np.full(len(job.demand), job.weights.unserved_rtt_ms)
    if job.placed and len(job.demand):
        rows = options.rtt_rows({site for site, _, _ in job.placed})
        if rows.size:
            best = np.minimum(best, rows.min(axis=0))
    return best.tolist()


def _relocate(capacity: Capacity, job: Job, options: candidates.Options, spread: DomainCounts | None) -> None:
    """Move single replicas to other candidates while that lowers the cost.

    Each round scores every (replica to take away, option to put it) pair in one array
    operation and makes the best improving move that capacity and spread allow.
    """
    w = job.weights
    weight = np.array([w.latency_per_ms * d.share for d in job.demand])
    index = options.position
    running = options.lists[2]
    taken = job.taken(capacity.fleet)  # the other deployments of the model stay put meanwhile
    for _ in range(RELOCATION_ROUNDS):
        count = Counter((s, v.name) for s, v, _ in job.placed)
        if any(key not in index for key in count):
            return  # placed outside the final candidate list (after a widened search)
        opened = Counter(s for s, _, _ in job.placed)
        counts = np.zeros(len(options.site), dtype=np.int64)
        for key, n in count.items():
            counts[index[key]] = n
        move_in = options.static + np.where(counts >= running, job.move_cost, 0.0)
        refund_all = options.static + np.where(counts > running, job.move_cost, 0.0)
        open_sites = sorted(opened)
        first: dict[int, tuple[int, str]] = {}
        for key in count:
            first.setdefault(key[0], key)
        rows = options.rtt[[index[first[s]] for s in open_sites]]
        best_all = rows.min(axis=0)
        # RTT per point without each open site: the runner-up where that site was nearest
        if len(open_sites) > 1:
            ranked = np.sort(rows, axis=0)
            without = np.where(rows == ranked[0], ranked[1], ranked[0])
        else:
            without = np.full((1, len(weight)), w.unserved_rtt_ms)
        keys = sorted(count)
        if spread is None:
            # Taking one replica off a site that keeps others changes no latency: of those,
            # only the one whose removal refunds the most can give the best move.
            stacked = [k for k in keys if opened[k[0]] > 1]
            if len(stacked) > 1:
                keep = max(stacked, key=lambda k: (refund_all[index[k]], k))
                keys = [k for k in keys if opened[k[0]] == 1 or k == keep]
        a = np.array([index[k] for k in keys])
        base = np.array([without[open_sites.index(k[0])] if opened[k[0]] == 1 else best_all for k in keys])
        latency = _latency_after(options.rtt, base, weight)
        gain = move_in[None, :] - refund_all[a][:, None] + latency - float(weight @ best_all)
        gain[np.arange(a.size), a] = np.inf
        if gain.min() >= -1e-9:
            return
        moved = False
        for flat in _smallest(gain.ravel(), 16):
            i, c = divmod(flat, gain.shape[1])
            if gain[i, c] >= -1e-9:
                break
            site_a = options.site[a[i]]
            if options.site[c] != site_a and not capacity.has_room(options.site[c], options.variant[c]):
                continue
            if taken is not None and taken[options.site[c]]:
                continue
            if spread is not None and not spread.allows(options.domain[c], options.domain[a[i]]):
                continue
            if _swap(capacity, job, keys[i], options.site[c], options.variant[c]):
                if spread is not None:
                    spread.shift(options.domain[a[i]], -1)
                    spread.shift(options.domain[c], +1)
                moved = True
                break
        if not moved:
            return


def _latency_after(rtt: np.ndarray, base: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted latency per (replica taken away, option put in): ``np.minimum(rtt[None],
    base[:, None]) @ weight``, a few replicas at a time. In one go the array is replicas ×
    options × demand points, and options grow with the points: 40 replicas of a deployment
    with 1,000 demand points took about a gigabyte."""
    per_key = max(1, rtt.size * rtt.itemsize)
    step = max(1, RELOCATION_CHUNK_BYTES // per_key)
    out = np.empty((base.shape[0], rtt.shape[0]))
    for start in range(0, base.shape[0], step):
        out[start:start + step] = np.minimum(rtt[None, :, :], base[start:start + step, None, :]) @ weight
    return out


def _smallest(values: np.ndarray, k: int) -> list[int]:
    """``np.argsort(values, kind="stable")[:k]`` without sorting all of ``values``."""
    if values.size <= k:
        return values.argsort(kind="stable").tolist()
    bound = np.partition(values, k - 1)[k - 1]
    within = (values <= bound).nonzero()[0]  # ascending index: ties keep stable order
    return within[values[within].argsort(kind="stable")[:k]].tolist()


def _swap(capacity: Capacity, job: Job, a_key: tuple[int, str], to_site: int, to_variant: Variant) -> bool:
    """Move one replica ``a_key`` → (to_site, to_variant) if the target has room."""
    at = max(i for i, (s, v, _) in enumerate(job.placed) if (s, v.name) == a_key)
    site, variant, group = job.placed[at]
    capacity.give_back(site, variant, group, job.deployment.name)
    new_group = capacity.take(to_site, to_variant, job.deployment.name)
    if new_group is None:
        capacity.hold(site, variant, group, job.deployment.name)
        return False
    job.placed[at] = (to_site, to_variant, new_group)
    return True
