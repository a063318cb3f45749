"""Agent-side faults with the control plane in-process: frozen agents (SIGSTOP), a
jittery uplink (no false evictions), a partitioned uplink (the gateway reroutes and
placement heals), and a full artifact cache disk (clear error, old model keeps serving)."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import time

import httpx

from orchestrator.testing import harness, onnx_models

from .conftest import RECOVERY, fleet_yaml, infer_body, spawn_agent
from .proxy import ChaosProxy, Faults

SITES = {"edge-a": 48.0, "edge-b": 48.1, "edge-c": 48.2}


async def _fleet(tmp_path: pathlib.Path, model: onnx_models.BuiltModel, replicas: int, sites: dict[str, float] = SITES) -> harness.Fleet:
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane(artifact_roots=(model.path.parent,))
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        assert (await http.post("/v1/apply", content=fleet_yaml(sites, model, replicas).encode())).status_code == 200
    return fleet


def _serving(cp, model: str = "intent") -> set[str]:  # type: ignore[no-untyped-def]
    return {e.site for e in cp.table.endpoints(model) if e.healthy}


def _lost_events(cp) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.name for e in cp.store.events(0, 10_000) if e.action == "agent-lost"]


async def _spawn(fleet: harness.Fleet, target: str, site: str, lat: float, **kw) -> harness.AgentProcess:  # type: ignore[no-untyped-def]
    cp = fleet.cp
    tls = (cp.ca_file, cp.agent_join_target) if cp is not None and cp.ca_file is not None else None
    agent = await asyncio.to_thread(spawn_agent, target, site, fleet.root / "agents" / site, lat, tls=tls, **kw)
    fleet.agents[site] = agent
    return agent


async def test_frozen_agent_is_routed_around_and_placement_heals(tmp_path: pathlib.Path, models) -> None:  # type: ignore[no-untyped-def]
    v1, _ = models
    fleet = await _fleet(tmp_path, v1, replicas=2)
    try:
        cp = fleet.cp
        assert cp is not None
        for site, lat in SITES.items():
            await _spawn(fleet, cp.agent_target, site, lat)
        await harness.wait_until(lambda: len(_serving(cp)) == 2, 60, what="two replicas serving")
        victim = sorted(_serving(cp))[0]
        frozen_at = time.monotonic()
        fleet.agents[victim].kill(signal.SIGSTOP)
        await harness.wait_until(lambda: victim not in _serving(cp), 10, what="the frozen agent to leave the routing table")
        RECOVERY["SIGSTOP agent: freeze to out of the gateway's table"] = time.monotonic() - frozen_at
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=10) as http:
            for _ in range(10):
                resp = await http.post("/v2/models/intent/infer", content=infer_body(v1))
                assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] != victim
        await harness.wait_until(lambda: len(_serving(cp)) == 2, 30, what="placement to heal on the third site")
        RECOVERY["SIGSTOP agent: freeze to 2 replicas serving again"] = time.monotonic() - frozen_at
        fleet.agents[victim].kill(signal.SIGCONT)
        resumed = time.monotonic()
        await harness.wait_until(lambda: (s := cp.hub.status(victim)) is not None and s.healthy, 30, what="the thawed agent to recover")
        RECOVERY["SIGCONT agent: resume to healthy again"] = time.monotonic() - resumed
        assert fleet.agents[victim].process.poll() is None
    finally:
        await fleet.stop()


async def test_jitter_causes_no_false_evictions_and_a_partition_reroutes(tmp_path: pathlib.Path, models) -> None:  # type: ignore[no-untyped-def]
    v1, _ = models
    sites = {"edge-a": 48.0, "edge-b": 48.1}
    fleet = await _fleet(tmp_path, v1, replicas=1, sites=sites)
    proxies: dict[str, ChaosProxy] = {}
    try:
        cp = fleet.cp
        assert cp is not None
        host, port = cp.agent_target.rsplit(":", 1)
        for i, (site, lat) in enumerate(sites.items()):
            proxies[site] = await ChaosProxy(host, int(port), seed=i).start()
            await _spawn(fleet, proxies[site].address, site, lat)
        await harness.wait_until(lambda: len(_serving(cp)) == 1, 60, what="one replica serving")
        # every agent beating before the jitter: what is measured is jitter on agents that beat,
        # not how long a join and its first heartbeat take on a starved machine
        for site in sites:
            await asyncio.wait_for(cp.hub.next_heartbeat(site), 30)

        # 200 ms of jitter on every chunk both ways, for 12 heartbeat intervals
        for p in proxies.values():
            p.faults.delay, p.faults.jitter = 0.0, 0.2
        beats_before = cp.hub.heartbeats_total
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            assert all(s.healthy for s in cp.hub.snapshot()), "an agent was evicted under 200 ms jitter"
            await asyncio.sleep(0.1)
        assert _lost_events(cp) == []
        assert cp.hub.heartbeats_total - beats_before >= 12, "heartbeats did not flow through the proxy"

        # partition the serving agent: lost after 3 missed heartbeats, replica moves
        victim = next(iter(_serving(cp)))
        other = next(s for s in sites if s != victim)
        for p in proxies.values():
            p.faults = Faults()
        cut_at = time.monotonic()
        proxies[victim].blackhole()
        await harness.wait_until(lambda: _serving(cp) == {other}, 30, what="the replica to move to the reachable site")
        RECOVERY["uplink partition: cut to replica serving elsewhere"] = time.monotonic() - cut_at
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=10) as http:
            resp = await http.post("/v2/models/intent/infer", content=infer_body(v1))
            assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == other
        # the partitioned agent kept serving its local callers all along
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.post(f"{fleet.agents[victim].url}/v2/models/intent/infer", content=infer_body(v1))).status_code == 200
        healed_at = time.monotonic()
        proxies[victim].heal()
        await harness.wait_until(lambda: (s := cp.hub.status(victim)) is not None and s.healthy, 60, what="the agent to rejoin")
        RECOVERY["uplink partition healed: to agent healthy again"] = time.monotonic() - healed_at
    finally:
        for p in proxies.values():
            await p.stop()
        await fleet.stop()


async def _full_disk_fleet(tmp_path: pathlib.Path) -> tuple[harness.Fleet, harness.AgentProcess, onnx_models.BuiltModel]:
    """One agent whose files may not grow past 1 MB, serving a small model, then told to
    roll out a ~2 MB one: the cache write fails with EFBIG mid-download."""
    art = tmp_path / "artifacts"
    small = onnx_models.build_mlp(art / "intent-small.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    big = onnx_models.build_mlp(art / "intent-big.onnx", in_dim=8, hidden=700, out_dim=4, layers=3, seed=2)
    assert big.path.stat().st_size > 1_500_000
    fleet = await _fleet(tmp_path, small, replicas=1, sites={"edge-a": 48.0})
    cp = fleet.cp
    assert cp is not None
    agent = await _spawn(fleet, cp.agent_target, "edge-a", 48.0, fsize_limit=1_000_000)
    await harness.wait_until(lambda: _serving(cp) == {"edge-a"}, 60, what="the small model serving")
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        assert (await http.post("/v1/apply", content=fleet_yaml({"edge-a": 48.0}, big, 1).encode())).status_code == 200
    return fleet, agent, small


async def test_full_cache_disk_keeps_the_old_model_serving(tmp_path: pathlib.Path) -> None:
    fleet, agent, small = await _full_disk_fleet(tmp_path)
    try:
        cp = fleet.cp
        assert cp is not None
        await harness.wait_until(lambda: "File too large" in agent.log(), 30, what="the write to fail")
        async with httpx.AsyncClient(timeout=5) as http:
            meta = (await http.get(f"{agent.url}/v2/models/intent")).json()
            assert meta["versions"] == [small.sha256[:12]]
            assert (await http.post(f"{agent.url}/v2/models/intent/infer", content=infer_body(small))).status_code == 200
            assert (await http.post(f"{cp.http_url}/v2/models/intent/infer", content=infer_body(small))).status_code == 200
        assert agent.process.poll() is None
    finally:
        await fleet.stop()


async def test_full_cache_disk_is_reported_to_the_control_plane(tmp_path: pathlib.Path) -> None:
    fleet, agent, small = await _full_disk_fleet(tmp_path)
    try:
        cp = fleet.cp
        assert cp is not None

        def reported() -> str:
            status = cp.hub.status("edge-a")
            state = status.models.get("intent") if status else None
            return state.message if state is not None and "too large" in state.message.lower() else ""

        await harness.wait_until(reported, 8, what="the agent to report the full disk")
    finally:
        await fleet.stop()
