"""Agents' events waiting to be logged in the store, in the order they came.

The replica an agent is connected to logs its joins, losses and recoveries one at a time
on the store's threads, so a stalled database holds none of the hub's paths on the event
loop. While the database stalls they wait here; 5,000 flapping agents during a stall of an
hour would queue millions, each with the agent's whole status. Past ``limit`` waiting, a
loss or recovery is not kept (it is counted, and its pass still runs: the hub has it); a
join always is, since logging it registers the agent's Site, and joins are bounded by the
fleet's enrolments.
"""

from __future__ import annotations

import asyncio

from orchestrator.agents import model

#: How many events may wait: at most a few tens of MB of agents' statuses.
LIMIT = 10_000


class EventBacklog:
    def __init__(self, limit: int | None = None) -> None:
        self.limit = LIMIT if limit is None else limit
        self._queue: asyncio.Queue[model.AgentEvent] = asyncio.Queue()
        self._dropped = 0

    def put(self, event: model.AgentEvent) -> bool:
        """Keep ``event`` to log; False when it is not kept (the backlog is full)."""
        if self._queue.qsize() >= self.limit and event.kind is not model.AgentEventKind.JOINED:
            self._dropped += 1
            return False
        self._queue.put_nowait(event)
        return True

    async def get(self) -> model.AgentEvent:
        return await self._queue.get()

    def qsize(self) -> int:
        """How many events wait."""
        return self._queue.qsize()

    def take_dropped(self) -> int:
        """How many events were not kept since the last call."""
        dropped, self._dropped = self._dropped, 0
        return dropped


__all__ = ["LIMIT", "EventBacklog"]
