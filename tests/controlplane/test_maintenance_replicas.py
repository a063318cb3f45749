"""A cordon made through a follower replica (two control planes on one PostgreSQL store) is
written to the shared store; the leader's pass plans it, and every replica shows it."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import signal
import time
from collections.abc import Awaitable, Callable

import httpx

from orchestrator.testing import harness, manifests, onnx_models
from orchestrator.testing.postgres import PostgresServer


async def test_a_cordon_through_a_follower_is_planned_by_the_leader(tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        async with httpx.AsyncClient(base_url=follower.http_url, timeout=30) as f, \
                httpx.AsyncClient(base_url=leader.http_url, timeout=30) as lead:
            assert (await f.post("/v1/apply", content=manifests.edge_site("edge-a", "FR", 48.0, 2.35))).status_code == 200
            r = await f.post("/v1/sites/edge-a/cordon", headers={"x-edgeplane-reason": "rack move"})
            assert r.status_code == 200 and r.json()["action"] == "cordoned", r.text

            async def state(http: httpx.AsyncClient) -> str | None:
                return ((await http.get("/v1/sites/edge-a")).json().get("status", {}).get("maintenance") or {}).get("state")

            seen: dict[str, str | None] = {}

            async def shown(http: httpx.AsyncClient, want: str | None) -> bool:
                seen[str(http.base_url)] = await state(http)
                return seen[str(http.base_url)] == want

            for http in (lead, f):  # the leader planned it; the follower reads the same store
                await _until(lambda h=http: shown(h, "Cordoned"), f"Cordoned at {http.base_url}", seen)  # type: ignore[misc]
            metrics = (await f.get("/metrics")).text
            assert 'edgeplane_sites_cordoned{state="cordoned"} 1.0' in metrics
            assert (await lead.post("/v1/sites/edge-a/uncordon")).json()["action"] == "uncordoned"
            await _until(lambda: shown(f, None), "schedulable again at the follower", seen)


async def _until(check: Callable[[], Awaitable[bool]], what: str, seen: dict[str, str | None], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}: {seen}")
        await asyncio.sleep(0.05)


async def test_a_follower_stops_routing_to_its_own_lost_agent_before_the_leader_hears(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """The agent connected to the follower is lost: the follower's gateway stops routing to it
    as its hub finds it lost, not once the leader has heard, planned and published (here the
    leader would give a relayed agent 30 s)."""
    model = onnx_models.build_mlp(tmp_path / "b" / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    (tmp_path / "a" / "artifacts").mkdir(parents=True)
    shutil.copy(model.path, tmp_path / "a" / "artifacts" / "intent.onnx")
    async with harness.leader_and_follower(tmp_path, postgres.create_database(), missed_heartbeats=60) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        async with httpx.AsyncClient(base_url=leader.http_url, timeout=30) as http:
            r = await http.post("/v1/apply", content=manifests.bundle(
                manifests.edge_site("edge-a", "FR", 48.0, 2.35, region="fr"), manifests.onnx_model("intent", "intent.onnx", model.sha256),
                manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]})))
            assert r.status_code == 200, r.text
        agent = await following.start_agent("edge-a", country="FR", region="fr", lat=48.0, lon=2.35)
        await harness.wait_until(lambda: [e.healthy for e in follower.table.endpoints("intent")] == [True], 60,
                                 what="the follower's gateway to route to the agent")
        agent.kill(signal.SIGSTOP)  # silent from now on: lost once it misses its heartbeats
        try:
            await harness.wait_until(lambda: not follower.hub.status("edge-a").healthy, 30,  # type: ignore[union-attr]
                                     interval=0.005, what="the follower to find its agent lost")
            assert [e.healthy for e in follower.table.endpoints("intent")] == [False]
        finally:
            agent.kill(signal.SIGKILL)
