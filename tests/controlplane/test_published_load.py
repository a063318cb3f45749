"""What the leader writes of its endpoint table to the store when only agents' load moved.
Each write is the whole document (2.8 MB at 10,000 endpoints) and every follower reads it
whole, while some agent's in-flight count moves between nearly any two passes of a busy
fleet: a table whose only change is load is written at most every ``load_publish_s``, any
other change at once. The leader's own gateway routes with the load of each pass."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib

from orchestrator import catalog
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import wire
from orchestrator.manifests import loader
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import loop, observed
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests

SHA = hashlib.sha256(b"m1").hexdigest()
SITES = [f"edge-{i}" for i in range(4)]
SERVING = (agent_model.ModelState("m1", SHA, agent_model.ModelPhase.READY, serving_sha256=SHA, deployment="d1", variant="distilled"),)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def beat(hub: hub_mod.AgentHub, site: str, agent_id: str, seq: int, inflight: int,
         models: tuple[agent_model.ModelState, ...] = SERVING) -> None:
    hub.record_heartbeat(site, agent_id, agent_model.Heartbeat(
        seq=seq, sent_unix_ms=0, inflight=inflight, cpu_percent=1.0, memory_available_bytes=8 << 30, assignment_version=0,
        draining=False, capacity=None, models=models, gpu_free_bytes=()))


def published_load(store: store_mod.Store) -> tuple[int, dict[str, int]]:
    """The published table's version and each site's in-flight count in it."""
    found = store.published(wire.PUBLISHED_KEY)
    assert found is not None
    return found[0], {e["site"]: e["inflight"] for e in json.loads(found[1])["endpoints"]}


def leader(tmp_path: pathlib.Path, store: store_mod.Store) -> tuple[loop.Reconciler, hub_mod.AgentHub, dict[str, str], Clock]:
    """A reconciler over ``SITES``, each with an agent serving m1, on a clock of the test's."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    catalog.apply_documents(store, loader.load_text(manifests.bundle(
        *(manifests.edge_site(s, "FR", 48.0 + i / 100, 2.0, region="fr") for i, s in enumerate(SITES)),
        manifests.onnx_model("m1", "m1.onnx", SHA),
        manifests.deployment("d1", "m1", len(SITES), manifests.spread_by_site(tiers=["edge"])))), actor="test")
    hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), heartbeat_interval=1.0)
    ids = {s: hub.join(agent_model.JoinApplication(
        s, "tok", None, "", f"http://{s}:8081", agent_model.Location(), {}, "test", 1.0,
        agent_model.Capacity(cpu_cores=4, memory_total_bytes=8 << 30))).agent_id for s in SITES}
    for s in SITES:
        beat(hub, s, ids[s], 1, 0)
    clock = Clock()
    reconciler = loop.Reconciler(store, hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), endpoints_mod.EndpointTable(), clock=clock)
    return reconciler, hub, ids, clock


def test_a_change_of_load_alone_is_published_at_most_every_load_publish_s_and_any_other_change_at_once(tmp_path: pathlib.Path) -> None:
    store = store_mod.Store(tmp_path / "state.db")
    try:
        reconciler, hub, ids, clock = leader(tmp_path, store)
        table = reconciler.table

        async def one_pass() -> None:
            await reconciler.reconcile_once()
            await reconciler.publishes_done()  # the table's write, beside the pass

        async def scenario() -> None:
            await one_pass()
            first, load = published_load(store)
            assert load == dict.fromkeys(SITES, 0)

            clock.now += 5.0
            beat(hub, "edge-0", ids["edge-0"], 2, 3)
            await one_pass()
            assert {e.site: e.inflight for e in table.all_endpoints()}["edge-0"] == 3  # this replica routes with it
            assert published_load(store) == (first, load)  # the store is not written

            clock.now += 10.0  # load_publish_s (15 s by default) since the last write
            await one_pass()
            second, load = published_load(store)
            assert second == first + 1 and load["edge-0"] == 3

            clock.now += 1.0
            beat(hub, "edge-1", ids["edge-1"], 2, 5)
            catalog.apply_documents(store, loader.load_text(manifests.bundle(
                manifests.edge_site("edge-new", "DE", 50.0, 8.0, region="de"))), actor="test")  # a new region: not load alone
            await one_pass()
            third, load = published_load(store)
            assert third == second + 1 and load["edge-1"] == 5  # at once, with the load as it is

        asyncio.run(scenario())
    finally:
        store.close()


def test_a_downloads_progress_alone_rewrites_the_observed_fleet_at_most_every_load_publish_s(tmp_path: pathlib.Path) -> None:
    """Followers read the observed fleet whole at each change; a download's progress moves
    at nearly every pass. A model that starts loading is written at once, its progress at
    most every ``load_publish_s``, with the progress as it is then."""
    store = store_mod.Store(tmp_path / "state.db")
    try:
        reconciler, hub, ids, clock = leader(tmp_path, store)

        def loading(percent: int) -> tuple[agent_model.ModelState, ...]:
            return (*SERVING, agent_model.ModelState("m2", "b" * 64, agent_model.ModelPhase.LOADING, f"downloading {percent}%"))

        def written() -> tuple[int, str]:
            found = store.published(observed.PUBLISHED_KEY)
            assert found is not None
            return found[0], found[1]

        async def one_pass() -> None:
            await reconciler.reconcile_once()
            await reconciler.publishes_done()

        async def scenario() -> None:
            await one_pass()
            first, _ = written()
            clock.now += 1.0
            beat(hub, "edge-0", ids["edge-0"], 2, 0, loading(10))
            await one_pass()
            second, text = written()
            assert second > first and "downloading 10%" in text  # a model loading: at once
            for seq, percent in ((3, 20), (4, 30)):
                clock.now += 5.0
                beat(hub, "edge-0", ids["edge-0"], seq, 0, loading(percent))
                await one_pass()
                assert written()[0] == second  # its progress alone: not yet
            clock.now += 5.0  # load_publish_s (15 s by default) since the last write
            beat(hub, "edge-0", ids["edge-0"], 5, 0, loading(40))
            await one_pass()
            third, text = written()
            assert third > second and "downloading 40%" in text

        asyncio.run(scenario())
    finally:
        store.close()
