"""The relay stream on the leader: refused for a wrong secret or by a replica that does not
lead, kept through an agent's oversized state and others' malformed messages, and let go
when it ends or is cut off, the sets for its sites waiting for the next stream."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import grpc
import pytest

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import model, relay, service

from .conftest import SECRET, SITE, TOKEN, ControlPlane, Leader, MakeAgent
from .relaying import of, until


async def test_a_relay_with_a_wrong_secret_or_to_a_replica_that_does_not_lead_is_refused(
    leader: Leader, follower: tuple[ControlPlane, relay.RelayClient], make_agent: MakeAgent
) -> None:
    cp, client = follower
    await make_agent(cp)
    client.point(leader.named("not-the-secret"))
    await until(lambda: client.last_error.startswith("UNAUTHENTICATED"), "the wrong secret refused")
    leader.secret = None
    client.point(leader.named())
    await until(lambda: client.last_error.startswith("UNAVAILABLE") and "does not lead" in client.last_error, "a non-leader refusing")
    assert leader.cp.hub.status(SITE) is None and not client.view()["connected"]

    leader.secret = SECRET  # elected: the relay gets through at its next attempt
    await leader.cp.events.wait_for(of(model.AgentEventKind.JOINED), timeout=15)
    leader.servicer.close_all()  # it stops leading: the stream ends, the follower keeps its agent
    await until(lambda: not client.view()["connected"], "the stream ended")
    assert cp.hub.status(SITE) is not None and cp.hub.status(SITE).healthy  # type: ignore[union-attr]


async def test_an_agent_whose_state_adds_up_past_the_leader_s_message_limit_does_not_end_the_relay(
    leader: Leader, follower: tuple[ControlPlane, relay.RelayClient]
) -> None:
    """Each message an agent sends is under the listener's limit, but its models (one
    heartbeat) and its load (another) together are not: reported whole, as every agent is
    when a relay stream starts, it must not end the stream that carries the replica's others."""
    cp, client = follower

    def join(site: str) -> model.JoinGrant:
        return cp.hub.join(model.JoinApplication(site, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test",
                                                 1.0, model.Capacity(cpu_cores=2)))

    join("edge-small")
    big = join("edge-big")
    models = pb.Heartbeat(sent_unix_ms=1, models=pb.ModelStates(models=[
        pb.ModelState(name=f"model-{i:05d}", sha256="a" * 64, serving_sha256="a" * 64, phase=pb.MODEL_PHASE_READY,
                      deployment="d" * 30, variant="v" * 20) for i in range(1000)]))
    load = pb.Heartbeat(sent_unix_ms=2, model_load=[
        pb.ModelLoad(name=f"model-{i:05d}" + "y" * 40, requests_total=1, busy_seconds_total=0.5) for i in range(3500)])
    for beat in (models, load):  # as the agents' servicer takes them
        assert beat.ByteSize() < service.MAX_RECEIVE_BYTES
        cp.hub.record_heartbeat("edge-big", big.agent_id, model.Heartbeat.from_proto(beat))
    client.point(leader.named())  # the stream starts: every agent is reported whole

    def relayed() -> bool:
        status = leader.cp.hub.status("edge-big")
        return status is not None and len(status.models) == 1000 and len(status.model_load) == 3500
    await until(relayed, "the large agent relayed whole")
    # the other agent too, in its own batch (the large one's parts fill batches of their own)
    await until(lambda: (small := leader.cp.hub.status("edge-small")) is not None and small.healthy, "the other agent relayed")
    assert client.connected and client.last_error == ""


async def test_malformed_relay_messages_end_only_that_stream(leader: Leader) -> None:
    async with grpc.aio.insecure_channel(leader.cp.target) as channel:
        call = channel.stream_stream(relay.METHOD)(metadata=((relay.SECRET_KEY, SECRET),))
        await call.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "malformed RelayReports" in (refused.value.details() or "")

        call = channel.stream_stream(relay.METHOD, request_serializer=pb.RelayReports.SerializeToString)(
            metadata=((relay.SECRET_KEY, SECRET),))
        bad = pb.AgentReport(site="Not A Site", agent_id="agt-1", agent=pb.JoinRequest(endpoint_url="http://127.0.0.1:1"))
        good = pb.AgentReport(site="edge-ok", agent_id="agt-2", agent=pb.JoinRequest(endpoint_url="http://127.0.0.1:2"),
                              state=pb.Heartbeat(inflight=3))
        await call.write(pb.RelayReports(replica="cp-x", reports=[bad, good]))
        await leader.cp.events.wait_for(of(model.AgentEventKind.JOINED, "edge-ok"))
        assert leader.cp.hub.status("Not A Site") is None and leader.cp.hub.status("edge-ok").inflight == 3  # type: ignore[union-attr]
        await call.done_writing()
    await until(lambda: leader.cp.hub.relayed() == 1, "records stay after the stream ends")


def relay_stream(channel: grpc.aio.Channel) -> Any:
    """A relay stream to the leader, as a relaying replica opens one."""
    return channel.stream_stream(relay.METHOD, request_serializer=pb.RelayReports.SerializeToString,
                                 response_deserializer=pb.RelayAssignments.FromString)(metadata=((relay.SECRET_KEY, SECRET),))


def reported_whole(site: str, agent_id: str) -> pb.AgentReport:
    return pb.AgentReport(site=site, agent_id=agent_id, agent=pb.JoinRequest(endpoint_url="http://127.0.0.1:2"),
                          state=pb.Heartbeat(inflight=1))


def intent(version: int) -> list[model.Assignment]:
    return [model.Assignment(model="intent", sha256="ab" * 32, artifact_url=f"http://cp/v1/artifacts/{version}",
                             deployment="d", variant="v")]


async def test_a_relay_stream_that_ended_is_let_go_and_its_sites_sets_wait_for_the_next(leader: Leader) -> None:
    """A replica that reconnects opens its new stream before the leader sees the old one end:
    that end leaves the new stream in place. Once its last stream ended the leader holds
    nothing of it (replica ids are new at each start: a leader would otherwise keep one per
    follower restart), and a set given to its agent's site meanwhile reaches the next stream
    that reports the agent."""
    agents = leader.cp.hub
    async with grpc.aio.insecure_channel(leader.cp.target) as channel:
        old, new = relay_stream(channel), relay_stream(channel)
        await old.write(pb.RelayReports(replica="cp-x", reports=[reported_whole("edge-ok", "agt-1")]))
        joined = await leader.cp.events.wait_for(of(model.AgentEventKind.JOINED, "edge-ok"))
        await new.write(pb.RelayReports(replica="cp-x", reports=[reported_whole("edge-ok", "agt-1")]))
        await leader.cp.events.wait_for(lambda e: e.site == "edge-ok" and e is not joined and "through replica cp-x" in e.reason)
        await old.done_writing()
        assert await old.read() is grpc.aio.EOF
        assert agents.relays() == ["cp-x"]  # the newer stream stays: the agent's sets go down it
        agents.set_assignments("edge-ok", intent(1), 1)
        down = await new.read()
        assert [(s.site, s.set.version) for s in down.sites] == [("edge-ok", 1)]

        await new.done_writing()
        assert await new.read() is grpc.aio.EOF
        assert agents.relays() == []
        agents.set_assignments("edge-ok", intent(2), 2)  # kept for the agent, sent down no stream
        again = relay_stream(channel)
        await again.write(pb.RelayReports(replica="cp-x", reports=[reported_whole("edge-ok", "agt-1")]))
        down = await again.read()
        assert [(s.site, s.set.version) for s in down.sites] == [("edge-ok", 2)]
        await again.done_writing()
        assert await again.read() is grpc.aio.EOF
    assert agents.relays() == []


async def test_relay_streams_cut_off_leave_nothing_pending_on_the_leader(leader: Leader) -> None:
    """A relaying replica killed or cut off: gRPC cancels the leader's handler while it waits
    for something to send. Nothing it started may stay pending (the cycle collector would
    reap each such task later, logging "Task was destroyed but it is pending!")."""
    gc.disable()  # what counts is what the handler cancels, not what the collector happens to reap
    try:
        def pending() -> int:  # gRPC's server has one of its own, replaced at each call
            return sum(1 for t in asyncio.all_tasks() if not t.done())

        before = pending()
        async with grpc.aio.insecure_channel(leader.cp.target) as channel:
            for i in range(5):
                call = relay_stream(channel)
                await call.write(pb.RelayReports(replica=f"cp-{i}"))
                await until(lambda: leader.cp.hub.relays() != [], "the stream attached")
                call.cancel()
                await until(lambda: leader.cp.hub.relays() == [], "the leader's handler ended")
        await until(lambda: pending() <= before, "no task left pending", within_s=2.0)
    finally:
        gc.enable()
