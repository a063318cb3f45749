"""A data centre whose API takes calls and answers slowly (a Ray dashboard, or a Kubernetes
API, that answers at the client's 15 s timeout) holds up only itself. Awaited inside the
pass, its call held the whole pass: the edge agents' new sets, a deploy or a drain, waited
on an unrelated cluster at every try. The pass now goes on with its last observation and
takes the answer in a later pass. The dashboard is a real HTTP server on loopback that holds
the requests the test stalls until it releases them; the agents are joined to a real hub."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from orchestrator import catalog
from orchestrator.agents import hub as hub_mod
from orchestrator.manifests import loader
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness, manifests
from tests.controlplane import datacentres, support


@dataclass
class Fleet:
    """edge-a (its agent joined to a real hub) and dc-1 (a Ray dashboard on loopback), under
    a reconciler whose loop runs."""

    store: store_mod.Store
    hub: hub_mod.AgentHub
    reconciler: loop.Reconciler
    dashboard: datacentres.ServeDashboard
    artifacts: pathlib.Path
    running: asyncio.Task[None] | None = None

    def apply(self, *docs: str) -> None:
        catalog.apply_documents(self.store, loader.load_text(manifests.bundle(*docs)), actor="test")
        self.reconciler.applied("test")

    def edge_model(self, name: str) -> str:
        """An ONNX model ``name`` and a deployment of it on the edge tier."""
        (self.artifacts / f"{name}.onnx").write_bytes(name.encode())
        return manifests.bundle(manifests.onnx_model(name, f"{name}.onnx", hashlib.sha256(name.encode()).hexdigest()),
                                manifests.deployment(f"on-{name}", name, 1, {"tiers": ["edge"]}))

    def sent_to_edge(self) -> set[str]:
        got = self.hub.assignments("edge-a")
        return set() if got is None else {a.model for a in got.assignments}

    def events(self, action: str) -> list[str]:
        return [e.reason for e in self.store.events(kind="Site", name="dc-1", limit=1000) if e.action == action]


@pytest.fixture
async def slow(tmp_path: pathlib.Path) -> AsyncIterator[Fleet]:
    dashboard = datacentres.ServeDashboard()
    store = store_mod.Store(tmp_path / "state.db")
    hub, reconciler = support.reconciler_with_agents(store, ("edge-a",), tmp_path)
    reconciler.resync_s = 0.2
    fleet = Fleet(store, hub, reconciler, dashboard, tmp_path)
    fleet.running = asyncio.create_task(reconciler.run())
    try:
        yield fleet
    finally:
        dashboard.release()
        reconciler.stop()
        fleet.running.cancel()
        await asyncio.gather(fleet.running, return_exceptions=True)
        await reconciler.datacentres.close()
        dashboard.stop()
        store.close()


async def test_a_pass_pushes_the_edge_sets_while_a_data_centres_observation_is_held(slow: Fleet) -> None:
    slow.dashboard.stall()
    slow.apply(manifests.edge_site("edge-a", "FR", 48.0, 2.35, region="fr"), slow.edge_model("m1"),
               datacentres.site("dc-1", on=f"ray: {{address: '{slow.dashboard.url}'}}"), datacentres.MODEL, datacentres.deployment("d", "dc-1"))
    await harness.wait_until(lambda: slow.sent_to_edge() == {"m1"}, 30, what="edge-a sent m1")
    slow.apply(slow.edge_model("m2"))  # a deploy while dc-1's observation is still held
    await harness.wait_until(lambda: slow.sent_to_edge() == {"m1", "m2"}, 30, what="edge-a sent m2")

    # dc-1 was never given up on: its one observation is still held, and no other was begun beside it
    assert slow.events("datacentre-error") == []
    assert (slow.dashboard.requests, slow.dashboard.held) == (["GET"], ["GET"])

    slow.dashboard.release()  # its answer lands in a later pass, which applies d there
    await harness.wait_until(lambda: slow.events("serve-applied"), 30, what="d applied on dc-1")
    assert list(slow.dashboard.applications) == ["ep-d.v.dc-1"]
    assert slow.events("datacentre-error") == []


async def test_a_pass_pushes_the_edge_sets_while_a_data_centres_apply_is_held(slow: Fleet) -> None:
    slow.apply(manifests.edge_site("edge-a", "FR", 48.0, 2.35, region="fr"), slow.edge_model("m1"),
               datacentres.site("dc-1", on=f"ray: {{address: '{slow.dashboard.url}'}}"), datacentres.MODEL)
    await harness.wait_until(lambda: slow.sent_to_edge() == {"m1"} and slow.events("serve-applied"), 30,
                             what="edge-a sent m1, dc-1 given its (no) applications")
    slow.dashboard.stall("PUT")
    slow.apply(datacentres.deployment("d", "dc-1"))
    await harness.wait_until(lambda: slow.dashboard.held == ["PUT"], 30, what="d's apply on dc-1 held")
    taken = len(slow.dashboard.requests)
    slow.apply(slow.edge_model("m2"))
    await harness.wait_until(lambda: slow.sent_to_edge() == {"m1", "m2"}, 30, what="edge-a sent m2")
    passes = slow.reconciler.passes
    await slow.reconciler.wait_for_pass(passes + 1)  # another pass while it is held

    # the apply is still on its way, and dc-1 was called for nothing more meanwhile (no observation beside it)
    assert slow.events("datacentre-error") == []
    assert slow.dashboard.held == ["PUT"] and len(slow.dashboard.requests) == taken

    slow.dashboard.release()
    await harness.wait_until(lambda: any("ep-d.v.dc-1" in e for e in slow.events("serve-applied")), 30, what="d's apply on dc-1 taken")
    assert list(slow.dashboard.applications) == ["ep-d.v.dc-1"]
    assert slow.events("datacentre-error") == []


def calls_in_flight() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("datacentre-call") and not t.done()]


async def test_an_observation_held_on_the_cluster_a_site_moved_off_is_cancelled_and_its_answer_never_taken(slow: Fleet) -> None:
    """dc-1 moves to another Ray cluster while its observation of the old one is held: the
    new one is observed and given d at once, and what the old one answers at last (d at
    three replicas) is never taken for dc-1's; the old one's applications are removed."""
    old, new = slow.dashboard, datacentres.ServeDashboard()
    try:
        old.applications = {"ep-d.v.dc-1": {"name": "ep-d.v.dc-1", "route_prefix": "/ep/dc-1/d/v", "import_path": "pkg.mod:app",
                                            "deployments": [{"name": "Ingress", "num_replicas": 3}]}}
        old.stall()
        slow.apply(manifests.edge_site("edge-a", "FR", 48.0, 2.35, region="fr"), slow.edge_model("m1"),
                   datacentres.site("dc-1", on=f"ray: {{address: '{old.url}'}}"), datacentres.MODEL, datacentres.deployment("d", "dc-1"))
        await harness.wait_until(lambda: slow.sent_to_edge() == {"m1"} and old.held == ["GET"], 30, what="dc-1's observation held")

        slow.apply(datacentres.site("dc-1", on=f"ray: {{address: '{new.url}'}}"))
        await harness.wait_until(lambda: "ep-d.v.dc-1" in new.applications, 30, what="d applied on dc-1's new cluster")
        assert old.requests[0] == "GET" and "PUT" not in old.requests  # the old one still holds what it took
        assert slow.events("datacentre-error") == []  # nothing the old one answers (its timeout) is dc-1's

        old.release()
        await harness.wait_until(lambda: any("moved off" in e for e in slow.events("serve-removed")), 30,
                                 what="d removed from dc-1's old cluster")
        await slow.reconciler.wait_for_pass(slow.reconciler.passes + 1)
        assert old.applications == {} and slow.events("datacentre-error") == []
        observed = slow.reconciler.dc_sync.observed["dc-1"]
        assert observed.reachable and {n: a.replicas_running for n, a in observed.apps.items()} == {"ep-d.v.dc-1": 1}, observed
    finally:
        new.stop()


async def test_a_call_held_when_the_reconciler_stops_is_cancelled(slow: Fleet) -> None:
    slow.dashboard.stall()
    slow.apply(datacentres.site("dc-1", on=f"ray: {{address: '{slow.dashboard.url}'}}"))
    await harness.wait_until(lambda: slow.dashboard.held == ["GET"], 30, what="dc-1's observation held")
    assert len(calls_in_flight()) == 1
    assert slow.running is not None
    slow.reconciler.stop()
    await slow.running  # ends without its answer
    assert calls_in_flight() == [] and slow.dashboard.held == ["GET"]


async def test_a_site_whose_first_observation_is_held_is_waited_for_not_planned_as_answering(slow: Fleet) -> None:
    """dc-1's first observation is held: nothing is known of it yet, so nothing new is
    placed there or routed to it, its status and d's reason say it is awaited; once it
    answers, d is placed there and applied."""
    slow.dashboard.stall()
    slow.apply(datacentres.site("dc-1", on=f"ray: {{address: '{slow.dashboard.url}'}}"), datacentres.MODEL, datacentres.deployment("d", "dc-1"))
    await harness.wait_until(lambda: slow.dashboard.held == ["GET"], 30, what="dc-1's first observation held")
    await slow.reconciler.wait_for_pass(slow.reconciler.passes + 2)  # passes planned while it is held

    def status(kind: str, name: str) -> dict[str, object]:
        stored = slow.store.get(kind, name)
        return dict(stored.status) if stored is not None else {}

    assert slow.store.placements() == []
    assert [e for e in slow.reconciler.table.all_endpoints() if e.site == "dc-1"] == []
    assert status("Site", "dc-1")["health"] == "Waiting"
    d = status("ModelDeployment", "d")
    assert d["phase"] == "Unschedulable" and "dc-1 waiting for its first answer" in str(d["reason"]), d
    assert slow.events("datacentre-error") == []

    slow.dashboard.release()
    await harness.wait_until(lambda: "ep-d.v.dc-1" in slow.dashboard.applications, 30, what="d applied on dc-1")
    await harness.wait_until(lambda: status("ModelDeployment", "d").get("phase") == "Running", 30, what="d running")
    assert status("Site", "dc-1")["health"] == "Healthy"
