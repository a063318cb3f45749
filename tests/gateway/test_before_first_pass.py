"""Before the control plane's first pass has published an endpoint table, its gateway knows
no model: it says so (503, Retry-After, unready), not "not deployed" (404), which would tell
a client or a load balancer that the model is gone."""

from __future__ import annotations

import asyncio
import pathlib
import socket

import httpx

from orchestrator import catalog
from orchestrator.gateway import endpoints, routing
from orchestrator.gatewayd import follow
from orchestrator.gatewayd import server as gatewayd
from orchestrator.manifests import loader
from orchestrator.store import open_store
from orchestrator.testing import harness, manifests

# A data centre whose dashboard takes connections and never answers: the first pass waits on it.
SITE = """
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {{name: dc-silent}}
spec:
  tier: datacenter
  location: {{country: FR, region: eu-west, lat: 48.85, lon: 2.35}}
  capacity: {{cpu: 8, memoryGiB: 32}}
  ray: {{address: "http://127.0.0.1:{port}"}}
"""
BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}


async def test_before_its_first_pass_the_gateway_says_retry_not_unknown(tmp_path: pathlib.Path) -> None:
    hole = socket.create_server(("127.0.0.1", 0), backlog=16)  # listens, never accepts: requests hang
    fleet = harness.Fleet(tmp_path)
    store = open_store(tmp_path / "control-plane" / "state.db")
    catalog.apply_documents(store, loader.load_text(SITE.format(port=hole.getsockname()[1])), actor="test", reason="seed")
    store.close()
    starting = asyncio.create_task(fleet.start_control_plane())
    try:
        await harness.wait_until(lambda: fleet.cp is not None, 30, what="the control plane to listen")
        assert fleet.cp is not None
        async with httpx.AsyncClient(base_url=fleet.cp.http_url, timeout=10) as http:
            assert not fleet.cp.table.published, "the first pass should still be waiting on the silent data centre"
            early = await http.post("/v2/models/intent/infer", json=BODY)
            assert early.status_code == 503 and early.headers["retry-after"] == "2", early.text
            assert "not known yet" in early.json()["error"] and "first pass" in early.json()["error"]
            chat = await http.post("/openai/v1/chat/completions", json={"model": "assistant", "messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code == 503 and chat.headers["retry-after"] == "2", chat.text
            assert (await http.get("/v2/health/ready")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200  # the API answers all along: apply works before the first pass
            hole.close()  # the data centre's connections reset: the pass ends with its error
            await asyncio.wait_for(starting, 30)
            after = await http.post("/v2/models/intent/infer", json=BODY)
            assert after.status_code == 404 and "is not deployed" in after.json()["error"], after.text
            assert (await http.get("/v2/health/ready")).status_code == 200
    finally:
        hole.close()
        if not starting.done():
            starting.cancel()
        await fleet.stop()


async def test_a_standalone_gateway_keeps_its_table_until_the_control_plane_has_one(tmp_path: pathlib.Path) -> None:
    """A control plane (re)started, or a replica on a shared database that has not read the
    leader's table, knows no model yet: a gateway that took that empty table would answer
    "not deployed" for every model while its replicas serve. It keeps the one it has."""
    hole = socket.create_server(("127.0.0.1", 0), backlog=16)
    fleet = harness.Fleet(tmp_path)
    store = open_store(tmp_path / "control-plane" / "state.db")
    catalog.apply_documents(store, loader.load_text(SITE.format(port=hole.getsockname()[1])), actor="test", reason="seed")
    store.close()
    starting = asyncio.create_task(fleet.start_control_plane())
    table = endpoints.EndpointTable()  # what the gateway routed with before the control plane restarted
    table.replace([routing.Endpoint("intent", "intent-fr", "edge-paris", "edge", "FR", "eu-west", 48.85, 2.35, "http://127.0.0.1:9")],
                  deployed={"intent": ""})
    follower: follow.TableFollower | None = None
    following: asyncio.Task[None] | None = None
    try:
        await harness.wait_until(lambda: fleet.cp is not None, 30, what="the control plane to listen")
        assert fleet.cp is not None and not fleet.cp.table.published
        follower = follow.TableFollower([fleet.cp.http_url], table)
        following = asyncio.create_task(follower.run())
        await harness.wait_until(lambda: "no endpoint table yet" in (follower.last_error or ""), 10, what="the watch's first heartbeat")
        assert follower.connected and follower.snapshots == 0 and table.endpoints("intent")
        assert "serving the last endpoint table meanwhile" in str(follower.status()["lastError"])
        async with httpx.AsyncClient(base_url=fleet.cp.http_url, timeout=10) as http:
            once = await http.get("/v1/endpoints")
        assert once.status_code == 503 and once.headers["retry-after"] == "2", once.text
        hole.close()  # the first pass ends: its table (no deployment) is the control plane's, and the gateway's now
        assert await follower.wait_snapshot(0, 30)
        assert table.models() == [] and follower.last_error is None
    finally:
        hole.close()
        if following is not None:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        if follower is not None:
            await follower.close()
        if not starting.done():
            starting.cancel()
        await fleet.stop()


async def test_a_model_applied_while_a_pass_runs_is_pending_not_unknown(tmp_path: pathlib.Path) -> None:
    """A deployment applied while the control plane's pass waits on a data centre: its model
    answers 503 "being placed" with Retry-After until that pass publishes, where it answered
    404 "not deployed"; a standalone gateway that follows the table says the same."""
    hole = socket.create_server(("127.0.0.1", 0), backlog=16)
    fleet = harness.Fleet(tmp_path)
    follower: gatewayd.StandaloneGateway | None = None
    try:
        cp = await fleet.start_control_plane()
        follower = await gatewayd.StandaloneGateway(gatewayd.GatewayConfig(control_planes=(cp.http_url,), port=0)).start()
        late = manifests.bundle(
            SITE.format(port=hole.getsockname()[1]),
            manifests.onnx_model("late", "https://models.example/late.onnx", "a" * 64),
            manifests.deployment("late", "late", 1, {"tiers": ["edge"]}),
        )
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=10) as http:
            passes = cp.reconciler.passes
            assert (await http.post("/v1/apply", content=late.encode())).status_code == 200
            await harness.wait_until(lambda: "late" in cp.table.models(), 10, what="the applied model in the table")
            assert cp.reconciler.passes == passes, "the pass should still be waiting on the silent data centre"
            early = await http.post("/v2/models/late/infer", json=BODY)
            assert early.status_code == 503 and early.headers["retry-after"] == "2", early.text
            assert "deployment late was just applied" in early.json()["error"]
            assert (await http.post("/v2/models/never/infer", json=BODY)).status_code == 404
            await harness.wait_until(lambda: follower.table.is_pending("late"), 10, what="the pending note at the standalone gateway")
            async with httpx.AsyncClient(base_url=follower.http_url, timeout=10) as via:
                there = await via.post("/v2/models/late/infer", json=BODY)
                assert there.status_code == 503 and there.headers["retry-after"] == "2", there.text
                assert "deployment late was just applied" in there.json()["error"]
            hole.close()  # the pass ends: its table says why 'late' has no replica (no edge site), no longer pending
            await cp.reconciler.wait_for_pass(passes)
            after = await http.post("/v2/models/late/infer", json=BODY)
            assert after.status_code == 503 and "retry-after" not in after.headers, after.text
            assert "deployment late is" in after.json()["error"] and not cp.table.is_pending("late")
            await harness.wait_until(lambda: not follower.table.is_pending("late"), 10, what="the note dropped at the standalone gateway")
    finally:
        hole.close()
        if follower is not None:
            await follower.stop()
        await fleet.stop()
