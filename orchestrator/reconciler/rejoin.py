"""The time a control plane gives its edge sites' agents to come back before it plans them lost.

A new leader knows no agent yet: they were connected to the old one and come over within
seconds, so its first pass waits for those that serve in the table it inherited
(:func:`await_takeover`). A control plane that starts on its own database knows none
either: they come back on their next reconnect. A pass that planned their sites lost at
once would have each agent unload what it serves the moment it rejoined, so for a while
(``rejoin_s``) an edge site that holds replicas in the stored placements keeps them and is
sent nothing, and the gateway routes to the endpoints it had in the table the control plane
started with (:class:`RejoinWindow`), until its agent has joined and sent its first
heartbeat: the join says nothing of the models it serves. Which sites are still awaited, and when the window
closes, is this module's; the loop asks it at each pass, on hold or not, and for previews
(which only read it), through the :class:`Comeback` it keeps, which also says until when
the control plane gives its agents to join it (failback's ``rejoin_until``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.gateway import routing
from orchestrator.reconciler import snapshot as snap
from orchestrator.store import sqlite as store_mod

log = logging.getLogger(__name__)


@dataclass
class RejoinWindow:
    """Open until ``until`` (the loop's clock); ``remembered``: the table's endpoints by
    site when it opened; ``awaited``: the edge sites not back yet, None until first read
    (each leaves the set for good when its agent has joined and reported, or has joined and
    is gone since: until its first heartbeat what it serves is not known, and its remembered
    endpoints stand for it)."""

    until: float
    remembered: Mapping[str, tuple[routing.Endpoint, ...]]
    awaited: frozenset[str] | None = None
    joined: frozenset[str] = frozenset()  # awaited sites a pass found joined: one whose agent is gone since is not awaited

    @classmethod
    def opened(cls, now: float, rejoin_s: float, endpoints: Iterable[routing.Endpoint]) -> RejoinWindow:
        by_site: dict[str, list[routing.Endpoint]] = {}
        for e in endpoints:
            by_site.setdefault(e.site, []).append(e)
        return cls(now + rejoin_s, {site: tuple(found) for site, found in by_site.items()})

    def is_open(self, now: float) -> bool:
        return now < self.until

    def waiting(self, sites: Iterable[snap.SiteRecord], placements: Iterable[store_mod.PlacementRow],
                agents: Iterable[agent_model.AgentStatus]) -> frozenset[str]:
        """The awaited edge sites whose agents are not back (not joined, or joined and not
        reported yet), whatever the deadline; it only reads, so a preview may ask it as a pass does."""
        awaited = self.awaited
        if awaited is None:
            edge = {r.name for r in sites if r.spec.tier == "edge"}
            awaited = frozenset(row.site for row in placements if row.site in edge)
        present = {a.site: a.reported for a in agents}
        # back: its agent reported; or it joined and is gone since (revoked, forgotten)
        return frozenset(site for site in awaited if not present.get(site, site in self.joined))

    def narrow(self, sites: Iterable[snap.SiteRecord], placements: Iterable[store_mod.PlacementRow],
               agents: Iterable[agent_model.AgentStatus], now: float, on_hold: bool = False) -> frozenset[str] | None:
        """The edge sites a pass still awaits, kept as the window's; None once the window
        has closed (every site back, or its time up: those not back are said in the log).
        ``on_hold``: for a pass on hold, which plans nothing."""
        awaited = self.waiting(sites, placements, agents)
        if awaited and self.is_open(now):
            self.awaited = awaited
            self.joined = self.joined | (awaited & {a.site for a in agents})
            return awaited
        if awaited:
            log.warning("%d edge site(s) that served before this control plane started did not rejoin in time (%s): %s",
                        len(awaited), ", ".join(sorted(awaited)[:5]),
                        "the gateway no longer routes to them; changes are on hold, so they are planned as lost once it ends, "
                        "unless their agents are back by then" if on_hold else "they are planned as lost")
        return None

    def remembered_of(self, rejoining: Iterable[str]) -> dict[str, tuple[routing.Endpoint, ...]]:
        """The endpoints remembered of the sites still ``rejoining``."""
        return {site: self.remembered[site] for site in rejoining if site in self.remembered}


async def await_takeover(hub: hub_mod.AgentHub, expected: frozenset[str], deadline: float, clock: Callable[[], float],
                         stopping: Callable[[], bool], every_s: float = 0.05) -> None:
    """Until every edge site in ``expected`` (those serving in the table a new leader
    inherited) has a healthy agent on this replica that has reported (a join says nothing
    of what it serves: a pass before its first heartbeat would publish a table without its
    endpoints), ``deadline`` passes, or the loop stops; those not back are said in the log,
    and planned as lost."""
    started = clock()
    missing = set(expected)
    while missing and clock() < deadline and not stopping():
        missing = {site for site in missing if not ((a := hub.status(site)) is not None and a.healthy and a.reported)}
        if missing:
            await asyncio.sleep(every_s)
    if missing:
        log.warning("took over without %d edge site(s) after %.1fs (%s): they are planned as lost",
                    len(missing), clock() - started, ", ".join(sorted(missing)[:5]))
    elif expected:
        log.info("took over: all %d serving edge site(s) joined in %.2fs", len(expected), clock() - started)


@dataclass
class Comeback:
    """The time the loop gives its edge sites' agents to come back to it: a new leader's
    first pass waits for those serving in the table it inherited (:meth:`led`), a restarted
    control plane's passes keep awaiting them in its :class:`RejoinWindow` (:meth:`resumed`);
    either way ``joins_until`` (the loop's ``clock``) is until when (failback's ``rejoin_until``)."""

    clock: Callable[[], float]
    takeover: tuple[float, frozenset[str]] | None = None  # a new leader's first pass waits: (until, edge sites to rejoin)
    window: RejoinWindow | None = None  # a restart: the edge sites awaited, and until when
    joins_until: float = 0.0

    def led(self, takeover_s: float, endpoints: Iterable[routing.Endpoint]) -> None:
        """A new term: its first pass waits (at most ``takeover_s``) for the edge sites that
        serve in the inherited table's ``endpoints``."""
        now = self.clock()
        self.takeover = (now + takeover_s, frozenset(e.site for e in endpoints if e.tier == "edge" and e.healthy)) if takeover_s > 0 else None
        self.joins_until = now + takeover_s

    def resumed(self, rejoin_s: float, endpoints: Iterable[routing.Endpoint]) -> None:
        """A start on its own database: the window for its edge sites to rejoin opens."""
        now = self.clock()
        self.window = RejoinWindow.opened(now, rejoin_s, endpoints)
        self.joins_until = now + rejoin_s

    @property
    def rejoining(self) -> bool:
        """Whether the window since :meth:`resumed` has not been closed by a pass yet."""
        return self.window is not None

    def is_open(self) -> bool:
        """Whether the window since :meth:`resumed` for edge sites to rejoin is still open."""
        return self.window is not None and self.window.is_open(self.clock())

    def awaited(self, sites: Iterable[snap.SiteRecord], placements: Iterable[store_mod.PlacementRow],
                agents: Iterable[agent_model.AgentStatus]) -> frozenset[str]:
        """The edge sites awaited since :meth:`resumed` whose agents are not back, whatever the
        deadline; it only reads, so a preview may ask it as a pass does."""
        return self.window.waiting(sites, placements, agents) if self.window is not None else frozenset()

    def narrow(self, sites: Iterable[snap.SiteRecord], placements: Iterable[store_mod.PlacementRow],
               agents: Iterable[agent_model.AgentStatus], on_hold: bool = False) -> frozenset[str]:
        """The edge sites still awaited since :meth:`resumed`; the window is closed once none
        is or its time is up. ``on_hold``: for a pass on hold, which plans nothing."""
        awaited = self.window.narrow(sites, placements, agents, self.clock(), on_hold) if self.window is not None else None
        if awaited is None:
            self.window = None
        return awaited or frozenset()

    def remembered(self, rejoining: frozenset[str]) -> dict[str, tuple[routing.Endpoint, ...]]:
        """The endpoints the table had of the sites still ``rejoining`` when the window opened."""
        return self.window.remembered_of(rejoining) if self.window is not None else {}

    async def taken_over(self, hub: hub_mod.AgentHub, stopping: Callable[[], bool]) -> None:
        """The wait of a new term's first pass (:func:`await_takeover`), once."""
        if self.takeover is not None:
            (deadline, expected), self.takeover = self.takeover, None
            await await_takeover(hub, expected, deadline, self.clock, stopping=stopping)
