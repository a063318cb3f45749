"""The control plane's fleet metrics as a scrape reads them: what only grows is a counter,
so ``rate()`` and ``increase()`` work on it across restarts."""

from __future__ import annotations

import pathlib
import types

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import fleet_metrics
from orchestrator.agents import admission, auth, hub, model
from orchestrator.artifacts import catalog as artifacts
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import routing
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod

TOKEN = "t0k3n"


def counters(registry: CollectorRegistry) -> dict[str, float]:
    """Every counter sample of a scrape, by the name a PromQL query uses."""
    return {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
            if f.type == "counter" for s in f.samples if s.name.endswith("_total")}


async def test_heartbeats_and_reconcile_passes_are_counters_that_move(tmp_path: pathlib.Path) -> None:
    store = store_mod.Store(tmp_path / "state.db")
    try:
        agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]))
        reconciler = loop.Reconciler(store, agent_hub, dc_mod.DataCentres(dc_mod.LocalRay()), artifacts.ArtifactCatalog((tmp_path,)),
                                     endpoints_mod.EndpointTable())
        registry = CollectorRegistry()
        registry.register(fleet_metrics.FleetCollector(types.SimpleNamespace(hub=agent_hub, reconciler=reconciler, elector=None)))  # type: ignore[arg-type]
        before = counters(registry)
        assert (before.get("edgeplane_heartbeats_received_total"), before.get("edgeplane_reconcile_passes_total")) == (0, 0)

        grant = agent_hub.join(model.JoinApplication("edge-1", TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test", 1.0,
                                                     model.Capacity(cpu_cores=2)))
        for seq in (1, 2):
            agent_hub.record_heartbeat("edge-1", grant.agent_id, model.Heartbeat(seq=seq, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=1 << 30,
                                                                              assignment_version=0, draining=False, capacity=None, models=None,
                                                                              gpu_free_bytes=()))
        await reconciler.reconcile_once()

        after = counters(registry)
        assert after["edgeplane_heartbeats_received_total"] == 2 and after["edgeplane_reconcile_passes_total"] == 1
    finally:
        store.close()


async def test_a_stored_object_that_does_not_read_shows_in_a_gauge_until_it_is_deleted(tmp_path: pathlib.Path) -> None:
    """Passes on hold still count as passes: the gauge is what says nothing changes meanwhile."""
    store = store_mod.Store(tmp_path / "state.db")
    try:
        reconciler = loop.Reconciler(store, hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN])), dc_mod.DataCentres(dc_mod.LocalRay()),
                                     artifacts.ArtifactCatalog((tmp_path,)), endpoints_mod.EndpointTable())
        registry = CollectorRegistry()
        registry.register(fleet_metrics.FleetCollector(types.SimpleNamespace(hub=reconciler.hub, reconciler=reconciler, elector=None)))  # type: ignore[arg-type]

        def unreadable() -> float | None:
            return registry.get_sample_value("edgeplane_unreadable_objects")

        assert unreadable() == 0
        legacy = {"variants": [{"name": "v", "runtime": "ray-serve", "importPath": "pkg.mod:app", "throughputRps": 1e-320,
                                "resources": {"cpu": 1, "memoryMiB": 256}}]}  # stored by an earlier version; refused by this one
        store.apply([store_mod.ObjectWrite("Model", "old", {}, legacy)], store_mod.Event("earlier-version", "apply", "", "", "apply"))
        assert await reconciler.reconcile_once() is None  # on hold
        assert unreadable() == 1
        store.delete("Model", "old", store_mod.Event("test", "delete", "Model", "old", "delete"))
        await reconciler.reconcile_once()
        assert unreadable() == 0
    finally:
        store.close()


def routable(table: endpoints_mod.EndpointTable) -> dict[str, float]:
    """``edgeplane_endpoints`` of a scrape, by model."""
    cp = types.SimpleNamespace(hub=hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN])), elector=None, store=None, table=table)
    registry = CollectorRegistry()
    registry.register(fleet_metrics.FleetCollector(cp))  # type: ignore[arg-type]
    return {s.labels["model"]: s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
            if f.name == "edgeplane_endpoints" for s in f.samples}


def test_the_endpoints_of_lost_agents_are_not_counted_as_routable() -> None:
    """A lost agent's replicas stay in the table, unhealthy, and no request is sent to them:
    with the last one lost every request gets a 503, and the gauge an alert watches reads 0."""
    def at(site: str, healthy: bool = True) -> routing.Endpoint:
        return routing.Endpoint("m", "d", site, "edge", "FR", "eu-west", 48.8, 2.3, f"http://{site}:8080", healthy=healthy)

    table = endpoints_mod.EndpointTable()
    table.replace([at("edge-1"), at("edge-2")])
    assert routable(table) == {"m": 2}
    table.replace([at("edge-1"), at("edge-2", healthy=False)])  # a pass read edge-2's agent lost
    assert routable(table) == {"m": 1}
    table.mark_down("http://edge-1:8080")  # the leader heard edge-1's agent is lost, before the next pass
    assert isinstance(table.rank("m", routing.Caller(), None), routing.NoRoute)
    assert routable(table) == {"m": 0}


def test_an_agent_relayed_by_a_follower_is_counted_once_across_replicas() -> None:
    """The leader holds a follower's agent as a relayed record and applies its heartbeats:
    the documented query sums each replica's count, so only the follower counts it."""
    leader, follower = (hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN])) for _ in range(2))

    def application(site: str) -> model.JoinApplication:
        return model.JoinApplication(site, TOKEN, None, "", f"http://{site}:8080", model.Location(), {}, "test", 1.0, model.Capacity(cpu_cores=2))

    def beat() -> model.Heartbeat:
        return model.Heartbeat(seq=1, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=1 << 30,
                               assignment_version=0, draining=False, capacity=None, models=None, gpu_free_bytes=())

    own = leader.join(application("edge-1"))
    relayed = follower.join(application("edge-2"))
    leader.admit_relayed(application("edge-2"), relayed.agent_id, "cp-2")  # as the relay brings it
    leader.record_heartbeat("edge-1", own.agent_id, beat())
    follower.record_heartbeat("edge-2", relayed.agent_id, beat())
    assert leader.relayed_heartbeat("edge-2", relayed.agent_id, beat(), "cp-2")  # the follower relays its beat

    def scraped(at: hub.AgentHub) -> tuple[float, float]:
        registry = CollectorRegistry()
        registry.register(fleet_metrics.FleetCollector(types.SimpleNamespace(hub=at, elector=None)))  # type: ignore[arg-type]
        agents = sum(registry.get_sample_value("edgeplane_agents", {"health": h}) or 0 for h in ("healthy", "unhealthy"))
        return agents, registry.get_sample_value("edgeplane_heartbeats_received_total") or 0

    assert scraped(leader) == (1, 1) and scraped(follower) == (1, 1)


def test_joins_refused_for_a_busy_control_plane_are_counted() -> None:
    """A join over --max-joins is refused (tests/agent/test_join_admission.py): the counter an
    operator watches at a restart moves, and the gauge says how many are under way."""
    gate = admission.JoinGate(1)
    registry = CollectorRegistry()
    registry.register(fleet_metrics.FleetCollector(types.SimpleNamespace(joins=gate, elector=None)))  # type: ignore[arg-type]
    assert registry.get_sample_value("edgeplane_agent_joins_refused_total") == 0
    held = gate.enter()
    assert isinstance(gate.enter(), admission.Refused) and isinstance(gate.enter(), admission.Refused)
    assert registry.get_sample_value("edgeplane_agent_joins_refused_total") == 2
    assert registry.get_sample_value("edgeplane_agent_joins_in_progress") == 1
    assert isinstance(held, admission.Admitted)
    gate.leave(held)
    assert registry.get_sample_value("edgeplane_agent_joins_in_progress") == 0
