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
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests

SHA = hashlib.sha256(b"m1").hexdigest()
SITES = [f"edge-{i}" for i in range(4)]
SERVING = (agent_model.ModelState("m1", SHA, agent_model.ModelPhase.READY, serving_sha256=SHA, deployment="d1", variant="distilled"),)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def beat(hub: hub_mod.AgentHub, site: str, agent_id: str, seq: int, inflight: int) -> None:
    hub.record_heartbeat(site, agent_id, agent_model.Heartbeat(
        seq=seq, sent_unix_ms=0, inflight=inflight, cpu_percent=1.0, memory_available_bytes=8 << 30, assignment_version=0,
        draining=False, capacity=None, models=SERVING, gpu_free_bytes=()))


def published_load(store: store_mod.Store) -> tuple[int, dict[str, int]]:
    """The published table's version and each site's in-flight count in it."""
    found = store.published(wire.PUBLISHED_KEY)
    assert found is not None
    return found[0], {e["site"]: e["inflight"] for e in json.loads(found[1])["endpoints"]}


def test_a_change_of_load_alone_is_published_at_most_every_load_publish_s_and_any_other_change_at_once(tmp_path: pathlib.Path) -> None:
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = store_mod.Store(tmp_path / "state.db")
    try:
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
        table, clock = endpoints_mod.EndpointTable(), Clock()
        reconciler = loop.Reconciler(store, hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                     artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table, clock=clock)

        async def one_pass() -> None:
            await reconciler.reconcile_once()
            while reconciler._publishes:  # the table's write, beside the pass
                await asyncio.wait(set(reconciler._publishes))

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
