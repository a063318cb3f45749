"""Agents on a replica that does not lead: a real agent joins the "follower" hub, whose relay
client streams it to the "leader" hub over real gRPC on loopback; the leader's assignment
reaches the agent, which downloads, serves and reports the model back the same way."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import httpx
import numpy as np
import pytest

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator import following
from orchestrator import server as control_plane
from orchestrator import server_config
from orchestrator.agents import auth, errors, hub, model, relay, relay_leader, service
from orchestrator.security import ca
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import certificates

from .conftest import SITE, TOKEN, ControlPlane, EventLog, MakeAgent, Models, start_control_plane
from .test_agent import assignment, infer, reference, wait_model

SECRET = "relay-secret-for-tests"


@dataclass
class Leader:
    cp: ControlPlane
    servicer: relay_leader.RelayServicer
    secret: str | None = SECRET

    def named(self, secret: str = SECRET) -> relay.Leader:
        return relay.Leader("cp-leader", self.cp.target, secret, answers_claims=True)


@pytest.fixture
async def leader() -> AsyncIterator[Leader]:
    events = EventLog()
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), on_change=events, heartbeat_interval=0.2, missed_heartbeats=3)
    holder: list[Leader] = []
    servicer = relay_leader.RelayServicer(agent_hub, lambda: holder[0].secret)
    server = await service.start_agent_server(agent_hub, "127.0.0.1", 0, more=(servicer.handler(),))
    holder.append(Leader(ControlPlane(agent_hub, server, events), servicer))
    yield holder[0]
    await server.stop(grace=None)


@pytest.fixture
async def follower() -> AsyncIterator[tuple[ControlPlane, relay.RelayClient]]:
    cp = await start_control_plane()
    client = relay.RelayClient(cp.hub, "cp-follower", flush_s=0.05)
    task = asyncio.create_task(client.run())
    yield cp, client
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await cp.server.stop(grace=None)


async def until(predicate: object, what: str, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def of(kind: model.AgentEventKind, site: str = SITE) -> object:
    return lambda e: e.kind is kind and e.site == site


async def test_an_agent_on_a_follower_is_planned_by_the_leader_and_served_its_assignments(
    leader: Leader, follower: tuple[ControlPlane, relay.RelayClient], make_agent: MakeAgent, models: Models
) -> None:
    cp, client = follower
    client.point(leader.named())
    agent = await make_agent(cp)
    joined = await leader.cp.events.wait_for(of(model.AgentEventKind.JOINED))
    assert "through replica cp-follower" in joined.reason
    assert joined.status.endpoint_url == agent.endpoint_url
    assert joined.status.location == model.Location("FR", "eu-west", 48.85, 2.35) and joined.status.labels == {"tier": "edge"}
    assert joined.status.capacity == cp.hub.status(SITE).capacity  # type: ignore[union-attr]
    assert leader.cp.hub.relayed() == 1 and client.view()["connected"]

    # the leader's assignment reaches the agent through the follower; its state comes back
    leader.cp.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=7)
    state = await wait_model(leader.cp, lambda s: s.phase is model.ModelPhase.READY)
    assert state.serving_sha256 == models.v1.sha256
    assert cp.hub.assignments(SITE) == leader.cp.hub.assignments(SITE)
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as http:
        x = np.ones((2, 8), np.float32)
        np.testing.assert_allclose(await infer(http, x), reference(models.v1, 0, x), rtol=1e-5)
    await until(lambda: (s := leader.cp.hub.status(SITE)) and s.assignment_version == 7, "the applied version relayed")
    for _ in range(5):  # heartbeats keep coming through the relay (counted by the follower, not here)
        last = leader.cp.hub.status(SITE).last_heartbeat  # type: ignore[union-attr]
        await until(lambda last=last: leader.cp.hub.status(SITE).last_heartbeat > last, "heartbeats keep coming through the relay")  # type: ignore[misc, union-attr]

    # the agent stops: the leader finds it lost by the same deadline as its own agents
    await agent.stop()
    lost = await leader.cp.events.wait_for(of(model.AgentEventKind.LOST))
    assert lost.status.healthy is False


async def test_a_leader_restarted_on_a_restored_store_reaches_a_follower_s_agent_with_its_lower_numbered_set(
    leader: Leader, follower: tuple[ControlPlane, relay.RelayClient], make_agent: MakeAgent, models: Models
) -> None:
    """The store restored from a backup, the leader restarts with no set in memory and numbers
    the next one below the set the follower holds: the leader's set still reaches the agent."""
    cp, client = follower
    client.point(leader.named())
    await make_agent(cp)
    joined = await leader.cp.events.wait_for(of(model.AgentEventKind.JOINED))
    leader.cp.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=7)
    await wait_model(leader.cp, lambda s: s.serving_sha256 == models.v1.sha256)

    leader.cp.hub.forget(SITE)  # as a restarted leader holds nothing of it until it is relayed again
    await leader.cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED and e is not joined)
    leader.cp.hub.set_assignments(SITE, [assignment(models.v2_url, models.v2)], version=3)
    state = await wait_model(leader.cp, lambda s: s.serving_sha256 == models.v2.sha256 and s.phase is model.ModelPhase.READY)
    assert state.serving_sha256 == models.v2.sha256
    assert cp.hub.assignments(SITE) == leader.cp.hub.assignments(SITE)


async def test_joins_and_model_changes_are_relayed_at_once_not_at_the_next_flush(
    leader: Leader, make_agent: MakeAgent, models: Models
) -> None:
    """Heartbeats wait for the flush (here a minute); what the leader plans and routes by
    does not: an agent that joins, a model that becomes ready."""
    cp = await start_control_plane()
    client = relay.RelayClient(cp.hub, "cp-follower", flush_s=60.0)
    task = asyncio.create_task(client.run())
    try:
        client.point(leader.named())
        await until(lambda: client.view()["connected"], "the relay connected")
        batches = client.batches_total
        await make_agent(cp)
        joined = await leader.cp.events.wait_for(of(model.AgentEventKind.JOINED), timeout=30)
        assert "through replica cp-follower" in joined.reason
        assert client.batches_total > batches
        leader.cp.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=3)
        state = await wait_model(leader.cp, lambda s: s.phase is model.ModelPhase.READY)
        assert state.serving_sha256 == models.v1.sha256
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await cp.server.stop(grace=None)


async def test_the_follower_s_agents_reach_a_new_leader_whole(
    leader: Leader, follower: tuple[ControlPlane, relay.RelayClient], make_agent: MakeAgent, models: Models
) -> None:
    cp, client = follower
    await make_agent(cp)
    await cp.events.wait_for(of(model.AgentEventKind.JOINED))
    cp.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)  # served before any leader is known
    await wait_model(cp, lambda s: s.phase is model.ModelPhase.READY)

    client.point(leader.named())  # a leader elected later hears of every agent, with its models
    joined = await leader.cp.events.wait_for(of(model.AgentEventKind.JOINED))
    state = await wait_model(leader.cp, lambda s: s.phase is model.ModelPhase.READY)  # as a direct agent's first heartbeat
    assert state.serving_sha256 == models.v1.sha256
    assert leader.cp.hub.status(SITE).assignment_version == 1  # type: ignore[union-attr]

    # the leader forgets it (as a new leader would): the next heartbeat brings it back whole
    leader.cp.hub.forget(SITE)
    await leader.cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED and e is not joined)
    await until(lambda: (s := leader.cp.hub.status(SITE)) and s.models["mlp"].phase is model.ModelPhase.READY, "models again")

    # the follower forgets it (a site deleted): the leader drops it too
    cp.hub.forget(SITE)
    await until(lambda: leader.cp.hub.status(SITE) is None, "the leader dropped the site")


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


async def test_one_live_agent_per_site_holds_across_replicas(
    leader: Leader, follower: tuple[ControlPlane, relay.RelayClient], make_agent: MakeAgent, tmp_path: pathlib.Path
) -> None:
    cp, client = follower
    client.point(leader.named())
    holder = await make_agent(cp)
    first = await leader.cp.events.wait_for(of(model.AgentEventKind.JOINED))

    other = await start_control_plane()  # a second follower: another agent claims the same site there
    other_client = relay.RelayClient(other.hub, "cp-follower-2", flush_s=0.05)
    relaying = asyncio.create_task(other_client.run())
    try:
        other_client.point(leader.named())
        await until(lambda: other_client.view()["connected"], "the second follower relays to the leader")
        await make_agent(other, data_dir=tmp_path / "claimant")

        # its own replica knows no holder, but the leader does: the claimant is refused, and so
        # are other joins for the site there, with the leader's reason
        await until(lambda: SITE in other.hub._held_elsewhere, "the leader refused the claimant")
        assert other.hub.status(SITE) is None
        with pytest.raises(errors.SiteTaken, match=f"held by live agent {first.agent_id} through replica cp-follower") as taken:
            other.hub.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test",
                                                 1.0, model.Capacity(cpu_cores=2)))
        assert taken.value.holder == first.agent_id and 0 < taken.value.retry_after_s <= 0.6 + 0.5
        holding = leader.cp.hub.status(SITE)
        assert holding is not None and holding.agent_id == first.agent_id and holding.healthy
        assert [e.agent_id for e in leader.cp.events.events if e.kind is model.AgentEventKind.JOINED] == [first.agent_id]

        # the holder stops: once the leader has lost it, the claimant's next join takes the site
        await holder.stop()
        await leader.cp.events.wait_for(of(model.AgentEventKind.LOST))
        await until(lambda: (s := leader.cp.hub.status(SITE)) is not None and s.agent_id != first.agent_id and s.healthy,
                    "the claimant holds the site at the leader", within_s=20)
        claimed = leader.cp.hub.status(SITE)
        assert claimed is not None and claimed.via == "cp-follower-2"
        assert (s := other.hub.status(SITE)) is not None and s.agent_id == claimed.agent_id
    finally:
        relaying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relaying
        await other.server.stop(grace=None)


async def test_a_join_refused_at_another_replica_leaves_the_holder_s_credential_alone(
    leader: Leader, tmp_path: pathlib.Path
) -> None:
    """Replicas keep the sites' credentials in one database. A second agent for a site (a
    misconfigured one, or a stolen bootstrap token) joining another replica must not replace
    the credential of the agent that holds the site through the first: the holder would be
    refused at its next reconnect, locked out by an agent the leader refused."""
    shared = store_mod.Store(tmp_path / "shared.db")
    relaying: list[asyncio.Task[None]] = []
    followers: list[hub.AgentHub] = []
    for name in ("cp-follower", "cp-follower-2"):
        follower = hub.AgentHub(auth.StoreJoinAuthenticator(shared, (TOKEN,)), heartbeat_interval=0.2)
        client = relay.RelayClient(follower, name, flush_s=0.05)
        relaying.append(asyncio.create_task(client.run()))
        client.point(leader.named())
        await until(lambda client=client: client.view()["connected"], f"{name} relays to the leader")  # type: ignore[misc]
        followers.append(follower)
    first, second = followers

    def application() -> model.JoinApplication:
        return model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test", 5.0,
                                     model.Capacity(cpu_cores=2))

    try:
        holder = await first.join_async(application())
        await until(lambda: (s := leader.cp.hub.status(SITE)) is not None and s.agent_id == holder.agent_id,
                    "the holder relayed to the leader")

        with pytest.raises(errors.SiteTaken, match=f"held by live agent {holder.agent_id} through replica cp-follower") as taken:
            await second.join_async(application())
        assert taken.value.holder == holder.agent_id and 0 < taken.value.retry_after_s <= 15.0
        assert second.status(SITE) is None

        # the holder's credential still opens its streams, and still joins
        await first.authenticate_stream(SITE, holder.agent_id, holder.credential)
        again = await first.join_async(dataclasses.replace(application(), bootstrap_token="", credential=holder.credential,
                                                           agent_id=holder.agent_id))
        assert (again.agent_id, again.credential) == (holder.agent_id, holder.credential)
    finally:
        for task in relaying:
            task.cancel()
        await asyncio.gather(*relaying, return_exceptions=True)
        shared.close()


class EarlierReleaseServicer(relay_leader.RelayServicer):
    """A leader of the release before claims: a report with no field it knows is dropped unanswered."""

    def _apply(self, report: pb.AgentReport, stream: relay_leader._Stream) -> None:
        if not report.claim:
            super()._apply(report, stream)


async def test_a_follower_takes_new_agents_while_the_leader_is_of_an_earlier_release(
    follower: tuple[ControlPlane, relay.RelayClient], caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling update replaces followers first: until the leader is replaced too, it
    answers no claim, and a follower that waited for one would refuse every new agent."""
    leader_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), heartbeat_interval=0.2, missed_heartbeats=3)
    servicer = EarlierReleaseServicer(leader_hub, lambda: SECRET)
    server = await service.start_agent_server(leader_hub, "127.0.0.1", 0, more=(servicer.handler(),))
    cp, client = follower
    try:
        published = json.dumps({"replica": "cp-leader", "address": f"127.0.0.1:{server.port}", "secret": SECRET, "fencingToken": 1})
        with caplog.at_level("WARNING", logger="orchestrator.agents.relay"):
            for _ in range(2):  # read again at each poll of the store
                client.follow(relay.Leader.from_json(published))
        await until(lambda: client.view()["connected"], "the follower relays to the leader")
        async with asyncio.timeout(relay.CLAIM_TIMEOUT_S / 2):
            grant = await cp.hub.join_async(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {},
                                                                  "test", 5.0, model.Capacity(cpu_cores=2)))
        await until(lambda: (s := leader_hub.status(SITE)) is not None and s.agent_id == grant.agent_id, "the leader holds the agent")
        assert [r.getMessage() for r in caplog.records if "answers no claim" in r.getMessage()] == [
            "the leader cp-leader answers no claim of a site (an earlier release): until it is upgraded, a join at this replica "
            "that gives a site a new identity is not checked against agents of other replicas"]
    finally:
        await server.stop(grace=None)


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


def test_heartbeats_merge_without_losing_what_a_later_one_leaves_out() -> None:
    client = relay.RelayClient(hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN])), "cp-f")
    first = pb.Heartbeat(seq=1, inflight=1, capacity=pb.Capacity(cpu_cores=4), models=pb.ModelStates(models=[pb.ModelState(name="m")]),
                         model_load=[pb.ModelLoad(name="m", requests_total=5)])
    client.beat("s", "a", first)
    client.beat("s", "a", pb.Heartbeat(seq=2, inflight=2))
    agent_id, merged = client._beats["s"]
    assert (agent_id, merged.seq, merged.inflight, merged.capacity.cpu_cores) == ("a", 2, 2, 4)
    assert [m.name for m in merged.models.models] == ["m"] and merged.model_load[0].requests_total == 5
    client.beat("s", "b", pb.Heartbeat(seq=1))  # another agent took the site: nothing carried over
    assert not client._beats["s"][1].HasField("capacity")


async def test_the_relay_presents_a_certificate_from_the_shared_agent_ca(tmp_path: pathlib.Path) -> None:
    authority = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    server_cert, server_key = authority.issue_server(["127.0.0.1"])
    events = EventLog()
    leader_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), on_change=events, heartbeat_interval=1.0)
    servicer = relay_leader.RelayServicer(leader_hub, lambda: SECRET)
    server = await service.start_agent_server(leader_hub, "127.0.0.1", 0, more=(servicer.handler(),),
                                              tls=service.ServerTls(server_cert, server_key, client_ca=authority.certificate_pem))
    follower_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), heartbeat_interval=1.0)
    follower_hub.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test", 1.0,
                                            model.Capacity(cpu_cores=2)))

    def certificate(by: ca.CertificateAuthority) -> relay.ClientTls:
        key, csr = ca.new_key_and_csr("control-plane-relay")
        return relay.ClientTls(authority.certificate_pem, key, by.issue_agent("control-plane-relay", csr))

    stranger = ca.CertificateAuthority.load_or_create(tmp_path / "other")
    clients = [relay.RelayClient(follower_hub, "cp-f", tls=lambda: certificate(stranger), flush_s=0.05)]
    task = asyncio.create_task(clients[0].run())
    try:
        clients[0].point(relay.Leader("cp-leader", f"127.0.0.1:{server.port}", SECRET, answers_claims=True))
        await until(lambda: clients[0].last_error.startswith("UNAVAILABLE"), "a certificate from another CA refused")
        assert leader_hub.status(SITE) is None
        task.cancel()
        replica = control_plane.ControlPlane(server_config.ServerConfig(data_dir=tmp_path))
        replica.ca = authority  # what a replica started on the shared CA holds; its relay certificate comes from it
        clients.append(relay.RelayClient(follower_hub, "cp-f", tls=replica._relay_tls, flush_s=0.05))
        task = asyncio.create_task(clients[1].run())
        clients[1].point(relay.Leader("cp-leader", f"127.0.0.1:{server.port}", SECRET, answers_claims=True))
        joined = await events.wait_for(of(model.AgentEventKind.JOINED))
        assert joined.status.via == "cp-f" and joined.status.capacity.cpu_cores == 2
        assert leader_hub.reporting() == 0  # joined, no heartbeat yet: the leader does not count it as reporting
    finally:
        task.cancel()
        await server.stop(None)


async def test_past_the_agent_cas_end_a_follower_says_once_why_it_cannot_relay(
    leader: Leader, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A follower that runs on past the agents' CA's notAfter can no longer be given a
    client certificate for the relay stream: each try says why in its relay view (what
    ``edgeplane status`` shows), and its log says it once, not a traceback at every try."""
    expired = certificates.ca_ending(tmp_path / "ca", datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1))
    replica = control_plane.ControlPlane(server_config.ServerConfig(data_dir=tmp_path))
    replica.ca = expired  # what a replica started on the shared CA holds, a day past its end
    tries: list[None] = []

    def relay_tls() -> relay.ClientTls:
        tries.append(None)
        return replica._relay_tls()

    client = relay.RelayClient(hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN])), "cp-f", tls=relay_tls, flush_s=0.05)
    task = asyncio.create_task(client.run())
    try:
        with caplog.at_level(logging.INFO, logger=relay.__name__):
            client.point(leader.named())
            await until(lambda: len(tries) >= 3, "the relay to try three times")
        ends = f"{expired.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        assert client.view()["lastError"] == (f"no client certificate to relay this replica's agents with: the agents' CA expired at {ends} "
                                              "(its notAfter): no certificate it signs is trusted; agents must join a new CA")
        said = [r for r in caplog.records if r.name == relay.__name__]
        assert [(r.levelname, r.exc_info) for r in said] == [("ERROR", None)], [r.getMessage() for r in said]
        assert f"expired at {ends}" in said[0].getMessage()
        assert not client.connected
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("body", ["not json", "[]", '{"replica": "cp-1", "address": "h:1"}', '{"replica": "cp-1", "address": 7, "secret": "s"}',
                                  '{"replica": "cp-1", "address": "h:1", "secret": "s", "agentCa": 5}',
                                  '{"replica": "cp-1", "address": "h:1", "secret": "s", "answersClaims": "yes"}'])
def test_a_leader_document_that_cannot_be_used_is_refused_with_a_reason(body: str) -> None:
    with pytest.raises(ValueError):
        relay.Leader.from_json(body)
    assert relay.Leader.from_json('{"replica": "cp-1", "address": "h:1", "secret": "s", "fencingToken": 3, "answersClaims": true}'
                                  ) == relay.Leader("cp-1", "h:1", "s", answers_claims=True)
    assert relay.Leader.from_json('{"replica": "cp-1", "address": "h:1", "secret": "s", "agentCa": "ab"}').agent_ca == "ab"
    # an earlier release's leader says nothing of claims: it answers none
    assert not relay.Leader.from_json('{"replica": "cp-1", "address": "h:1", "secret": "s"}').answers_claims


def test_a_replica_whose_agent_ca_is_not_the_leader_s_says_what_to_do(tmp_path: pathlib.Path) -> None:
    ours, theirs = (ca.CertificateAuthority.load_or_create(tmp_path / n) for n in ("ours", "theirs"))
    copied = ca.CertificateAuthority.load_or_create(tmp_path / "theirs")  # the same files, loaded again
    leader = relay.Leader("cp-1", "h:1", "s", agent_ca=theirs.fingerprint)
    assert copied.fingerprint == theirs.fingerprint and leader.unlike(copied.fingerprint) is None
    unlike = leader.unlike(ours.fingerprint)
    assert unlike is not None and "copy <data-dir>/ca" in unlike and ours.fingerprint[:16] in unlike and theirs.fingerprint[:16] in unlike
    assert "without TLS" in (leader.unlike(None) or "")
    assert "without TLS" in (relay.Leader("cp-1", "h:1", "s").unlike(ours.fingerprint) or "")
    assert relay.Leader("cp-1", "h:1", "s").unlike(None) is None


def test_an_agent_reported_whole_carries_what_is_left_of_its_quiet_spell() -> None:
    """A relay stream that starts again (a new leader, a dropped connection) reports its
    agents whole. One that is loading a generative model announced a quiet spell; the
    leader must keep waiting out what is left of it, not call it lost at the usual limit."""
    now = [1_000.0]
    follower = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), clock=lambda: now[0], missed_heartbeats=3)
    leader = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), clock=lambda: now[0], missed_heartbeats=3)
    client = relay.RelayClient(follower, "cp-follower")
    grant = follower.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test",
                                                1.0, model.Capacity(cpu_cores=2)))
    now[0] += 0.1
    loading = pb.Heartbeat(sent_unix_ms=int(now[0] * 1000), quiet_ms=20_000)
    follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(loading))

    now[0] += 5.0  # the stream to the leader starts again while the model loads
    client.touched(SITE)
    [batch] = client._batches()
    [report] = batch.reports
    assert report.HasField("agent") and report.state.quiet_ms == 15_000
    stream = relay_leader._Stream()
    stream.via = "cp-follower"
    relay_leader.RelayServicer(leader, lambda: SECRET)._apply(report, stream)

    now[0] += 14.9  # past the usual 3 s, inside the announced spell
    assert leader.sweep() == [] and leader.status(SITE).healthy  # type: ignore[union-attr]
    now[0] += 0.2
    [lost] = leader.sweep()
    assert lost.kind is model.AgentEventKind.LOST and "quiet spell" in lost.reason


class InProcess(NamedTuple):
    now: list[float]  # the clock both hubs read
    follower: hub.AgentHub
    leader: hub.AgentHub
    client: relay.RelayClient  # taps the follower's hub; nothing connects anywhere
    servicer: relay_leader.RelayServicer  # applies to the leader's hub what the test hands it
    stream: relay_leader._Stream

    def exchange(self) -> pb.RelayAssignments:
        """Hands the leader every report the follower's client has batched, and the client
        what the leader sent down the stream meanwhile: the sites to report again, whole."""
        for batch in self.client._batches():
            for report in batch.reports:
                self.servicer._apply(report, self.stream)
        down = self.stream.take()
        for site in down.report_again:
            self.client._touched.add(site)
        return down


def relayed_in_process(leader_tokens: tuple[str, ...] = (), **leader_options: Any) -> InProcess:
    """A follower's hub relayed to a leader's by the relay's own client and servicer, on one
    injected clock, with no network: reports reach the leader when the test delivers them.
    Agents join the leader directly with ``leader_tokens``."""
    now = [1_000.0]
    follower = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), clock=lambda: now[0])
    leader = hub.AgentHub(auth.InMemoryJoinAuthenticator(list(leader_tokens)), clock=lambda: now[0], **leader_options)
    client = relay.RelayClient(follower, "cp-follower")
    client.point(relay.Leader("cp-leader", "127.0.0.1:9", SECRET, answers_claims=True))
    stream = relay_leader._Stream()
    stream.via = "cp-follower"
    return InProcess(now, follower, leader, client, relay_leader.RelayServicer(leader, lambda: SECRET), stream)


def test_the_end_of_an_agent_s_stream_at_a_follower_reaches_the_leader() -> None:
    """A killed agent's connection closes at its replica; the leader, which plans, must not
    wait for every missed heartbeat either. A heartbeat on a new stream takes it back."""
    now, follower, leader, client, servicer, stream = relayed_in_process(missed_heartbeats=3, reconnect_grace=1.0)

    def deliver() -> list[pb.AgentReport]:
        reports = [r for batch in client._batches() for r in batch.reports]
        for report in reports:
            servicer._apply(report, stream)
        return reports

    grant = follower.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test",
                                                5.0, model.Capacity(cpu_cores=2)))
    deliver()
    assert leader.status(SITE).agent_id == grant.agent_id  # type: ignore[union-attr]
    opened = follower.heartbeats_opened(SITE, grant.agent_id)
    follower.heartbeats_ended(opened)
    [report] = deliver()
    assert report.disconnected and not report.HasField("state")
    now[0] += 5.1  # one interval, not 3 x 5 s
    [lost] = leader.sweep()
    assert "heartbeat stream ended" in lost.reason

    # back on a new stream before the batch went: no word of the end reaches the leader
    grant = follower.join(model.JoinApplication(SITE, TOKEN, grant.credential, grant.agent_id, "http://127.0.0.1:9",
                                                model.Location(), {}, "test", 5.0, model.Capacity(cpu_cores=2)))
    deliver()
    follower.heartbeats_ended(follower.heartbeats_opened(SITE, grant.agent_id))
    beat = pb.Heartbeat(sent_unix_ms=int(now[0] * 1000))
    follower.heartbeats_opened(SITE, grant.agent_id)
    follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(beat))
    client.beat(SITE, grant.agent_id, beat)
    assert not any(r.disconnected for r in deliver())
    now[0] += 14.9
    assert leader.sweep() == [] and leader.status(SITE).healthy  # type: ignore[union-attr]


def test_an_agent_restarting_on_a_follower_with_its_identity_reaches_the_leader_with_its_new_address_and_pace() -> None:
    """The leader plans and routes: it must have the endpoint and heartbeat interval the
    agent joined with this time, not those of its previous run."""
    now, follower, leader, client, servicer, stream = relayed_in_process(missed_heartbeats=3)

    def deliver() -> None:
        for batch in client._batches():
            for report in batch.reports:
                servicer._apply(report, stream)

    def join(endpoint: str, interval: float, credential: str | None = None, agent_id: str = "") -> model.JoinGrant:
        return follower.join(model.JoinApplication(SITE, TOKEN if credential is None else "", credential, agent_id, endpoint,
                                                   model.Location(), {}, "test", interval, model.Capacity(cpu_cores=2)))

    grant = join("http://10.0.0.5:8080", 5.0)
    deliver()
    now[0] += 1.0
    join("http://10.0.0.6:9090", 30.0, grant.credential, grant.agent_id)  # restarted with its saved identity
    deliver()
    status = leader.status(SITE)
    assert status is not None and status.agent_id == grant.agent_id
    assert (status.endpoint_url, status.heartbeat_interval) == ("http://10.0.0.6:9090", 30.0)
    for _ in range(3):  # beating on time for its new interval
        beat = pb.Heartbeat(sent_unix_ms=int(now[0] * 1000))
        follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(beat))
        client.beat(SITE, grant.agent_id, beat)
        deliver()
        now[0] += 29.0
        assert leader.sweep() == []


def test_an_agent_revoked_at_the_leader_is_not_taken_back_from_a_follower_that_has_not_heard() -> None:
    """The follower learns of a revocation from the store, a moment later; meanwhile its agent
    beats on, and the leader, which no longer holds it, asks for it whole: it is refused, and
    the follower drops it. Another agent enrolled for the site afterwards is taken."""
    relayed = relayed_in_process()
    now, follower, leader, client, servicer, stream = relayed
    deliver = relayed.exchange

    def join() -> model.JoinGrant:
        return follower.join(model.JoinApplication(SITE, TOKEN, None, "", "http://10.0.0.5:8080", model.Location(), {},
                                                   "test", 5.0, model.Capacity(cpu_cores=2)))

    grant = join()
    deliver()
    leader.revoke(SITE)
    assert leader.status(SITE) is None
    now[0] += 1.0
    beat = pb.Heartbeat(sent_unix_ms=int(now[0] * 1000))
    follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(beat))
    client.beat(SITE, grant.agent_id, beat)
    assert deliver().report_again == [SITE]
    [refusal] = deliver().refused
    assert (refusal.agent_id, refusal.holder_agent_id) == (grant.agent_id, "")
    assert leader.status(SITE) is None
    follower.refused_by_leader(refusal.site, refusal.agent_id, refusal.holder_agent_id, refusal.message,
                               refusal.retry_after_ms / 1000)
    assert follower.status(SITE) is None  # its streams end; its credential no longer joins (the store)

    enrolled = join()  # a new agent, with a bootstrap token created after the revocation
    deliver()
    status = leader.status(SITE)
    assert status is not None and status.agent_id == enrolled.agent_id and status.healthy


def test_a_revoked_agent_stays_refused_from_a_stale_follower_after_another_agent_joins_the_leader() -> None:
    """The site is revoked and enrolled again at the leader, and the new agent is lost at
    once; the follower, which has not heard of the revocation, still reports the revoked
    agent. Another agent's join is no proof of the revoked one: it stays refused, and the
    follower drops it."""
    relayed = relayed_in_process(leader_tokens=(TOKEN,), missed_heartbeats=3)
    now, follower, leader, client, servicer, stream = relayed
    deliver = relayed.exchange

    application = model.JoinApplication(SITE, TOKEN, None, "", "http://10.0.0.5:8080", model.Location(), {}, "test", 5.0,
                                        model.Capacity(cpu_cores=2))
    revoked = follower.join(application)
    deliver()
    leader.revoke(SITE)
    enrolled = leader.join(dataclasses.replace(application, endpoint_url="http://10.0.0.6:8080"))
    assert enrolled.agent_id != revoked.agent_id
    now[0] += 16.0  # the new agent never beats: lost after 3 x 5 s
    assert [e.agent_id for e in leader.sweep()] == [enrolled.agent_id]

    beat = pb.Heartbeat(sent_unix_ms=int(now[0] * 1000))
    follower.record_heartbeat(SITE, revoked.agent_id, model.Heartbeat.from_proto(beat))
    client.beat(SITE, revoked.agent_id, beat)
    assert deliver().report_again == [SITE]
    [refusal] = deliver().refused
    assert (refusal.agent_id, refusal.holder_agent_id) == (revoked.agent_id, "")
    status = leader.status(SITE)
    assert status is not None and status.agent_id == enrolled.agent_id and not status.healthy


@pytest.mark.parametrize("enrolled_through", ["another replica", "this follower"])
async def test_a_follower_drops_a_revoked_agent_even_once_the_site_was_enrolled_again(
        enrolled_through: str, tmp_path: pathlib.Path) -> None:
    """A site is revoked and enrolled again (a new agent, with a bootstrap token made after)
    before the follower holding its agent reads the revocation: the site is no longer revoked,
    but the agent held here is not its identity. It is dropped all the same (a newly elected
    leader never revoked it and would take it back from the relay); the new agent, held here
    when it enrolled through this follower, is kept."""
    clock = [1_000_000.0]  # the store's: a token made after the revocation is dated after it
    now = [1_000.0]  # the hubs'
    store = open_store(tmp_path / "state.db", clock=lambda: clock[0])
    follower = hub.AgentHub(auth.StoreJoinAuthenticator(store), clock=lambda: now[0])
    elsewhere = hub.AgentHub(auth.StoreJoinAuthenticator(store), clock=lambda: now[0])

    def application(token: str, endpoint: str) -> model.JoinApplication:
        return model.JoinApplication(SITE, token, None, "", endpoint, model.Location(), {}, "test", 5.0,
                                     model.Capacity(cpu_cores=2))

    try:
        seen = await following.read_revocations(store, follower, None)
        first, _ = store.create_token("bootstrap", "agent", 3600, "admin")
        revoked = await follower.join_async(application(first, "http://10.0.0.5:8080"))
        clock[0] += 1.0
        assert store.revoke_agent(SITE, "admin")
        elsewhere.revoke(SITE)  # the replica the request went through
        clock[0] += 1.0
        fresh, _ = store.create_token("bootstrap", "agent", 3600, "admin")
        if enrolled_through == "this follower":  # once the revoked agent here was lost
            now[0] += 16.0
            assert [e.agent_id for e in follower.sweep()] == [revoked.agent_id]
        joined_at = follower if enrolled_through == "this follower" else elsewhere
        enrolled = await joined_at.join_async(application(fresh, "http://10.0.0.6:8080"))
        assert store.agent_revoked_at(SITE) is None and store.agent_of(SITE) == enrolled.agent_id

        await following.read_revocations(store, follower, seen)
        status = follower.status(SITE)
        if enrolled_through == "this follower":
            assert status is not None and status.agent_id == enrolled.agent_id
        else:
            assert status is None  # its streams end; its credential no longer verifies
            with pytest.raises(errors.NotAuthenticated):
                await follower.join_async(dataclasses.replace(application("", "http://10.0.0.5:8080"),
                                                              agent_id=revoked.agent_id, credential=revoked.credential))
    finally:
        store.close()


def test_heartbeats_merged_past_the_leader_s_limit_go_in_parts_and_the_end_of_the_stream_after_them() -> None:
    now, follower, leader, client, servicer, stream = relayed_in_process(missed_heartbeats=3, reconnect_grace=1.0)

    def deliver() -> list[pb.RelayReports]:
        batches = client._batches()
        for batch in batches:
            assert batch.ByteSize() <= service.MAX_RECEIVE_BYTES
            for report in batch.reports:
                servicer._apply(report, stream)
        return batches

    grant = follower.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test",
                                                5.0, model.Capacity(cpu_cores=2)))
    deliver()
    opened = follower.heartbeats_opened(SITE, grant.agent_id)
    models = pb.Heartbeat(sent_unix_ms=1, inflight=3, models=pb.ModelStates(models=[
        pb.ModelState(name=f"model-{i:05d}", sha256="a" * 64, phase=pb.MODEL_PHASE_READY) for i in range(1500)]))
    load = pb.Heartbeat(sent_unix_ms=2, inflight=4, model_load=[
        pb.ModelLoad(name=f"model-{i:05d}" + "y" * 40, requests_total=1, busy_seconds_total=0.5) for i in range(3000)])
    for beat in (models, load):  # in one flush: merged into one report
        now[0] += 0.1
        follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(beat))
        client.beat(SITE, grant.agent_id, beat)
    follower.heartbeats_ended(opened)
    assert len(deliver()) > 1
    status = leader.status(SITE)
    assert status is not None and (len(status.models), len(status.model_load), status.inflight) == (1500, 3000, 4)
    now[0] += 5.1  # one interval: its stream's end came after its last state
    [lost] = leader.sweep()
    assert "heartbeat stream ended" in lost.reason
