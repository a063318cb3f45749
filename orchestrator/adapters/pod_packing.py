"""How many pods of one shape hold a set of Serve replicas.

Ray places an actor only on a node with room for everything it asks, and the Ray autoscaler
sizes a cluster by packing resource demands onto node types, largest first. Dividing the
summed demand by a pod's size undercounts whenever replicas do not fill a pod evenly: three
replicas of 2.5 CPUs need three 4-CPU pods, not two, and the third would wait forever for
room. So the count is a first-fit packing, largest replica first, over every resource at
once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Slack for sums of fractional requests (0.1 + 0.2 fits in 0.3).
_EPSILON = 1e-9


@dataclass(frozen=True)
class Resources:
    cpu: float
    memory_mib: float
    gpus: float

    def values(self) -> tuple[float, float, float]:
        return self.cpu, self.memory_mib, self.gpus


def _how_many(need: tuple[float, ...], room: Sequence[float]) -> float:
    """How many replicas of ``need`` fit in ``room`` (infinite for one that asks for nothing)."""
    return min((math.floor((r + _EPSILON) / n) for n, r in zip(need, room) if n > 0), default=math.inf)


def pods_needed(replicas: Sequence[tuple[Resources, int]], pod: Resources, limit: int) -> int | None:
    """The pods of ``pod``'s size that hold ``count`` replicas of each ``Resources`` in
    ``replicas``, packed first fit, the largest replica (by its largest share of a pod)
    first; None when that takes more than ``limit`` pods. Every replica must fit an empty pod
    (the caller checks, to say which resource is short)."""
    capacity = pod.values()

    def share(need: Resources) -> float:
        return max((n / c for n, c in zip(need.values(), capacity) if c > 0), default=0.0)

    rooms: list[list[float]] = []
    for need, count in sorted(replicas, key=lambda item: share(item[0]), reverse=True):
        wants = need.values()
        per_pod = _how_many(wants, capacity)
        if count <= 0 or per_pod == math.inf:
            continue  # asks for nothing a pod has: Ray places it anywhere, the head included
        for room in rooms:
            take = min(_how_many(wants, room), count)
            if take:
                room[:] = [r - n * take for r, n in zip(room, wants)]
                count -= take
                if not count:
                    break
        if count:
            new = math.ceil(count / per_pod)
            if len(rooms) + new > limit:
                return None
            for i in range(new):
                placed = min(per_pod, count - i * per_pod)
                rooms.append([c - n * placed for c, n in zip(capacity, wants)])
    return len(rooms)
