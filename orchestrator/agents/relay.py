"""Agents on any control-plane replica: the relay between a replica and the leader.

Replicas that share a database elect one leader, which plans; agents may connect to any
replica. A replica that does not lead keeps its agents in its own hub (their streams,
credentials and health) and relays them to the leader over one gRPC stream
(``edgeplane.agent.v1.ReplicaRelay``), on the leader's agent listener:

- up, every ``flush_s`` (0.25 s), one batch: each agent that joined, left or beat since the
  last batch, its heartbeats merged into one (latest values; capacity and models carried
  forward when a later beat leaves them out). An agent that joined (again, even as the same
  agent: a new endpoint or interval) or that the leader has not heard of on this stream is
  reported whole (who it is, as it joined, and its full state). So the leader's
  cost is one message per replica per flush, not one per heartbeat, and nothing per
  heartbeat reaches the database. What the leader plans and routes by does not wait for
  the flush: an agent that joined or left, or a heartbeat that brings changed model states
  or capacity, or says the agent is draining, is sent at once, at most one batch every
  ``URGENT_GAP_S`` (a storm of joins after a failover is still a few batches a second);
- down, the assignment sets the leader's reconciler gives those agents' sites (latest wins
  per site), which the replica's hub hands to the agents' watch streams, and the agents
  the leader refused because another live agent holds their site through another replica
  (the rule of one live agent per site holds across replicas): the replica drops such an
  agent and refuses joins for its site, with the leader's reason, until the holder could
  have been lost;
- a join that would give a site a new identity asks first (a ``claim``, sent at once): its
  credential would replace, in the database the replicas share, that of an agent which
  may hold the site through another replica; the leader answers ``free`` or refuses it.
  A leader says in its published document that it answers claims (``answersClaims``): one
  of an earlier release, met during a rolling update, would drop a claim unanswered, so a
  follower of this release takes joins there unasked, as that release did, and logs it.

The leader's hub holds relayed agents as its own (health by the same deadlines, so a relay
that goes quiet loses its agents in the usual time); the published endpoint table brings
what it decides to every replica's gateway. The stream authenticates with the secret the
leader published in the database at its election; with mutual TLS the relaying replica
presents a client certificate from the shared agent CA.

This module is the relaying replica's end (:class:`RelayClient`) and what both ends share;
the leader's end is :mod:`orchestrator.agents.relay_leader`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import errors, hub, model, service

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReplicaRelay"].full_name
METHOD = f"/{SERVICE_NAME}/Relay"
SECRET_KEY = "x-edgeplane-relay"
#: A batch stays under the agent listener's 256 KiB message limit (one agent's report too: ``RelayClient._parts``).
MAX_BATCH_BYTES = 192 * 1024
FLUSH_S = 0.25
URGENT_GAP_S = 0.05  # joins, losses, model and capacity changes: sent at once, but no more often than this
RETRY_S = (0.25, 5.0)  # reconnect backoff: first and largest wait
CLAIM_TIMEOUT_S = 5.0  # a join waits this long for the leader to say whether its site is free


# -- the relaying replica's side -------------------------------------------------------------


@dataclass(frozen=True)
class Leader:
    """Where the leader takes relays: from the document it published in the database."""

    replica: str
    address: str  # host:port of its agent listener
    secret: str
    agent_ca: str | None = None  # its agent CA's SHA-256 fingerprint; None: it takes agents without TLS
    #: It answers a join's claim of a site (its document says so). A leader of an earlier release
    #: does not: it drops the claim unanswered, so a follower that asked it would refuse every new agent.
    answers_claims: bool = False

    @classmethod
    def from_json(cls, body: str) -> Leader:
        """The published document; ValueError when it is not one this version can use."""
        doc = json.loads(body)
        fields = [doc.get(k) if isinstance(doc, dict) else None for k in ("replica", "address", "secret")]
        if not all(isinstance(f, str) and f for f in fields):
            raise ValueError(f"the leader's relay document lacks replica, address or secret: {body[:200]!r}")
        agent_ca = doc.get("agentCa")
        if agent_ca is not None and not isinstance(agent_ca, str):
            raise ValueError(f"the leader's relay document has an agentCa that is not a string: {agent_ca!r}")
        answers_claims = doc.get("answersClaims", False)
        if not isinstance(answers_claims, bool):
            raise ValueError(f"the leader's relay document has an answersClaims that is not a boolean: {answers_claims!r}")
        return cls(*fields, agent_ca=agent_ca, answers_claims=answers_claims)

    def unlike(self, agent_ca: str | None) -> str | None:
        """Why a replica whose agent CA has fingerprint ``agent_ca`` (None: agents without
        TLS) cannot share agents with this leader; None when it can."""
        if agent_ca == self.agent_ca:
            return None
        if agent_ca is None or self.agent_ca is None:
            tls = "this replica" if agent_ca is not None else f"the leader {self.replica}"
            return (f"{tls} takes agents over mutual TLS and the other without TLS (--insecure-agents): "
                    "run every replica alike; this replica's agents are not relayed to the leader")
        return (f"this replica's agent CA (SHA-256 {agent_ca[:16]}...) is not the one of the leader {self.replica} "
                f"({self.agent_ca[:16]}...): an agent enrolled at one is refused by the other, and this replica's agents "
                "are not relayed. Give every replica the same CA (copy <data-dir>/ca from one replica to the others, "
                "or mount one Secret: docs/deploy.md) and restart them")


@dataclass(frozen=True)
class ClientTls:
    ca_pem: bytes
    key_pem: bytes
    certificate_pem: bytes


class RelayClient:
    """Relays this replica's agents to the leader while it follows (see the module doc).

    ``point`` names the leader (None while this replica leads or knows no leader);
    ``run`` keeps one stream open to it, reconnecting with backoff. What agents do while the
    stream is down is kept (latest state per site) and the next stream starts with every
    agent reported whole.
    """

    def __init__(self, agent_hub: hub.AgentHub, replica: str, *, tls: Callable[[], ClientTls] | None = None,
                 agent_ca: str | None = None, flush_s: float = FLUSH_S) -> None:
        self._hub = agent_hub
        self.replica = replica
        self._tls = tls
        self._agent_ca = agent_ca  # this replica's agent CA fingerprint; None: agents without TLS
        self.flush_s = flush_s
        self.leader: Leader | None = None
        self._pointed = asyncio.Event()
        self._connection: asyncio.Task[None] | None = None
        self._touched: set[str] = set()
        self._urgent = asyncio.Event()  # set by what should not wait for the flush (see the module)
        self._beats: dict[str, tuple[str, pb.Heartbeat]] = {}
        self._disconnected: dict[str, str] = {}  # site -> agent id whose heartbeat stream ended here
        self._sent: dict[str, str] = {}  # site -> agent id the leader knows on this stream
        self._claims: dict[str, asyncio.Future[None]] = {}  # site -> the leader's answer to a join's claim
        self._unasked: set[str] = set()  # claims not sent yet on this stream
        self.connected = False
        self.last_error = ""
        self.batches_total = 0
        self.reports_total = 0

    # RelayTap: called by the hub and the agents' servicer on the event loop

    def touched(self, site: str) -> None:
        """``site``'s agent joined (it is reported whole, with what it joined with) or left."""
        self._touched.add(site)
        self._disconnected.pop(site, None)
        self._urgent.set()  # an agent joined or left: the next batch goes now

    def disconnected(self, site: str, agent_id: str) -> None:
        self._disconnected[site] = agent_id
        self._urgent.set()  # the leader's shorter wait starts now, not at the next flush

    def beat(self, site: str, agent_id: str, message: object) -> None:
        assert isinstance(message, pb.Heartbeat)
        if self._disconnected.get(site) == agent_id:
            del self._disconnected[site]  # back on a new stream
        pending = self._beats.get(site)
        if pending is not None and pending[0] == agent_id:
            _carry(pending[1], message)
        self._beats[site] = (agent_id, message)
        if message.draining or message.HasField("models") or message.HasField("capacity"):
            self._urgent.set()  # what the leader plans and routes by changed: the next batch goes now

    async def claim(self, site: str) -> None:
        """Ask the leader whether a new agent may take ``site`` (see :meth:`relayed.RelayTap.claim`);
        joins for one site at once share its answer. A leader of an earlier release answers no
        claim: the join goes on unasked, as it did then (:meth:`point` logged it)."""
        if self.leader is not None and not self.leader.answers_claims:
            return
        if not self.connected:
            raise errors.Unavailable(f"a new agent for site {site!r} waits for this replica to reach the leader, which "
                                     f"knows whether another replica's agent holds the site ({self.last_error or 'connecting'})")
        answer = self._claims.get(site)
        if answer is None:
            answer = self._claims[site] = asyncio.get_running_loop().create_future()
            self._unasked.add(site)
            self._urgent.set()
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT_S):
                await asyncio.shield(answer)
        except TimeoutError:
            raise errors.Unavailable(f"the leader did not say within {CLAIM_TIMEOUT_S:g}s whether site {site!r} is free") from None
        finally:
            if self._claims.get(site) is answer and answer.done():
                del self._claims[site]

    def _answer(self, site: str, refusal: BaseException | None = None) -> None:
        answer = self._claims.pop(site, None)
        self._unasked.discard(site)
        if answer is not None and not answer.done():
            if refusal is None:
                answer.set_result(None)
            else:
                answer.set_exception(refusal)
                answer.exception()  # retrieved: a join that timed out no longer waits for it

    # control

    def point(self, leader: Leader | None) -> None:
        if leader == self.leader:
            return
        self.leader = leader
        self._hub.tap = self if leader is not None else None
        if leader is not None and not leader.answers_claims:
            log.warning("the leader %s answers no claim of a site (an earlier release): until it is upgraded, a join at this "
                        "replica that gives a site a new identity is not checked against agents of other replicas", leader.replica)
        if leader is None:
            self._beats.clear()
            self._touched.clear()
            self._disconnected.clear()
        if self._connection is not None:
            self._connection.cancel()
        self._pointed.set()

    def follow(self, leader: Leader) -> None:
        """The leader the database names: relay to it, unless this replica cannot share
        agents with it (another agent CA or TLS mode), which is then logged once and shown
        as the view's ``lastError``."""
        if leader.replica == self.replica:
            return
        unlike = leader.unlike(self._agent_ca)
        if unlike is None:
            self.point(leader)
            return
        if self.last_error != unlike:
            log.error("relay to leader %s: %s", leader.replica, unlike)
        self.point(None)
        self.last_error = unlike

    def view(self) -> dict[str, object]:
        return {"leader": self.leader.replica if self.leader else None, "address": self.leader.address if self.leader else None,
                "connected": self.connected, "agents": len(self._sent) if self.connected else 0,
                "batches": self.batches_total, "reports": self.reports_total, "lastError": self.last_error or None}

    async def run(self) -> None:
        """Until cancelled: a stream to the leader whenever one is named."""
        backoff = RETRY_S[0]
        try:
            while True:
                self._pointed.clear()  # set by the next point(): it ends a wait below at once
                if self.leader is None:
                    await self._pointed.wait()
                    continue
                leader = self.leader
                self._connection = asyncio.create_task(self._connect(leader), name="relay-stream")
                started = time.monotonic()
                try:
                    await self._connection
                except asyncio.CancelledError:
                    if self._connection.cancelled() and not _current_cancelling():
                        backoff = RETRY_S[0]
                        continue  # pointed elsewhere
                    raise
                except grpc.RpcError as exc:
                    self.last_error = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    log.info("relay to leader %s at %s: %s", leader.replica, leader.address, self.last_error)
                except errors.NoRelayCertificate as exc:  # lasts until the replica is given a new CA: said once, tried on
                    if str(exc) != self.last_error:
                        log.error("relay to leader %s at %s: %s", leader.replica, leader.address, exc)
                    self.last_error = str(exc)
                except Exception as exc:  # a bug must not end the relay for good
                    self.last_error = repr(exc)
                    log.exception("relay to leader %s failed", leader.replica)
                finally:
                    self.connected = False
                    self._connection = None
                if time.monotonic() - started > 10 * RETRY_S[1]:
                    backoff = RETRY_S[0]  # it had been up a while: try again soon
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await self._pointed.wait()  # a new leader named: at once
                backoff = min(backoff * 2, RETRY_S[1])
        finally:
            self._hub.tap = None

    async def _connect(self, leader: Leader) -> None:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.keepalive_time_ms", 10_000),
                   ("grpc.keepalive_timeout_ms", 5_000), ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.enable_http_proxy", 0)]  # directly, as an agent dials: gRPC would follow this host's http_proxy
        if self._tls is None:
            channel = grpc.aio.insecure_channel(leader.address, options=options)
        else:
            tls = self._tls()
            channel = grpc.aio.secure_channel(leader.address, grpc.ssl_channel_credentials(
                tls.ca_pem, tls.key_pem, tls.certificate_pem), options=options)
        async with channel:
            call = channel.stream_stream(METHOD, request_serializer=pb.RelayReports.SerializeToString,
                                         response_deserializer=pb.RelayAssignments.FromString)(
                metadata=((SECRET_KEY, leader.secret),))
            self._sent = {}
            self._touched = set(self._hub.sites())  # the leader hears of every agent afresh
            self._unasked = set(self._claims)
            self._beats.clear()
            receiver = asyncio.create_task(self._receive(call), name="relay-receiver")
            urgent = asyncio.create_task(self._urgent.wait(), name="relay-urgent")
            try:
                first = True
                while True:
                    self._urgent.clear()
                    sent_at = time.monotonic()
                    batches = self._batches()
                    if first and not batches:
                        batches = [pb.RelayReports(replica=self.replica)]  # names this replica at once
                    for batch in batches:
                        await call.write(batch)
                        self.batches_total += 1
                    if first:
                        self.connected, self.last_error, first = True, "", False
                        log.info("relaying %d agents to leader %s at %s", len(self._sent), leader.replica, leader.address)
                    if urgent.done():
                        urgent = asyncio.create_task(self._urgent.wait(), name="relay-urgent")
                    done, _ = await asyncio.wait({receiver, urgent}, timeout=self.flush_s, return_when=asyncio.FIRST_COMPLETED)
                    if receiver in done:
                        receiver.result()  # the leader ended the stream: its error, if any
                        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                                   "the leader ended the relay stream")
                    if urgent in done and (wait := sent_at + URGENT_GAP_S - time.monotonic()) > 0:
                        await asyncio.sleep(wait)  # changes close together go in one batch
            finally:
                for site in list(self._claims):
                    self._answer(site, errors.Unavailable(f"the relay to leader {leader.replica} ended before it said whether "
                                                          f"site {site!r} is free"))
                for task in (receiver, urgent):
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                    await receiver
                with contextlib.suppress(asyncio.CancelledError):
                    await urgent

    async def _receive(self, call: grpc.aio.StreamStreamCall) -> None:
        async for message in call:
            for sent in message.sites:
                self._hub.accept_assignments(sent.site, [model.Assignment.from_proto(a) for a in sent.set.assignments],
                                             sent.set.version)
            for site in message.report_again:
                self._sent.pop(site, None)
                self._touched.add(site)
            for site in message.free:
                self._answer(site)
            for refusal in message.refused:
                if not refusal.agent_id:
                    self._answer(refusal.site, errors.SiteTaken(refusal.message, holder=refusal.holder_agent_id,
                                                                retry_after_s=refusal.retry_after_ms / 1000))
                elif self._sent.get(refusal.site) == refusal.agent_id:
                    del self._sent[refusal.site]
                self._hub.refused_by_leader(refusal.site, refusal.agent_id, refusal.holder_agent_id, refusal.message,
                                            refusal.retry_after_ms / 1000)

    def _batches(self) -> list[pb.RelayReports]:
        """What happened since the last batch, as messages under ``MAX_BATCH_BYTES``."""
        touched, self._touched = self._touched, set()
        beats, self._beats = self._beats, {}
        reports = [pb.AgentReport(site=site, claim=True) for site in sorted(self._unasked)]
        self._unasked = set()
        for site in touched:
            status = self._hub.status(site)
            known = self._sent.get(site)
            if status is None:
                if known is not None:
                    reports.append(pb.AgentReport(site=site, agent_id=known, gone=True))
                    del self._sent[site]
            elif status.healthy:  # joined again, even as the same agent: it may listen elsewhere, beat at another pace
                reports.append(_whole(status, self._hub))
                self._sent[site] = status.agent_id
                beats.pop(site, None)
        disconnected, self._disconnected = self._disconnected, {}
        for site, (agent_id, beat) in beats.items():
            if self._sent.get(site) == agent_id:
                reports.append(pb.AgentReport(site=site, agent_id=agent_id, state=beat,
                                              disconnected=disconnected.pop(site, None) == agent_id))
            elif (status := self._hub.status(site)) is not None and status.agent_id == agent_id and status.healthy:
                reports.append(_whole(status, self._hub))
                self._sent[site] = agent_id
        for site, agent_id in disconnected.items():
            if self._sent.get(site) == agent_id:
                reports.append(pb.AgentReport(site=site, agent_id=agent_id, disconnected=True))
        reports = [part for report in reports for part in self._parts(report)]
        self.reports_total += len(reports)
        batches: list[pb.RelayReports] = []
        size, start = 0, 0
        for i, report in enumerate(reports):
            size += report.ByteSize() + 8
            if size > MAX_BATCH_BYTES and i > start:
                batches.append(pb.RelayReports(replica=self.replica, reports=reports[start:i]))
                start, size = i, report.ByteSize() + 8
        if start < len(reports):
            batches.append(pb.RelayReports(replica=self.replica, reports=reports[start:]))
        return batches

    def _parts(self, report: pb.AgentReport) -> list[pb.AgentReport]:
        """``report`` as reports the leader takes. Each message an agent sends is under the
        leader's limit, but a report merges several (its join, the models of one heartbeat,
        the load of another): one too large for a batch is sent as several, its heartbeat's
        lists one to a report (each repeating the scalars, which every heartbeat sets). A part
        still past the leader's limit is left out and logged, for a message the leader refuses
        would end the stream, and the relay, of every agent of this replica."""
        if report.ByteSize() <= MAX_BATCH_BYTES or not report.HasField("state"):
            parts = [report]
        else:
            first = pb.AgentReport()
            first.CopyFrom(report)
            first.disconnected = False  # on the last part: a heartbeat after it would undo it
            scalars = pb.Heartbeat()  # what every heartbeat sets; what one leaves out stays as it was
            scalars.CopyFrom(report.state)
            for name in ("capacity", "models", "gpu_load", "model_load"):
                scalars.ClearField(name)
            parts = [first]
            if report.state.HasField("models"):
                first.state.ClearField("models")
                parts.append(pb.AgentReport(site=report.site, agent_id=report.agent_id, state=scalars))
                parts[-1].state.models.CopyFrom(report.state.models)
            if report.state.model_load:
                first.state.ClearField("model_load")
                parts.append(pb.AgentReport(site=report.site, agent_id=report.agent_id, state=scalars))
                parts[-1].state.model_load.extend(report.state.model_load)
            parts[-1].disconnected = report.disconnected
        fits = [p.ByteSize() <= MAX_BATCH_BYTES or pb.RelayReports(replica=self.replica, reports=[p]).ByteSize()
                <= service.MAX_RECEIVE_BYTES for p in parts]
        if all(fits):
            return parts
        log.warning("agent %s of site %s: a part of its report is larger than the leader takes (%d bytes): %s",
                    report.agent_id, report.site, max(p.ByteSize() for p in parts),
                    "left out" if fits[0] else "the agent is not relayed")
        if not fits[0]:
            self._sent.pop(report.site, None)
            return []
        return [p for p, fit in zip(parts, fits, strict=True) if fit]


def _current_cancelling() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _carry(earlier: pb.Heartbeat, later: pb.Heartbeat) -> None:
    """Merge two heartbeats into ``later``: what it leaves out as unchanged, ``earlier`` had."""
    for name in ("capacity", "models"):
        if earlier.HasField(name) and not later.HasField(name):
            getattr(later, name).CopyFrom(getattr(earlier, name))
    if not later.gpu_load and earlier.gpu_load:
        later.gpu_load.extend(earlier.gpu_load)
    if not later.model_load and earlier.model_load:
        later.model_load.extend(earlier.model_load)


def _whole(status: model.AgentStatus, agent_hub: hub.AgentHub) -> pb.AgentReport:
    """An agent reported whole: who it is and everything the leader's hub keeps of it (its
    state only once it has sent a heartbeat, so the leader counts it as reporting then),
    including what is left of a quiet spell it announced (a model loading)."""
    capacity = status.capacity.to_proto()
    report = pb.AgentReport(
        site=status.site, agent_id=status.agent_id,
        agent=pb.JoinRequest(site=status.site, agent_id=status.agent_id, endpoint_url=status.endpoint_url,
                             location=status.location.to_proto(), labels=dict(status.labels), agent_version=status.agent_version,
                             heartbeat_interval_ms=round(status.heartbeat_interval * 1000), capacity=capacity,
                             agent_started_unix_ms=status.started_unix_ms, checks_tokens=status.checks_tokens))
    if not status.reported:
        return report
    report.state.CopyFrom(pb.Heartbeat(
            sent_unix_ms=int(agent_hub.wall_time(status.last_heartbeat) * 1000), inflight=status.inflight, cpu_percent=status.cpu_percent,
            memory_available_bytes=status.memory_available_bytes, assignment_version=status.assignment_version,
            quiet_ms=max(0, round((status.quiet_until - agent_hub.now()) * 1000)) if status.quiet_until else 0,
            capacity=capacity, models=pb.ModelStates(models=[m.to_proto() for m in status.models.values()]),
            gpu_load=[pb.Gpu(index=g.index, memory_free_bytes=g.memory_free_bytes) for g in status.capacity.gpus],
            model_load=[pb.ModelLoad(name=name, requests_total=load.requests_total, busy_seconds_total=load.busy_seconds_total)
                        for name, load in status.model_load.items()]))
    return report
