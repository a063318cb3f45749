"""The agents other replicas relay to this one, and what a replica that relays its own is told.

Why apart from the hub's inventory: the rule of one live agent per site holds across
control-plane replicas, and that takes two roles the hub's own agents never need. The
leader holds agents that joined followers as *relayed* records (``via`` names the relaying
replica) and answers a follower's claim of a site; a follower drops an agent the leader
refused and refuses the site, with the leader's reason, until the holder could have been
lost. Both act on the hub's records, on its event loop: :class:`RelayedAgents` is mixed
into :class:`~orchestrator.agents.hub.AgentHub`, whose public methods these are. The relay
stream itself is :mod:`orchestrator.agents.relay`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from orchestrator.agents import applications, errors, model
from orchestrator.agents.records import Record, SiteChannel

log = logging.getLogger("orchestrator.agents.hub")  # the hub's own: its agents' story in one log


class RelayTap(Protocol):
    """What a replica that relays its agents to the leader is told (see ``AgentHub.tap``)."""

    def touched(self, site: str) -> None:
        """``site``'s agent joined or was forgotten here."""

    def beat(self, site: str, agent_id: str, message: object) -> None:
        """A heartbeat was applied; ``message`` is the protobuf message as received."""

    def disconnected(self, site: str, agent_id: str) -> None:
        """The agent's heartbeat stream here ended (see :meth:`AgentHub.heartbeats_ended`)."""

    async def claim(self, site: str) -> None:
        """Returns once the leader says no live agent holds ``site``: SiteTaken when one does,
        Unavailable when the leader cannot be asked now."""


class RelayOutbox(Protocol):
    """One relay stream on the leader, as the hub sees it: where its sites' assignment sets
    go, and its agents the relaying replica is to drop."""

    def push(self, site: str, assignment_set: model.AssignmentSet) -> None: ...

    def refuse(self, site: str, agent_id: str, message: str, holder: str = "", retry_after_s: float = 0.0) -> None: ...


class RelayedAgents:
    """The hub's relayed agents (the leader's side) and what a relaying replica is told."""

    if TYPE_CHECKING:  # the hub's, which these act on
        _records: dict[str, Record]
        _clock: Callable[[], float]

        def _refuse_if_held(self, site: str, now: float, agent_id: str | None = None) -> None: ...
        def _new_record(self, application: model.JoinApplication, agent_id: str, now: float, *, joined_at: float,
                        via: str | None = None) -> Record: ...
        def _channel(self, site: str) -> SiteChannel: ...
        def _rethink_sweep(self, record: Record) -> None: ...
        def _emit(self, kind: model.AgentEventKind, record: Record, reason: str) -> model.AgentEvent: ...
        def _ended(self, record: Record) -> None: ...
        def record_heartbeat(self, site: str, agent_id: str, beat: model.Heartbeat) -> None: ...
        def forget(self, site: str) -> None: ...
        def assignments(self, site: str) -> model.AssignmentSet | None: ...
        def set_assignments(self, site: str, assignments: list[model.Assignment], version: int, *, replacing: bool = False) -> None: ...

    def __init__(self) -> None:
        self.tap: RelayTap | None = None  # set while this replica relays its agents to a leader
        self._relays: dict[str, RelayOutbox] = {}  # relaying replica -> its current stream
        # site -> (holder, why, until): sites the leader said another replica's agent holds
        self._held_elsewhere: dict[str, tuple[str, str, float]] = {}
        # site -> the agent ids revoked here: a relay that has not heard yet must not bring one back.
        # Kept when another agent joins the site (a new identity, not theirs), and by
        # revocations after it, so a stale report of any of them stays refused.
        self._revoked: dict[str, set[str]] = {}

    # -- relayed agents (the leader's side) ------------------------------------------

    def attach_relay(self, via: str, outbox: RelayOutbox) -> None:
        """Replica ``via`` relays agents from now on; their assignment sets go to ``outbox``
        (its newest stream: one it opened again replaces the last)."""
        self._relays[via] = outbox

    def detach_relay(self, via: str, outbox: RelayOutbox) -> None:
        """``via``'s stream ``outbox`` ended: its sites' sets wait here (each site's latest)
        until their agents are reported again, through a relay or by joining here, or are
        lost in the usual time. A newer stream of ``via``'s, attached before this one's end
        was seen, stays."""
        if self._relays.get(via) is outbox:
            del self._relays[via]

    def relays(self) -> list[str]:
        """The replicas that relay their agents to this hub now."""
        return sorted(self._relays)

    def admit_relayed(self, application: model.JoinApplication, agent_id: str, via: str) -> None:
        """An agent that joined replica ``via``, which checked its credential. The site rule
        holds across replicas: SiteTaken while another live agent holds the site, here or
        through another relay (``via`` then drops the agent, see :meth:`refused_by_leader`).
        NotAuthenticated for an agent revoked here (``AgentHub.revoke``): ``via`` drops it too."""
        applications.check(application)
        site = application.site
        if agent_id in self._revoked.get(site, ()):
            raise errors.NotAuthenticated(f"agent {agent_id} of site {site!r} was revoked")
        now = self._clock()
        self._refuse_if_held(site, now, agent_id)
        current = self._records.get(site)
        joined_at = current.joined_at if current is not None and current.agent_id == agent_id else now
        if current is not None and current.via not in (None, via) and current.agent_id == agent_id:
            self._moved_off(current, now, f"replica {via}")
        record = self._new_record(application, agent_id, now, joined_at=joined_at, via=via)
        if current is not None and current.agent_id == agent_id and current.live(now):
            record.continue_from(current)  # a new session of a live agent: no break
        self._records[site] = record
        self._rethink_sweep(record)
        self._channel(site).notify()  # the agent's stream here, if it moved away, ends
        if current is not None and current.agent_id == agent_id and current.live(now):
            self._emit(model.AgentEventKind.RECONNECTED, record, f"reconnected through replica {via}")
        else:
            log.info("agent %s joined site %s through replica %s", agent_id, site, via)
            self._emit(model.AgentEventKind.JOINED, record, f"agent joined through replica {via}")
        latest = self._channel(site).latest
        if latest is not None and (outbox := self._relays.get(via)) is not None:
            outbox.push(site, latest)

    def _moved_off(self, record: Record, now: float, to: str) -> None:
        """``record``'s agent, relayed by ``record.via``, now connects ``to`` another replica:
        ``record.via`` is told to drop it (the agent's stream there has ended or will), or its
        sweep would find it lost, log a loss that no recovery follows and count it unhealthy
        for as long as the Site exists. Other agents' joins for the site are refused there
        until it could be lost. Not told while its relay stream is down: it learns nothing then."""
        if (outbox := self._relays.get(record.via)) is not None:
            outbox.refuse(record.site, record.agent_id, f"agent {record.agent_id} moved to {to}", record.agent_id,
                          max(0.0, record.deadline - now))

    def check_claim(self, site: str) -> None:
        """A relaying replica asks whether a new agent may take ``site``: SiteTaken while a live
        agent holds it, here or through any relay, or a join here is writing its credential."""
        self._refuse_if_held(site, self._clock())

    def relayed_heartbeat(self, site: str, agent_id: str, beat: model.Heartbeat, via: str) -> bool:
        """Apply heartbeats relayed by ``via``; False when this hub does not hold that agent
        through ``via`` (the relay then reports it whole)."""
        record = self._records.get(site)
        if record is None or record.agent_id != agent_id or record.via != via:
            return False
        self.record_heartbeat(site, agent_id, beat)
        return True

    def relayed_disconnected(self, site: str, agent_id: str, via: str) -> None:
        """Replica ``via`` saw the heartbeat stream of its agent end (see ``AgentHub.heartbeats_ended``)."""
        record = self._records.get(site)
        if record is not None and record.agent_id == agent_id and record.via == via and record.healthy:
            self._ended(record)

    def relayed_gone(self, site: str, agent_id: str, via: str) -> None:
        record = self._records.get(site)
        if record is not None and record.agent_id == agent_id and record.via == via:
            self.forget(site)

    def drop_relayed(self) -> None:
        """Forget every relayed agent (this replica stopped leading: the relays move on)."""
        for site in [s for s, r in self._records.items() if r.via is not None]:
            self.forget(site)

    def relayed(self) -> int:
        return sum(1 for r in self._records.values() if r.via is not None)

    # -- a relaying replica's side ---------------------------------------------------

    def refused_by_leader(self, site: str, agent_id: str, holder: str, message: str, retry_after_s: float) -> None:
        """The leader refused our agent of ``site``: live agent ``holder`` holds it (connected
        to the leader or relayed by another replica). The agent is dropped (its streams end and it joins again), and joins
        of other agents for the site are refused here with the leader's reason until the
        holder could have been lost. No ``holder``: the agent's identity was revoked; it is
        dropped, and its credential no longer joins."""
        if holder:
            self._held_elsewhere[site] = (holder, message, self._clock() + max(0.0, retry_after_s))
        record = self._records.get(site)
        if record is not None and record.agent_id == agent_id:
            log.warning("agent %s dropped from site %s: %s", agent_id, site, message)
            self.forget(site)

    def sites(self) -> list[str]:
        return list(self._records)

    def accept_assignments(self, site: str, assignments: list[model.Assignment], version: int) -> None:
        """A set the leader sent through the relay: kept whenever it differs from the one
        held, newer or not. The relay brings the leader's sets in the order it made them, each
        its latest for the site, and a leader restarted on a store restored from a backup
        numbers its sets below those a follower holds from before it: refusing them would
        leave the agent on a set no deployment asks for."""
        latest = self.assignments(site)
        if latest is None or (latest.version, latest.assignments) != (version, tuple(assignments)):
            self.set_assignments(site, assignments, version, replacing=True)

    def _refuse_if_held_elsewhere(self, site: str, now: float, agent_id: str | None) -> None:
        """SiteTaken while the leader said another replica's agent holds ``site``: only while
        relaying to the leader that said so (a replica that leads decides itself)."""
        held = self._held_elsewhere.get(site) if self.tap is not None else None
        if held is not None:
            holder, message, until = held
            if now >= until:
                del self._held_elsewhere[site]
            elif holder != agent_id:
                raise errors.SiteTaken(message, holder=holder, retry_after_s=until - now)
