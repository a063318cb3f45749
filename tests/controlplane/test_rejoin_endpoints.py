"""An edge site's endpoint through its agent's return: a live agent that rejoins a restarted
control plane, or opens a new session after a dropped connection, or comes over to a new
leader, still serves what it served. Between its join and its first heartbeat (a few
milliseconds, in which a pass may run: the join calls for one) the control plane knows
nothing of its models from the agent, so what it knew before must stand until the agent's
own report says otherwise; a table published without the site's endpoint in between had
the gateway answer 503 to requests its only replica would have served.

Each pass here runs exactly between the join and the first heartbeat, where in a live
control plane it runs there only by chance."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

from orchestrator import catalog
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import routing
from orchestrator.manifests import loader
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import loop
from orchestrator.reconciler import rejoin
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests

SITE = "edge-lyon"
URL = f"http://{SITE}:9001"


class Agent:
    """The site's agent, joined to a real hub on a clock the test moves, serving intent."""

    def __init__(self, sha256: str) -> None:
        self.now = 0.0
        self.sha256 = sha256
        self.hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), clock=lambda: self.now, heartbeat_interval=0.5)
        self.grant: agent_model.JoinGrant | None = None

    def join(self, url: str = URL, started_unix_ms: int = 1) -> None:
        """A join with the bootstrap token the first time, with the agent's credential after."""
        self.now += 0.01
        grant = self.grant
        self.grant = self.hub.join(agent_model.JoinApplication(
            SITE, "" if grant else "tok", grant.credential if grant else None, grant.agent_id if grant else "", url,
            agent_model.Location("FR", "fr", 45.7, 4.8), {}, "test", 0.5,
            agent_model.Capacity(cpu_cores=2, memory_total_bytes=8 << 30), started_unix_ms=started_unix_ms))

    def beat(self, serving: bool = True) -> None:
        self.now += 0.01
        state = agent_model.ModelState("intent", self.sha256, agent_model.ModelPhase.READY, serving_sha256=self.sha256,
                                       deployment="intent-eu", variant="distilled")
        assert self.grant is not None
        self.hub.record_heartbeat(SITE, self.grant.agent_id, agent_model.Heartbeat(
            seq=int(self.now * 100), sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=8 << 30,
            assignment_version=0, draining=False, capacity=None, models=(state,) if serving else (), gpu_free_bytes=()))


def _fleet(tmp_path: pathlib.Path) -> tuple[store_mod.Store, Agent, artifacts_mod.ArtifactCatalog]:
    artifact = tmp_path / "intent.onnx"
    artifact.write_bytes(b"an onnx model")
    sha256 = artifacts_mod.sha256_file(artifact)
    store = store_mod.Store(tmp_path / "state.db")
    catalog.apply_documents(store, loader.load_text(manifests.bundle(
        manifests.edge_site(SITE, "FR", 45.7, 4.8, region="fr"),
        manifests.onnx_model("intent", artifact.name, sha256),
        manifests.deployment("intent-eu", "intent", 1, manifests.spread_by_site(residency=["FR"], tiers=["edge"])))), actor="test")
    store.replace_placements([store_mod.PlacementRow("intent-eu", SITE, "distilled", 1)])
    return store, Agent(sha256), artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp")


@contextlib.asynccontextmanager
async def _reconciling(tmp_path: pathlib.Path, *, remembered: bool = False) -> AsyncIterator[tuple[Agent, endpoints_mod.EndpointTable, loop.Reconciler]]:
    """The fleet's agent, its table (holding the site's endpoint a last run published, when
    ``remembered``) and a reconciler over them on the agent's clock, closed after."""
    store, agent, artifacts = _fleet(tmp_path)
    table = endpoints_mod.EndpointTable()
    if remembered:
        table.replace([routing.Endpoint("intent", "intent-eu", SITE, "edge", "FR", "fr", 45.7, 4.8, URL)])
    reconciler = loop.Reconciler(store, agent.hub, dc_mod.DataCentres(dc_mod.LocalRay()), artifacts, table, clock=lambda: agent.now)
    try:
        yield agent, table, reconciler
    finally:
        await reconciler.publishes_done()
        store.close()


def _routed(table: endpoints_mod.EndpointTable) -> list[tuple[str, bool]]:
    return [(e.url, e.healthy) for e in table.all_endpoints() if e.model == "intent"]


async def test_a_live_agent_rejoining_a_restarted_control_plane_keeps_its_endpoint_until_it_reports(tmp_path: pathlib.Path) -> None:
    """``edgeplane serve`` was killed and started again: its table is the one its last run
    published. The agent joins, a pass runs before its first heartbeat, then another after:
    the site's endpoint is in the table the whole time, healthy."""
    async with _reconciling(tmp_path, remembered=True) as (agent, table, reconciler):
        reconciler.resume(rejoin_s=30.0)
        await reconciler.reconcile_once()
        assert _routed(table) == [(URL, True)]
        agent.join()
        await reconciler.reconcile_once()  # the pass the join calls for, before the agent's first heartbeat
        assert _routed(table) == [(URL, True)], "the table the join's pass published lacks the rejoining site's endpoint"
        agent.beat()
        await reconciler.reconcile_once()
        assert _routed(table) == [(URL, True)]
        assert not reconciler.comeback.rejoining  # the window closed once the agent reported


async def test_a_rejoined_agents_own_report_decides_what_its_site_serves(tmp_path: pathlib.Path) -> None:
    """The remembered endpoint stands for the agent only until it reports: one that says it
    serves nothing any more has its endpoint dropped; one that came back at another address
    is not routed to at the old one meanwhile."""
    async with _reconciling(tmp_path, remembered=True) as (agent, table, reconciler):
        reconciler.resume(rejoin_s=30.0)
        agent.join(url="http://127.0.0.1:9002")
        await reconciler.reconcile_once()
        assert _routed(table) == []
        agent.beat(serving=False)
        await reconciler.reconcile_once()
        assert _routed(table) == []
        agent.beat()
        await reconciler.reconcile_once()
        assert _routed(table) == [("http://127.0.0.1:9002", True)]


async def test_an_agent_reconnecting_after_a_dropped_connection_keeps_its_endpoint(tmp_path: pathlib.Path) -> None:
    """No restart: the agent's connection dropped and it opens a new session with its
    credential (the same process). The pass the new session calls for runs before its first
    heartbeat on the new stream, and the table keeps its endpoint."""
    async with _reconciling(tmp_path) as (agent, table, reconciler):
        agent.join()
        agent.beat()
        await reconciler.reconcile_once()
        assert _routed(table) == [(URL, True)]
        agent.join()  # a new session of the live agent
        await reconciler.reconcile_once()
        assert _routed(table) == [(URL, True)], "the table the reconnect's pass published lacks the site's endpoint"
        agent.beat(serving=False)  # its own report says otherwise: gone
        await reconciler.reconcile_once()
        assert _routed(table) == []


async def test_a_restarted_agent_process_is_not_taken_to_serve_what_the_last_one_did(tmp_path: pathlib.Path) -> None:
    """An agent whose process restarted (another start time at its join) loads its models
    again: nothing is kept of its last process's states."""
    async with _reconciling(tmp_path) as (agent, table, reconciler):
        agent.join()
        agent.beat()
        await reconciler.reconcile_once()
        agent.join(started_unix_ms=2)
        status = agent.hub.status(SITE)
        assert status is not None and status.models == {}


async def test_a_new_leader_waits_for_its_agents_first_reports_not_their_joins(tmp_path: pathlib.Path) -> None:
    """A new leader's first pass waits for the edge sites serving in the inherited table: an
    agent that has joined but not reported is not back yet (its models are not known), so the
    first pass does not publish a table without its endpoint."""
    _, agent, _ = _fleet(tmp_path)
    agent.join()
    ticks: list[float] = []

    def clock() -> float:  # each look moves time on; the agent reports at the fourth
        ticks.append(agent.now)
        if len(ticks) == 4:
            agent.beat()
        agent.now += 0.05
        return agent.now

    await rejoin.await_takeover(agent.hub, frozenset({SITE}), deadline=agent.now + 1.0, clock=clock, stopping=lambda: False, every_s=0)
    status = agent.hub.status(SITE)
    assert status is not None and status.reported
