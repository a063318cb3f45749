"""An edge site lost and back, within its hold-down, whose agent restarts while no leader
holds it (the leader stops, another takes over): the agent says when its process started at
each join, the leader keeps the one it last saw in the store with the site's seats, and the
new leader, finding another, takes the restart for a flap and starts the hold-down over. Its
healthy-since time cannot tell it: the agent rejoined while still counted live (within its
reconnect grace), and a new leader had never seen it anyway. Real control-plane replicas on
PostgreSQL, real agents (subprocesses) connected to the follower, which relays them."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time

import httpx

from orchestrator import server
from orchestrator.testing import harness, manifests, onnx_models
from orchestrator.testing.postgres import PostgresServer

SITES = {"edge-a": 48.0, "edge-b": 49.0}
AFTER_S = 20.0  # --failback-after: longer than the leader change and the agent's restart take together
BEAT_S = 10.0  # the agents' heartbeat interval: one killed is counted live for this long (its reconnect grace)


def placed(cp: server.ControlPlane) -> set[str]:
    return {r.site for r in cp.store.placements() if r.deployment == "intent-fr" and r.replicas}


def remembered(cp: server.ControlPlane, site: str) -> dict:
    """What the failback memory in the store holds of ``site`` ({}: nothing)."""
    got = cp.store.published("failback")
    return json.loads(got[1])["sites"].get(site, {}) if got is not None else {}


async def test_an_agent_restarted_while_no_leader_held_it_starts_its_sites_hold_down_over(tmp_path: pathlib.Path,
                                                                                           postgres: PostgresServer) -> None:
    art = tmp_path / "art"
    model = onnx_models.build_mlp(art / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    fleet = manifests.bundle(*(manifests.edge_site(n, "FR", lat, 2.35, region="fr") for n, lat in SITES.items()),
                             manifests.onnx_model("intent", model.path.name, model.sha256),
                             manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}))
    both = {"artifact_roots": (art,), "failback_after_s": AFTER_S, "resync_s": 0.5}
    async with harness.leader_and_follower(tmp_path, postgres.create_database(), both=both) as (fa, fb):
        a, b = fa.cp, fb.cp
        assert a is not None and b is not None
        async with httpx.AsyncClient(base_url=a.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=fleet)).status_code == 200
        for site, lat in SITES.items():  # connected to the follower, and staying with it
            await fb.start_agent(site, country="FR", region="fr", lat=lat, lon=2.35, heartbeat_interval=BEAT_S)
        (home,) = await harness.wait_until(lambda: p if len(p := placed(a)) == 1 else None, 60, what="the replica placed")
        (other,) = set(SITES) - {home}

        await asyncio.to_thread(fb.agents[home].stop)  # drained: lost at once
        await harness.wait_until(lambda: placed(a) == {other}, 60, what=f"the replica moved off {home}")
        await fb.restart_agent(home)
        back = await harness.wait_until(lambda: remembered(a, home).get("backSince"), 60, what=f"{home} back, its hold-down begun")
        assert remembered(a, home)["agentStarted"] == a.hub.status(home).started_unix_ms > 0  # type: ignore[union-attr]

        await fa.stop()  # no leader now ...
        left = time.time()
        fb.agents[home].kill()  # ... and the agent restarts, within the time it is counted live
        await asyncio.to_thread(fb.agents[home].process.wait, 10)
        await fb.restart_agent(home)
        await harness.wait_until(lambda: b.elector is not None and b.elector.leading and b.reconciler.lease is not None, 30,
                                 what="b leads")
        status = b.hub.status(home)
        assert status is not None and status.healthy, status
        passes = b.reconciler.passes
        await harness.wait_until(lambda: b.reconciler.passes >= passes + 2, 30, what="two passes of the new leader")
        assert placed(b) == {other}
        restarted = remembered(b, home).get("backSince", 0.0)
        assert restarted >= left > back, (back, left, restarted)  # the hold-down started over, not went on from the return

        moved = await harness.wait_until(
            lambda: [e for e in b.store.recent_events(kind="Site", name=home) if e.action == "failback"], AFTER_S + 30,
            what="the replica moved back a hold-down after the restart")
        assert moved[0].ts - left >= AFTER_S, (moved[0].ts, left)
