"""An agent may rejoin a restarting control plane early: its listener is up while start() is
still stopping the Ray cluster a killed control plane left (about a second). Its events
must reach the reconciler (made before the listener starts), and the reconciler's first
pass must see it; the hub once logged a traceback for each such event."""

from __future__ import annotations

import asyncio
import logging
import pathlib

import pytest

from orchestrator import server, server_config
from orchestrator.agents import model
from orchestrator.reconciler import datacentres
from orchestrator.testing import harness


async def test_an_agent_joining_while_the_start_reclaims_ray_is_seen_by_the_first_pass(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    reclaiming, joined = asyncio.Event(), asyncio.Event()

    async def slow_reclaim(self: datacentres.LocalRay) -> list[int]:
        reclaiming.set()
        await joined.wait()
        return []

    monkeypatch.setattr(datacentres.LocalRay, "reclaim", slow_reclaim)
    config = server_config.ServerConfig(data_dir=tmp_path, port=0, agent_port=0, agent_join_port=0, heartbeat_interval_s=60.0,
                                 bootstrap_tokens=(harness.BOOTSTRAP_TOKEN,))
    cp = server.ControlPlane(config)
    starting = asyncio.create_task(cp.start())
    try:
        await asyncio.wait_for(reclaiming.wait(), 30)
        assert cp.agent_target and not cp.ready()  # the agents' listener is up, the start is not done
        with caplog.at_level(logging.ERROR, logger="orchestrator"):
            cp.hub.join(model.JoinApplication(
                site="edge-1", bootstrap_token=harness.BOOTSTRAP_TOKEN, credential=None, agent_id="", endpoint_url="http://127.0.0.1:9",
                location=model.Location("FR", "eu-west", 48.8, 2.3), labels={}, agent_version="test", heartbeat_interval=60.0,
                capacity=model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",))))
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
        joined.set()
        await asyncio.wait_for(starting, 30)
        await harness.wait_until(lambda: cp.reconciler.last_snapshot is not None, 30, what="the first pass")
        snapshot = cp.reconciler.last_snapshot
        assert snapshot is not None and "edge-1" in snapshot.agent_by_site, snapshot.agents
        assert cp.store.get("Site", "edge-1") is not None  # registered from the join, as at any time
    finally:
        joined.set()
        if not starting.done():
            await asyncio.wait_for(starting, 30)
        await cp.stop()
