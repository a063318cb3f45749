"""Replica counts per spread domain, kept balanced while replicas are added and moved.

``maxSkew`` bounds the difference between the fullest and the emptiest eligible domain
(region or site). The planner asks before every placement or move, so the counts are
kept with a histogram that answers in constant time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt


class DomainCounts:
    """Replica counts per spread domain, with the min/max checks the greedy needs."""

    def __init__(self, domains: Iterable[int], max_skew: int, keys: npt.NDArray[np.int64]) -> None:
        self.keys = keys  # the domain of every site (``Fleet.domains``)
        # Spread by site over 100,000 sites has 100,000 domains: only those holding a
        # replica get an entry, the others count zero through the histogram.
        self.domains = np.asarray(domains, dtype=np.int64)
        self.count: dict[int, int] = {}
        self.hist: Counter[int] = Counter({0: int(self.domains.size)})
        self.max_skew = max_skew
        self._low = 0

    def copy(self) -> DomainCounts:
        copied = DomainCounts((), self.max_skew, self.keys)
        copied.domains, copied.count, copied.hist, copied._low = self.domains, dict(self.count), Counter(self.hist), self._low
        return copied

    def of(self, domain: int) -> int:
        """Replicas in ``domain`` now."""
        return self.count.get(domain, 0)

    def low(self) -> int:
        return self._low

    def allows(self, add: int, remove: int | None = None) -> bool:
        """Would one more replica in ``add`` (and one fewer in ``remove``) keep the skew?"""
        if remove is None:
            c = self.count.get(add, 0)
            return c + 1 - self._low <= self.max_skew or (c == self._low and self.hist[c] == 1)
        if remove == add:
            return True
        self.shift(add, +1)
        self.shift(remove, -1)
        live = [c for c, n in self.hist.items() if n > 0]
        ok = max(live) - min(live) <= self.max_skew
        self.shift(remove, +1)
        self.shift(add, -1)
        return ok

    def shift(self, domain: int, by: int) -> None:
        old = self.count.get(domain, 0)
        self.hist[old] -= 1
        self.hist[old + by] += 1
        self.count[domain] = old + by
        self._low = min(self._low, old + by)
        while self.hist[self._low] == 0 and self._low < old + by:
            self._low += 1
