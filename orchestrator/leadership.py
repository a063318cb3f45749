"""Which control-plane replica reconciles: a lease in the shared store.

Why a lease with a fencing token: every replica serves the API, the gateway and agents,
but two reconcilers would fight over placements. The leader renews a lease in the store
every third of its time to live; a replica that cannot renew stops reconciling before
the lease can have run out (``ttl - margin``, counted from the moment it asked, so a
slow answer only shortens its term), and a replica that takes the lease over gets a
larger fencing token. The reconciler's writes of intent carry that token and the store
refuses one whose token is no longer current, so a leader cut off from the database
(paused, partitioned, slow) cannot land a late decision over the new leader's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.store import StateStore
from orchestrator.store import sqlite as store_mod

log = logging.getLogger(__name__)

LEASE = "leader"


@dataclass
class Elector:
    """Campaigns for the lease until cancelled; ``on_gain(lease)`` and ``on_lose(reason)``
    are called on the event loop, in turn (never two gains in a row)."""

    store: StateStore
    holder: str
    ttl_s: float
    on_gain: Callable[[store_mod.Lease], None]
    on_lose: Callable[[str], None]
    clock: Callable[[], float] = time.monotonic
    lease: store_mod.Lease | None = None  # held now (as this replica knows it)
    changes: int = 0  # times this replica gained or lost the lease
    _deadline: float = 0.0
    _attempt: tuple[float, asyncio.Future[store_mod.Lease | None]] | None = None  # (asked at, the call)

    @property
    def margin_s(self) -> float:
        return self.ttl_s / 5

    @property
    def leading(self) -> bool:
        return self.lease is not None

    async def run(self) -> None:
        while True:
            # One call to the store at a time: one that hangs (the database unreachable) is
            # waited for again rather than joined by more threads. Ahead of the store's queue:
            # what a stall left queued there must not outlast the lease.
            if self._attempt is None or self._attempt[1].done():
                self._attempt = (self.clock(), asyncio.ensure_future(
                    self.store.run_first(self.store.acquire_lease, LEASE, self.holder, self.ttl_s)))
                # retrieved even when the campaign ends first: a stop leaves it to fail as the store closes
                self._attempt[1].add_done_callback(lambda done: done.cancelled() or done.exception())
            asked, attempt = self._attempt
            # a renewal that has not answered by the deadline is a loss, not a wait
            timeout = max(0.01, self._deadline - self.clock()) if self.lease is not None else self.ttl_s
            # asyncio.wait neither cancels the call nor, unlike wait_for on Python 3.11, swallows a
            # cancel of this task that comes as the call answers (the campaign would never end)
            await asyncio.wait((attempt,), timeout=timeout)
            lease, reason = None, "the store did not grant the lease: no answer in time"
            if attempt.done():
                self._attempt = None
                if attempt.exception() is not None:  # the store unreachable or failing: the campaign goes on
                    reason = f"the store did not grant the lease: {attempt.exception() or 'no answer'}"
                else:
                    lease, reason = attempt.result(), "another replica holds the lease"
            if lease is not None and asked + lease.remaining_s - self.margin_s <= self.clock():
                lease, reason = None, "the store granted the lease too late to lead on it"  # ask again now
            if lease is not None:
                self._deadline = asked + lease.remaining_s - self.margin_s
                if self.lease is None:
                    self.lease = lease
                    self.changes += 1
                    log.info("leading with fencing token %d (lease %.1fs)", lease.token, self.ttl_s)
                    self.on_gain(lease)
                self.lease = lease
            elif self.lease is not None:
                self._lose(reason)
            await self._sleep(asked + self.ttl_s / 3)

    async def _sleep(self, until: float) -> None:
        """Until the next attempt; a leader whose deadline comes first steps down then."""
        while True:
            now = self.clock()
            if self.lease is not None and now >= self._deadline:
                self._lose("the lease ran out before it was renewed")
            if now >= until:
                return
            await asyncio.sleep(max(0.0, (min(until, self._deadline) if self.lease is not None else until) - now))

    def _lose(self, reason: str) -> None:
        self.lease = None
        self.changes += 1
        log.warning("no longer leading: %s", reason)
        self.on_lose(reason)

    def release(self) -> None:
        """Give the lease up (a clean stop), so another replica takes over at once."""
        lease, self.lease = self.lease, None
        if lease is not None:
            with contextlib.suppress(store_mod.StoreError):  # unreachable: the lease runs out on its own
                self.store.release_lease(lease)
