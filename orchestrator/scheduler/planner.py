"""The placement planner: desired deployments + site inventory + running replicas → a plan.

A pure function of its arguments. The shape of the algorithm, and why:

1. Running replicas that still satisfy every hard rule keep their seats: their capacity is
   reserved before anything new is placed, so a re-plan never evicts a healthy replica to
   make room for another deployment. Replicas that broke a rule (site unhealthy or gone,
   residency or selector changed, capacity shrank) are released and replaced
   (``incumbents``).
2. Deployments are planned one at a time, scarcest first (GPU variants, then fewest
   eligible sites), each against the capacity left by those before it (``job``).
3. Per deployment, the hard rules become vector masks over all sites (``fleet.Fleet``);
   a few dozen candidate sites are picked from the feasible ones (nearest to each demand
   point, cheapest to run, where it runs now, best per spread domain) so the search does
   not grow with the fleet, and a lazy greedy adds one replica at a time where it lowers
   the cost the most (``objective``: latency, carbon, moves, variant fit). The latency
   term is a facility-location objective whose gains only shrink as replicas are added,
   which is what makes the lazy greedy exact step by step and cheap.
4. A relocation pass then moves single replicas while that lowers the cost, which repairs
   the greedy's early choices (``relocation``).
5. A deployment still short may shift another's replica to another site, switch one this
   plan started to a smaller variant in its seat, or give one back for two of its own
   (``repair.fill_short``).

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

import numpy as np

from orchestrator.scheduler import candidates, diagnosis, gcpause, objective, outcome, repair
from orchestrator.scheduler.spread import DomainCounts
from orchestrator.scheduler.capacity import Capacity, bound_gpu_models
from orchestrator.scheduler.fleet import BoolArray, Fleet
from orchestrator.scheduler.incumbents import seat_incumbents
from orchestrator.scheduler.job import Job, pair_rivals, prepare, scarcity
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
from orchestrator.scheduler.relocation import relocate
from orchestrator.scheduler.result import PlanResult


WIDEN_MARGIN = 1.0  # cost points a left-out site must save per replica to widen the search


def plan(
    sites: Sequence[Site],
    deployments: Sequence[Deployment],
    current: Iterable[Replica] = (),
    *,
    weights: Weights = DEFAULT_WEIGHTS,
    tuning: Tuning = DEFAULT_TUNING,
    region_locations: Mapping[str, tuple[float, float]] | None = None,
    returning: Iterable[Replica] = (),
) -> PlanResult:
    """Plan where every replica of ``deployments`` runs, starting from ``current``.

    ``weights`` apply to deployments without their own; ``region_locations`` places
    demand regions that have no sites (others sit at the centroid of their sites).
    ``returning``: the seats replicas of ``current`` stood in for while their site was
    lost (a failback: the site is back). For the costs alone they count as seats the
    deployment runs, beside the stand-ins' own: going back costs no move, nor does
    staying, and the keep check does not hold the deployment to the stand-ins' seats, so
    latency, carbon and fit decide as in a plan from nothing. They run nowhere: a
    replica the plan puts there is placed (and its stand-in moved), as any other.
    """
    # A plan allocates tens of thousands of short-lived, acyclic objects; the cyclic
    # collector would walk the whole heap several times over for nothing.
    with gcpause.paused():
        return _plan(sites, deployments, current, weights=weights, tuning=tuning, region_locations=region_locations,
                     returning=returning)


def _plan(
    sites: Sequence[Site],
    deployments: Sequence[Deployment],
    current: Iterable[Replica],
    *,
    weights: Weights,
    tuning: Tuning,
    region_locations: Mapping[str, tuple[float, float]] | None,
    returning: Iterable[Replica] = (),
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
    running = _credit(fleet, jobs, returning)
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
        ran = sum(running.get(job, job.running).values())  # a failback's seats run nowhere
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
            relocate(capacity, job, job.options, job.spread)
        if job not in running:  # a failback's stand-ins are not held to their seats
            _keep_if_no_better(fleet, capacity, job)
        job.options = None  # nothing after this phase reads them: free them as we go
    repair.fill_short(fleet, capacity, order, order)
    for job in order:
        if len(job.placed) < job.wanted:
            job.shortfall = diagnosis.explain(fleet, capacity, job)
    returned: dict[str, Counter[tuple[str, str]]] = {}
    for job, really in running.items():  # the result tells what runs now
        returned[job.deployment.name] = Counter({(fleet.names[s], v): n for (s, v), n in (job.running - really).items()})
        job.running = really
    return outcome.build(fleet, list(jobs.values()), current, dropped, returned)


def _credit(fleet: Fleet, jobs: Mapping[str, Job], returning: Iterable[Replica]) -> dict[Job, Counter[tuple[int, str]]]:
    """Count the ``returning`` seats (``plan``) among their deployments' running ones, for
    the search's costs; what each such deployment really runs, to put back once it is done.
    Seats on sites not in the fleet, or of deployments or variants not planned, count for none."""
    really: dict[Job, Counter[tuple[int, str]]] = {}
    for replica in returning:
        job, site = jobs.get(replica.deployment), fleet.index.get(replica.site)
        if job is None or site is None or replica.variant not in job.eligible:
            continue
        really.setdefault(job, Counter(job.running))
        job.running[(site, replica.variant)] += 1
    return really

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
