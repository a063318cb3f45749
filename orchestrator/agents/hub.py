"""The live inventory of edge agents and the desired assignments for their sites.

Why a hub and not the store: heartbeats arrive thousands of times a second and must cost
O(1) each, so they update an in-memory record and never touch disk; only *changes* that
matter to placement (an agent joined, was lost, came back, its capacity or model states
moved) reach the rest of the control plane, through the injected ``on_change`` callback.
What it keeps per site (an agent's record, the site's assignment channel) is
:mod:`orchestrator.agents.records`'.

Site identity rule: a site is held by at most one agent at a time. A Join for a site
whose current agent is still healthy (it has not missed ``missed_heartbeats`` heartbeats)
is refused with :class:`SiteTaken` unless it comes from that same agent (same agent id
with a valid credential, as after a restart). Once the holder is marked unhealthy, a new
agent presenting a valid bootstrap token or the site's credential takes the site over.

Several control-plane replicas: an agent may join any of them. A replica that does not
lead relays its agents to the leader (:mod:`orchestrator.agents.relay`); the leader's hub
holds them as *relayed* records (``via`` names the relaying replica,
:mod:`orchestrator.agents.relayed`), which heartbeats, health and placement treat like its
own, and whose assignment sets it hands to that relay.
A relaying replica gives a site a new agent identity only once the leader says no live
agent holds it (:meth:`relayed.RelayTap.claim`): its credential, in the store the replicas share,
would replace the holder's.

Everything here runs on one event loop thread: call ``set_assignments`` from it. Proving an
agent's identity, which may wait on the database, is :mod:`orchestrator.agents.identity`'s,
in worker threads (joins by :meth:`AgentHub.join_async`, stream opens, enrolments).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import applications, auth, errors, identity, model, records, relayed

log = logging.getLogger(__name__)

class LagHistogram:
    """Fixed log-spaced buckets of heartbeat lag (ms): O(1) per observation, no allocation."""

    BOUNDS_MS = tuple(round(0.5 * 1.25**i, 3) for i in range(64))  # 0.5 ms .. ~800 s

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS_MS) + 1)
        self.total = 0

    def observe(self, lag_ms: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS_MS, lag_ms)] += 1
        self.total += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (ms); 0 when empty."""
        if not self.total:
            return 0.0
        rank = q * self.total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return self.BOUNDS_MS[i] if i < len(self.BOUNDS_MS) else float("inf")
        return float("inf")


#: After an agent's heartbeat stream ends, how long (at least one heartbeat interval) it has
#: to open a session again before it is lost: its reconnect backoff starts at 0.5 s.
RECONNECT_GRACE_S = 5.0


class AgentHub(relayed.RelayedAgents):
    """Owns agent records, their health, and the assignment channel of their sites.

    ``clock`` returns seconds (``time.monotonic`` by default) and stamps every time the
    hub keeps: a step of the wall clock (NTP, a virtual machine resumed) must neither lose
    every agent at once nor keep a dead one, and load rates must not run backwards. ``wall``
    (``time.time``) is read only to measure lag against the agents' ``sent_unix_ms``.
    An agent is unhealthy once ``missed_heartbeats`` of its intervals pass without one, or
    sooner once its heartbeat stream has ended and it has not come back within one interval
    or ``reconnect_grace``, whichever is longer (:meth:`heartbeats_ended`).
    """

    def __init__(
        self,
        authenticator: auth.JoinAuthenticator,
        *,
        on_change: Callable[[model.AgentEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        heartbeat_interval: float = 5.0,
        min_heartbeat_interval: float = 0.05,
        max_heartbeat_interval: float = 300.0,
        missed_heartbeats: int = 3,
        reconnect_grace: float = RECONNECT_GRACE_S,
    ) -> None:
        if missed_heartbeats < 1:
            raise ValueError("missed_heartbeats must be at least 1")
        super().__init__()
        self._identities = identity.Identities(authenticator)
        self._on_change = on_change
        self._clock = clock
        self._wall = wall
        self.heartbeat_interval = heartbeat_interval
        self._interval_bounds = (min_heartbeat_interval, max_heartbeat_interval)
        self.missed_heartbeats = missed_heartbeats
        self.reconnect_grace = reconnect_grace
        self._records: dict[str, records.Record] = {}
        self._channels: dict[str, records.SiteChannel] = {}
        self.lag = LagHistogram()
        #: Heartbeats of the agents connected here; those a follower relays are counted there.
        self.heartbeats_total = 0
        self._beat_waiters: dict[str, asyncio.Event] = {}
        # The sweeper's sleep between sweeps, and what wakes it early: an agent joining with a
        # shorter interval than that sleep allows for.
        self._sweep_step = float("inf")
        self._shorter_interval = asyncio.Event()
        # The API tokens sent with every site's set (serve_tokens), and what wakes the
        # watchers when they change; None until read (a set then goes without).
        self._serve_tokens: pb.ServeTokens | None = None
        self._tokens_changed = asyncio.Event()

    # -- join and identity ----------------------------------------------------------

    def join(self, application: model.JoinApplication) -> model.JoinGrant:
        """Admit an agent, every step on the caller's thread: for an authenticator that does
        not block (in memory). The control plane's, on its store, joins by :meth:`join_async`."""
        applications.check(application)
        proof = self._identities.prove(application)
        if self._decide(application, proof):
            return self._record(application, proof, application.agent_id, application.credential or "")
        return self._record(application, proof, *self._identities.issue(application.site, proof))

    async def join_async(self, application: model.JoinApplication,
                         bootstrap: auth.BootstrapToken | None = None) -> model.JoinGrant:
        """:meth:`join` with the authenticator's calls, which may wait on the database, in
        worker threads: the event loop (health probes, the gateway, other agents) never
        waits on them. Who holds the site is decided on the loop, and a new identity's
        credential replaces the site's last one only once the site is this join's: it is
        held for it (:meth:`identity.Identities.issue_held`) until the join is recorded or fails.
        While relaying, the leader is asked first whether another replica's agent holds it.
        ``bootstrap``: the application's token, already verified by :meth:`check_enrolment`."""
        applications.check(application)
        proof = await self._identities.prove_off_loop(application, bootstrap)
        if self._decide(application, proof):  # the same identity: nothing to write
            return self._record(application, proof, application.agent_id, application.credential or "")
        if self.tap is not None:
            # Relaying: the site's holder may be another replica's agent, which only the leader
            # knows; its credential is not replaced unless the leader says the site is free.
            await self.tap.claim(application.site)
            self._decide(application, proof)  # the site may have been taken here meanwhile
        return self._record(application, proof, *await self._identities.issue_held(application.site, proof))

    def _decide(self, application: model.JoinApplication, proof: identity.Proof) -> bool:
        """NotAuthenticated when the site was revoked since the proof began (a credential or
        token checked just before); SiteTaken while another agent holds the site; True when the
        agent keeps its identity (its credential and agent id), False when it is to be given a new one."""
        self._identities.refuse_if_revoked_since(application.site, proof.revocations)
        self._refuse_if_held(application.site, self._clock(), application.agent_id if proof.by_credential else None)
        return proof.by_credential and bool(application.agent_id)

    def _record(self, application: model.JoinApplication, proof: identity.Proof, agent_id: str, credential: str) -> model.JoinGrant:
        site = application.site
        now = self._clock()
        current = self._records.get(site)
        same_agent = proof.by_credential and current is not None and agent_id == current.agent_id
        if same_agent and current is not None and current.via is not None:
            self._moved_off(current, now, "the leader")
        record = self._new_record(application, agent_id, now, joined_at=now)
        if same_agent and current is not None and current.live(now):
            record.continue_from(current)  # a new session of a live agent: no break
        self._records[site] = record
        self._revoked.get(site, set()).discard(agent_id)  # this agent proved itself since its revocation (_decide)
        self._rethink_sweep(record)
        self._channel(site).notify()  # a superseded agent's watch stream ends
        if self.tap is not None:
            self.tap.touched(site)
        if same_agent and current is not None and current.live(now):
            # A live agent opening a new session: right after its first join over the join
            # port (enrolment), or after a dropped connection. Not a second join.
            log.debug("agent %s reconnected to site %s from %s", agent_id, site, application.endpoint_url)
            self._emit(model.AgentEventKind.RECONNECTED, record, "reconnected with its credential")
        else:
            log.info("agent %s joined site %s from %s", agent_id, site, application.endpoint_url)
            how = "with its credential" if proof.by_credential else "with a bootstrap token"
            self._emit(model.AgentEventKind.JOINED, record, f"agent joined {how}")
        return model.JoinGrant(agent_id, credential, record.heartbeat_interval, self.missed_heartbeats)

    def _refuse_if_held(self, site: str, now: float, agent_id: str | None = None) -> None:
        """SiteTaken while another live agent holds ``site``: one here or relayed to this hub,
        or (on a relaying replica) one the leader named when it refused an agent of ours."""
        current = self._records.get(site)
        if current is not None and current.live(now) and current.agent_id != agent_id:
            where = f" through replica {current.via}" if current.via else ""
            raise errors.SiteTaken(
                f"site {site!r} is held by live agent {current.agent_id}{where} (last heartbeat "
                f"{now - current.last_heartbeat:.1f}s ago); another agent may take it over "
                f"only after {self.missed_heartbeats} missed heartbeats "
                f"({self.missed_heartbeats * current.heartbeat_interval:.1f}s)",
                holder=current.agent_id, retry_after_s=current.deadline - now,
            )
        self._identities.refuse_if_joining(site, agent_id)
        self._refuse_if_held_elsewhere(site, now, agent_id)

    async def check_enrolment(self, site: str, bootstrap_token: str) -> auth.BootstrapToken:
        """A client certificate asked for without one (the join port) is for a valid bootstrap
        token only (:meth:`identity.Identities.check_enrolment`): the verified token, for :meth:`join_async`."""
        return await self._identities.check_enrolment(site, bootstrap_token)

    async def authenticate_stream(self, site: str, agent_id: str, credential: str) -> None:
        """Check the metadata of a Heartbeats/WatchAssignments stream, once per stream (the
        credential in a worker thread, the site's holder on the loop)."""
        await self._identities.check_credential(site, credential)
        current = self._records.get(site)
        if current is None or current.agent_id != agent_id:
            raise errors.NotJoined(f"agent {agent_id!r} does not hold site {site!r}; join again")

    # -- heartbeats and health ------------------------------------------------------

    def record_heartbeat(self, site: str, agent_id: str, beat: model.Heartbeat) -> None:
        """Apply one heartbeat: O(1) unless capacity or model states are attached."""
        record = self._records.get(site)
        if record is None or record.agent_id != agent_id:
            raise errors.NotJoined(f"agent {agent_id!r} does not hold site {site!r}; join again")
        now = self._clock()
        if record.via is None:  # a relayed beat is counted by the replica it reached (edgeplane_heartbeats_received_total)
            self.heartbeats_total += 1
        if beat.sent_unix_ms:
            self.lag.observe(self._wall() * 1000.0 - beat.sent_unix_ms)
        first = record.last_heartbeat <= record.joined_at < now  # not AgentStatus.reported until this beat
        record.last_heartbeat = now
        record.heard = True
        record.opened_at = None  # the next stream to open is a sign of life again
        record.broke_at = None
        record.quiet_s = beat.quiet_ms / 1000.0
        record.deadline = now + self._allowance(record)
        record.inflight = beat.inflight
        # Protobuf floats carry inf and NaN, which no agent measures: not taken, as if not sent
        # (a NaN compares false to everything, an inf counter is an infinite rate to the autoscaler).
        record.cpu_percent = beat.cpu_percent if math.isfinite(beat.cpu_percent) else 0.0
        record.memory_available_bytes = beat.memory_available_bytes
        record.assignment_version = beat.assignment_version
        if beat.model_load:  # replaced whole: a status holds the previous mapping, not a copy
            loads = {name: model.ModelLoad(n, busy, now) for name, n, busy in beat.model_load if math.isfinite(busy)}
            if len(loads) < len(beat.model_load):
                loads = {**record.model_load, **loads}  # a bad counter's model keeps its last sample
            record.model_load = loads
        if beat.capacity is not None and beat.capacity != record.capacity:
            record.capacity = beat.capacity
            self._emit(model.AgentEventKind.CAPACITY_CHANGED, record, "capacity changed")
        if beat.gpu_free_bytes and record.capacity.gpus:
            free = dict(beat.gpu_free_bytes)
            record.capacity = dataclasses.replace(record.capacity, gpus=tuple(
                model.Gpu(g.index, g.model, g.memory_total_bytes, free.get(g.index, g.memory_free_bytes))
                for g in record.capacity.gpus
            ))
        if beat.models is not None:
            models = {m.name: m for m in beat.models}
            # neither do request counters nor a download's progress (a loading model's message,
            # once a second): the reconciler has nothing to decide on them, and `get placements`
            # reads the live states (ControlPlane.placements_view)
            changed = models != record.models and _decisive(models) != _decisive(record.models)  # equal: the cheap, usual case
            record.models = models
            if changed:
                self._emit(model.AgentEventKind.MODELS_CHANGED, record, "model states changed")
        if beat.draining:
            if record.healthy:
                record.healthy = False
                record.deadline = now
                self._emit(model.AgentEventKind.LOST, record, "agent is draining")
        elif not record.healthy:
            record.healthy = True
            record.healthy_since = now
            self._emit(model.AgentEventKind.RECOVERED, record, "heartbeats resumed")
        if first:  # a site that joined waits for this before a rollout sends it anything (reconciler.rollout)
            self._emit(model.AgentEventKind.REPORTED, record, "first heartbeat since it joined")
        if self._beat_waiters:
            waiter = self._beat_waiters.pop(site, None)
            if waiter is not None:
                waiter.set()

    def reporting(self) -> int:
        """Agents that sent a heartbeat since they joined (no status objects made: cheap
        enough to ask every second of a 100,000-agent fleet)."""
        return sum(1 for r in self._records.values() if r.last_heartbeat > r.joined_at)

    async def next_heartbeat(self, site: str) -> model.AgentStatus:
        """Wait for the next heartbeat from ``site`` and return the status it produced."""
        waiter = self._beat_waiters.get(site)
        if waiter is None:
            waiter = self._beat_waiters[site] = asyncio.Event()
        await waiter.wait()
        status = self.status(site)
        if status is None:
            raise errors.NotJoined(f"site {site!r} has no agent")
        return status

    def sweep(self) -> list[model.AgentEvent]:
        """Mark agents whose heartbeats stopped as unhealthy; returns the LOST events."""
        now = self._clock()
        lost = []
        for record in self._records.values():
            if record.healthy and now > record.deadline:
                record.healthy = False
                signed = max(record.last_heartbeat, record.opened_at or record.last_heartbeat)  # its last sign of life
                if record.broke_at is not None and record.deadline < signed + self._allowance(record):
                    reason = (f"its heartbeat stream ended {now - record.broke_at:.1f}s ago and it did not come back"
                              f" (last heartbeat {now - record.last_heartbeat:.1f}s ago)")
                elif not record.heard:
                    reason = (f"no heartbeat since it joined {now - record.joined_at:.1f}s ago "
                              f"({self.missed_heartbeats} x {record.heartbeat_interval:g}s missed"
                              + (f", since its heartbeat stream opened {now - record.opened_at:.1f}s ago"
                                 if record.opened_at is not None else "") + ")")
                else:
                    reason = (
                        f"no heartbeat for {now - record.last_heartbeat:.1f}s "
                        f"({self.missed_heartbeats} x {record.heartbeat_interval:g}s missed"
                        + (f", after a quiet spell of {record.quiet_s:g}s it announced" if record.quiet_s else "") + ")"
                    )
                log.warning("agent %s of site %s lost: %s", record.agent_id, record.site, reason)
                event = self._emit(model.AgentEventKind.LOST, record, reason)
                lost.append(event)
        return lost

    async def run_sweeper(self, period: float | None = None) -> None:
        """Sweep forever (cancel to stop); by default at the smallest agent interval / 2,
        worked out again as soon as an agent joins."""
        while True:
            step = period
            if step is None:
                intervals = [r.heartbeat_interval for r in self._records.values()]
                step = min(intervals, default=self.heartbeat_interval) / 2
            self._sweep_step = max(step, 0.01)
            self._shorter_interval.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._sweep_step):
                    await self._shorter_interval.wait()
            try:
                self.sweep()
            except Exception:  # the loop never dies: a bad callback is logged, not fatal
                log.exception("agent sweep failed")

    def _rethink_sweep(self, record: records.Record) -> None:
        if record.heartbeat_interval / 2 < self._sweep_step:
            self._shorter_interval.set()

    # -- assignments ----------------------------------------------------------------

    def set_assignments(
        self, site: str, assignments: list[model.Assignment], version: int, *, replacing: bool = False
    ) -> None:
        """Replace the desired set of ``site`` and push it to its agent (latest wins; a set
        older than the one held is refused, unless ``replacing``: the leader's set relayed,
        see :meth:`accept_assignments`)."""
        channel = self._channel(site)
        if not replacing and channel.latest is not None and version < channel.latest.version:
            raise errors.StaleAssignments(
                f"assignment version {version} for site {site!r} is older than "
                f"{channel.latest.version}"
            )
        channel.latest = model.AssignmentSet(site, version, tuple(assignments))
        channel.notify()
        record = self._records.get(site)
        if record is not None and record.via is not None and (outbox := self._relays.get(record.via)) is not None:
            outbox.push(site, channel.latest)

    def set_serve_tokens(self, tokens: pb.ServeTokens) -> None:
        """The API tokens every agent is sent with its set (:mod:`orchestrator.agents.serve_tokens`);
        the watchers send them at once when they changed."""
        if tokens == self._serve_tokens:
            return
        self._serve_tokens = tokens
        self._tokens_changed.set()
        self._tokens_changed = asyncio.Event()

    def assignments(self, site: str) -> model.AssignmentSet | None:
        channel = self._channels.get(site)
        return channel.latest if channel else None

    def latest_version(self) -> int:
        """The highest version of the sets this hub holds (0: none)."""
        return max((c.latest.version for c in self._channels.values() if c.latest is not None), default=0)

    async def watch_assignments(self, site: str, agent_id: str, *, tokens: bool = False) -> AsyncIterator[model.AssignmentSet]:
        """Yield the site's set now and each newer one, until another agent takes the site
        over. Sets that arrive while one is being sent are collapsed: only the latest is sent.
        With ``tokens`` (the agent checks API tokens) each goes with the list, and the set is
        sent again when only the list changed; without, no list goes to the agent.

        The set is sent on every open, even when the agent says it has that version: a
        control plane restored from a backup numbers its next set with a version the agent
        already applied (from the lost future), and skipping it would leave the agent on a
        set no deployment asks for. A set is small and the agent applies it idempotently."""
        sent: tuple[model.AssignmentSet, pb.ServeTokens | None] | None = None
        while True:
            record = self._records.get(site)
            if record is None or record.agent_id != agent_id:
                return
            # Looked up each time: once the agent was forgotten its site's channel went with it,
            # and the same agent may have joined again before this woke.
            channel = self._channel(site)
            changed, tokens_changed = channel.changed(), self._tokens_changed
            latest, listed = channel.latest, self._serve_tokens if tokens else None
            if latest is not None and (sent is None or latest is not sent[0] or listed is not sent[1]):
                sent = (latest, listed)  # before the yield: what changes while it is sent is sent after
                yield dataclasses.replace(latest, serve_tokens=listed)
            waits = [asyncio.ensure_future(changed.wait()), *([asyncio.ensure_future(tokens_changed.wait())] if tokens else [])]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    # -- views ----------------------------------------------------------------------

    def snapshot(self) -> list[model.AgentStatus]:
        return [r.status() for r in self._records.values()]

    def status(self, site: str) -> model.AgentStatus | None:
        record = self._records.get(site)
        return record.status() if record else None

    def now(self) -> float:
        """This hub's clock (the one its statuses' times are on)."""
        return self._clock()

    def wall_time(self, t: float) -> float:
        """A time of this hub's clock as wall-clock seconds (for another process to read)."""
        return self._wall() - (self._clock() - t)

    def forget(self, site: str) -> None:
        """Drop a site's agent record (e.g. the Site was deleted) and the site's assignment set:
        its watch streams end. A set given to the site later, as the reconciler gives one to
        an agent that joins it again (it reads no set here), starts a new channel."""
        self._records.pop(site, None)
        channel = self._channels.pop(site, None)
        if channel is not None:
            channel.notify()
        if self.tap is not None:
            self.tap.touched(site)

    def forget_if_lost(self, site: str) -> None:
        """:meth:`forget` ``site``'s agent if it is lost (its Site was deleted): one that came
        back since it was found lost is kept."""
        if (agent := self.status(site)) is not None and not agent.healthy:
            self.forget(site)

    def revoke(self, site: str) -> None:
        """The site's agent identity was revoked (through any replica): drop its agent, whose
        streams here end and whose credential no longer joins, and refuse it when a replica
        that relays it reports it again before it has heard (:meth:`admit_relayed`)."""
        record = self._records.get(site)
        if record is not None:
            self._revoked.setdefault(site, set()).add(record.agent_id)
            log.warning("agent %s of site %s dropped: its identity was revoked", record.agent_id, site)
        self._identities.revoked(site)  # joins and stream opens checked before now are refused
        self.forget(site)

    def revoked_and_enrolled(self, site: str, current: str) -> None:
        """The site's identity was revoked through another replica, and agent ``current`` enrolled
        it since, before this hub read the revocation: an agent of any other identity here (the
        revoked one) is dropped as by :meth:`revoke`. Joins and stream opens under way are not
        refused: ``current``'s may be among them, and a revoked credential no longer verifies."""
        record = self._records.get(site)
        if record is None or record.agent_id == current:
            return
        self._revoked.setdefault(site, set()).add(record.agent_id)
        log.warning("agent %s of site %s dropped: its identity was revoked, and agent %s enrolled since",
                    record.agent_id, site, current or "(none)")
        self.forget(site)

    # -- heartbeat streams -----------------------------------------------------------

    def heartbeats_opened(self, site: str, agent_id: str) -> object:
        """A heartbeat stream of ``site``'s agent opened here; give the handle back to
        :meth:`heartbeats_ended` when it ends.

        An authenticated stream opening is a sign of life, as a heartbeat is, and gives the
        agent the same allowance from now: between a join and its first heartbeat lie the
        agent's save of its identity, this stream's authentication (its credential checked on
        the store, which may be busy) and a link that may lag, more than ``missed_heartbeats``
        intervals on a starved machine. A join followed by no stream, or a stream by no
        heartbeat, is still lost that long after it. Only the first stream to open after a
        heartbeat (or the join) counts: an agent whose streams open and end again with no
        heartbeat on any is lost all the same. An agent already lost stays so until it beats:
        an open stream says it lives, not that it serves."""
        record = self._records.get(site)
        if record is None or record.agent_id != agent_id:
            raise errors.NotJoined(f"agent {agent_id!r} does not hold site {site!r}; join again")
        record.streams += 1
        if record.healthy and record.opened_at is None:
            now = self._clock()
            record.opened_at = now
            record.broke_at = None
            record.deadline = max(record.deadline, now + self._allowance(record))
        return record

    def heartbeats_ended(self, handle: object) -> None:
        """A heartbeat stream ended. An agent whose process died ends its streams at once
        (the kernel closes its connections); a live one opens a session again within its
        reconnect backoff. So an agent left with no stream here is given one heartbeat
        interval or ``reconnect_grace``, whichever is longer, instead of every missed
        heartbeat (15 s at the default 5 s interval): its replicas move sooner when it has
        crashed. Nothing changes while it announced a quiet spell, or once it has joined
        again (a new session is a new record) or left."""
        record = handle
        assert isinstance(record, records.Record)
        record.streams -= 1
        if record.streams > 0 or self._records.get(record.site) is not record or not record.healthy:
            return
        self._ended(record)
        if self.tap is not None:
            self.tap.disconnected(record.site, record.agent_id)

    def _ended(self, record: records.Record) -> None:
        now = self._clock()
        if record.last_heartbeat + record.quiet_s > now:
            return  # loading a model: the spell it announced stands
        record.broke_at = now
        record.deadline = min(record.deadline, now + max(record.heartbeat_interval, self.reconnect_grace))

    def _allowance(self, record: records.Record) -> float:
        """How long after a heartbeat the agent is healthy without another."""
        return max(record.heartbeat_interval * self.missed_heartbeats, record.quiet_s)

    # -- internals ------------------------------------------------------------------

    def _new_record(self, application: model.JoinApplication, agent_id: str, now: float, *, joined_at: float,
                    via: str | None = None) -> records.Record:
        interval = self._clamp(application.heartbeat_interval)
        return records.Record(
            site=application.site,
            agent_id=agent_id,
            endpoint_url=application.endpoint_url,
            location=application.location,
            labels=model.frozen_mapping(application.labels),
            agent_version=application.agent_version,
            joined_at=joined_at,
            heartbeat_interval=interval,
            capacity=application.capacity,
            last_heartbeat=now,
            deadline=now + interval * self.missed_heartbeats,
            via=via,
            healthy_since=now,
            started_unix_ms=application.started_unix_ms,
            checks_tokens=application.checks_tokens,
        )

    def _channel(self, site: str) -> records.SiteChannel:
        channel = self._channels.get(site)
        if channel is None:
            channel = self._channels[site] = records.SiteChannel()
        return channel

    def _clamp(self, requested: float | None) -> float:
        low, high = self._interval_bounds
        value = requested if requested else self.heartbeat_interval
        return min(max(value, low), high)

    def _emit(self, kind: model.AgentEventKind, record: records.Record, reason: str) -> model.AgentEvent:
        event = model.AgentEvent(kind, record.site, record.agent_id, self._clock(), reason, record.status())
        if self._on_change is not None:
            try:
                self._on_change(event)
            except Exception:
                log.exception("on_change callback failed for %s %s", kind.value, record.site)
        return event


def _decisive(models: Mapping[str, model.ModelState]) -> dict[str, model.ModelState]:
    return {n: dataclasses.replace(m, message="") if m.phase is model.ModelPhase.LOADING else m for n, m in models.items()}
