"""How many agent joins the control plane works on at once, and when one over that comes back.

Why a bound: after a control-plane restart a whole fleet joins within its first reconnect
step. Each join proves the agent's identity against the store, on the store's few threads;
taken all at once, the last of thousands waits behind every other one and nears the
agent's join timeout (10 s), after which the agent tries again and the storm grows. So at
most ``limit`` joins are worked on at once (``edgeplane serve --max-joins``), and one more
is refused at once, before anything of it is read or kept, with when to come back
(``edgeplane_proto.reconnect``: the agent waits that long, jittered, instead of its backoff
step).

When to come back: each refused join is given a turn, one join's share of the gate (how
long joins have been taking / ``limit``) after the turn given before it, so that the
refused come back about as fast as the gate drains instead of all together; never sooner
than ``MIN_RETRY_S``, never later than the protocol's ``PUSHBACK_MAX_S``.
:func:`retry_after` decides that from numbers alone; :class:`JoinGate` keeps the counts,
on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from edgeplane_proto import reconnect

#: Joins worked on at once by default: enough to keep the store's threads busy (a join is a
#: few milliseconds of them), few enough that none waits long behind the others.
MAX_JOINS = 64
#: The shortest wait asked of a refused join (seconds): the agent's first backoff step at its
#: longest, so a refusal never brings an agent back sooner than a failure would.
MIN_RETRY_S = reconnect.RECONNECT_INITIAL_S
#: How long a join is taken to last until one has been measured (seconds).
FIRST_JOIN_S = 0.05
#: Weight of the latest join in the running mean of how long joins take.
SMOOTHING = 0.2


@dataclass(frozen=True)
class Admitted:
    """A join being worked on: hand it back to :meth:`JoinGate.leave` however it ends."""

    started: float


@dataclass(frozen=True)
class Refused:
    """A join refused because ``limit`` were being worked on; to come back in ``retry_after_s``."""

    retry_after_s: float
    limit: int


def retry_after(now: float, last_turn: float, join_s: float, limit: int,
                bounds: tuple[float, float] = (MIN_RETRY_S, reconnect.PUSHBACK_MAX_S)) -> float:
    """Seconds from ``now`` until the turn of a join refused now: one join's share of the gate
    (``join_s / limit``) after ``last_turn``, the turn given to the join refused before it,
    within ``bounds`` from now."""
    low, high = bounds
    turn = max(last_turn + join_s / limit, now + low)
    return min(turn - now, high)


class JoinGate:
    """At most ``limit`` joins at once; ``clock`` (seconds, monotonic) times them and the turns."""

    def __init__(self, limit: int = MAX_JOINS, *, clock: Callable[[], float] = time.monotonic,
                 retry_bounds: tuple[float, float] = (MIN_RETRY_S, reconnect.PUSHBACK_MAX_S)) -> None:
        if limit < 1:
            raise ValueError(f"joins at once must be at least 1, not {limit}")
        self.limit = limit
        self._clock = clock
        self._bounds = retry_bounds
        self.in_progress = 0
        #: Joins refused since start (``edgeplane_agent_joins_refused_total``).
        self.refused_total = 0
        self._join_s = FIRST_JOIN_S
        self._last_turn = float("-inf")

    def enter(self) -> Admitted | Refused:
        """Take a place for a join, or refuse it with when to come back."""
        now = self._clock()
        if self.in_progress >= self.limit:
            wait = retry_after(now, self._last_turn, self._join_s, self.limit, self._bounds)
            self._last_turn = now + wait
            self.refused_total += 1
            return Refused(wait, self.limit)
        self.in_progress += 1
        return Admitted(now)

    def leave(self, admitted: Admitted) -> None:
        """A join ended (granted, refused by the hub, or failed): its place is free again."""
        self.in_progress -= 1
        self._join_s += SMOOTHING * (self._clock() - admitted.started - self._join_s)
