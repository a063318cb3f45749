"""A follower's own reads of the store (``orchestrator.following.StoreFollower``) on a real
SQLite store, with the leader's writes made to it directly: what its gateway routes with
when the leader's tables come faster than it reads them."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib

from orchestrator import following, leadership
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints, routing, wire
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness

URL = "http://10.0.0.1:9000"
ENDPOINT = routing.Endpoint("intent", "intent-eu", "edge-paris", "edge", "FR", "fr", 48.85, 2.35, URL, healthy=True)


def table_text(*endpoints_: routing.Endpoint) -> str:
    table = endpoints.EndpointTable()
    table.replace(endpoints_, deployed={"intent": ""})
    return wire.table_to_text(table)


async def test_a_followers_lost_agent_that_rejoined_elsewhere_is_routed_to_again(tmp_path: pathlib.Path) -> None:
    """The follower's own agent is lost, and marked down in its gateway; it rejoins another
    replica, and the leader's tables that list it down, then healthy again, both come between
    two of the follower's reads. The leader's table read after it must have heard of the loss
    (an agent's loss time after the mark) says it serves, whether it is read then or was read
    before; one read before does not."""
    store = store_mod.Store(tmp_path / "state.db")
    lease = store.acquire_lease(leadership.LEASE, "leader", 60.0)
    assert lease is not None
    hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), heartbeat_interval=0.5, missed_heartbeats=4)
    table = endpoints.EndpointTable()
    reconciler = loop.Reconciler(store, hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table)
    elector = leadership.Elector(store, "follower", 60.0, on_gain=lambda lease: None, on_lose=lambda why: None)  # never run: it follows
    follower = following.StoreFollower(store, elector, hub, table, reconciler, None, lambda lease: None, lambda: None)

    def healthy() -> bool:
        return [e.healthy for e in table.endpoints("intent")] == [True]

    reads = asyncio.create_task(follower.run(every_s=0.02))
    try:
        store.publish(wire.PUBLISHED_KEY, table_text(ENDPOINT), lease=lease)
        await harness.wait_until(healthy, 10, interval=0.01, what="the follower to route to the agent")
        table.mark_down(URL)  # its own agent, lost
        marked = table.clock()
        # the leader's table from before it heard of the loss (a new version, as it changed otherwise)
        lyon = dataclasses.replace(ENDPOINT, site="edge-lyon", url="http://10.0.0.2:9000")
        store.publish(wire.PUBLISHED_KEY, table_text(ENDPOINT, lyon), lease=lease)
        await harness.wait_until(lambda: len(table.endpoints("intent")) == 2, 10, interval=0.01, what="the leader's next table")
        assert not healthy_at(table, URL)
        # the agent rejoined the leader: down, then healthy again, both between two reads here
        store.publish(wire.PUBLISHED_KEY, table_text(ENDPOINT), lease=lease)
        await harness.wait_until(healthy, 10, interval=0.01, what="the follower to route to the agent again")
        assert table.clock() - marked >= hub.heartbeat_interval * hub.missed_heartbeats  # not before the leader had heard
    finally:
        reads.cancel()
        store.close()


def healthy_at(table: endpoints.EndpointTable, url: str) -> bool:
    return any(e.healthy for e in table.endpoints("intent") if e.url == url)


class Clock:
    """The gateway table's clock, moved by the test: a follower's marks last by it, not by
    how long a loaded machine takes to read the leader's tables."""

    now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_followers_mark_on_its_lost_agent_lasts_the_agents_own_loss_time(tmp_path: pathlib.Path) -> None:
    """The follower's own agent, which heartbeats every 0.75 s where the hub's default is
    0.25 s, is lost and marked down in its gateway; the leader, not told (its relay is down),
    declares it lost only once 4 of the agent's own intervals pass without a heartbeat, and
    its tables list it healthy meanwhile. The follower routes to it again only after those
    3 s, not after 4 of the hub's default intervals (1 s), while it is still lost."""
    store = store_mod.Store(tmp_path / "state.db")
    lease = store.acquire_lease(leadership.LEASE, "leader", 60.0)
    assert lease is not None
    hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), heartbeat_interval=0.25, missed_heartbeats=4)
    hub.join(agent_model.JoinApplication("edge-paris", "tok", None, "", URL, agent_model.Location(), {}, "test", 0.75,
                                         agent_model.Capacity(cpu_cores=4, memory_total_bytes=8 << 30)))
    clock = Clock()
    table = endpoints.EndpointTable(clock=clock)
    reconciler = loop.Reconciler(store, hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table)
    elector = leadership.Elector(store, "follower", 60.0, on_gain=lambda lease: None, on_lose=lambda why: None)  # never run: it follows
    follower = following.StoreFollower(store, elector, hub, table, reconciler, None, lambda lease: None, lambda: None)
    reads = asyncio.create_task(follower.run(every_s=0.02))
    others = [dataclasses.replace(ENDPOINT, site=f"edge-{n}", url=f"http://10.0.0.{n}:9000") for n in range(2, 5)]

    async def leaders_table(after_s: float, listed: int) -> None:
        """The leader's next table, still listing the agent healthy, read ``after_s`` past the mark."""
        clock.now = marked + after_s
        store.publish(wire.PUBLISHED_KEY, table_text(ENDPOINT, *others[:listed - 1]), lease=lease)
        await harness.wait_until(lambda: len(table.endpoints("intent")) == listed, 10, interval=0.01,
                                 what=f"the leader's table of {listed}")
    try:
        store.publish(wire.PUBLISHED_KEY, table_text(ENDPOINT), lease=lease)
        await harness.wait_until(lambda: healthy_at(table, URL), 10, interval=0.01, what="the follower to route to the agent")
        table.mark_down(URL)  # its own agent, lost (as the server marks it at the hub's LOST event)
        marked = clock()
        await leaders_table(0.0, 2)
        assert not healthy_at(table, URL)
        await leaders_table(1.5, 3)  # past the hub's default loss time, within the agent's
        assert not healthy_at(table, URL)
        await leaders_table(0.75 * hub.missed_heartbeats + 0.01, 4)  # the leader has heard by now: its word holds
        assert healthy_at(table, URL)
    finally:
        reads.cancel()
        store.close()
