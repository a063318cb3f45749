"""One live agent per site across control-plane replicas: the leader refuses a relayed agent
whose site another holds and tells the follower, a join refused at one replica leaves the
holder's credential alone, and an agent revoked at the leader is not taken back from a
follower that has not heard yet."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib

import pytest

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator import following
from orchestrator.agents import auth, errors, hub, model, relay
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod

from .conftest import SITE, TOKEN, ControlPlane, Leader, MakeAgent, start_control_plane
from .relaying import of, relayed_in_process, until


def held_elsewhere(replica_hub: hub.AgentHub) -> set[str]:
    """The sites a replica's hub refuses joins for, as the leader said another replica's
    agent holds them. Read from the hub's private record: a join refused shows it, but a
    join tried to find out would take the site when the word has not come yet."""
    return set(replica_hub._held_elsewhere)


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
        await until(lambda: SITE in held_elsewhere(other.hub), "the leader refused the claimant")
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
