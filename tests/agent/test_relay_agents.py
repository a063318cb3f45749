"""Agents on a replica that does not lead: a real agent joins the "follower" hub, whose relay
client streams it to the "leader" hub over real gRPC on loopback; the leader's assignment
reaches the agent, which downloads, serves and reports the model back the same way, through
a leader restarted on a restored store, a new leader, and a leader of an earlier release.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import auth, hub, model, relay, relay_leader, service

from .conftest import SECRET, SITE, TOKEN, ControlPlane, Leader, MakeAgent, Models, start_control_plane
from .relaying import of, until
from .test_agent import assignment, infer, reference, wait_model


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


class EarlierReleaseServicer(relay_leader.RelayServicer):
    """A leader of the release before claims: a report with no field it knows is dropped unanswered."""

    # the servicer's private step for one report, overridden: nothing public stands between
    # a relay stream and the hub it applies reports to
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
