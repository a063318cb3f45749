"""Per-client token buckets: the gateway's rate limit, and the failed agent joins an address may make.

Pure bookkeeping with an injected clock: :meth:`RateLimiter.take` says whether a request
may pass now and, when not, how long the client should wait (the ``Retry-After``). Keys
are whatever identifies a client (the bearer token's digest, else the peer address).
:meth:`RateLimiter.wait` asks the same without spending: the agent service spends only
for a join that failed, and asks before each join whether its address has any left.
The table of buckets is bounded: when full, the least recently used key is dropped, so a
flood of distinct addresses costs memory proportional to ``max_clients`` only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


#: The slowest rate a limit may have (one request in about 11.6 days): a slower one makes a
#: client's wait overflow (1e-320 requests/s is a number, and its wait is infinite).
MIN_RATE = 1e-6


@dataclass(frozen=True)
class RateLimit:
    """``rate`` requests per second sustained, up to ``burst`` at once; rate 0 = no limit."""

    rate: float = 0.0
    burst: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def capacity(self) -> float:
        """The bucket size: ``burst``, or when unset the rate (at least one request)."""
        return self.burst if self.burst > 0 else max(self.rate, 1.0)


class RateLimiter:
    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic, max_clients: int = 100_000) -> None:
        if limit.rate < 0 or limit.burst < 0:
            raise ValueError("rate and burst must be >= 0")
        if 0 < limit.rate < MIN_RATE:
            raise ValueError(f"rate must be 0 (no limit) or at least {MIN_RATE:g} requests/s")
        if 0 < limit.burst < 1:
            raise ValueError("burst must be 0 (the rate) or at least 1: a smaller bucket never holds one request")
        self.limit = limit
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, updated)

    def take(self, key: str, cost: float = 1.0) -> float | None:
        """Spend ``cost`` tokens of ``key``'s bucket: None if allowed, else seconds to wait."""
        if not self.limit.enabled:
            return None
        now = self._clock()
        tokens = self._refilled(key, now)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            allowed = None
        else:
            self._buckets[key] = (tokens, now)
            allowed = (cost - tokens) / self.limit.rate
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return allowed

    def wait(self, key: str, cost: float = 1.0) -> float | None:
        """What :meth:`take` would answer now, spending nothing and keeping no bucket."""
        if not self.limit.enabled or key not in self._buckets:
            return None
        tokens = self._refilled(key, self._clock())
        return None if tokens >= cost else (cost - tokens) / self.limit.rate

    def _refilled(self, key: str, now: float) -> float:
        capacity = self.limit.capacity()
        tokens, updated = self._buckets.pop(key, (capacity, now))
        self._buckets[key] = (tokens, updated)  # the most recently used, for the table's bound
        return min(capacity, tokens + (now - updated) * self.limit.rate)

    def __len__(self) -> int:
        return len(self._buckets)
