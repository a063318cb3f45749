"""The leader's end of the relay: it takes other replicas' relay streams and answers them.

While this replica leads, :class:`RelayServicer` serves ``edgeplane.agent.v1.ReplicaRelay``
on its agent listener: it checks the secret it published, applies each batch of reports to
its hub (joins, heartbeats, claims of a site, losses) and sends down each stream the
assignment sets, refusals and answers to claims for that replica's agents. The relaying
replica's end, the protocol's story and its constants are :mod:`orchestrator.agents.relay`'s.
The two ends share only the wire and its constants: a replica answers relays while it
leads and relays its own agents while it follows, so each end can be read and changed
without the other.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import errors, hub, model, relay, service

log = logging.getLogger("orchestrator.agents.relay")  # the relay's own: both ends' story in one log


class RelayServicer:
    """Takes relay streams while this replica leads: ``secret()`` is the secret it published,
    None while it does not lead."""

    def __init__(self, agent_hub: hub.AgentHub, secret: Callable[[], str | None]) -> None:
        self._hub = agent_hub
        self._secret = secret
        self._streams: set[_Stream] = set()
        self.reports_total = 0

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(relay.SERVICE_NAME, {
            "Relay": grpc.stream_stream_rpc_method_handler(
                self.Relay, response_serializer=pb.RelayAssignments.SerializeToString),
        })

    def close_all(self) -> None:
        """End every relay stream now (this replica stopped leading)."""
        for stream in self._streams:
            stream.closing = True
            stream.wake.set()

    async def Relay(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RelayAssignments]:
        secret = self._secret()
        if secret is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this control-plane replica does not lead")
        given = service.call_metadata(context).get(relay.SECRET_KEY, "")
        if not hmac.compare_digest(given.encode(), (secret or "").encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong relay secret (it changes with each leader)")
        stream = _Stream()
        self._streams.add(stream)
        # One task per stream, and the handler awaits only the stream's own wake-up (which the
        # reader's end sets too): when gRPC cancels the handler (its peer went away) nothing
        # else is left waiting.
        reader = asyncio.create_task(self._read(requests, stream), name="relay-reader")
        reader.add_done_callback(lambda _: stream.wake.set())
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.closing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "this control-plane replica stopped leading")
                if stream.outbox or stream.again or stream.refused or stream.free:
                    yield stream.take()
                if reader.done():
                    problem = reader.result()
                    if problem:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                    return
        finally:
            self._streams.discard(stream)
            reader.cancel()
            if stream.via is not None:
                self._hub.detach_relay(stream.via, stream)
                log.info("replica %s stopped relaying its agents", stream.via)

    async def _read(self, requests: AsyncIterator[bytes], stream: _Stream) -> str | None:
        """Apply the batches; returns why the stream must end, or None when the replica ended it."""
        async for raw in requests:
            try:
                batch = pb.RelayReports.FromString(raw)
            except DecodeError as exc:
                return f"malformed RelayReports: {exc}"
            if stream.via is None:
                if not batch.replica:
                    return "the first RelayReports must name the relaying replica"
                stream.via = batch.replica
                self._hub.attach_relay(stream.via, stream)
                log.info("replica %s relays its agents here", stream.via)
            for report in batch.reports:
                self.reports_total += 1
                try:
                    self._apply(report, stream)
                except errors.AgentHubError as exc:  # one bad agent does not end the others' relay
                    log.warning("relayed agent %r of site %r from replica %s refused: %s", report.agent_id, report.site, stream.via, exc)
        return None

    def _apply(self, report: pb.AgentReport, stream: _Stream) -> None:
        via = stream.via
        assert via is not None
        if report.gone:
            self._hub.relayed_gone(report.site, report.agent_id, via)
            return
        if report.claim:
            try:
                self._hub.check_claim(report.site)
            except errors.SiteTaken as exc:
                log.info("a join for site %s at replica %s refused: %s", report.site, via, exc)
                stream.refuse(report.site, "", str(exc), exc.holder, exc.retry_after_s)
            else:
                stream.free.add(report.site)
                stream.wake.set()
            return
        if report.HasField("agent"):
            joined = report.agent
            try:
                self._hub.admit_relayed(model.JoinApplication(
                    site=report.site, bootstrap_token="", credential=None, agent_id=report.agent_id,
                    endpoint_url=joined.endpoint_url, location=model.Location.from_proto(joined.location),
                    labels=dict(joined.labels), agent_version=joined.agent_version,
                    heartbeat_interval=joined.heartbeat_interval_ms / 1000 or None,
                    capacity=model.Capacity.from_proto(joined.capacity), started_unix_ms=joined.agent_started_unix_ms,
                    checks_tokens=joined.checks_tokens),
                    report.agent_id, via)
            except errors.SiteTaken as exc:
                log.warning("agent %s of site %s through replica %s refused: %s", report.agent_id, report.site, via, exc)
                stream.refuse(report.site, report.agent_id, str(exc), exc.holder, exc.retry_after_s)
                return
            except errors.NotAuthenticated as exc:  # revoked: the replica drops it, as it would have once told
                log.warning("agent %s of site %s through replica %s refused: %s", report.agent_id, report.site, via, exc)
                stream.refuse(report.site, report.agent_id, str(exc))
                return
        if report.HasField("state") and not self._hub.relayed_heartbeat(
                report.site, report.agent_id, model.Heartbeat.from_proto(report.state), via):
            stream.again.add(report.site)
            stream.wake.set()
            return
        if report.disconnected:
            self._hub.relayed_disconnected(report.site, report.agent_id, via)


class _Stream:
    """One relay stream on the leader: what is to be sent down it."""

    def __init__(self) -> None:
        self.via: str | None = None
        self.outbox: dict[str, model.AssignmentSet] = {}  # latest set per site
        self.again: set[str] = set()
        self.refused: list[pb.RelayRefusal] = []
        self.free: set[str] = set()  # claimed sites no live agent holds
        self.closing = False  # this replica stopped leading: the stream is to end
        self.wake = asyncio.Event()

    def push(self, site: str, assignment_set: model.AssignmentSet) -> None:
        self.outbox[site] = assignment_set
        self.wake.set()

    def refuse(self, site: str, agent_id: str, message: str, holder: str = "", retry_after_s: float = 0.0) -> None:
        """The relaying replica is to drop ``agent_id``: ``holder`` holds its site, or (none) it
        was revoked. No ``agent_id``: its claim of the site is refused."""
        self.refused.append(pb.RelayRefusal(site=site, agent_id=agent_id, holder_agent_id=holder,
                                            message=message, retry_after_ms=int(retry_after_s * 1000)))
        self.wake.set()

    def take(self) -> pb.RelayAssignments:
        message = pb.RelayAssignments(
            sites=[pb.SiteAssignments(site=site, set=s.to_proto()) for site, s in self.outbox.items()],
            report_again=sorted(self.again), refused=self.refused, free=sorted(self.free))
        self.outbox, self.again, self.refused, self.free = {}, set(), [], set()
        return message
