"""What the agent hub keeps for each site: its agent's record and its assignment channel.

Why apart from the hub: the hub decides who holds a site, applies heartbeats and sweeps the
silent; these are the plain state it decides on, read by its relayed side
(:mod:`orchestrator.agents.relayed`) too. A :class:`Record` is mutable and only the hub's
event loop touches it; :meth:`Record.status` is the view everything else is given.
A :class:`SiteChannel` holds a site's latest assignment set and wakes its watchers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.agents import model


@dataclass
class Record:
    """Mutable state of one agent; only the hub touches it."""

    site: str
    agent_id: str
    endpoint_url: str
    location: model.Location
    labels: object  # Mapping[str, str], frozen
    agent_version: str
    joined_at: float
    heartbeat_interval: float
    capacity: model.Capacity
    last_heartbeat: float
    deadline: float
    healthy: bool = True
    inflight: int = 0
    cpu_percent: float = 0.0
    memory_available_bytes: int = 0
    assignment_version: int = 0
    models: dict[str, model.ModelState] = field(default_factory=dict)
    model_load: Mapping[str, model.ModelLoad] = field(default_factory=dict)
    via: str | None = None  # the replica that relays this agent; None: connected here
    quiet_s: float = 0.0  # the silence its last heartbeat announced (a generative model's load)
    streams: int = 0  # its heartbeat streams open on this hub
    broke_at: float | None = None  # when its last heartbeat stream here (or at its relay) ended, if none came since
    opened_at: float | None = None  # when a heartbeat stream of it opened here since its last heartbeat, a sign of life
    heard: bool = False  # a heartbeat (or, relayed, its state) came since this record was made
    # Since when the site's agent has been healthy without a break: its join, or its heartbeats'
    # return after it was lost; a live agent's new session (a dropped connection) keeps it.
    healthy_since: float = 0.0
    started_unix_ms: int = 0  # when the agent process started, as it said at its join (0: not said)
    checks_tokens: bool = False  # its serving ports check API tokens, as it said at its join

    def continue_from(self, previous: Record) -> None:
        """This record is a new session of ``previous``'s agent, which was live: its health
        had no break, and when the same process opened it (the same start time at its join)
        the model states it last reported stand until its first heartbeat on the new session
        reports them again. A join says nothing of them, and a pass run in between would
        otherwise take the site to serve nothing, and publish a table without its endpoints."""
        self.healthy_since = previous.healthy_since
        if self.started_unix_ms == previous.started_unix_ms:
            self.models = dict(previous.models)
            self.model_load = previous.model_load

    def live(self, now: float) -> bool:
        """Healthy and not past its deadline: it holds its site against other agents."""
        return self.healthy and now <= self.deadline

    def status(self) -> model.AgentStatus:
        return model.AgentStatus(
            site=self.site,
            agent_id=self.agent_id,
            endpoint_url=self.endpoint_url,
            healthy=self.healthy,
            last_heartbeat=self.last_heartbeat,
            joined_at=self.joined_at,
            location=self.location,
            labels=self.labels,  # type: ignore[arg-type]
            agent_version=self.agent_version,
            capacity=self.capacity,
            providers=self.capacity.execution_providers,
            inflight=self.inflight,
            cpu_percent=self.cpu_percent,
            memory_available_bytes=self.memory_available_bytes,
            models=dict(self.models),
            assignment_version=self.assignment_version,
            heartbeat_interval=self.heartbeat_interval,
            model_load=self.model_load,
            via=self.via,
            quiet_until=self.last_heartbeat + self.quiet_s if self.quiet_s else 0.0,
            healthy_since=self.healthy_since,
            started_unix_ms=self.started_unix_ms,
            checks_tokens=self.checks_tokens,
        )


class SiteChannel:
    """Latest assignment set of a site and a wake-up for its watchers (latest wins). The hub
    keeps one while the site has an agent here or has been given a set since its last agent
    was forgotten: over months of nodes coming and going (a DaemonSet names a site per node)
    a channel per site ever seen would be a leak."""

    def __init__(self) -> None:
        self.latest: model.AssignmentSet | None = None
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """Take this *before* reading ``latest``: it is set by the next ``notify``."""
        return self._changed
