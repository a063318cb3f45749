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

Failed joins: a join takes its place before its token or certificate is checked, so a
flood of joins with made-up bootstrap tokens would hold places real agents wait for, and
cost a store lookup each. So the joins that fail to authenticate are counted per peer
(:class:`FailedJoins`, a token bucket of :mod:`orchestrator.security.ratelimit`: ``burst``
failures at once, ``rate`` more per second; ``edgeplane serve --join-failure-rate`` and
``--join-failure-burst``), and a join from a peer with none left is refused before it takes
a place or is read, with when it may fail again. Only failures spend: a site behind NAT
whose agents join well shares its address freely. A join that comes with a verified client
certificate is counted by the certificate's site, not its address, so a stranger failing
from an address shared with enrolled agents never holds their rejoins back; first joins
(bootstrap token, no certificate) and agents without TLS are counted by address.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from edgeplane_proto import reconnect
from orchestrator.security import ratelimit

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
#: Failed joins a peer may make at once by default: more than a few agents behind one
#: address, each with a token gone stale, fail in a reconnect step.
JOIN_FAILURE_BURST = 20.0
#: Failed joins a peer earns per second by default (one every 5 s): an agent refused for its
#: token retries at most every ``reconnect.RECONNECT_MAX_S``; a flood is slowed to this many store lookups.
JOIN_FAILURE_RATE = 0.2


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


@dataclass(frozen=True)
class TooManyFailures:
    """A join refused because its peer failed too many joins; it may try again in ``retry_after_s``."""

    retry_after_s: float
    rate: float


class FailedJoins:
    """Failed join authentications per peer, in ``limiter``'s buckets (rate 0: not limited)."""

    def __init__(self, limiter: ratelimit.RateLimiter) -> None:
        self.limiter = limiter
        #: Joins refused since start for their peer's failures (``edgeplane_agent_joins_refused_for_failures_total``).
        self.refused_total = 0

    def check(self, peer: str) -> TooManyFailures | None:
        """Refuse a join of ``peer`` with none of its failures left; spends nothing."""
        wait = self.limiter.wait(peer)
        if wait is None:
            return None
        self.refused_total += 1
        return TooManyFailures(min(max(wait, MIN_RETRY_S), reconnect.PUSHBACK_MAX_S), self.limiter.limit.rate)

    def failed(self, peer: str) -> None:
        """A join of ``peer`` failed to authenticate: it spends one of its failures."""
        self.limiter.take(peer)


def failure_limit_problem(rate: float, burst: float) -> str | None:
    """What is wrong with ``--join-failure-rate`` / ``--join-failure-burst``, or None."""
    if rate < 0 or burst < 0:
        return "--join-failure-rate and --join-failure-burst must be >= 0"
    if 0 < rate < ratelimit.MIN_RATE:
        return f"--join-failure-rate {rate:g} is too slow: give 0 (no limit) or {ratelimit.MIN_RATE:g} failed joins/s or more"
    if 0 < burst < 1:
        return f"--join-failure-burst {burst:g} is less than one failed join: give 1 or more (0: the rate)"
    return None


def failed_joins(rate: float = JOIN_FAILURE_RATE, burst: float = JOIN_FAILURE_BURST) -> FailedJoins:
    return FailedJoins(ratelimit.RateLimiter(ratelimit.RateLimit(rate, burst)))


def peer_key(peer: str, site: str | None) -> str:
    """Whose failures a join spends: ``site:<site>`` for one with a verified client certificate,
    else ``addr:<host>`` of gRPC's peer string (``ipv4:10.0.0.7:51234``, ``ipv6:[::1]:51234``)."""
    if site is not None:
        return f"site:{site}"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, port = rest.rpartition(":")
        return f"addr:{host.strip('[]') if sep and port.isdigit() else rest}"
    return f"addr:{peer}"
