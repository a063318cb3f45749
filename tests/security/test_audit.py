"""Audit: every apply, delete, placement change, agent join/leave/revocation and token
create/revoke is in the event log with who did it and why; a revoked agent is cut off."""

from __future__ import annotations

import pathlib
from typing import Any

import httpx
import pytest

from orchestrator.testing import harness, onnx_models
from orchestrator.testing.postgres import PostgresServer

from .conftest import fleet_yaml

WHERE = dict(country="FR", region="fr", lat=48.0, lon=2.35)


def _events(http: httpx.Client | Any) -> list[dict[str, Any]]:
    return http.get("/v1/events", params={"limit": "5000"}).json()["items"]


def _find(events: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [e for e in events if all(e.get(k) == v for k, v in match.items())]


async def test_every_change_is_in_the_event_log_with_identity_and_reason(
    tmp_path: pathlib.Path, built_model: tuple[pathlib.Path, onnx_models.BuiltModel]
) -> None:
    root, built = built_model
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(auth="token", artifact_roots=(root / "artifacts",))
        assert cp.admin_token
        admin = {"authorization": f"Bearer {cp.admin_token}"}
        async with httpx.AsyncClient(base_url=cp.http_url, headers=admin) as http:
            admin_id = (await http.get("/v1/events")).json()["items"][0]["name"]  # the initial admin token
            me = f"token:{admin_id} (initial admin token)"

            # token create (API token for a reader, bootstrap token for an agent)
            resp = await http.post("/v1/tokens", json={"purpose": "api", "role": "read", "description": "dashboards"})
            assert resp.status_code == 201
            reader = resp.json()
            resp = await http.post("/v1/tokens", json={"purpose": "bootstrap", "ttlSeconds": 600, "description": "edge-a install"})
            assert resp.status_code == 201
            bootstrap = resp.json()

            # apply with a stated reason
            resp = await http.post("/v1/apply", content=fleet_yaml(["edge-a"], built.sha256).encode(),
                                   headers={"x-edgeplane-reason": "CHG-1: first intent rollout"})
            assert resp.status_code == 200, resp.text

            # a reader's write is refused and leaves no trace but the refusal
            ro = {"authorization": f"Bearer {reader['token']}"}
            assert (await http.post("/v1/apply", content=fleet_yaml(["edge-z"], built.sha256).encode(), headers=ro)).status_code == 403

            # agent joins with the bootstrap token -> placement
            await fleet.start_agent("edge-a", **WHERE, extra=("--token", bootstrap["token"]))
            await harness.wait_until(lambda: any(e.healthy for e in cp.table.endpoints("intent")), 30, what="intent endpoint")

            # delete with a reason -> the replica is removed
            resp = await http.delete("/v1/modeldeployments/intent-fr", headers={"x-edgeplane-reason": "CHG-2: retire"})
            assert resp.status_code == 200
            await harness.wait_until(lambda: not cp.table.endpoints("intent"), 30, what="the endpoint to go")

            # token revoke
            assert (await http.post(f"/v1/revoke/tokens/{reader['id']}")).status_code == 200
            assert (await http.get("/v1/sites", headers=ro)).status_code == 401

            # agent leaves (drains on SIGTERM)
            await harness.asyncio.to_thread(fleet.agents["edge-a"].stop)
            await harness.wait_until(lambda: not cp.hub.status("edge-a").healthy, 10, what="edge-a to be lost")  # type: ignore[union-attr]

            events = (await http.get("/v1/events", params={"limit": "5000"})).json()["items"]

        def one(**match: Any) -> dict[str, Any]:
            found = _find(events, **match)
            assert found, f"no event {match} in {[(e['actor'], e['action'], e['kind'], e['name']) for e in events]}"
            assert all(e["actor"] and e["reason"] for e in found), found
            return found[-1]

        one(action="token-created", kind="Token", name=reader["id"], actor=me, reason="dashboards")
        one(action="token-created", kind="Token", name=bootstrap["id"], actor=me, reason="edge-a install")
        for kind, name in (("Site", "edge-a"), ("Model", "intent"), ("ModelDeployment", "intent-fr")):
            one(action="created", kind=kind, name=name, actor=me, reason="CHG-1: first intent rollout")
        assert not _find(events, name="edge-z"), "a refused write must not be applied"
        joined = one(action="agent-joined", kind="Site", name="edge-a")
        assert joined["actor"].startswith("agent")
        placed = one(action="replica-placed", kind="ModelDeployment", name="intent-fr", actor="scheduler")
        assert placed["details"]["site"] == "edge-a"
        one(action="deleted", kind="ModelDeployment", name="intent-fr", actor=me, reason="CHG-2: retire")
        one(action="token-revoked", kind="Token", name=reader["id"], actor=me)
        lost = one(action="agent-lost", kind="Site", name="edge-a")
        assert "draining" in lost["reason"] or "no heartbeat" in lost["reason"]  # a drain that outlasts 3 beats reads as lost
        # every event says who and why
        assert all(e["actor"] and e["reason"] for e in events)
    finally:
        await fleet.stop()


async def test_revoked_agent_is_cut_off_at_once_and_cannot_rejoin_on_old_tokens(
    tmp_path: pathlib.Path, built_model: tuple[pathlib.Path, onnx_models.BuiltModel]
) -> None:
    root, built = built_model
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(artifact_roots=(root / "artifacts",))
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            assert (await http.post("/v1/apply", content=fleet_yaml(["edge-a", "edge-b"], built.sha256, replicas=1).encode())).status_code == 200
            for i, site in enumerate(("edge-a", "edge-b")):
                await fleet.start_agent(site, **{**WHERE, "lat": 48.0 + i * 0.1})
            await harness.wait_until(lambda: len(cp.table.endpoints("intent")) == 1, 30, what="one intent endpoint")
            victim = cp.table.endpoints("intent")[0].site
            other = "edge-b" if victim == "edge-a" else "edge-a"

            resp = await http.post(f"/v1/revoke/agents/{victim}", headers={"x-edgeplane-reason": "stolen box"})
            assert resp.status_code == 200 and resp.json() == {"revoked": True}
            assert cp.hub.status(victim) is None  # dropped synchronously, its streams are ending
            # placement heals onto the other site; the revoked one never comes back
            await harness.wait_until(lambda: [e.site for e in cp.table.endpoints("intent")] == [other], 30, what="replica to move")
            log = fleet.agents[victim]
            await harness.wait_until(lambda: "was revoked" in log.log(), 15, what="the agent to be refused")
            assert cp.hub.status(victim) is None
            events = (await http.get("/v1/events", params={"limit": "5000"})).json()["items"]
            assert _find(events, action="agent-revoked", name=victim, actor="anonymous", reason="stolen box")

            # re-admission takes a bootstrap token created after the revocation
            log.stop()
            fresh = (await http.post("/v1/tokens", json={"purpose": "bootstrap", "ttlSeconds": 60})).json()["token"]
            (log.data_dir / "identity.json").unlink()
            where = {**WHERE, "lat": 48.0 + (0 if victim == "edge-a" else 0.1)}
            await fleet.start_agent(victim, **where, extra=("--token", fresh))
            assert cp.hub.status(victim).healthy  # type: ignore[union-attr]
    finally:
        await fleet.stop()


@pytest.mark.parametrize("role", ["read"])
async def test_reader_cannot_revoke_or_create_tokens(tmp_path: pathlib.Path, role: str) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(auth="token")
        secret, _ = cp.store.create_token("api", role, None, "test")
        async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {secret}"}) as http:
            assert (await http.post("/v1/tokens", json={"purpose": "api", "role": "admin"})).status_code == 403
            assert (await http.post("/v1/revoke/agents/x")).status_code == 403
            assert (await http.delete("/v1/sites/x")).status_code == 403
            assert (await http.get("/v1/events")).status_code == 200
    finally:
        await fleet.stop()


async def test_an_agent_revoked_through_one_replica_is_cut_off_at_the_replica_it_is_connected_to(
    tmp_path: pathlib.Path, postgres: PostgresServer
) -> None:
    """Replicas on one database: the revocation lands on the leader, the agent's streams are on
    a follower, which relays it to the leader. The follower drops it too, and the leader does not
    take it back when the follower reports it again."""
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        agent = await following.start_agent("edge-a", **WHERE)
        await harness.wait_until(lambda: (s := leader.hub.status("edge-a")) is not None and s.via == follower.replica_id, 30,
                                 what="the agent relayed to the leader")
        async with httpx.AsyncClient(base_url=leader.http_url) as http:
            resp = await http.post("/v1/revoke/agents/edge-a", headers={"x-edgeplane-reason": "stolen box"})
            assert resp.status_code == 200 and resp.json() == {"revoked": True}
        await harness.wait_until(lambda: follower.hub.status("edge-a") is None, 10, what="the follower to drop the agent")
        await harness.wait_until(lambda: "was revoked" in agent.log(), 15, what="the agent to be refused")
        assert follower.hub.status("edge-a") is None and leader.hub.status("edge-a") is None
