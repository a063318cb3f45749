"""How often a condition that every request meets is logged: at once, then at most once
every interval while it lasts.

A token store that does not answer, a gateway out of file descriptors: each request that
meets it would log the same line, and a flood of callers would flood the log (and the disk
it is on) with what one line says. :class:`Throttle` decides whether a line is due, and
counts those it holds back; its caller writes the line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class Throttle:
    """Lines about one condition, ``interval_s`` apart at least on ``clock`` (monotonic);
    a condition said otherwise (``what``: a store's other error) is a new one, due at once."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: tuple[Hashable, float] | None = None  # what was logged last, and when
        self._held = 0  # lines held back since

    def due(self, what: Hashable = None) -> int | None:
        """Whether to log ``what`` now: None while the same was logged less than
        ``interval_s`` ago (counted as held back), else how many lines were held back since
        the last one logged (0 for the first)."""
        now = self._clock()
        if self._last is not None and self._last[0] == what and now - self._last[1] < self.interval_s:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, (what, now)
        return held
