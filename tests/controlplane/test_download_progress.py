"""`GET /v1/placements` shows where a replica's model download has got, as the agent reports
it about once a second, without a reconcile pass for each report."""

from __future__ import annotations

import pathlib

import httpx

from orchestrator import server
from orchestrator.agents import model
from orchestrator.testing import harness

EXAMPLE_SHA = "35831637b80bdd36f96771ab77bf514a108f89a6d67ea078d044bfcc8b228703"  # manifests/examples/artifacts/intent-distilled.onnx
FLEET = f"""
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {{name: edge-1}}
spec:
  tier: edge
  location: {{country: FR, region: eu-west, lat: 48.8, lon: 2.3}}
---
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {{name: intent}}
spec:
  variants:
    - name: small
      runtime: onnx
      artifact: {{uri: artifacts/intent-distilled.onnx, sha256: {EXAMPLE_SHA}}}
      resources: {{cpu: 0.25, memoryMiB: 256}}
---
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {{name: intent-fr}}
spec:
  model: intent
  replicas: {{min: 1, max: 1}}
  placement: {{residency: [FR], tiers: [edge]}}
"""


async def test_placements_show_a_downloads_progress(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        grant = cp.hub.join(model.JoinApplication(
            site="edge-1", bootstrap_token=harness.BOOTSTRAP_TOKEN, credential=None, agent_id="", endpoint_url="http://127.0.0.1:9",
            location=model.Location("FR", "eu-west", 48.8, 2.3), labels={}, agent_version="test", heartbeat_interval=60.0,
            capacity=model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",))))
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=FLEET)).status_code == 200
            await harness.wait_until(lambda: [p.site for p in cp.store.placements()] == ["edge-1"], 30, what="the replica placed")
            url = "http://127.0.0.1:9/artifacts/intent.onnx"
            for seq, done in enumerate(("0% of 812.3 MB", "40% of 812.3 MB"), start=1):
                state = model.ModelState("intent", EXAMPLE_SHA, model.ModelPhase.LOADING, message=f"downloading {url}: {done}",
                                         deployment="intent-fr", variant="small")
                cp.hub.record_heartbeat("edge-1", grant.agent_id, model.Heartbeat(
                    seq=seq, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=1 << 30, assignment_version=0,
                    draining=False, capacity=None, models=(state,), gpu_free_bytes=()))
                (row,) = (await http.get("/v1/placements")).json()["items"]
                assert (row["site"], row["state"], row["ready"]) == ("edge-1", "LOADING", 0), row
                assert row["reason"] == f"downloading {url}: {done}", row
    finally:
        await fleet.stop()


async def test_a_replica_whose_artifact_is_missing_says_it_was_not_sent(tmp_path: pathlib.Path) -> None:
    """A variant whose artifact the control plane cannot find is sent to no agent: its
    placement says why, where it said "sent to the agent, which has not reported it"."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        cp.hub.join(model.JoinApplication(
            site="edge-1", bootstrap_token=harness.BOOTSTRAP_TOKEN, credential=None, agent_id="", endpoint_url="http://127.0.0.1:9",
            location=model.Location("FR", "eu-west", 48.8, 2.3), labels={}, agent_version="test", heartbeat_interval=60.0,
            capacity=model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",))))
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            missing = FLEET.replace("artifacts/intent-distilled.onnx", "artifacts/not-published-yet.onnx")
            assert (await http.post("/v1/apply", content=missing)).status_code == 200
            await harness.wait_until(lambda: [p.site for p in cp.store.placements()] == ["edge-1"], 30, what="the replica placed")
            await cp.reconciler.wait_for_pass(cp.reconciler.passes)
            (row,) = (await http.get("/v1/placements")).json()["items"]
            assert (row["site"], row["state"], row["ready"]) == ("edge-1", "ArtifactError", 0), row
            assert row["reason"].startswith("not sent: Model intent variant small: artifact 'artifacts/not-published-yet.onnx' "
                                            "was not found under the artifact roots"), row
            assert cp.hub.assignments("edge-1") is None or not cp.hub.assignments("edge-1").assignments
    finally:
        await fleet.stop()


async def test_an_agent_whose_site_is_deleted_is_told_to_serve_nothing(tmp_path: pathlib.Path) -> None:
    """Deleting a Site takes its replicas out of the plan and the gateway's table; its agent,
    still connected, now gets an empty assignment set and unloads, where it kept serving
    (and holding the memory of) models that no request would reach."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=FLEET)).status_code == 200
            await fleet.start_agent("edge-1", country="FR", region="eu-west", lat=48.8, lon=2.3)
            await harness.wait_until(lambda: _serving(cp, "intent"), 60, what="the model served at the agent")
            assert (await http.delete("/v1/sites/edge-1")).status_code == 200
            await harness.wait_until(lambda: not _serving(cp, "intent"), 30, what="the model unloaded at the agent")
            assigned = cp.hub.assignments("edge-1")
            assert assigned is not None and assigned.assignments == ()
            (row,) = [d for d in (await http.get("/v1/modeldeployments")).json()["items"] if d["metadata"]["name"] == "intent-fr"]
            assert row["status"]["reason"].startswith("no site in FR"), row["status"]  # as a plan of what is left: no site
    finally:
        await fleet.stop()


def _serving(cp: server.ControlPlane, name: str) -> bool:
    status = cp.hub.status("edge-1")
    state = status.models.get(name) if status is not None else None
    return state is not None and state.serving
