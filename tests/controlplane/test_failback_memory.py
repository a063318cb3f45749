"""Failback's memory outlives its leader: an edge site is lost, its replica moves to the other
site, the site comes back, and the control plane restarts (SQLite) or another replica takes
over as leader (PostgreSQL) before the hold-down ends. The new reconciler (a new hub, the
agents rejoined) goes on with the hold-down where the old one left it, from the store, and
moves the replica back once the site has been healthy for ``--failback-after`` since it
came back, not since the new leader first saw it."""

from __future__ import annotations

import logging
import pathlib

import pytest

from orchestrator import catalog
from orchestrator.api import simulate as api_simulate
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.manifests import loader
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import failback as failback_mod
from orchestrator.reconciler import failback_record
from orchestrator.reconciler import loop
from orchestrator.reconciler import observed as observed_mod
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests
from orchestrator.testing.postgres import PostgresServer

SITES = {"edge-a": 48.0, "edge-b": 49.0}
AFTER_S = 5.0
JOIN_S = 2.0  # how long a new leader (or a restarted control plane) gives its agents to join it
EPOCH = 1.8e9  # the store's time when the test's clock reads 0


class Fleet:
    """Agents of the sites on a clock the test moves, joined to a leader's hub."""

    def __init__(self) -> None:
        self.now = 0.0
        self.hub = self.new_hub()
        self.ids: dict[str, str] = {}

    def new_hub(self) -> hub_mod.AgentHub:
        self.hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), clock=lambda: self.now, heartbeat_interval=0.5)
        return self.hub

    def join(self, site: str) -> None:
        self.ids[site] = self.hub.join(agent_model.JoinApplication(
            site, "tok", None, "", f"http://{site}:8090", agent_model.Location("FR", "fr", SITES[site], 2.35), {}, "test", 0.5,
            agent_model.Capacity(cpu_cores=2, memory_total_bytes=8 << 30))).agent_id
        self.beat(site)

    def beat(self, *sites: str) -> None:
        self.now += 0.1
        for site in sites:
            self.hub.record_heartbeat(site, self.ids[site], agent_model.Heartbeat(
                seq=int(self.now * 10) + 1, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=8 << 30,
                assignment_version=0, draining=False, capacity=None, models=(), gpu_free_bytes=()))

    def reconciler(self, store: store_mod.Store, root: pathlib.Path) -> loop.Reconciler:
        return loop.Reconciler(store, self.hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                               artifacts_mod.ArtifactCatalog((root,), "http://cp"), endpoints_mod.EndpointTable(),
                               clock=lambda: self.now, failback_after_s=AFTER_S)


def placed(store: store_mod.Store) -> set[str]:
    return {r.site for r in store.placements() if r.deployment == "intent-fr" and r.replicas}


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.mark.parametrize("rejoins", ["before the first pass", "after the first pass"])
async def test_a_new_leader_goes_on_with_the_hold_down_and_moves_the_replica_back(tmp_path: pathlib.Path, location: str,
                                                                                  rejoins: str) -> None:
    """``after the first pass``: the new leader's first pass runs before the returned site's
    agent has joined it (it serves nothing, so no pass waits for it); the agent joins within
    the time the new leader gives its agents, and the hold-down still goes on from the return."""
    artifact = tmp_path / "intent.onnx"
    artifact.write_bytes(b"an onnx model")
    sha256 = artifacts_mod.sha256_file(artifact)
    fleet = Fleet()
    store = open_store(location, clock=lambda: EPOCH + fleet.now)
    shared = location.startswith("postgresql://")  # replicas on one database lead by the lease; a restart on SQLite holds none
    catalog.apply_documents(store, loader.load_text(manifests.bundle(
        *(manifests.edge_site(site, "FR", lat, 2.35, region="fr") for site, lat in SITES.items()),
        manifests.onnx_model("intent", artifact.name, sha256),
        manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}))), actor="test")
    first = fleet.reconciler(store, tmp_path)

    def lead(r: loop.Reconciler, holder: str) -> None:
        """On PostgreSQL, ``r`` leads under the lease, giving its agents ``JOIN_S`` to come
        over; a control plane alone on SQLite holds none, and gives them as long after a restart."""
        if shared:
            lease = store.acquire_lease("leader", holder, 60.0)
            assert lease is not None
            r.lead(lease, takeover_s=JOIN_S)
        else:
            r.resume(rejoin_s=JOIN_S)

    second = None
    try:
        lead(first, "a")
        for site in SITES:
            fleet.join(site)
        await first.reconcile_once()
        (home,) = placed(store)
        (other,) = set(SITES) - {home}

        for _ in range(40):  # home's agent is gone: its heartbeats stop, and the hub's sweep finds it lost
            fleet.beat(other)
            fleet.hub.sweep()
        assert not fleet.hub.status(home).healthy  # type: ignore[union-attr]
        await first.reconcile_once()
        assert placed(store) == {other}

        fleet.join(home)  # back
        back = fleet.now
        await first.reconcile_once()
        assert placed(store) == {other}  # within the hold-down

        await first.publishes_done()
        if shared:
            store.release_lease(first.lease)  # type: ignore[arg-type]
        fleet.now = back + AFTER_S - 1.0
        fleet.new_hub()  # the new leader's (or the restarted control plane's): the agents rejoin it
        second = fleet.reconciler(store, tmp_path)
        lead(second, "b")
        fleet.join(other)
        if rejoins == "before the first pass":
            fleet.join(home)
        await second.reconcile_once()
        assert placed(store) == {other}  # the hold-down goes on
        if rejoins == "after the first pass":
            fleet.join(home)
            await second.reconcile_once()
            assert placed(store) == {other}

        while fleet.now - back < AFTER_S:
            fleet.beat(*SITES)
        await second.reconcile_once()
        assert placed(store) == {home, other}, "the replica was not moved back after the hold-down"  # made before it breaks
        assert [e.name for e in store.recent_events(kind="Site") if e.action == "failback"] == [home]
    finally:
        await first.publishes_done()
        if second is not None:
            await second.publishes_done()
        store.close()


async def test_a_what_if_of_the_fleet_as_it_is_shows_the_failback_the_next_pass_makes(tmp_path: pathlib.Path) -> None:
    """The site has been back for the hold-down and no pass has run since: ``edgeplane
    simulate`` of the leader (nothing changed but a demand factor of 1) reports the moves
    back the next pass makes; a moment earlier, within the hold-down, none."""
    artifact = tmp_path / "intent.onnx"
    artifact.write_bytes(b"an onnx model")
    sha256 = artifacts_mod.sha256_file(artifact)
    fleet = Fleet()
    store = open_store(str(tmp_path / "state.db"), clock=lambda: EPOCH + fleet.now)
    catalog.apply_documents(store, loader.load_text(manifests.bundle(
        *(manifests.edge_site(site, "FR", lat, 2.35, region="fr") for site, lat in SITES.items()),
        manifests.onnx_model("intent", artifact.name, sha256),
        manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}))), actor="test")
    reconciler = fleet.reconciler(store, tmp_path)

    follower = fleet.reconciler(store, tmp_path)  # another replica on the store (PostgreSQL's case): it plans with what the leader published

    async def moves(on: loop.Reconciler = reconciler) -> list[tuple[str, str]]:
        if on is reconciler:
            s, standing = await reconciler.current(), reconciler.plan_in_force()
        else:
            await reconciler.publishes_done()
            published = store.published(observed_mod.PUBLISHED_KEY)
            assert published is not None
            s, standing = await follower.current(observed_mod.from_text(published[1])), None
        got = api_simulate.run(s, b"spec: {demand: [{factor: 1}]}", standing=standing)
        return [(m["from"], m["to"]) for m in got["moves"]]

    try:
        for site in SITES:
            fleet.join(site)
        await reconciler.reconcile_once()
        (home,) = placed(store)
        (other,) = set(SITES) - {home}
        for _ in range(40):
            fleet.beat(other)
            fleet.hub.sweep()
        await reconciler.reconcile_once()
        assert placed(store) == {other}
        fleet.join(home)
        back = fleet.now
        await reconciler.reconcile_once()
        assert await moves() == await moves(follower) == []  # within the hold-down
        while fleet.now - back < AFTER_S:
            fleet.beat(*SITES)
        assert await moves() == await moves(follower) == [(other, home)]
        await reconciler.reconcile_once()
        assert placed(store) == {home, other}
    finally:
        await reconciler.publishes_done()
        store.close()


async def test_a_stored_memory_that_does_not_read_is_warned_of_once_and_replaced_by_the_next_leaders(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """A follower's what-ifs read it each time: it is warned of once, not at each what-if; the
    next leader forgets it, and its first pass writes over it what it remembers (here nothing)."""
    store = open_store(str(tmp_path / "state.db"))
    try:
        store.publish(failback_record.PUBLISHED_KEY, '{"format": 1, "sites": {"x": {}}}')
        follower = failback_record.FailbackRecord(store, clock=lambda: 0.0, lease=lambda: None)
        with caplog.at_level(logging.WARNING, logger=failback_record.__name__):
            for _ in range(3):
                assert (await follower.read(term=False)).seats == {}
        assert len([r for r in caplog.records if "does not read" in r.getMessage()]) == 1
        leader = failback_record.FailbackRecord(store, clock=lambda: 0.0, lease=lambda: None)
        assert (await leader.read()).seats == {}
        await leader.write(failback_mod.Failback())  # its first pass: nothing to remember
        stored = store.published(failback_record.PUBLISHED_KEY)
        assert stored is not None and failback_record.from_text(stored[1], lambda at: at) == failback_mod.Failback()
    finally:
        store.close()
