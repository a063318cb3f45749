"""What a replica that does not lead answers of the fleet, on a real PostgreSQL shared by two
in-process control planes with real agents: previews (``apply --dry-run``, ``drain
--dry-run``), ``get placements`` and ``describe`` plan and read with what the leader
observed (every agent, wherever it is connected), not with the follower's own hub; and the
artifact versions a follower checks for ``describe`` are forgotten once nothing uses them,
as the leader forgets its own."""

from __future__ import annotations

import json
import logging
import pathlib
import time

import httpx
import pytest

from orchestrator import server
from orchestrator.adapters import serve_config
from orchestrator.agents import model as agent_model
from orchestrator.reconciler import autoscaler, observed, snapshot
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness, manifests, onnx_models, stall
from orchestrator.testing.postgres import PostgresServer

FR_SITES = {"edge-a": 48.0, "edge-b": 49.0}


def fr_fleet(model: onnx_models.BuiltModel, replicas: int) -> str:
    return manifests.bundle(
        *(manifests.edge_site(name, "FR", lat, 2.35, region="fr") for name, lat in FR_SITES.items()),
        manifests.onnx_model("intent", model.path.name, model.sha256),
        manifests.deployment("intent-fr", "intent", replicas, {"residency": ["FR"], "tiers": ["edge"]}),
    )


async def a_pass_after_now(cp: server.ControlPlane) -> None:
    """Until a pass that began after this call has ended (and published what it observed)."""
    after = cp.reconciler.passes + 1  # the pass under way may have gathered before
    cp.reconciler.trigger("test")
    await cp.reconciler.wait_for_pass(after)
    await cp.reconciler.publishes_done()  # written beside the pass


async def test_previews_through_a_follower_plan_with_the_agents_connected_to_the_leader(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    model = onnx_models.build_mlp(tmp_path / "a" / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        async with httpx.AsyncClient(base_url=leader.http_url, timeout=30) as lead, \
                httpx.AsyncClient(base_url=follower.http_url, timeout=30) as f:
            assert (await lead.post("/v1/apply", content=fr_fleet(model, 1))).status_code == 200
            for name, lat in FR_SITES.items():  # both agents joined the leader, none the follower
                await leading.start_agent(name, country="FR", region="fr", lat=lat, lon=2.35)
            rows = await harness.wait_until(lambda: leader.store.placements() or None, 30, what="the replica placed")
            await a_pass_after_now(leader)
            (source,) = {r.site for r in rows}
            (other,) = set(FR_SITES) - {source}

            drained = [await c.post(f"/v1/sites/{source}/drain", params={"dryRun": "true"}) for c in (lead, f)]
            assert [r.status_code for r in drained] == [200, 200], [r.text for r in drained]
            assert other in drained[0].text, drained[0].text  # the replica moves to the other site
            leads, follows = drained[0].json()["plan"], drained[1].json()["plan"]
            assert "observedAt" not in leads and "observedAt" in follows  # as of the leader's write
            assert {k: v for k, v in follows.items() if k != "observedAt"} == leads

            scaled = [await c.post("/v1/apply", params={"dryRun": "true"}, content=fr_fleet(model, 2)) for c in (lead, f)]
            assert [r.status_code for r in scaled] == [200, 200], [r.text for r in scaled]
            plan = scaled[1].json()["plan"]
            assert plan.pop("observedAt") == follows["observedAt"] and plan == scaled[0].json()["plan"]
            assert sum(c["after"] for c in plan["changes"]) == 2 and "removed" not in {c["change"] for c in plan["changes"]}, plan


async def test_placements_and_describe_through_a_follower_say_the_replicas_state(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    model = onnx_models.build_mlp(tmp_path / "a" / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    yaml_text = manifests.bundle(manifests.edge_site("edge-a", "FR", 48.0, 2.35),
                                 manifests.onnx_model("intent", model.path.name, model.sha256),
                                 manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}))
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        async with httpx.AsyncClient(base_url=leader.http_url, timeout=30) as lead, \
                httpx.AsyncClient(base_url=follower.http_url, timeout=30) as f:
            assert (await lead.post("/v1/apply", content=yaml_text)).status_code == 200
            await leading.start_agent("edge-a", country="FR", lat=48.0, lon=2.35)

            def serving() -> bool:
                agent = leader.hub.status("edge-a")
                return agent is not None and (m := agent.models.get("intent")) is not None and m.serving
            await harness.wait_until(serving, 60, what="the model served at edge-a")
            await a_pass_after_now(leader)

            at_leader, at_follower = [(await c.get("/v1/placements")).json() for c in (lead, f)]
            assert at_leader["items"][0]["state"] == "READY" and at_leader["items"][0]["ready"] == 1, at_leader
            assert at_follower["items"] == at_leader["items"]
            # the follower's answer says when the leader wrote what it comes from, so a stale one can be told
            assert "observedAt" not in at_leader and at_follower["observedAt"].startswith(str(time.gmtime().tm_year)), at_follower

            described = [(await c.get("/v1/modeldeployments/intent-fr", params={"describe": "true"})).json() for c in (lead, f)]
            assert described[0]["placement"]["placed"] == 1, described[0]
            assert described[1]["placement"] == described[0]["placement"]
            assert described[1]["observedAt"] == at_follower["observedAt"], described[1]


async def test_a_follower_forgets_the_versions_it_checked_once_nothing_uses_them(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    art = tmp_path / "art"
    async with harness.leader_and_follower(tmp_path, postgres.create_database(), both={"artifact_roots": (art,)}) as (_, fb):
        b = fb.cp
        assert b is not None
        shas = []
        async with httpx.AsyncClient(base_url=b.http_url, timeout=30) as f:
            for i in range(4):  # a Model updated, and described, through the follower each time
                v = onnx_models.build_mlp(art / f"v{i}.onnx", in_dim=8, hidden=16, out_dim=4, seed=i)
                shas.append(v.sha256)
                assert (await f.post("/v1/apply", content=manifests.onnx_model("intent", v.path.name, v.sha256))).status_code == 200
                described = (await f.get("/v1/models/intent", params={"describe": "true"})).json()
                assert "error" not in described["variants"][0], described
            await harness.wait_until(lambda: b.artifacts.checked() == {shas[-1]} or None, 30,
                                     what="the follower to hold only the version the Model names")
            assert [(await f.head(f"/v1/artifacts/{sha}")).status_code for sha in shas] == [404, 404, 404, 200]


def observed_fleet() -> observed.Observed:
    gpu = agent_model.Gpu(0, "L4", 24 << 30, memory_free_bytes=0)
    states = {"intent": agent_model.ModelState("intent", "a" * 64, agent_model.ModelPhase.LOADING, "fetching 40%", "CPU",
                                               serving_sha256="b" * 64, deployment="intent-fr", variant="small", failures=1)}
    agent = agent_model.AgentStatus(
        "edge-a", "agent-1", "http://10.0.0.1:9000", True, last_heartbeat=1.0, joined_at=0.0,
        location=agent_model.Location("FR", "idf", 48.8, 2.3), labels=agent_model.frozen_mapping({"rack": "r1"}),
        agent_version="1.2", capacity=agent_model.Capacity(8, 16 << 30, (gpu,), ("CPUExecutionProvider",)),
        providers=("CPUExecutionProvider",), inflight=0, cpu_percent=0.0, memory_available_bytes=0, models=states,
        assignment_version=7, heartbeat_interval=0.5, via="replica-b")
    app = serve_config.ServeAppStatus("dc-intent", serve_config.ServeAppState.RUNNING, "", 2, 2, "http://dc/intent", version="v1")
    return observed.Observed(
        agents=(agent,),
        datacentres={"dc-paris": snapshot.DataCentreObservation(True, {"dc-intent": app}), "dc-lyon": snapshot.DataCentreObservation(
            False, error="connection refused", lost=True),
            # out of reach for now: followers' placements say what the gateway routes to meanwhile
            "dc-nice": snapshot.DataCentreObservation(False, error="HTTP 503", last_apps={"dc-intent": app})},
        artifacts={("intent", "small"): snapshot.ArtifactRef("http://cp/v1/artifacts/" + "a" * 64, hosts=("cp",)),
                   ("intent", "big"): snapshot.ArtifactRef(None, "not found")},
        autoscale={"intent-fr": autoscaler.Recommendation(3, "rps", 10.0, 2, 2, 12.5)},
        rejoining=frozenset({"edge-b"}),
        described={"intent-fr": {"placement": {"placed": 1}}}, sources={"a" * 64: "intent.onnx"}, at=1_700_000_000.5)


async def test_a_follower_whose_store_does_not_answer_the_leaders_view_is_unavailable_for_now(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """A preview or a view through a follower that cannot read what the leader observed is
    answered 503 with Retry-After (the store unavailable for now), as a placements read that
    times out is, never a 500 for a store refusing the call."""
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (_, following):
        follower = following.cp
        assert follower is not None and follower.store.backend_pid
        with stall.stalled(follower.store.backend_pid):
            with pytest.raises(store_mod.StoreUnavailable, match="did not answer"):
                await follower.leaders_view()


async def test_a_follower_reads_and_warns_of_an_observed_fleet_it_cannot_read_once(
        tmp_path: pathlib.Path, postgres: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    """A leader of another version published it: the follower answers from the last one it
    read (or its own view) and asks again only for a newer one, not from version 0 at each
    request, warning each time."""
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        leader.store.publish(observed.PUBLISHED_KEY, '{"agents": "from another version"}', lease=leader.reconciler.lease)
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                await follower.leaders_view()
        assert sum("not one this version reads" in r.getMessage() for r in caplog.records) == 1, caplog.text


@pytest.mark.parametrize("published", [observed_fleet(), observed.Observed()], ids=["a fleet", "nothing yet"])
def test_what_the_leader_observed_reads_back_as_it_published_it(published: observed.Observed) -> None:
    assert observed.from_text(observed.to_text(published)) == published


@pytest.mark.parametrize("text", ["[]", '{"agents": []}', '{"agents": [{"site": "x"}], "datacentres": {}}'])
def test_an_observed_fleet_this_version_cannot_read_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        observed.from_text(text)


def test_an_observed_fleet_a_leader_of_the_release_before_sources_published_reads() -> None:
    """As a leader before the document said where each version came from wrote it (no
    ``sources``, ``observedAt``, nor a data centre's ``refused``, ``lastApps`` or
    ``unreachableAt``; ``energy`` then required): a control plane of this version that takes
    over from it read nothing, and so lost its data centres' last observation."""
    text = json.dumps({
        "agents": [], "artifacts": [], "autoscale": {}, "rejoining": [], "described": {},
        "energy": None,
        "datacentres": {"dc-1": {"reachable": False, "error": "connection refused", "drift": False, "lost": False, "apps": {
            "ep-d.v.dc-1": {"name": "ep-d.v.dc-1", "status": "RUNNING", "message": "", "replicas_running": 1, "replicas_target": 1,
                            "endpoint_url": "http://ray:8000/ep/dc-1/d/v", "detail": "", "version": "", "ingress": "",
                            "deployments_up": True}}}},
    }, sort_keys=True, separators=(",", ":"))
    got = observed.from_text(text)
    assert got.sources == {} and got.at is None
    assert got.datacentres["dc-1"].error == "connection refused" and list(got.datacentres["dc-1"].apps) == ["ep-d.v.dc-1"]


#: What a leader of a later release adds to each record of the document: a field this one does not know.
LATER = {"addedLater": {"what": ["a later release's"]}}


def as_a_newer_leader_writes(published: observed.Observed) -> str:
    """``published`` as a leader of a later release would write it: a field this release
    does not know at every level, and an item more at the end of each row."""
    doc = json.loads(observed.to_text(published))
    doc.update(LATER)
    for agent in doc["agents"]:
        agent.update(LATER)
        agent["capacity"].update(LATER)
        agent["location"].append("later")
        for row in (*agent["capacity"]["gpus"], *agent["models"]):
            row.append("later")
    for dc in doc["datacentres"].values():
        dc.update(LATER)
        for app in (*dc["apps"].values(), *(dc["lastApps"] or {}).values()):
            app.update(LATER)
    for record in (*doc["artifacts"], *doc["autoscale"].values()):
        record.update(LATER)
    return json.dumps(doc)


def test_an_observed_fleet_a_newer_leader_published_reads_as_this_version_wrote_it() -> None:
    """During a rolling update (the highest ordinal, upgraded first, often leads) or after a
    rollback of one replica: its followers read what they know, not nothing."""
    assert observed.from_text(as_a_newer_leader_writes(observed_fleet())) == observed_fleet()


@pytest.mark.parametrize("cut", [
    ("agents", 0, "models", 0, 8), ("agents", 0, "capacity", "gpus", 0, 2), ("agents", 0, "capacity", "cpuCores"),
    ("autoscale", "intent-fr", "target"), ("datacentres", "dc-paris", "apps", "dc-intent", "status"),
    ("datacentres", "dc-paris", "apps", "dc-intent", "replicas_target"), ("artifacts", 0, "url")])
def test_an_observed_fleet_that_lacks_what_this_version_needs_is_still_a_value_error(cut: tuple[object, ...]) -> None:
    doc = json.loads(as_a_newer_leader_writes(observed_fleet()))
    *to, last = cut
    record = doc
    for step in to:
        record = record[step]
    if isinstance(last, int):
        del record[last:]  # a row cut short: the items this version reads are not all there
    else:
        del record[last]
    with pytest.raises(ValueError, match="not one this version reads"):
        observed.from_text(json.dumps(doc))


async def test_a_follower_previews_with_the_fleet_a_newer_leader_published(
        tmp_path: pathlib.Path, postgres: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        leader.store.publish(observed.PUBLISHED_KEY, as_a_newer_leader_writes(observed_fleet()), lease=leader.reconciler.lease)
        with caplog.at_level(logging.WARNING):
            view = await follower.leaders_view()
        assert view is not None and [a.site for a in view.agents] == ["edge-a"], caplog.text
        assert "not one this version reads" not in caplog.text
