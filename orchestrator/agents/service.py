"""The gRPC face of the hub: ``edgeplane.agent.v1.AgentControl`` on ``grpc.aio``.

This is the one place that speaks protobuf and gRPC status codes on the control-plane
side. It validates what arrives, converts it into :mod:`orchestrator.agents.model` values
and maps the hub's errors to status codes; the hub itself never sees a gRPC object.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from edgeplane_proto import hostport, identity, reconnect
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import admission, errors, hub, model

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=Message)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AgentControl"].full_name

#: Metadata keys of the per-agent identity (one place: an mTLS pass replaces them).
SITE_KEY = "x-edgeplane-site"
AGENT_ID_KEY = "x-edgeplane-agent-id"
CREDENTIAL_KEY = "x-edgeplane-credential"

#: Largest message an agent may send; a heartbeat is well under 1 KiB, a Join a few KiB.
MAX_RECEIVE_BYTES = 256 * 1024
#: Largest message sent to an agent (an assignment set of many models).
MAX_SEND_BYTES = 16 * 1024 * 1024
#: Streams gRPC core may hold before the servicer picks them up. Its defaults (1,000 soft,
#: 3,000 hard, random early rejection in between) cancel streams when more than ~1,000
#: agents open theirs at once (a fleet reconnecting after a control-plane restart): the
#: asyncio server accepts calls one at a time, so the backlog briefly reaches the fleet size.
#: Each pending call is a few KiB; the limits stay well above the largest expected fleet.
MAX_PENDING_STREAMS = 100_000
#: How long an accepted call may wait for the server to take it up before gRPC cancels it
#: (default 30 s). A reconnecting fleet of tens of thousands queues longer than that behind
#: the one-at-a-time asyncio server, and its cancelled streams reconnect and queue again.
MAX_UNREQUESTED_S = 300

_CODES: list[tuple[type[errors.AgentHubError], grpc.StatusCode]] = [
    (errors.NotAuthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.SiteTaken, grpc.StatusCode.ALREADY_EXISTS),
    (errors.InvalidJoin, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotJoined, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def _status_code(exc: errors.AgentHubError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def call_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key] = value
    return out


def _parse(message_type: type[_M], raw: bytes) -> _M:
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise _Malformed(f"malformed {message_type.DESCRIPTOR.name}: {exc}") from exc


class _Malformed(Exception):
    pass


class AgentControlServicer:
    """Implements ``edgeplane.agent.v1.AgentControl``.

    Requests arrive as raw bytes and are parsed here, so a garbage message is answered
    INVALID_ARGUMENT with a reason instead of gRPC's generic UNKNOWN and a stack trace.
    """

    def __init__(self, agent_hub: hub.AgentHub, *, issuer: CertificateIssuer | None = None,
                 joins: admission.JoinGate | None = None, failures: admission.FailedJoins | None = None) -> None:
        self._hub = agent_hub
        self._joins = joins if joins is not None else admission.JoinGate()
        self._failures = failures if failures is not None else admission.failed_joins()
        # With an issuer, every stream must come with a client certificate naming its site.
        self._issuer = issuer

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Join": grpc.unary_unary_rpc_method_handler(
                    self.Join, response_serializer=pb.JoinResponse.SerializeToString
                ),
                "Heartbeats": grpc.stream_unary_rpc_method_handler(
                    self.Heartbeats, response_serializer=pb.HeartbeatSummary.SerializeToString
                ),
                "WatchAssignments": grpc.unary_stream_rpc_method_handler(
                    self.WatchAssignments, response_serializer=pb.AssignmentSet.SerializeToString
                ),
            },
        )

    async def Join(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        """At most the gate's limit of joins at once: one more is refused before anything of it
        is read, RESOURCE_EXHAUSTED with when to come back (:mod:`admission`); so is, before it
        takes a place, one from a peer that failed too many joins."""
        peer = admission.peer_key(context.peer() or "", _peer_site(context))
        over = self._failures.check(peer)
        if over is not None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many agent joins from {peer.partition(':')[2]!r} failed to authenticate (--join-failure-rate "
                f"{over.rate:g}/s); check its bootstrap token or certificate, and join again in {over.retry_after_s:.1f}s",
                trailing_metadata=((reconnect.PUSHBACK_KEY, str(round(over.retry_after_s * 1000))),),
            )
        place = self._joins.enter()
        if isinstance(place, admission.Refused):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this control plane is working on {place.limit} agent joins at once (--max-joins); "
                f"join again in {place.retry_after_s:.1f}s",
                trailing_metadata=((reconnect.PUSHBACK_KEY, str(round(place.retry_after_s * 1000))),),
            )
        try:
            return await self._join(raw, context, peer)
        finally:
            self._joins.leave(place)

    async def _join(self, raw: bytes, context: grpc.aio.ServicerContext, who: str) -> pb.JoinResponse:
        try:
            request = _parse(pb.JoinRequest, raw)
        except _Malformed as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        meta = call_metadata(context)
        application = model.JoinApplication(
            site=request.site,
            bootstrap_token=request.bootstrap_token,
            credential=meta.get(CREDENTIAL_KEY),
            agent_id=request.agent_id,
            endpoint_url=request.endpoint_url,
            location=model.Location.from_proto(request.location),
            labels=dict(request.labels),
            agent_version=request.agent_version,
            heartbeat_interval=request.heartbeat_interval_ms / 1000 or None,
            capacity=model.Capacity.from_proto(request.capacity),
            started_unix_ms=request.agent_started_unix_ms,
            checks_tokens=request.checks_tokens,
        )
        peer = _peer_site(context)
        if peer is not None and peer != request.site:
            self._failures.failed(who)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this certificate is for site {peer!r}, not {request.site!r}")
        if request.csr_pem:  # refused before the join touches the site's record
            if self._issuer is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "this control plane runs agents without TLS (--insecure-agents); start the agent with --insecure")
            refusal = self._issuer.signing_refusal()
            if refusal is not None:  # the join would be recorded, then no certificate given: the agent retries later
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"this control plane cannot sign certificates: {refusal}")
            try:
                self._issuer.check_agent_csr(request.csr_pem.encode())
            except ValueError as exc:  # CertificateError and malformed PEM alike
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot sign this CSR: {exc}")
        try:
            bootstrap = None
            if request.csr_pem and peer is None:  # no certificate to renew: an enrolment
                bootstrap = await self._hub.check_enrolment(request.site, request.bootstrap_token)
            response = (await self._hub.join_async(application, bootstrap)).to_proto()
        except errors.AgentHubError as exc:
            if isinstance(exc, errors.NotAuthenticated):
                self._failures.failed(who)
            await context.abort(_status_code(exc), str(exc))
            raise  # unreachable: abort raises
        if request.csr_pem:
            assert self._issuer is not None
            response.certificate_pem = self._issuer.issue_agent(request.site, request.csr_pem.encode()).decode()
            response.ca_pem = self._issuer.certificate_pem.decode()
        return response

    async def Heartbeats(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatSummary:
        site, agent_id = await self._authenticate(context)
        received = 0
        agent_hub = self._hub
        record = agent_hub.record_heartbeat
        from_proto = model.Heartbeat.from_proto
        parse = pb.Heartbeat.FromString
        try:
            stream = agent_hub.heartbeats_opened(site, agent_id)
        except errors.AgentHubError as exc:
            await context.abort(_status_code(exc), str(exc))
        try:
            async for raw in request_iterator:
                message = parse(raw)
                record(site, agent_id, from_proto(message))
                if agent_hub.tap is not None:  # this replica relays its agents to the leader
                    agent_hub.tap.beat(site, agent_id, message)
                received += 1
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed Heartbeat: {exc}")
        except errors.AgentHubError as exc:
            await context.abort(_status_code(exc), str(exc))
        finally:  # however it ended: the agent's connection closed, or it was refused
            agent_hub.heartbeats_ended(stream)
        return pb.HeartbeatSummary(received=received)

    async def WatchAssignments(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AssignmentSet]:
        try:
            # its known_version not used: the current set is sent on every open (AgentHub.watch_assignments)
            request = _parse(pb.WatchAssignmentsRequest, raw)
        except _Malformed as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        site, agent_id = await self._authenticate(context)
        async for assignment_set in self._hub.watch_assignments(site, agent_id, tokens=request.checks_tokens):
            yield assignment_set.to_proto()
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, f"site {site!r} was taken over; join again"
        )

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        meta = call_metadata(context)
        site = meta.get(SITE_KEY, "")
        agent_id = meta.get(AGENT_ID_KEY, "")
        if self._issuer is not None and _peer_site(context) != site:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"streams for site {site!r} need that site's client certificate (join with a bootstrap token first)")
        try:
            await self._hub.authenticate_stream(site, agent_id, meta.get(CREDENTIAL_KEY, ""))
        except errors.AgentHubError as exc:
            await context.abort(_status_code(exc), str(exc))
        return site, agent_id


class CertificateIssuer(Protocol):
    """The control plane's CA as the servicer sees it."""

    @property
    def certificate_pem(self) -> bytes: ...

    def signing_refusal(self) -> str | None: ...

    def check_agent_csr(self, csr_pem: bytes) -> None: ...

    def issue_agent(self, site: str, csr_pem: bytes) -> bytes: ...


def _peer_site(context: grpc.aio.ServicerContext) -> str | None:
    """The site named by the verified client certificate of this call, if there is one."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    return identity.site_of(pem[0]) if pem else None


@dataclass(frozen=True)
class MutualTls:
    """Agent identity by client certificate. The agent port requires a certificate from the
    issuer's CA; a second, join port takes the first join (bootstrap token + CSR) over
    server-authenticated TLS, since gRPC cannot make client certificates optional."""

    issuer: CertificateIssuer
    # the listener's (certificate chain, key) PEM, asked on every handshake: a new pair is
    # served from the next one on (the control plane renews its certificate as it ages)
    server_certificate: Callable[[], tuple[bytes, bytes]]
    join_port: int = 0


def _renewing_credentials(mtls: MutualTls, client_ca: bytes | None) -> grpc.ServerCredentials:
    """TLS credentials that take up the pair ``mtls.server_certificate`` gives when it changes."""
    def configuration(pair: tuple[bytes, bytes]) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pair[1], pair[0])], root_certificates=client_ca)

    served = [mtls.server_certificate()]

    def fetch() -> grpc.ServerCertificateConfiguration | None:  # on gRPC's threads, before each handshake
        try:
            pair = mtls.server_certificate()
        except Exception:  # a failure here would fail the handshake: serve the pair before, and say why
            log.exception("cannot renew the agent listener's certificate; serving the one before")
            return None
        if pair == served[0]:
            return None
        served[0] = pair
        return configuration(pair)

    return grpc.dynamic_ssl_server_credentials(configuration(served[0]), fetch, require_client_authentication=client_ca is not None)


@dataclass(frozen=True)
class ServerTls:
    """PEM material for a TLS listener; ``client_ca`` set = require client certificates."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


def server_options(max_receive_bytes: int = MAX_RECEIVE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        # Agents ping every 20 s so a dead uplink is noticed even with no heartbeats due.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.server.max_pending_requests", MAX_PENDING_STREAMS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_STREAMS),
        ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_S),
        # gRPC binds with SO_REUSEPORT by default: a second control plane given a taken
        # --agent-port would share it, and the kernel would split the agents between the two
        ("grpc.so_reuseport", 0),
    ]


class AgentServer:
    """A started gRPC listener for agents plus the hub's health sweeper."""

    def __init__(self, server: grpc.aio.Server, port: int, sweeper: asyncio.Task[None], join_port: int | None = None) -> None:
        self.server = server
        self.port = port
        self.join_port = join_port
        self._sweeper = sweeper

    async def stop(self, grace: float | None = 1.0) -> None:
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper
        await self.server.stop(grace)


def _add_port(add: Callable[[], int], address: str, what: str) -> int:
    """gRPC reports a port it cannot bind as 0 or as a RuntimeError, by version: either way
    the user reads which address, for what, and why it is most likely taken."""
    try:
        port = add()
    except RuntimeError as exc:
        raise OSError(errno.EADDRINUSE, f"cannot listen on {address} ({what}): {exc}") from None
    if port == 0:
        raise OSError(errno.EADDRINUSE, f"cannot listen on {address} ({what}): address already in use or not available")
    return port


async def start_agent_server(
    agent_hub: hub.AgentHub,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ServerTls | None = None,
    *,
    mtls: MutualTls | None = None,
    max_receive_bytes: int = MAX_RECEIVE_BYTES,
    sweep_period: float | None = None,
    more: Sequence[grpc.GenericRpcHandler] = (),
    joins: admission.JoinGate | None = None,
    failures: admission.FailedJoins | None = None,
) -> AgentServer:
    """Listen for agents on ``host:port`` (0 = any free port) and start sweeping health;
    ``more`` services share the listener (the replica relay); ``joins`` bounds the joins
    worked on at once (default :data:`admission.MAX_JOINS`), ``failures`` the failed joins
    a peer may make (default :func:`admission.failed_joins`)."""
    server = grpc.aio.server(options=server_options(max_receive_bytes))
    issuer = mtls.issuer if mtls is not None else None
    server.add_generic_rpc_handlers((AgentControlServicer(agent_hub, issuer=issuer, joins=joins, failures=failures).handler(), *more))
    address = hostport.address(host, port)
    join_port = None
    if mtls is not None:
        bound = _add_port(lambda: server.add_secure_port(address, _renewing_credentials(mtls, mtls.issuer.certificate_pem)),
                          address, "agents, --agent-port")
        join_address = hostport.address(host, mtls.join_port)
        join_port = _add_port(lambda: server.add_secure_port(join_address, _renewing_credentials(mtls, None)),
                              join_address, "agent joins, --agent-join-port")
    elif tls is None:
        bound = _add_port(lambda: server.add_insecure_port(address), address, "agents, --agent-port")
    else:
        credentials = grpc.ssl_server_credentials(
            [(tls.private_key, tls.certificate_chain)],
            root_certificates=tls.client_ca,
            require_client_auth=tls.client_ca is not None,
        )
        bound = _add_port(lambda: server.add_secure_port(address, credentials), address, "agents, --agent-port")
    await server.start()
    sweeper = asyncio.create_task(agent_hub.run_sweeper(sweep_period), name="agent-hub-sweeper")
    mode = "mutual TLS, joins on port %d" % join_port if join_port else ("tls" if tls else "insecure")
    log.info("agent gRPC listening on %s (%s)", hostport.address(host, bound), mode)
    return AgentServer(server, bound, sweeper, join_port)
