"""How a replica follows what the other replicas on its database write.

Several control-plane replicas share one PostgreSQL database; each acts on some of the
others' writes: the leader on applies made through a follower and on wakes followers
logged, a follower on the relay address and the endpoint table the leader published,
every replica on agents revoked through another, a follower on Sites deleted (their lost
agents are forgotten, as the leader's pass forgets its own). A write is read when the store's change
feed tells of it (within milliseconds of the commit) and on a poll in case a notification
was lost, always in a worker thread: the event loop serves the API, the gateway and the
agents, and a stalled database must not hold them. Apart from the server (which wires it,
and leads or follows by the lease, :mod:`orchestrator.leadership`) because it is one idea:
what a replica reads of the others, and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator import catalog, leadership
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.agents import relay
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import wire
from orchestrator.reconciler import loop as reconciler_mod
from orchestrator.reconciler import artifact_use, delivery
from orchestrator.store import sqlite as store_mod

log = logging.getLogger("edgeplane")

WAKE_ACTION = "wake-requested"  # the event a follower logs for a request that found a model scaled to zero
LEADER_KEY = "leader"  # published by each new leader: where followers relay their agents, and the secret
#: What other replicas' writes wake the store loop for (see the store's ``_changed``): the
#: leader, applies and followers' wakes (Model events); a follower, the leader's relay
#: address and endpoint table; either, agents revoked (Site events).
REVOCATIONS = "events:Site"
LEADER_READS = ("resources", "events:Model", REVOCATIONS)
FOLLOWER_READS = (f"published:{LEADER_KEY}", f"published:{wire.PUBLISHED_KEY}", REVOCATIONS)


@dataclass
class StoreFollower:
    """One replica's reads of the others' writes, and what it does with them."""

    store: store_mod.Store
    elector: leadership.Elector
    hub: hub_mod.AgentHub
    table: endpoints_mod.EndpointTable
    reconciler: reconciler_mod.Reconciler
    relay_client: relay.RelayClient | None
    publish_leader: Callable[[store_mod.Lease], None]  # in a worker thread: this leader's relay address, under its lease
    published_under: Callable[[], int | None]  # the fencing token the relay address was last published under
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    # what the versions in use were last judged by: (resourceVersion, sets relayed here, versions checked)
    _versions_judged: tuple[int, tuple[tuple[str, agent_model.AssignmentSet], ...], frozenset[str]] | None = None

    def told(self, what: str) -> None:
        """Another replica's write committed (the store's change feed, on the loop): wake
        :meth:`run` when it is one this replica reads in its role."""
        if what == "*" or what in (LEADER_READS if self.elector.leading else FOLLOWER_READS):
            self._changed.set()

    async def run(self, every_s: float) -> None:
        """At each change another replica makes that this one reads (the store's change
        feed, within milliseconds of the commit), and every ``every_s`` (``--store-poll``)
        in case a notification was lost: on the leader, a change of the store's resourceVersion wakes
        the reconciler (an apply made through a follower reaches no reconciler) and wakes
        logged by followers reach its table; on a follower, the endpoint table and
        cascades the leader published replace this gateway's, and artifact versions nothing
        uses any more are forgotten.

        A table read is the leader's word on this replica's agents lost more than the agent's
        loss time (its own heartbeat interval × missed heartbeats) before the read: by then the leader heard of the loss (relayed within a
        second; with the relay down, it declares them lost itself once their heartbeats stop
        coming) and wrote a table that lists them down, so a later one that lists them healthy
        saw them back (rejoined elsewhere). The table held is taken again for such a mark when
        no newer one comes: the leader's down-then-healthy tables may both have come between
        two reads here."""
        seen, table_version, leader_version = -1, 0, 0
        followed: wire.TableContents | None = None  # the leader's table last applied here
        wakes_seen: int | None = None  # the last event read for followers' wakes (leading only)
        revocations_seen: int | None = None  # the last Site event read for revoked agents
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await self._changed.wait()
            self._changed.clear()
            try:
                revocations_seen = await read_revocations(self.store, self.hub, revocations_seen)
                if self.elector.leading:
                    table_version = leader_version = 0  # read again whenever this replica follows again
                    followed = None
                    lease = self.reconciler.lease
                    if lease is not None and self.published_under() != lease.token:
                        await self.store.run(self.publish_leader, lease)
                    if wakes_seen is None:  # wakes left before this replica led were for the old leader
                        elected = await self.store.run(self.store.recent_events, "ControlPlane", "leader", 1)
                        wakes_seen = elected[-1].id if elected else 0
                    wakes_seen = await self._read_wakes(wakes_seen)
                    version = await self.store.run(self.store.resource_version)
                    if version != seen:
                        seen = version
                        self.reconciler.applied(f"store changed (resourceVersion {version})")
                    continue
                wakes_seen = None
                await self._forget_lost_agents_of_deleted_sites()
                leader = await self.store.run(self.store.published, LEADER_KEY, leader_version)
                if leader is not None and not self.elector.leading and self.relay_client is not None:
                    leader_version, body = leader
                    self.relay_client.follow(relay.Leader.from_json(body))  # ValueError: logged below, read again when it changes
                heard_before = self._heard_before()
                got = await self.store.run(self.store.published, wire.PUBLISHED_KEY, table_version)
                if got is not None and not self.elector.leading:
                    table_version, body = got
                    followed = wire.contents_from_json(json.loads(body))  # all or nothing
                    wire.apply(self.table, followed, heard_before)
                elif followed is not None and self.table.marked_before(heard_before):
                    wire.apply(self.table, followed, heard_before)  # the table held is the leader's word on them by now
            except store_mod.StoreError as exc:
                log.warning("following the store: %s", exc)
            except ValueError as exc:  # WireError, or not JSON: a table this version cannot read
                log.warning("what the leader published (its endpoint table or relay address) is unreadable here: %s", exc)
            if self.elector.leading:
                continue
            try:  # apart: a Models read that fails holds up neither the table nor the relay address
                await self._forget_unused_versions()
            except store_mod.StoreError as exc:
                log.warning("following the store (artifact versions in use): %s", exc)

    def _heard_before(self) -> Callable[[str], float]:
        """Per URL, when a loss marked here must have been marked for the leader to have heard
        of it by now: its agent's loss time before now, by the agent's own heartbeat interval
        (an agent may be started with another than the hub's default, and the leader declares
        it lost by that one), or by the hub's default for a URL no agent here has."""
        now, missed = self.table.clock(), self.hub.missed_heartbeats
        own: dict[str, float] = {}

        def heard_before(url: str) -> float:
            if not own:  # asked only while a loss is marked: the agents are listed then, once per read
                own.update((a.endpoint_url.rstrip("/"), now - a.heartbeat_interval * missed) for a in self.hub.snapshot())
            return own.get(url, now - self.hub.heartbeat_interval * missed)
        return heard_before

    async def _forget_lost_agents_of_deleted_sites(self) -> None:
        """A follower forgets its lost agents whose Site is no longer stored, as the leader's
        pass forgets its own (``ForgetAgent``): no pass runs here, and the record would stay
        in this replica's ``edgeplane_agents{health="unhealthy"}`` for good. Connected ones
        are kept, serving nothing, until they leave; a lost one only once the empty set the
        leader relays has reached it (``delivery.agents_to_forget``). Read at a Site's deletion
        (its event wakes this loop) and at each poll, for an agent lost after its Site was deleted."""
        lost = [a for a in self.hub.snapshot() if not a.healthy and a.via is None]
        if not lost:
            return
        stored = await self.store.run(lambda: {r.name for r in self.store.list("Site")})
        sent = {a.site: got.assignments for a in lost if (got := self.hub.assignments(a.site)) is not None}
        for site in delivery.agents_to_forget(lost, stored, sent):
            self.hub.forget_if_lost(site)

    async def _forget_unused_versions(self) -> None:
        """A follower checks artifact versions too (``describe`` of a Model does) but runs no
        pass, whose end forgets on the leader the versions nothing uses: forgotten here at
        each poll, as there, those no stored Model and no set relayed to this replica's
        agents names. The Models are read and parsed only while the catalog holds a version,
        and only when something changed since the last time: a stored object (the store's
        resourceVersion), a set relayed here, or the versions checked."""
        artifacts = self.reconciler.artifacts
        if not (checked := artifacts.checked()):
            return
        sets = tuple((site, got) for site in sorted(self.hub.sites()) if (got := self.hub.assignments(site)) is not None)
        stored = await self.store.run(self.store.resource_version)  # read before the Models: a later write is seen next time
        if (stored, sets, checked) == self._versions_judged:
            return
        models, _ = await self.store.run(lambda: catalog.read_each(self.store.list("Model"), catalog.parse_model))
        artifacts.retain(artifact_use.live(models, [got.assignments for _, got in sets], {}))
        self._versions_judged = (stored, sets, artifacts.checked())

    async def _read_wakes(self, since: int) -> int:
        """Followers' wakes logged after event ``since`` reach this (leading) replica's table."""
        events = await self.store.run(self.store.events, since, 1000, "Model")
        for model in sorted({e.name for e in events if e.action == WAKE_ACTION}):
            self.table.wake(model)
        return events[-1].id if events else since


async def read_revocations(store: store_mod.Store, hub: hub_mod.AgentHub, since: int | None) -> int:
    """Agents revoked through any replica after Site event ``since`` (None: from now on) are
    dropped here too: the one that took the request drops only the agents connected to it.
    A site enrolled again since (a new agent joined with a bootstrap token made after the
    revocation) is no longer revoked, yet the agent held here may be the revoked one: it is
    dropped unless it is the site's new identity. Gives back the last Site event read."""
    if since is None:
        newest = await store.run(store.recent_events, "Site", None, 1)
        return newest[-1].id if newest else 0
    while events := await store.run(store.events, since, 1000, "Site"):
        since = events[-1].id
        for site in sorted({e.name for e in events if e.action == "agent-revoked"}):
            revoked, current = await store.run(_identity_of, store, site)
            if revoked:
                hub.revoke(site)
            else:
                hub.revoked_and_enrolled(site, current)
    return since


def _identity_of(store: store_mod.Store, site: str) -> tuple[bool, str]:
    """Whether ``site`` is revoked, and its agent's id. Read in that order: a site enrolled again
    between the two reads gives the new id, never the revoked one as if it were current."""
    revoked = store.agent_revoked_at(site) is not None
    return revoked, store.agent_of(site)
