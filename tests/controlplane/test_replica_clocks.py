"""Control-plane replicas whose clocks are hours apart, on one real PostgreSQL store: what one
replica stamps in the store and another compares with its time is on one time, the store's
(the database server's clock), never on either replica's own. Each replica's clock is
injected (``ServerConfig.wall``), hours off."""

from __future__ import annotations

import pathlib
import time

import httpx

from orchestrator.testing import harness
from orchestrator.testing.postgres import PostgresServer

HOUR_S = 3600.0


async def test_a_token_made_through_a_replica_hours_behind_works_on_the_others_for_its_whole_life(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """A one-hour API token made through a replica two hours behind was refused by every other
    replica at once (its expiry, by that replica's clock, was an hour past by theirs)."""
    behind = {"wall": lambda: time.time() - 2 * HOUR_S}
    async with harness.leader_and_follower(tmp_path, postgres.create_database(), both={"auth": "token"}, **behind) as (fa, fb):
        assert fa.cp is not None and fa.cp.admin_token and fb.cp is not None
        async with httpx.AsyncClient(base_url=fa.cp.http_url, timeout=30,
                                     headers={"authorization": f"Bearer {fa.cp.admin_token}"}) as http:
            made = await http.post("/v1/tokens", json={"purpose": "api", "role": "read", "ttlSeconds": HOUR_S})
            assert made.status_code == 201, made.text
        token = made.json()["token"]
        for replica in (fb.cp, fa.cp):
            async with httpx.AsyncClient(base_url=replica.http_url, timeout=30, headers={"authorization": f"Bearer {token}"}) as http:
                who = await http.get("/v1/whoami")
                assert who.status_code == 200, (replica.replica_id, who.text)
                assert (await http.get("/v1/placements")).status_code == 200
        async with httpx.AsyncClient(base_url=fb.cp.http_url, timeout=30,
                                     headers={"authorization": f"Bearer {fa.cp.admin_token}"}) as http:
            [listed] = [t for t in (await http.get("/v1/tokens")).json()["items"] if t["id"] == made.json()["id"]]
        assert listed["state"] == "active", listed
