"""Making room: shift another deployment's replica so a short deployment can start one.

Planning deployments one after another leaves a classic gap: a flexible deployment (any
EU country) may sit on the only site a constrained one (DE only) can use, while it could
have run elsewhere. A missing replica costs more than any latency or carbon difference
(``Weights.shortfall_per_replica``), so when a deployment is short, the planner looks for
a single replica of another deployment whose move to another site with room frees enough
capacity, and makes that trade. The moved replica keeps its count (a move, never a drop),
and deployments with a spread rule are left alone so their balance is never broken.

When no move frees room, ``switch_variant`` looks at the occupants' own variants: a
deployment planned first may fill the only site a short one can use with its large
variant, where its small one would leave room for both. Switching it there keeps its count
and its site (so its latency), and costs only what the objective charges a smaller variant
(carbon, fit, a start), far less than a missing replica. Only replicas this plan started
are switched: a running replica is never downsized for another deployment, since on a
full site its smaller self cannot start before it stops. Room the smaller variant leaves
beyond what the short deployment takes goes to the switched one if it is short too: left
empty, the plan could hold fewer replicas than it would without the switch.

When neither frees room, ``trade_down`` looks at sizes: a deployment of two-GPU replicas
grown past its minimum may hold the GPUs that two one-GPU replicas of a short deployment
need. Every missing replica costs the same, so giving one large replica back for two or
more small ones in its place lowers the cost; planning in scarcity order (largest GPU
count first) is what creates this case. Only replicas this plan started are given back,
never one running now (a re-plan never evicts a healthy replica for another
deployment), and never below the giver's ``replicas.min``.

A switch and a later trade-down can want the same room, and the greedy order gives it to
the switch: the switched replica frees less when given back (its variant is smaller), or
none at all (it became the variant running there now), where the large one would have
made room for several of the short deployment's. ``fill_short`` runs the three in turn
for each short deployment; where that switched a variant, it runs them again without
switches from the same start and keeps whichever places more replicas.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.scheduler import objective
from orchestrator.scheduler.capacity import Capacity
from orchestrator.scheduler.fleet import Fleet
from orchestrator.scheduler.model import Variant

if TYPE_CHECKING:
    from orchestrator.scheduler.job import Job

SITES_TRIED = 64  # per replica sought; the lowest-carbon full sites come first
TRADES_TRIED = 256  # per replica sought: bounds the work when nothing can give way
GIVERS_TRIED = 64  # per trade_down round: replicas of other deployments tried


def fill_short(fleet: Fleet, capacity: Capacity, short: Sequence[Job], jobs: Sequence[Job]) -> None:
    """Add replicas to each of ``short``, in turn while it is short, with ``make_room``,
    then ``switch_variant``, then ``trade_down``; ``jobs``: every deployment planned.

    Where a variant was switched, the same pass without switches is tried from the same
    start, and the plan with more replicas is kept (the one with switches on a tie). The
    start is a copy of the room left and of the replica lists, taken where some deployment
    is short (2 ms of a 1 s plan at 10,000 sites); the second pass runs only after a switch.
    """
    if all(len(job.placed) >= job.wanted for job in short):
        return
    start = _Snapshot(capacity, jobs)
    if not _fill_pass(fleet, capacity, short, jobs, switch=True):
        return
    switched = _Snapshot(capacity, jobs)
    start.restore(capacity)
    _fill_pass(fleet, capacity, short, jobs, switch=False)
    if switched.replicas >= sum(len(job.placed) for job in jobs):
        switched.restore(capacity)


def _fill_pass(fleet: Fleet, capacity: Capacity, short: Sequence[Job], jobs: Sequence[Job], switch: bool) -> bool:
    """One pass of ``fill_short``: whether it switched a variant."""
    switched = False
    for job in short:
        if len(job.placed) < job.wanted:
            make_room(fleet, capacity, job, jobs)
        if switch and len(job.placed) < job.wanted:
            switched = switch_variant(fleet, capacity, job, jobs) or switched
        if len(job.placed) < job.wanted:
            trade_down(capacity, job, jobs)
    return switched


class _Snapshot:
    """The room left and every deployment's replicas at one point of ``fill_short``, to
    go back to once (``restore`` hands over the lists it holds)."""

    def __init__(self, capacity: Capacity, jobs: Sequence[Job]) -> None:
        self.room = capacity.save()
        self.jobs = [(job, list(job.placed), None if job.spread is None else job.spread.copy()) for job in jobs]
        self.replicas = sum(len(placed) for _, placed, _ in self.jobs)

    def restore(self, capacity: Capacity) -> None:
        capacity.restore(self.room)
        for job, placed, spread in self.jobs:
            job.placed, job.spread = placed, spread


def make_room(fleet: Fleet, capacity: Capacity, job: Job, jobs: Sequence[Job]) -> None:
    """Add replicas to ``job`` by moving single replicas of other deployments away."""
    others = [j for j in jobs if j is not job and j.deployment.placement.spread is None]
    occupants: dict[int, list[tuple[Job, int]]] = {}
    for other in others:
        for i, (site, _, _) in enumerate(other.placed):
            occupants.setdefault(site, []).append((other, i))
    while len(job.placed) < job.wanted and _make_room_once(fleet, capacity, job, occupants):
        pass


def _make_room_once(fleet: Fleet, capacity: Capacity, job: Job, occupants: dict[int, list[tuple[Job, int]]]) -> bool:
    tries = TRADES_TRIED
    rooms: dict[tuple[int, str], np.ndarray] = {}  # valid until a trade succeeds
    taken = job.taken(fleet)
    for variant in job.variants():
        full = np.flatnonzero(job.eligible[variant.name] & ~capacity.fits_mask(variant)
                              & (True if taken is None else ~taken))
        full = full[[bool(occupants.get(s)) for s in full.tolist()]] if full.size else full
        if job.spread is not None and full.size:
            full = np.array([s for s in full.tolist() if job.spread.allows(int(job.spread.keys[s]))], dtype=np.int64)
        order = np.argsort(fleet.intensity[full], kind="stable")[:SITES_TRIED]
        for site in full[order].tolist():
            for other, i in occupants[site]:
                if _trade(fleet, capacity, job, variant, site, other, i, rooms):
                    occupants[site].remove((other, i))
                    occupants.setdefault(other.placed[i][0], []).append((other, i))
                    return True
                tries -= 1
                if tries == 0:
                    return False
    return False


def _trade(
    fleet: Fleet,
    capacity: Capacity,
    job: Job,
    variant: Variant,
    site: int,
    other: Job,
    i: int,
    rooms: dict[tuple[int, str], np.ndarray],
) -> bool:
    """Move ``other.placed[i]`` off ``site`` if that lets ``variant`` of ``job`` in."""
    _, their_variant, their_group = other.placed[i]
    ours = capacity.trade(site, their_variant, their_group, other.deployment.name, site, variant, job.deployment.name)
    if ours is None:
        return False
    best: tuple[float, int, Variant] | None = None
    for candidate in other.variants():  # it may change variant, e.g. edge → data centre
        key = (id(other), candidate.name)
        if key not in rooms:  # only ``site`` changes between failed trades: mask it below
            theirs = other.taken(fleet)
            rooms[key] = np.flatnonzero(other.eligible[candidate.name] & capacity.fits_mask(candidate)
                                        & (True if theirs is None else ~theirs))
        targets = rooms[key][rooms[key] != site]
        if targets.size:
            t = int(targets[np.argmin(fleet.intensity[targets])])
            score = float(fleet.intensity[t]) * candidate.watts
            if best is None or score < best[0]:
                best = (score, t, candidate)
    group = None if best is None else capacity.take(best[1], best[2], other.deployment.name)
    if best is None or group is None:
        capacity.give_back(site, variant, ours, job.deployment.name)
        capacity.hold(site, their_variant, their_group, other.deployment.name)
        return False
    target, their_variant = best[1], best[2]
    other.placed[i] = (target, their_variant, group)
    job.placed.append((site, variant, ours))
    if job.spread is not None:
        job.spread.shift(int(job.spread.keys[site]), +1)
    return True


def switch_variant(fleet: Fleet, capacity: Capacity, job: Job, jobs: Sequence[Job]) -> bool:
    """Add replicas to ``job`` by switching single new replicas of other deployments to
    another of their variants on the same site, where ``job``'s then fit beside them:
    whether one was switched."""
    # Only the sites full for ``job`` now can be traded on, and this pass fills no other:
    # the replicas elsewhere need not be counted.
    taken = job.taken(fleet)
    full = np.zeros(fleet.size, dtype=bool)
    for variant in job.variants():
        full |= job.eligible[variant.name] & ~capacity.fits_mask(variant)
    if taken is not None:
        full &= ~taken
    if not full.any():
        return False
    on = full.tolist()
    held: dict[Job, Counter[tuple[int, str]]] = {}  # per deployment that may switch: replicas per (site, variant)
    at: dict[int, list[Job]] = {}  # per full site, the deployments holding a replica there
    for other in jobs:
        if other is job or other.deployment.placement.spread is not None or len(other.eligible) < 2:
            continue
        counts = Counter((s, v.name) for s, v, _ in other.placed if on[s])
        if counts:
            held[other] = counts
            for site in {s for s, _ in counts}:
                at.setdefault(site, []).append(other)
    switched = False
    while len(job.placed) < job.wanted and at and _switch_once(fleet, capacity, job, held, at):
        switched = True
    return switched


def _switch_once(fleet: Fleet, capacity: Capacity, job: Job, held: dict[Job, Counter[tuple[int, str]]],
                 at: dict[int, list[Job]]) -> bool:
    tries = TRADES_TRIED
    taken = job.taken(fleet)
    for variant in job.variants():
        full = np.flatnonzero(job.eligible[variant.name] & ~capacity.fits_mask(variant)
                              & (True if taken is None else ~taken))
        full = full[[s in at for s in full.tolist()]] if full.size else full
        if job.spread is not None and full.size:
            full = np.array([s for s in full.tolist() if job.spread.allows(int(job.spread.keys[s]))], dtype=np.int64)
        order = np.argsort(fleet.intensity[full], kind="stable")[:SITES_TRIED]
        for site in full[order].tolist():
            for other in at[site]:
                counts = held[other]
                # only replicas beyond those running now: this plan started them
                for key in [k for k, n in counts.items() if k[0] == site and n > other.running.get(k, 0)]:
                    switched = _switch(fleet, capacity, job, variant, site, other, key[1])
                    if switched is not None:
                        counts[key] -= 1
                        counts[(site, switched[0])] += 1 + switched[1]
                        return True
                    tries -= 1
                    if tries == 0:
                        return False
    return False


def _switch(fleet: Fleet, capacity: Capacity, job: Job, variant: Variant, site: int, other: Job,
            name: str) -> tuple[str, int] | None:
    """Switch one replica of ``other`` at ``site`` from variant ``name`` to another of its
    variants if ``variant`` of ``job`` then fits beside it, and place as many of ``job``'s
    there as then fit, then as many more of ``other``'s switched variant: the variant
    switched to and how many more of it ``other`` placed, or None."""
    i = max(n for n, (s, v, _) in enumerate(other.placed) if s == site and v.name == name)
    _, theirs, their_group = other.placed[i]
    ours = capacity.trade(site, theirs, their_group, other.deployment.name, site, variant, job.deployment.name)
    if ours is None:
        return None
    # The cheapest other variant the objective allows there, if ``job``'s missing replica
    # costs more than the switch adds to ``other`` (with the default weights, always).
    gain = (objective.shortfall_cost(job.deployment, len(job.placed), job.weights)
            - objective.shortfall_cost(job.deployment, len(job.placed) + 1, job.weights))
    before = objective.replica_cost(fleet, site, theirs, other.weights)
    found: tuple[Variant, int] | None = None
    for candidate in sorted((v for v in other.variants() if v.name != name and other.eligible[v.name][site]),
                            key=lambda v: objective.replica_cost(fleet, site, v, other.weights)):
        if objective.replica_cost(fleet, site, candidate, other.weights) - before >= gain:
            break
        group = capacity.take(site, candidate, other.deployment.name)
        if group is not None:
            found = (candidate, group)
            break
    if found is None:
        capacity.give_back(site, variant, ours, job.deployment.name)
        capacity.hold(site, theirs, their_group, other.deployment.name)
        return None
    other.placed[i] = (site, found[0], found[1])
    job.placed.append((site, variant, ours))
    if job.spread is not None:
        job.spread.shift(int(job.spread.keys[site]), +1)
    _fill(capacity, job, site, variant)
    # what is left goes to ``other`` if it is short too (planned with its large variant, it often is)
    return found[0].name, _fill(capacity, other, site, found[0])


def _fill(capacity: Capacity, job: Job, site: int, variant: Variant) -> int:
    """Place replicas of ``variant`` of ``job`` at ``site`` while it is short of its
    wanted count, they fit and its spread allows: how many."""
    spread, before = job.spread, len(job.placed)
    while len(job.placed) < job.wanted and (spread is None or spread.allows(int(spread.keys[site]))):
        more = capacity.take(site, variant, job.deployment.name)
        if more is None:
            break
        job.placed.append((site, variant, more))
        if spread is not None:
            spread.shift(int(spread.keys[site]), +1)
    return len(job.placed) - before


def trade_down(capacity: Capacity, job: Job, jobs: Sequence[Job]) -> None:
    """Add replicas to ``job`` by giving back single new replicas of other deployments
    where two or more of ``job``'s fit in their place (fewer replicas short overall)."""
    taken = job.taken(capacity.fleet)
    eligible = job.any_eligible if taken is None else job.any_eligible & ~taken
    givers = [_Giver(other) for other in jobs if other is not job and other.deployment.placement.spread is None]
    while len(job.placed) < job.wanted and _trade_down_once(capacity, job, givers, eligible):
        pass


class _Giver:
    """Where ``trade_down`` stands in one deployment's replicas, kept across trades: each
    trade gives back one replica, and recounting the rest for every trade made it
    quadratic in replicas (``held``, ``count`` and the failed ones follow each trade)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.held = Counter((s, v.name) for s, v, _ in job.placed)
        self.count: dict[tuple[int, str], int] = {}  # per key, the replicas at ``next`` and above
        self.next = len(job.placed) - 1  # the latest placed first, going down
        self.failed: list[int] = []  # indices above ``next`` tried in vain, highest first

    def gave(self, i: int, key: tuple[int, str]) -> None:
        """``job.placed[i]`` (of ``key``, at or above ``next``) was given back."""
        self.held[key] -= 1
        self.count[key] -= 1
        self.failed = [f - 1 if f > i else f for f in self.failed]


def _trade_down_once(capacity: Capacity, job: Job, givers: list[_Giver], eligible: np.ndarray) -> bool:
    """One trade. Each round retries the replicas that failed before (highest first, as a
    scan from the latest placed meets them; each costs a try) and then goes on down."""
    tries = GIVERS_TRIED
    for n, giver in enumerate(givers):
        other = giver.job
        if len(other.placed) <= other.deployment.min_replicas:
            continue
        for i in list(giver.failed):
            site, variant, _ = other.placed[i]
            if _swap_for_more(capacity, job, site, other, i):
                giver.failed.remove(i)
                giver.gave(i, (site, variant.name))
                _drop_spent(givers, n)
                return True
            tries -= 1
            if tries == 0:
                return False
        while giver.next >= 0:
            i = giver.next
            giver.next -= 1
            site, variant, _ = other.placed[i]
            key = (site, variant.name)
            giver.count[key] = giver.count.get(key, 0) + 1
            if not eligible[site] or giver.count[key] + other.running.get(key, 0) > giver.held[key]:
                continue  # not usable by ``job``, or one of the replicas running now
            if _swap_for_more(capacity, job, site, other, i):
                giver.gave(i, key)
                _drop_spent(givers, n)
                return True
            giver.failed.append(i)
            tries -= 1
            if tries == 0:
                return False
    return False


def _drop_spent(givers: list[_Giver], n: int) -> None:
    """Forget the givers before ``givers[n]`` that have nothing left to try: every later
    round would walk past them (fewer than ``GIVERS_TRIED`` of them keep failed ones)."""
    givers[:n] = [g for g in givers[:n] if g.failed and len(g.job.placed) > g.job.deployment.min_replicas]


def _swap_for_more(capacity: Capacity, job: Job, site: int, other: Job, i: int) -> bool:
    """Give back ``other.placed[i]`` if at least two replicas of ``job`` then fit there."""
    _, their_variant, their_group = other.placed[i]
    capacity.give_back(site, their_variant, their_group, other.deployment.name)
    added: list[tuple[int, Variant, int]] = []
    spread = job.spread
    for variant in job.variants():
        if not job.eligible[variant.name][site]:
            continue
        while len(job.placed) + len(added) < job.wanted:
            if spread is not None and not spread.allows(int(spread.keys[site])):
                break
            group = capacity.take(site, variant, job.deployment.name)
            if group is None:
                break
            added.append((site, variant, group))
            if spread is not None:
                spread.shift(int(spread.keys[site]), +1)
    if len(added) >= 2:
        del other.placed[i]
        job.placed.extend(added)
        return True
    for s, variant, group in reversed(added):
        capacity.give_back(s, variant, group, job.deployment.name)
        if spread is not None:
            spread.shift(int(spread.keys[s]), -1)
    capacity.hold(site, their_variant, their_group, other.deployment.name)
    return False
