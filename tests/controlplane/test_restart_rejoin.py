"""Edge agents that rejoin a restarted control plane (its own SQLite database). The window
kept for them lasts as long as an agent may legitimately take to come back (its reconnect
backoff at its cap, after the control plane listens again), so none that serves is planned
as lost. One back after the window anyway (its site was planned as lost meanwhile) is sent
the plan then, never a set made while it was away: an agent unloads at once a model its set
leaves out, so such a set would have it answer 404, then 503 while it loads again, until a
later pass gave the model back."""

from __future__ import annotations

import pathlib

from edge_agent import retry
from orchestrator import catalog, server, server_config
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import routing
from orchestrator.manifests import loader
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests

SITES = ("edge-a", "edge-b")
REJOIN_S = 7.5  # a window past which an agent comes back in the test below
#: The chaos test's control plane (tests/chaos/conftest.py).
CHAOS = server_config.ServerConfig(heartbeat_interval_s=0.5, missed_heartbeats=3, leader_lease_s=3.0)


class Agents:
    """Agents of the sites, joined to a real hub on a clock the test moves, each serving the
    model it served before the restart."""

    def __init__(self, sha256: str) -> None:
        self.now = 0.0
        self.sha256 = sha256
        self.hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), clock=lambda: self.now, heartbeat_interval=0.5)
        self.ids: dict[str, str] = {}

    def join(self, site: str) -> None:
        self.ids[site] = self.hub.join(agent_model.JoinApplication(
            site, "tok", None, "", f"http://{site}:8090", agent_model.Location("FR", "fr", 48.0, 2.35), {}, "test", 0.5,
            agent_model.Capacity(cpu_cores=2, memory_total_bytes=8 << 30))).agent_id

    def beat(self, site: str) -> None:
        self.now += 0.1  # a heartbeat comes after the join, as it does on the agent's stream
        serving = agent_model.ModelState("intent", self.sha256, agent_model.ModelPhase.READY, serving_sha256=self.sha256,
                                         deployment="intent-fr", variant="distilled")
        self.hub.record_heartbeat(site, self.ids[site], agent_model.Heartbeat(
            seq=int(self.now * 10) + 1, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=8 << 30,
            assignment_version=0, draining=False, capacity=None, models=(serving,), gpu_free_bytes=()))


class Top:
    """The top of the agent's reconnect jitter: its longest wait."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _intent(sha256: str, store: store_mod.Store, artifact: pathlib.Path) -> None:
    catalog.apply_documents(store, loader.load_text(manifests.bundle(
        *(manifests.edge_site(site, "FR", 48.0, 2.35, region="fr") for site in SITES),
        manifests.onnx_model("intent", artifact.name, sha256),
        manifests.deployment("intent-fr", "intent", 2, manifests.spread_by_site(residency=["FR"], tiers=["edge"])))), actor="test")
    store.replace_placements([store_mod.PlacementRow("intent-fr", site, "distilled", 1) for site in SITES])  # before the restart


async def test_an_agent_whose_reconnect_backoff_reached_its_cap_is_back_within_the_window_a_restart_keeps(tmp_path: pathlib.Path) -> None:
    """The control plane took long to start (22 s on a loaded machine), and edge-b's agent
    backed off all the while, up to its cap: its last attempt failed just before the agent
    listener was up, and it waits a whole step at the top of its jitter before the next one,
    then joins. Until then its site is Rejoining in every pass: it keeps its replica, the
    gateway's table keeps its endpoint, and nothing moves."""
    artifact = tmp_path / "intent.onnx"
    artifact.write_bytes(b"an onnx model")
    sha256 = artifacts_mod.sha256_file(artifact)
    store = store_mod.Store(tmp_path / "state.db")
    agents = Agents(sha256)
    table = endpoints_mod.EndpointTable()
    table.replace([routing.Endpoint("intent", "intent-fr", site, "edge", "FR", "fr", 48.0, 2.35, f"http://{site}:8090")
                   for site in SITES])  # the table the last run published, which the restarted control plane starts from
    reconciler = loop.Reconciler(store, agents.hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table, clock=lambda: agents.now)
    try:
        _intent(sha256, store, artifact)
        started = agents.now
        reconciler.resume(rejoin_s=server.ControlPlane(CHAOS).rejoin_s)  # as the control plane does once it listens for agents
        back = started + retry.RECONNECT.delay(64, Top()) + 1.0  # its wait, then a join that takes a second
        agents.join("edge-a")
        seen: list[str] = []
        while agents.now < back:
            agents.beat("edge-a")
            await reconciler.reconcile_once()
            placed = {row.site for row in store.placements()}
            routed = {e.site for e in table.all_endpoints()}
            if placed != set(SITES) or routed != set(SITES):
                seen.append(f"at {agents.now - started:.1f}s: placed on {sorted(placed)}, routed to {sorted(routed)}")
            agents.now += 0.4
        agents.join("edge-b")
        agents.beat("edge-b")
        await reconciler.reconcile_once()
        assert not seen, f"edge-b's agent, back {back - started:.1f}s after the restart, was planned as lost before: {seen[:3]}"
        assert {e.site for e in table.all_endpoints()} == set(SITES)
        assert "intent" in {a.model for a in agents.hub.assignments("edge-b").assignments}  # type: ignore[union-attr]
    finally:
        await reconciler.publishes_done()
        store.close()


async def test_an_agent_back_after_its_rejoin_window_is_never_sent_a_set_made_while_it_was_away(tmp_path: pathlib.Path) -> None:
    """edge-b's agent reconnects only after the window (its backoff grew while the control
    plane took long to start): the passes meanwhile planned its site as lost. The set its
    watch stream sends as it opens, and every set a pass sends it after, still name the
    model it serves."""
    artifact = tmp_path / "intent.onnx"
    artifact.write_bytes(b"an onnx model")
    sha256 = artifacts_mod.sha256_file(artifact)
    store = store_mod.Store(tmp_path / "state.db")
    agents = Agents(sha256)
    reconciler = loop.Reconciler(store, agents.hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), endpoints_mod.EndpointTable(),
                                 clock=lambda: agents.now)
    try:
        _intent(sha256, store, artifact)
        reconciler.resume(rejoin_s=REJOIN_S)
        sent: list[agent_model.AssignmentSet] = []

        def sent_to_b() -> None:
            got = agents.hub.assignments("edge-b")
            if got is not None and got not in sent:
                sent.append(got)

        agents.join("edge-a")
        agents.beat("edge-a")
        await reconciler.reconcile_once()
        agents.now += REJOIN_S + 1  # edge-b's agent is not back when the window closes: its site is planned as lost
        agents.beat("edge-a")
        await reconciler.reconcile_once()
        agents.join("edge-b")  # and it reconnects: what its watch stream sends it at once
        sent_to_b()
        await reconciler.reconcile_once()  # the pass its join starts
        sent_to_b()
        agents.beat("edge-b")
        await reconciler.reconcile_once()  # the pass its first heartbeat starts
        sent_to_b()
        without = [s.version for s in sent if "intent" not in {a.model for a in s.assignments}]
        assert not without, f"edge-b's agent, serving intent, was sent sets without it (versions {without}): it unloads at once"
        assert sent and sent[-1].assignments[0].sha256 == sha256, "edge-b's agent is given its model back once it reports"
    finally:
        await reconciler.publishes_done()
        store.close()
