"""An edge agent the hub calls lost while it is still connected and serving: its heartbeats
came late (a starved machine, a stalled link), not its end. The plan moves its replicas
and the gateway stops routing to it, as for any loss; but it is sent no set that takes a
model from it until its own heartbeats are back and the plan made then still leaves the
model out. An agent unloads at once what its set leaves out, so a false loss would have it
unload, download and load again a model the pass after its recovery places there again.
The agent of a deleted Site, lost or not, is still told to serve nothing."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import pytest

from orchestrator import catalog, maintenance
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.manifests import loader
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests

from .test_restart_rejoin import SITES, Agents, _intent

LATE_S = 2.0  # edge-b's heartbeats are this late: past its 3 missed x 0.5 s


class Fleet:
    """edge-a and edge-b serving intent-fr, their agents on a real hub with a clock the test
    moves; every set the hub holds for edge-b after each pass, in order."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        artifact = tmp_path / "intent.onnx"
        artifact.write_bytes(b"an onnx model")
        sha256 = artifacts_mod.sha256_file(artifact)
        self.store = store_mod.Store(tmp_path / "state.db")
        self.agents = Agents(sha256)
        self.table = endpoints_mod.EndpointTable()
        self.reconciler = loop.Reconciler(self.store, self.agents.hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                          artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), self.table,
                                          clock=lambda: self.agents.now)
        _intent(sha256, self.store, artifact)
        self.sent_to_b: list[agent_model.AssignmentSet] = []

    async def serving(self) -> None:
        for site in SITES:
            self.agents.join(site)
            self.agents.beat(site)
        await self.reconcile()
        assert {row.site for row in self.store.placements()} == set(SITES)
        assert "intent" in self.models_sent_to_b(-1)

    async def reconcile(self) -> None:
        await self.reconciler.reconcile_once()
        got = self.agents.hub.assignments("edge-b")
        if got is not None and (not self.sent_to_b or got is not self.sent_to_b[-1]):
            self.sent_to_b.append(got)

    async def b_late(self) -> None:
        """edge-b's heartbeats stop for a while: edge-a's go on, and the hub finds edge-b lost."""
        self.agents.now += LATE_S
        self.agents.beat("edge-a")
        assert [e.site for e in self.agents.hub.sweep()] == ["edge-b"]
        await self.reconcile()

    def models_sent_to_b(self, index: int) -> set[str]:
        return {a.model for a in self.sent_to_b[index].assignments}

    async def close(self) -> None:
        await self.reconciler.publishes_done()
        self.store.close()


@pytest.fixture
async def fleet(tmp_path: pathlib.Path) -> AsyncIterator[Fleet]:
    made = Fleet(tmp_path)
    try:
        yield made
    finally:
        await made.close()


async def test_an_agent_falsely_lost_is_sent_no_set_that_unloads_what_it_serves_again_once_back(fleet: Fleet) -> None:
    """intent-fr spreads one replica per site over the two: while edge-b is lost its replica
    has nowhere to go and leaves the plan and the gateway's table; once its heartbeats are
    back the replica is placed there again. edge-b's agent is never sent a set without it."""
    await fleet.serving()
    await fleet.b_late()
    assert {row.site for row in fleet.store.placements()} == {"edge-a"}  # the loss moves what it can, as before
    assert {e.site for e in fleet.table.all_endpoints()} == {"edge-a"}
    await fleet.reconcile()  # a pass more while it is lost
    fleet.agents.beat("edge-b")  # its heartbeats are back
    assert fleet.agents.hub.status("edge-b").healthy  # type: ignore[union-attr]
    await fleet.reconcile()
    assert {row.site for row in fleet.store.placements()} == set(SITES)
    without = [s.version for s in fleet.sent_to_b if "intent" not in {a.model for a in s.assignments}]
    assert not without, f"edge-b's agent, lost only by late heartbeats, was sent sets without intent (versions {without})"
    assert "intent" in fleet.models_sent_to_b(-1)


async def test_an_agent_falsely_lost_is_sent_the_smaller_set_once_back_when_the_plan_still_leaves_it_out(fleet: Fleet) -> None:
    """The plan made once its heartbeats are back still has no replica there (its
    deployment was cut to one replica meanwhile): then the set shrinks, and the agent unloads."""
    await fleet.serving()
    await fleet.b_late()
    catalog.apply_documents(fleet.store, loader.load_text(manifests.deployment(
        "intent-fr", "intent", 1, manifests.spread_by_site(residency=["FR"], tiers=["edge"]))), actor="test")
    await fleet.reconcile()
    assert "intent" in fleet.models_sent_to_b(-1)  # lost: nothing taken from it yet
    fleet.agents.beat("edge-b")
    await fleet.reconcile()
    assert {row.site for row in fleet.store.placements()} == {"edge-a"}
    assert fleet.models_sent_to_b(-1) == set()


async def test_the_lost_agent_of_a_drained_site_is_sent_the_set_the_drain_leaves_it(fleet: Fleet) -> None:
    """An operator drained edge-b: whatever the plan takes from it goes, its agent lost or not."""
    await fleet.serving()
    maintenance.take_out(fleet.store, "edge-b", maintenance.Mode.DRAIN, actor="test", reason="new disk", now=0.0, force=True)
    await fleet.b_late()
    await fleet.reconcile()
    assert {row.site for row in fleet.store.placements()} == {"edge-a"}
    assert fleet.models_sent_to_b(-1) == set()


async def delete_b_and_see_its_agent_forgotten(fleet: Fleet, watching: asyncio.Task[None]) -> None:
    """edge-b's Site deleted and its agent late: the passes after forget it, its assignment
    stream (``watching``) ending."""
    catalog.delete_object(fleet.store, "Site", "edge-b", actor="test")
    await fleet.b_late()
    for _ in range(3):  # the passes after: it is forgotten by then
        await fleet.reconcile()
    async with asyncio.timeout(10):
        await watching
    assert fleet.agents.hub.status("edge-b") is None, "the lost agent of a deleted Site is forgotten"


async def test_the_lost_agent_of_a_deleted_site_is_still_told_to_serve_nothing(fleet: Fleet) -> None:
    """edge-b's Site is deleted while its agent, still connected, is lost: the set its watch
    stream sends it is the empty one, before the hub forgets it and the stream ends."""
    await fleet.serving()
    hub = fleet.agents.hub
    received: list[agent_model.AssignmentSet] = []
    ready = asyncio.Event()

    async def watch() -> None:
        async for got in hub.watch_assignments("edge-b", fleet.agents.ids["edge-b"]):
            received.append(got)
            ready.set()

    watching = asyncio.create_task(watch())
    await ready.wait()  # the set it serves now
    await delete_b_and_see_its_agent_forgotten(fleet, watching)
    assert received[-1].assignments == (), f"its agent was last sent {received[-1]}: it serves on"


async def test_the_lost_agent_of_a_deleted_site_sent_no_set_yet_is_still_told_to_serve_nothing(fleet: Fleet) -> None:
    """edge-b's agent joined this control plane and was sent no set yet (it serves what it
    cached) when its Site is deleted and it is lost: the empty set still reaches it before
    the hub forgets it, as for one that was sent a set."""
    for site in SITES:
        fleet.agents.join(site)
        fleet.agents.beat(site)
    hub = fleet.agents.hub
    assert hub.assignments("edge-b") is None
    received: list[agent_model.AssignmentSet] = []

    async def watch() -> None:
        async for got in hub.watch_assignments("edge-b", fleet.agents.ids["edge-b"]):
            received.append(got)

    watching = asyncio.create_task(watch())
    await asyncio.sleep(0)  # its stream is open, waiting for a set, as the agent's is
    await delete_b_and_see_its_agent_forgotten(fleet, watching)
    assert received and received[-1].assignments == (), f"its agent was sent {received}: it serves on what it cached"
