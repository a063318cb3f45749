"""A fleet rejoining a restarted control plane: every agent's join is logged, in few writes.

After a restart thousands of agents join within a second or two. Each join is an event to
log (and, for a site nobody declared, a Site to register); logged one transaction each,
with a reconcile pass called after each one (a pass reads and writes every Site), a fleet
of 1,500 sites took minutes to log, the passes and the log taking turns on the store's one
connection. What waits is logged together, in order, one transaction a batch, and one
pass follows each batch."""

from __future__ import annotations

import pathlib

import pytest

from orchestrator import server, server_config
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness

AGENTS = 300


async def test_a_fleet_joining_at_once_is_logged_in_a_few_writes_in_the_order_it_joined(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness.declare_edge_sites(tmp_path, [f"edge-{i}" for i in range(AGENTS)], by="test")
    config = server_config.ServerConfig(data_dir=tmp_path, port=0, agent_port=0, agent_join_port=0, heartbeat_interval_s=60.0,
                                        bootstrap_tokens=(harness.BOOTSTRAP_TOKEN,))
    cp = await server.ControlPlane(config).start()
    try:
        writes: list[int] = []  # the agents' events each write to the log carried
        record = cp.store.record

        def counted(*events: store_mod.Event, lease: store_mod.Lease | None = None) -> None:
            if agents := sum(e.actor.startswith("agent:") for e in events):
                writes.append(agents)
            record(*events, lease=lease)

        monkeypatch.setattr(cp.store, "record", counted)
        for i in range(AGENTS):  # all in one turn of the event loop, as a storm of joins reaches it
            cp.hub.join(harness.join_application(f"edge-{i}"))
        await harness.wait_until(lambda: sum(writes) >= AGENTS, 60, what="every join logged")
        assert sum(writes) == AGENTS
        assert len(writes) <= 3, f"{len(writes)} writes for {AGENTS} joins"
        joined = [e.name for e in cp.store.events(limit=10_000) if e.action == "agent-joined"]
        assert joined == [f"edge-{i}" for i in range(AGENTS)]
    finally:
        await cp.stop()
