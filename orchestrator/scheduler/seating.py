"""Which GPU group each replica already running on a site holds.

Nothing records the group a replica took: a re-plan, a standing plan, the maintenance of
a drain and the N-1 sweep all seat the replicas of a site again. Seating them one by one
in whatever order they are listed is not enough where a site has groups of different
cards: a one-GPU replica seated first takes a card of the pair that a two-GPU replica
holds, and the two-GPU one "no longer has room" though nothing changed. So every caller
seats a site's replicas here, scarcest first (as the planner placed them), and where
that still leaves one out, searches the seatings for one that holds as many as fit:
any placement the planner could have made seats again.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.scheduler.capacity import Capacity
from orchestrator.scheduler.model import Variant

#: States the search visits per site before it settles for the scarcest-first seating;
#: a site holds a few groups and a few dozen replicas, far below it.
SEARCH_LIMIT = 20_000


def seat(capacity: Capacity, site: int, variants: Sequence[Variant]) -> list[int | None]:
    """Per replica of ``variants`` at ``site``, the GPU group it holds among the GPUs free
    in ``capacity`` (-1: it needs none; None: no group is left for it), as many seated as
    the groups allow. Only GPUs are seated: nothing is taken from ``capacity``."""
    groups: list[int | None] = [-1] * len(variants)
    needy = sorted((i for i, v in enumerate(variants) if v.gpus),
                   key=lambda i: (-variants[i].gpus, -variants[i].gpu_memory_gib, not variants[i].gpu_model, i))
    if not needy:
        return groups
    fleet = capacity.fleet
    memory, models = fleet.gpu_memory[site], fleet.gpu_model[site]
    fits: list[dict[int, tuple[bool, float]]] = []  # per needy replica, the groups it may use → ``gpu_group``'s rank
    for i in needy:
        v = variants[i]
        fits.append({k: (not v.gpu_model and models[k] in capacity.bound, float(memory[k]))
                     for k in range(fleet.gpu_groups)
                     if memory[k] >= v.gpu_memory_gib - 1e-9 and (not v.gpu_model or models[k] == v.gpu_model)})
    free = tuple(int(c) for c in capacity.gpu_count[site])
    chosen = _greedy(needy, variants, fits, free)
    if None in chosen and len(needy) <= 256:  # past that, deeper than a site holds and than recursion allows
        chosen = _search(needy, variants, fits, free) or chosen
    for i, k in zip(needy, chosen):
        groups[i] = k
    return groups


def _greedy(needy: list[int], variants: Sequence[Variant], fits: list[dict[int, tuple[bool, float]]],
            free: tuple[int, ...]) -> list[int | None]:
    """Scarcest first, each into the group ``Capacity.gpu_group`` would give it."""
    left = list(free)
    out: list[int | None] = []
    for j, i in enumerate(needy):
        n = variants[i].gpus
        options = [k for k in fits[j] if left[k] >= n]
        k = min(options, key=lambda k: (fits[j][k], left[k], k)) if options else None
        if k is not None:
            left[k] -= n
        out.append(k)
    return out


def _search(needy: list[int], variants: Sequence[Variant], fits: list[dict[int, tuple[bool, float]]],
            free: tuple[int, ...]) -> list[int | None] | None:
    """The seating that holds the most replicas (depth first, memoised on the GPUs left);
    None past ``SEARCH_LIMIT`` states."""
    best: dict[tuple[int, tuple[int, ...]], tuple[int, int | None]] = {}  # → (seated from here, group taken)

    def most(j: int, left: tuple[int, ...]) -> int:
        if j == len(needy):
            return 0
        found = best.get((j, left))
        if found is not None:
            return found[0]
        if len(best) >= SEARCH_LIMIT:
            raise _TooLarge
        n = variants[needy[j]].gpus
        answer: tuple[int, int | None] = (most(j + 1, left), None)
        for k in sorted(fits[j], key=lambda k: (fits[j][k], left[k], k)):
            if left[k] >= n and answer[0] < len(needy) - j:
                after = left[:k] + (left[k] - n,) + left[k + 1:]
                seated = 1 + most(j + 1, after)
                if seated > answer[0]:
                    answer = (seated, k)
        best[(j, left)] = answer
        return answer[0]

    try:
        most(0, free)
    except _TooLarge:
        return None
    out: list[int | None] = []
    left = free
    for j in range(len(needy)):
        k = best[(j, left)][1]
        out.append(k)
        if k is not None:
            left = left[:k] + (left[k] - variants[needy[j]].gpus,) + left[k + 1:]
    return out


class _TooLarge(Exception):
    """The search passed ``SEARCH_LIMIT``."""
