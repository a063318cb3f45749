"""Agents' events waiting to be logged in the store, in the order they came.

The replica an agent is connected to logs its joins, losses and recoveries on the store's
threads, what waits together in one transaction (:meth:`EventBacklog.get_batch`: a fleet
rejoining a restarted control plane is thousands of joins in a second), so a stalled
database holds none of the hub's paths on the event loop. While the database stalls they wait here; 5,000 flapping agents during a stall of an
hour would queue millions, each with the agent's whole status. Past ``limit`` waiting, a
site's loss or recovery takes the place of the one of that site still waiting, which is
counted and not logged: the log then ends on each agent's latest state (dropping the newer
one instead would leave an agent that recovered logged as lost), and what waits is bounded
by the limit plus one event per site; the pass such an event calls for runs at once, not
behind the writes waiting before it. A join is always kept, since logging it registers
the agent's Site, and joins are bounded by the fleet's enrolments.

The count of events not logged is reported (:meth:`EventBacklog.take_dropped`) once the
backlog has drained below half its limit, or every ``report_every_s`` while it has not: a
fleet that flaps on while the store lags may never let it drain to nothing.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from orchestrator.agents import model

#: How many events may wait before a site's newer loss or recovery replaces its older one:
#: at most a few tens of MB of agents' statuses.
LIMIT = 10_000
#: How often events not logged are reported while the backlog stays over half its limit.
REPORT_EVERY_S = 60.0


class _Entry:
    """A waiting event; ``event`` None once a newer one of its site took its place."""

    __slots__ = ("event",)

    def __init__(self, event: model.AgentEvent) -> None:
        self.event: model.AgentEvent | None = event


class EventBacklog:
    def __init__(self, limit: int | None = None, *, clock: Callable[[], float] = time.monotonic,
                 report_every_s: float = REPORT_EVERY_S) -> None:
        self.limit = LIMIT if limit is None else limit
        self.clock, self.report_every_s = clock, report_every_s
        self._entries: collections.deque[_Entry] = collections.deque()
        self._waiting = 0  # entries whose event is still there
        self._blanked = 0  # entries whose event a newer one replaced, still in _entries
        self._latest: dict[str, _Entry] = {}  # by site: its newest loss or recovery waiting
        self._arrived = asyncio.Event()
        self._dropped = 0
        self._first_dropped = 0.0  # when the first event not reported yet was dropped

    def put(self, event: model.AgentEvent) -> bool:
        """Keep ``event`` to log; past the limit, a loss or recovery in the place of its site's
        one still waiting, if any. False for a loss or recovery kept past the limit: the pass
        it calls for should not wait until it is logged, behind that many writes (a join's
        does: the pass must see the Site its logging registers)."""
        entry = _Entry(event)
        passes_after = True
        if event.kind is not model.AgentEventKind.JOINED:
            passes_after = self._waiting < self.limit
            older = self._latest.get(event.site)
            if older is not None and not passes_after:
                older.event = None
                self._waiting -= 1
                self._blanked += 1
                if not self._dropped:
                    self._first_dropped = self.clock()
                self._dropped += 1
            self._latest[event.site] = entry
        self._entries.append(entry)
        self._waiting += 1
        if self._blanked > max(self.limit, self._waiting):
            # A stall that outlasts get() would otherwise keep one blank entry per event
            # replaced; past as many blanks as waiting events, dropping them costs no more
            # than the puts that made them.
            self._entries = collections.deque(e for e in self._entries if e.event is not None)
            self._blanked = 0
        self._arrived.set()
        return passes_after

    async def get(self) -> model.AgentEvent:
        return (await self.get_batch(1))[0]

    async def get_batch(self, most: int) -> list[model.AgentEvent]:
        """The oldest events waiting, in order, at most ``most`` of them: once one waits,
        whatever else waits then, without waiting for more."""
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[model.AgentEvent] = []
        while self._entries and len(batch) < most:
            entry = self._entries.popleft()
            if (event := entry.event) is None:  # a newer one of its site took its place
                self._blanked -= 1
                continue
            self._waiting -= 1
            if self._latest.get(event.site) is entry:
                del self._latest[event.site]
            batch.append(event)
        return batch

    def qsize(self) -> int:
        """How many events wait."""
        return self._waiting

    def take_dropped(self) -> int:
        """How many events were not logged since the last report, when it is time to report
        them (the backlog is below half its limit, or the first of them is ``report_every_s``
        old); else 0."""
        if not self._dropped:
            return 0
        if self._waiting >= self.limit // 2 and self.clock() - self._first_dropped < self.report_every_s:
            return 0
        dropped, self._dropped = self._dropped, 0
        return dropped


__all__ = ["LIMIT", "REPORT_EVERY_S", "EventBacklog"]
