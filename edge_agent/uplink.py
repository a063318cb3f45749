"""The agent's only gRPC client: join, heartbeat, receive assignments, and reconnect.

An edge uplink drops; the agent must not care beyond logging it. :class:`Uplink.run`
loops forever: join (with the saved credential when there is one, else the bootstrap
token), then keep the heartbeat client stream and the assignment server stream open
until either fails, then back off (exponential, jittered, capped) and start again.
``grpc.RpcError`` never leaves this module: it becomes an :mod:`edge_agent.errors` value.
Under mutual TLS it also enrols (the first join, over the join port) and carries a renewal's
CSR in a join; when the client certificate is due, and what a failed renewal waits, is
:mod:`edge_agent.renewal`'s to say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

import edge_agent
from edge_agent import assignments, capacity, diagnosis, errors, outage, registry, renewal, state, tls
from edge_agent.retry import RECONNECT, Jitter, RetryPolicy, pushback_delay
from edgeplane_proto import reconnect
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Metadata keys of the per-agent identity (must match the control plane's servicer).
SITE_KEY = "x-edgeplane-site"
AGENT_ID_KEY = "x-edgeplane-agent-id"
CREDENTIAL_KEY = "x-edgeplane-credential"
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

MAX_RECEIVE_BYTES = 16 * 1024 * 1024
JOIN_TIMEOUT_S = 10.0
DEFAULT_HEARTBEAT_S = 5.0  # before a join has said the control plane's interval

_REFUSED = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def translate(exc: grpc.RpcError, hint: str = "") -> errors.ControlPlaneError:
    """``hint``: what most likely went wrong when the control plane could not be had
    (:func:`edge_agent.diagnosis.hint`), said after what gRPC said."""
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
    detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    if code in _REFUSED:
        return errors.JoinRefused(f"{code.name}: {detail}", code.name)  # type: ignore[union-attr]
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return errors.NotJoined(detail or "not joined")
    if (asked := _pushback(exc)) is not None:
        return errors.ControlPlaneBusy(f"control plane busy: {detail}", asked)
    name = code.name if code is not None else "ERROR"
    return errors.AgentUnavailable(f"control plane unavailable ({name}: {detail}){'; ' + hint if hint else ''}")


def _pushback(exc: grpc.RpcError) -> float | None:
    """The seconds a busy control plane's refusal (``RESOURCE_EXHAUSTED``) asks to wait
    (``edgeplane_proto.reconnect.PUSHBACK_KEY``); None for another error, for none, or for
    one that is not a whole number of milliseconds."""
    if not isinstance(exc, grpc.aio.AioRpcError) or exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailing = exc.trailing_metadata()
    value = dict(trailing or ()).get(reconnect.PUSHBACK_KEY)
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    return int(value) / 1000


@dataclass(frozen=True)
class JoinFacts:
    """What the agent tells the control plane about itself when it joins."""

    site: str
    bootstrap_token: str
    endpoint_url: str
    agent_version: str
    heartbeat_interval: float | None  # None: the control plane's (edgeplane serve --heartbeat-interval)
    country: str = ""
    region: str = ""
    lat: float | None = None
    lon: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    started_unix_ms: int = 0  # when this agent started: another value at a join tells the control plane it restarted
    checks_tokens: bool = False  # --serve-auth token: the endpoint list says so, and only then does the client send its token

    def to_proto(self, cap: capacity.Capacity, agent_id: str) -> pb.JoinRequest:
        location = pb.Location(country=self.country, region=self.region)
        if self.lat is not None and self.lon is not None:
            location.lat, location.lon, location.has_coordinates = self.lat, self.lon, True
        return pb.JoinRequest(
            site=self.site,
            bootstrap_token=self.bootstrap_token,
            location=location,
            labels=self.labels,
            agent_version=self.agent_version,
            endpoint_url=self.endpoint_url,
            agent_id=agent_id,
            heartbeat_interval_ms=round(_asked_interval(self.heartbeat_interval) * 1000),
            capacity=cap.to_proto(),
            agent_started_unix_ms=self.started_unix_ms,
            checks_tokens=self.checks_tokens,
        )


def _asked_interval(seconds: float | None) -> float:
    """The heartbeat interval a Join asks for (0: the control plane's), within what the
    control plane takes: it would clamp it anyway, and past about 49 days the Join's uint32
    milliseconds could not carry it and no join could be sent."""
    if not seconds:
        return 0.0
    return min(max(seconds, edge_agent.MIN_HEARTBEAT_S), edge_agent.MAX_HEARTBEAT_S)


def _report(exc: Exception) -> tuple[int, str, bool]:
    """The level and line of a failure the agent knows (what to change, or that it retries),
    and whether a traceback goes with it: only for what it did not foresee."""
    if isinstance(exc, errors.JoinRefused):
        return logging.ERROR, f"control plane refused this agent: {exc}", False
    if isinstance(exc, errors.ControlPlaneBusy):
        return logging.INFO, str(exc), False
    if isinstance(exc, errors.NotJoined):
        return logging.WARNING, f"control plane asks to join again: {exc}", False
    if isinstance(exc, errors.AgentUnavailable):
        return logging.WARNING, str(exc), False
    if isinstance(exc, errors.AgentError):  # an unusable certificate, an identity tool that failed
        return logging.ERROR, str(exc), False
    return logging.ERROR, f"uplink session failed: {type(exc).__name__}: {exc}", True


class Reporter(Protocol):
    """What heartbeats carry; the daemon implements it."""

    def capacity(self) -> capacity.Capacity: ...

    def load(self) -> capacity.Load: ...

    def inflight(self) -> int: ...

    def model_statuses(self) -> tuple[registry.ModelStatus, ...]: ...

    def model_load(self) -> list[tuple[str, int, float]]: ...

    def assignment_version(self) -> int: ...

    def draining(self) -> bool: ...


def client_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        ("grpc.max_send_message_length", 256 * 1024),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        # Directly, whatever http_proxy / https_proxy this host sets: the agent reads no proxy
        # settings (docs/deploy.md), and gRPC would send its connection, loopback included,
        # to a proxy that answers the CONNECT with a refusal on a corporate network.
        ("grpc.enable_http_proxy", 0),
    ]


class Uplink:
    def __init__(
        self,
        target: str | Sequence[str],
        facts: JoinFacts,
        store: state.StateStore,
        reporter: Reporter,
        on_assignments: Callable[[assignments.AssignmentSet], Awaitable[None]],
        *,
        on_serve_tokens: Callable[[pb.ServeTokens | None], None] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        agent_tls: tls.AgentTls | None = None,
        backoff: RetryPolicy = RECONNECT,
        rng: Jitter | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """``clock``: the wall clock, for what is dated (certificates, heartbeats' send
        times); ``monotonic``: for how long a session lasted, which a step of the wall clock
        (NTP, a virtual machine resumed) must not lengthen or shorten; ``sleep``: the wait
        between two sessions (a stop ends it sooner)."""
        # several control-plane replicas: a session that cannot be had moves to the next address
        self._targets = [target] if isinstance(target, str) else list(target)
        if not self._targets:
            raise ValueError("no control-plane address")
        self._current = 0
        self._facts = facts
        self._store = store
        self._reporter = reporter
        self._on_assignments = on_assignments
        # the API tokens each set comes with (None: a control plane of an earlier release sent none)
        self._on_serve_tokens = on_serve_tokens
        self._creds = channel_credentials
        self._tls = agent_tls
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.interval = _asked_interval(facts.heartbeat_interval) or DEFAULT_HEARTBEAT_S  # until the join answers
        try:
            self.identity = store.load_identity(facts.site)
        except errors.StateError as exc:
            if not facts.bootstrap_token:
                raise errors.StateError(f"{exc}: give a bootstrap token (--token) to join again as a new agent") from None
            kept = store.set_aside(store.identity_path)
            log.error("%s; set aside as %s: joining again with the bootstrap token", exc, kept.name)
            self.identity = None
        self._saved_identity = self.identity  # what identity.json holds
        # when the client certificate is due (mutual TLS)
        self._renewal = renewal.Renewal(agent_tls, facts.site, clock) if agent_tls is not None else None
        self._answered = False  # the control plane answered a join in this session
        self._outage = outage.Outage()  # what the log has said of the failed attempts since
        self.connected = False  # a session is joined now
        self.last_contact: float | None = None  # wall time the control plane was last reached (None: not since start)

    def contact(self) -> tuple[bool, float | None, float | None]:
        """(connected now, when the control plane was last reached, when the client
        certificate expires), wall-clock times, None where unknown: what the agent's
        /metrics tells a site's own monitoring of its link."""
        expires = self._renewal.expires if self._renewal is not None else None
        return self.connected, self.last_contact, expires

    def _reached(self) -> None:
        self.last_contact = self._clock()

    @property
    def _target(self) -> str:
        return self._targets[self._current]

    def nudge(self) -> None:
        """Send a heartbeat now (a model changed state) instead of at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._answered = False
            started = self._monotonic()
            try:
                await self._session()
            except errors.RenewalDue:
                log.info("client certificate due for renewal: joining again with a new CSR")
                continue
            except Exception as exc:  # the uplink never dies: log, back off, go on
                if self._stopping.is_set():
                    return  # ended by the stop itself (the signal may have reached the identity tool too): nothing to report
                level, line, trace = _report(exc)
                said = self._outage.failed(line, self._clock(), self._monotonic())
                log.log(level if said is not None else logging.DEBUG, "%s", said or line, exc_info=exc if trace else None)
                busy = exc if isinstance(exc, errors.ControlPlaneBusy) else None
            else:
                busy, said = None, ""
            if self._stopping.is_set():
                return
            if busy is not None:
                # Refused while the control plane works through other joins: it said when to
                # come back, which is when it can take this one; the backoff ladder stands.
                delay = pushback_delay(busy.retry_after_s, self._rng)
                log.info("reconnecting to %s in %.1fs, as it asked", self._target, delay)
                await self._rest(delay)
                continue
            if self._answered and self._monotonic() - started >= self.interval:
                # The control plane answered and the session lasted a heartbeat: it restarted
                # or dropped us, not an outage. One that ends every session at once (a crash
                # loop) keeps the ladder climbing, so a fleet does not rejoin it in a storm.
                attempt = 0
            # the next address at once; the backoff ladder steps once per round of addresses
            self._current = (self._current + 1) % len(self._targets)
            attempt += 1
            delay = 0.0 if self._current else self._backoff.delay(-(-attempt // len(self._targets)), self._rng)
            # said along with the failure it follows; a failure kept out of the log keeps this out too
            log.log(logging.INFO if said is not None else logging.DEBUG, "reconnecting to %s in %.1fs", self._target, delay)
            await self._rest(delay)

    async def _rest(self, delay: float) -> None:
        """Wait ``delay`` seconds between sessions, or until the agent stops."""
        resting = asyncio.ensure_future(self._sleep(delay))
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({resting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (resting, stopped):
                task.cancel()
            await asyncio.gather(resting, stopped, return_exceptions=True)

    async def stop(self) -> None:
        """Send one last heartbeat marked draining (best effort) and end the session: the task
        running :meth:`run` ends once the control plane has it (or the session fails)."""
        self._stopping.set()
        self._wake.set()

    async def _session(self) -> None:
        if self._tls is not None:
            assert self._renewal is not None  # made with the TLS material
            lapsed = False
            if self._tls.enrolled():
                await self._renewal.check(self._facts.bootstrap_token)
                lapsed = self._renewal.lapsed(self._facts.bootstrap_token)
            if lapsed or not self._tls.enrolled():
                key_pem, csr_pem = await self._renewal.pending()  # one key until an enrolment succeeds
                if self._stopping.is_set():
                    return  # no join now: one the control plane took but this agent never saved would hold the site
                try:
                    await self._enroll(self._tls, key_pem, csr_pem)
                except errors.JoinRefused as exc:
                    if lapsed and exc.code == grpc.StatusCode.UNAUTHENTICATED.name:
                        self._renewal.token_refused()
                    raise
            channel = grpc.aio.secure_channel(self._target, self._tls.mutual_credentials(), options=client_options())
        elif self._creds is None:
            channel = grpc.aio.insecure_channel(self._target, options=client_options())
        else:
            channel = grpc.aio.secure_channel(self._target, self._creds, options=client_options())
        joined = False
        try:
            stub = pb_grpc.AgentControlStub(channel)
            await self._join(stub)
            joined = True
            await self._streams(stub)
        except grpc.RpcError as exc:
            # a stream cut after the join says nothing about the settings that made the connection
            raise translate(exc, "" if joined else await self._hint(exc, self._dial(self._target))) from exc
        finally:
            self.connected = False
            await channel.close(grace=None)

    def _dial(self, target: str, *, join: bool = False) -> diagnosis.Dial:
        agent_tls = self._tls
        if agent_tls is None:
            return diagnosis.Dial(target, self._target, tls=False)
        saved = agent_tls.ca_file is None and agent_tls.saved_ca_path.exists()
        return diagnosis.Dial(target, self._target, tls=True, join=join, join_address=agent_tls.join_target is not None,
                              ca_file=str(agent_tls.ca_file or ""), saved_ca=str(agent_tls.saved_ca_path) if saved else "",
                              client_cert="" if join else str(agent_tls.cert_path))

    async def _hint(self, exc: grpc.RpcError | OSError, dial: diagnosis.Dial) -> str:
        """What most likely kept the control plane from being had, and the flag that fixes
        it ("" for a refusal, or where the evidence does not say); may ask the address what it
        speaks (:func:`edge_agent.diagnosis.probe`)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            if exc.code() not in _UNREACHABLE:
                return ""
            detail = exc.details() or ""
        else:
            detail = str(exc)
        found = diagnosis.symptom(detail)
        address = diagnosis.to_probe(found, dial)
        return diagnosis.hint(found, dial, await diagnosis.probe(address) if address else None)

    async def _enroll(self, agent_tls: tls.AgentTls, key_pem: bytes, csr_pem: bytes) -> None:
        """First join over the join port: bootstrap token + CSR in, client certificate out."""
        target = agent_tls.join_target_for(self._target)
        if agent_tls.needs_pinned_ca():
            if (saved := agent_tls.saved_ca_sha256()) is not None:
                log.warning("the CA saved in %s (SHA-256 %s) is not the one --ca-sha256 names: replacing it with the one "
                            "%s presents under that SHA-256", agent_tls.saved_ca_path, saved, target)
            try:
                await agent_tls.fetch_pinned_ca(target)
            except errors.AgentUnavailable as exc:
                cause = exc.__cause__
                hint = await self._hint(cause, self._dial(target, join=True)) if isinstance(cause, OSError) else ""
                if not hint:
                    raise
                raise errors.AgentUnavailable(f"{exc}; {hint}") from cause
        channel = grpc.aio.secure_channel(target, agent_tls.join_credentials(), options=client_options())
        try:
            request, metadata = self._join_request()
            request.csr_pem = csr_pem.decode()
            response: pb.JoinResponse = await pb_grpc.AgentControlStub(channel).Join(request, metadata=metadata, timeout=JOIN_TIMEOUT_S)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                # the site's credential does not enrol: only a bootstrap token does, and --token is no longer one
                raise errors.JoinRefused(f"cannot enrol: {exc.details()}; restart the agent with a fresh bootstrap token "
                                         "(--token, from 'edgeplane token create --role agent')", exc.code().name) from exc
            raise translate(exc, await self._hint(exc, self._dial(target, join=True))) from exc
        finally:
            await channel.close(grace=None)
        if not response.certificate_pem:
            raise errors.JoinRefused("the control plane issued no client certificate; is it running with --insecure-agents?")
        self._answered = True
        self._reached()
        # in a worker thread, as every save: its fsyncs may take seconds on a slow disk
        await asyncio.to_thread(agent_tls.save, key_pem, response.certificate_pem.encode(), response.ca_pem.encode(),
                                received_at=self._clock())
        assert self._renewal is not None  # made with the TLS material
        self._renewal.forget()
        await self._adopt(state.Identity(self._facts.site, response.agent_id, response.credential))
        log.info("enrolled: client certificate for site %s issued by the control plane's CA", self._facts.site)

    async def _adopt(self, identity: state.Identity) -> None:
        """Take the identity the control plane issued, and write it unless ``identity.json``
        already holds it. Held in memory first, so that a save that fails (a full disk) still
        rejoins as this agent, and compared with the file, not with memory, so that the next
        join writes what the failed save could not: a restart would otherwise spend the
        bootstrap token again. Written in a worker thread: its fsync may take seconds on a
        slow disk, during which the event loop serves inference and health probes."""
        self.identity = identity
        if identity != self._saved_identity:
            await asyncio.to_thread(self._store.save_identity, identity)
            self._saved_identity = identity

    def _join_request(self) -> tuple[pb.JoinRequest, tuple[tuple[str, str], ...]]:
        """A Join with this site's facts and measured capacity; a known identity rejoins
        with its agent id and credential."""
        identity = self.identity
        request = self._facts.to_proto(self._reporter.capacity(), identity.agent_id if identity else "")
        return request, ((CREDENTIAL_KEY, identity.credential),) if identity else ()

    async def _join(self, stub: pb_grpc.AgentControlStub) -> None:
        request, metadata = self._join_request()
        certificate = self._renewal
        csr = await certificate.request() if certificate is not None else None
        if csr is not None:
            request.csr_pem = csr[1].decode()
        try:
            response: pb.JoinResponse = await stub.Join(request, metadata=metadata, timeout=JOIN_TIMEOUT_S)
        except grpc.RpcError as exc:
            if certificate is None or csr is None or exc.code() in _UNREACHABLE or _pushback(exc) is not None:
                raise  # a busy control plane refused the join, not the renewal: the next join asks again
            # Renewal is best effort while the certificate is valid: join without it.
            certificate.failed(f"the control plane refused the renewal ({exc.code().name}: {exc.details()})")
            request.ClearField("csr_pem")
            csr = None
            response = await stub.Join(request, metadata=metadata, timeout=JOIN_TIMEOUT_S)
        self._answered = True
        self.connected = True
        self._reached()
        if certificate is not None and csr is not None:
            await certificate.renewed(csr[0], response)
        await self._adopt(state.Identity(self._facts.site, response.agent_id, response.credential))
        if response.heartbeat_interval_ms:
            self.interval = response.heartbeat_interval_ms / 1000
        log.info(
            "joined control plane %s as %s (site %s, heartbeat every %gs)%s",
            self._target,
            response.agent_id,
            self._facts.site,
            self.interval,
            self._outage.ended(self._monotonic()),
        )

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        assert self.identity is not None  # set by _join before any stream opens
        return (
            (SITE_KEY, self._facts.site),
            (AGENT_ID_KEY, self.identity.agent_id),
            (CREDENTIAL_KEY, self.identity.credential),
        )

    async def _streams(self, stub: pb_grpc.AgentControlStub) -> None:
        heartbeats = stub.Heartbeats(self._beats(), metadata=self._metadata())
        watch = stub.WatchAssignments(
            pb.WatchAssignmentsRequest(known_version=self._reporter.assignment_version(), checks_tokens=self._on_serve_tokens is not None),
            metadata=self._metadata(),
        )

        async def receive() -> None:
            async for message in watch:
                desired = assignments.AssignmentSet.from_proto(message)
                log.info(
                    "assignment set v%d received (%d models)",
                    desired.version,
                    len(desired.assignments),
                )
                self._reached()
                if self._on_serve_tokens is not None:
                    self._on_serve_tokens(message.serve_tokens if message.HasField("serve_tokens") else None)
                await self._on_assignments(desired)

        receiver = asyncio.ensure_future(receive())
        sender = asyncio.ensure_future(heartbeats)
        tasks = {receiver, sender}
        renewal_due = asyncio.ensure_future(self._renewal.due()) if self._renewal is not None else None
        if renewal_due is not None:
            tasks.add(renewal_due)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the stream's error
            if not self._stopping.is_set():
                raise errors.AgentUnavailable("control plane closed the stream")
        finally:
            watch.cancel()
            if renewal_due is not None:
                renewal_due.cancel()
            for task in (receiver, sender):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await receiver
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await sender

    async def _beats(self) -> AsyncIterator[pb.Heartbeat]:
        seq = 0
        last_capacity: capacity.Capacity | None = None
        last_models: tuple[registry.ModelStatus, ...] | None = None
        while True:
            self._wake.clear()
            report = self._reporter
            load = report.load()
            beat = pb.Heartbeat(
                seq=seq,
                sent_unix_ms=int(self._clock() * 1000),
                inflight=report.inflight(),
                cpu_percent=load.cpu_percent,
                memory_available_bytes=load.memory_available_bytes,
                assignment_version=report.assignment_version(),
                draining=report.draining() or self._stopping.is_set(),
            )
            for index, free in load.gpu_free_bytes:
                beat.gpu_load.add(index=index, memory_free_bytes=free)
            for name, requests, busy in report.model_load():
                beat.model_load.add(name=name, requests_total=requests, busy_seconds_total=busy)
            if seq % 12 == 0:  # static facts are re-probed now and then, sent if changed
                cap = report.capacity()
                if cap != last_capacity:  # equality ignores free GPU memory, which is load
                    last_capacity = cap
                    beat.capacity.CopyFrom(cap.to_proto())
            models = report.model_statuses()
            if models != last_models:
                last_models = models
                beat.models.SetInParent()
                beat.models.models.extend(m.to_proto() for m in models)
            yield beat  # resumed when the stream wants the next one: this one is on its way
            self._reached()
            seq += 1
            if self._stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
