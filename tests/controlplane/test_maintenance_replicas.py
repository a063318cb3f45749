"""A cordon made through a follower replica (two control planes on one PostgreSQL store) is
written to the shared store; the leader's pass plans it, and every replica shows it."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Awaitable, Callable

import httpx

from orchestrator.testing import harness, manifests
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
