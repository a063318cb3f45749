"""Agents and the control plane's inventory: joined sites appear with measured capacity,
lose health when their agent goes silent, and their replicas move."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import os
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from orchestrator.testing.postgres import PostgresServer
from tests.foundation.support import sqlite_connection

pytestmark = pytest.mark.asyncio


async def cli(cp_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, in a thread: the control plane under test runs on this event loop."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "orchestrator.cli.main", "--server", cp_url, *args],
                                   capture_output=True, text=True, timeout=60)


async def test_an_undeclared_agent_registers_its_site_with_measured_capacity(tmp_path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        await fleet.start_agent("edge-porto", country="PT", region="eu-south", lat=41.15, lon=-8.61)
        await harness.wait_until(lambda: (o := cp.store.get("Site", "edge-porto")) is not None and o.status.get("health") == "Healthy",
                                 20, what="site registered and healthy")
        proc = await cli(cp.http_url, "get", "sites", "-o", "json")
        assert proc.returncode == 0, proc.stderr
        [site] = [s for s in json.loads(proc.stdout)["items"] if s["metadata"]["name"] == "edge-porto"]
        assert site["spec"]["tier"] == "edge" and site["spec"]["location"]["country"] == "PT"
        status = site["status"]
        assert status["capacitySource"] == "measured"
        assert status["capacity"]["cpu"] == psutil.cpu_count(logical=True) or status["capacity"]["cpu"] == os.cpu_count()
        assert abs(status["capacity"]["memoryGiB"] - psutil.virtual_memory().total / 1024**3) < 0.5
        assert "CPUExecutionProvider" in status["agent"]["providers"]
        assert status["agent"]["runtimes"] == ["onnx", "onnx-genai"]  # what this machine has installed
        table = await cli(cp.http_url, "get", "sites")
        line = next(x for x in table.stdout.splitlines() if x.startswith("edge-porto"))
        assert "Healthy" in line and "measured" in line and "onnx,onnx-genai" in line.split()
        events = [e for e in cp.store.events(limit=1000) if e.name == "edge-porto"]
        assert "agent-joined" in {e.action for e in events}
        assert any(e.action == "created" and "registered by its agent" in e.reason and e.actor.startswith("agent:") for e in events)

        # kill -9: the site turns unhealthy after the configured missed heartbeats
        fleet.agents["edge-porto"].kill(signal.SIGKILL)
        await harness.wait_until(lambda: cp.store.get("Site", "edge-porto").status.get("health") == "Unhealthy", 15, what="site unhealthy")
        assert any(e.action == "agent-lost" for e in cp.store.events(limit=1000) if e.name == "edge-porto")
    finally:
        await fleet.stop()


async def test_an_agent_without_location_is_reported_not_scheduled(tmp_path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        await fleet.start_agent("edge-nowhere")
        await harness.wait_until(lambda: any(e.action == "site-undeclared" for e in cp.store.events(limit=100)), 15, what="event")
        assert cp.store.get("Site", "edge-nowhere") is None
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            events = (await http.get("/v1/events")).json()["items"]
        assert any("--country" in e["reason"] for e in events if e["name"] == "edge-nowhere")
    finally:
        await fleet.stop()


async def test_a_join_the_store_cannot_take_is_retried_not_refused(tmp_path: pathlib.Path) -> None:
    """A store that cannot write (a full disk; SQLite's page limit stands in for it) makes a
    join answer UNAVAILABLE with why, so the agent backs off and retries; it answered UNKNOWN
    with the server's traceback. Once the store takes writes again, the agent joins."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        sqlite_connection(cp.store).execute("PRAGMA max_page_count = 1")  # no page beyond those it has
        for i in range(200):  # fill the pages it has, so that the join's writes need new ones
            with contextlib.suppress(store_mod.StoreError):
                cp.store.record(store_mod.Event("test", "filler", "Site", f"filler-{i}", "x" * 200))
            with contextlib.suppress(store_mod.StoreError):
                cp.store.save_agent(f"filler-{i:03d}-" + "x" * 200, "agt-filler", "credential", "test")
        agent = await fleet.start_agent("edge-full", country="FR", lat=48.8, lon=2.3, wait_joined=False)
        await harness.wait_until(lambda: "UNAVAILABLE: the control plane cannot check this join now" in agent.log(), 30,
                                 what="the join answered UNAVAILABLE")
        assert "database or disk is full" in agent.log() and cp.hub.status("edge-full") is None
        sqlite_connection(cp.store).execute("PRAGMA max_page_count = 1073741823")
        await harness.wait_until(lambda: (s := cp.hub.status("edge-full")) is not None and s.healthy, 60, what="the agent to join")
    finally:
        await fleet.stop()


async def test_a_deleted_sites_lost_agent_is_no_longer_counted(tmp_path: pathlib.Path) -> None:
    """A decommissioned site: its agent is stopped for good, then its Site deleted. The
    agent was counted as unhealthy until the control plane restarted, so an alert on
    unhealthy agents never cleared."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        await fleet.start_agent("edge-old", country="FR", lat=48.8, lon=2.3)
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            await asyncio.to_thread(fleet.agents.pop("edge-old").stop)
            await harness.wait_until(lambda: not cp.hub.status("edge-old").healthy, 20, what="the agent to be lost")
            assert await agents_gauge(http) == {"healthy": 0, "unhealthy": 1}
            passes = cp.reconciler.passes
            assert (await http.delete("/v1/sites/edge-old")).status_code == 200
            await cp.reconciler.wait_for_pass(passes + 1)  # a whole pass that began after the delete
            assert await agents_gauge(http) == {"healthy": 0, "unhealthy": 0}
            assert cp.hub.status("edge-old") is None
    finally:
        await fleet.stop()


async def test_a_forgotten_sites_agent_that_returns_is_sent_its_assignments_again(tmp_path: pathlib.Path) -> None:
    """Nodes come and go (the agent DaemonSet names a site per node): once a deleted Site's
    lost agent is forgotten the control plane keeps nothing of the site, not its last
    assignment set either. A node back under the same name registers its Site again and is
    sent a set, as a new site is."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        await fleet.start_agent("edge-old", country="FR", lat=48.8, lon=2.3)
        await harness.wait_until(lambda: cp.hub.assignments("edge-old") is not None, 20, what="a first set sent")
        await asyncio.to_thread(fleet.agents["edge-old"].stop)
        await harness.wait_until(lambda: not cp.hub.status("edge-old").healthy, 20, what="the agent to be lost")
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            passes = cp.reconciler.passes
            assert (await http.delete("/v1/sites/edge-old")).status_code == 200
            await cp.reconciler.wait_for_pass(passes + 1)
        assert cp.hub.status("edge-old") is None and cp.hub.assignments("edge-old") is None

        await fleet.restart_agent("edge-old")

        def applied() -> bool:
            sent, agent = cp.hub.assignments("edge-old"), cp.hub.status("edge-old")
            return sent is not None and agent is not None and agent.healthy and agent.assignment_version == sent.version
        await harness.wait_until(applied, 30, what="the returning agent to be sent a set and apply it")
        assert cp.store.get("Site", "edge-old") is not None
    finally:
        await fleet.stop()


async def test_a_deleted_sites_lost_agent_is_no_longer_counted_on_the_follower_it_was_connected_to(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """Replicas on one database: the decommissioned site's agent was connected to a follower,
    which runs no pass to forget it; the follower forgets it once its Site is deleted."""
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (_, following):
        follower = following.cp
        assert follower is not None
        await following.start_agent("edge-old", country="FR", lat=48.8, lon=2.3)
        await asyncio.to_thread(following.agents.pop("edge-old").stop)
        await harness.wait_until(lambda: not follower.hub.status("edge-old").healthy, 20, what="the agent to be lost")
        async with httpx.AsyncClient(base_url=follower.http_url, timeout=30) as http:
            assert await agents_gauge(http) == {"healthy": 0, "unhealthy": 1}
            assert (await http.delete("/v1/sites/edge-old")).status_code == 200
            await harness.wait_until(lambda: follower.hub.status("edge-old") is None, 15, what="the follower to forget the agent")
            assert await agents_gauge(http) == {"healthy": 0, "unhealthy": 0}


async def test_an_agent_that_moves_from_a_follower_to_the_leader_is_not_left_lost_on_the_follower(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """Its connection to the follower ended and it joined the leader with its credential:
    the follower, told by the leader, drops it rather than find it lost at its deadline, log
    a loss no recovery follows and count it unhealthy for as long as its Site exists."""
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        agent = await following.start_agent("edge-1", country="FR", lat=48.8, lon=2.3, heartbeat_interval=3.0)
        await harness.wait_until(lambda: (s := leader.hub.status("edge-1")) is not None and s.via is not None, 20,
                                 what="the agent relayed to the leader")
        agent.kill()
        cmd = harness.agent_command(leader.agent_target, "edge-1", agent.data_dir, country="FR", lat=48.8, lon=2.3,
                                    heartbeat_interval=3.0, tls=(leader.ca_file, leader.agent_join_target))
        following.agents["edge-1"] = await harness.spawn_agent_async(cmd, "edge-1", agent.data_dir)  # stopped with the fleet
        await harness.wait_until(lambda: (s := leader.hub.status("edge-1")) is not None and s.via is None and s.healthy, 30,
                                 what="the agent connected to the leader")
        await harness.wait_until(lambda: follower.hub.status("edge-1") is None, 10, what="the follower to drop the agent")
        assert "agent-lost" not in [e.action for e in leader.store.events(kind="Site", name="edge-1", limit=100)]
        async with httpx.AsyncClient(base_url=follower.http_url, timeout=30) as http:
            assert await agents_gauge(http) == {"healthy": 0, "unhealthy": 0}


async def agents_gauge(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    return {s.labels["health"]: s.value for f in text_string_to_metric_families(text) if f.name == "edgeplane_agents" for s in f.samples}
