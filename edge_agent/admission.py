"""How many sequences of one generative model run at once, and who waits for the next slot.

Each served version admits at most ``max_active`` sequences (each holds a KV cache, the
memory the scheduler budgets for) and lets ``max_queued`` more wait in arrival order; one
more is refused at once with when to retry, so a burst never becomes an unbounded backlog.
Kept apart from the HTTP routes (``edge_agent.generation``) because it is pure asyncio
bookkeeping, tested on its own.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable

from edge_agent import errors

#: Sequences of one generative model at once when its assignment does not say (each holds a
#: KV cache: the registry counts this many of them when it weighs the model's load).
DEFAULT_MAX_CONCURRENT = 4


class Retired(Exception):
    """The model version stopped being served while the request waited for a slot."""


class Admission:
    """At most ``max_active`` holders; up to ``max_queued`` waiters, served in order. Once
    :meth:`close` d, waiters and newcomers are refused (:class:`Retired`), holders keep their
    slots, and ``drained`` runs when the last one is released. One more waiter than allowed
    is refused at once (:class:`errors.Overloaded`, with when to retry)."""

    def __init__(self, max_active: int, max_queued: int, drained: Callable[[], None] = lambda: None) -> None:
        self.max_active = max(1, max_active)
        self.max_queued = max(0, max_queued)
        self.active = 0
        self.closed = False
        self.drained = drained
        # Each waiter's future is set True when it is given a slot, False when it is refused:
        # not an exception, which would hold its traceback's frames (the request's model
        # among them) in a cycle with the future.
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        self.mean_s = 1.0  # moving average of how long a sequence holds its slot

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.closed:
            raise Retired
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise errors.Overloaded(f"{self.active} sequences running and {len(self._waiters)} waiting, as many as allowed",
                                    max(1, math.ceil(self.mean_s * (len(self._waiters) + 1) / self.max_active)))
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            granted = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()  # granted just as the caller left: pass it on
            elif fut in self._waiters:  # unless a release() since the cancel dropped it and passed the slot on
                self._waiters.remove(fut)
            raise
        if not granted:
            raise Retired

    def release(self, held_s: float | None = None) -> None:
        if held_s is not None:
            self.mean_s = 0.8 * self.mean_s + 0.2 * held_s
        # Over a lowered limit the slot is not passed on: it goes, until the holders are few enough.
        if self.active <= self.max_active and self._grant():
            return  # the slot passed straight to the next waiter
        self.active -= 1
        if self.closed and not self.active:
            self.drained()

    def resize(self, max_active: int, max_queued: int) -> None:
        """New limits: holders keep their slots (over a lowered limit too, until they
        release them), waiters beyond a raised one are let in at once."""
        self.max_active = max(1, max_active)
        self.max_queued = max(0, max_queued)
        while self.active < self.max_active and self._grant():
            self.active += 1

    def _grant(self) -> bool:
        """Give a slot to the first waiter still there; False when there is none."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                return True
        return False

    def close(self) -> None:
        self.closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(False)
        if not self.active:
            self.drained()
