"""An in-process agent against a real control-plane gRPC server on loopback: assignments
are downloaded over real HTTP, verified, run by real onnxruntime and served over v2."""

from __future__ import annotations

import asyncio
import errno
import json
import pathlib
import shutil
import socket
from collections.abc import Callable

import httpx
import numpy as np
import psutil
import pytest

from edge_agent import capacity, registry, state
from edgeplane_proto import oip
from orchestrator.agents import model
from orchestrator.testing import harness, onnx_models

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent, Models, start_control_plane
from .test_artifacts_runtime import _SilentServer



def assignment(url: str, built: onnx_models.BuiltModel, name: str = "mlp") -> model.Assignment:
    return model.Assignment(name, "intent", "small", url, built.sha256)


async def wait_model(cp: ControlPlane, predicate: Callable[[model.ModelState], bool], name: str = "mlp") -> model.ModelState:
    def match(event: model.AgentEvent) -> bool:
        state = event.status.models.get(name)
        return event.kind is model.AgentEventKind.MODELS_CHANGED and state is not None and predicate(state)

    event = await cp.events.wait_for(match)
    return event.status.models[name]


def reference(built: onnx_models.BuiltModel, seed: int, x: np.ndarray) -> np.ndarray:
    weights = onnx_models.mlp_weights(built.in_dim, 16, built.out_dim, 2, seed)
    return onnx_models.mlp_reference(x, weights, softmax=True)


async def infer(client: httpx.AsyncClient, x: np.ndarray, *, binary: bool = False) -> np.ndarray:
    body, header = oip.encode_request({"input": x}, binary=binary)
    headers = {oip.BINARY_HEADER: str(header)} if header is not None else {}
    response = await client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    length = response.headers.get(oip.BINARY_HEADER)
    decoded = oip.decode_response(response.content, int(length) if length else None)
    return decoded.outputs[0].array


async def v1_then_v2(cp: ControlPlane, client: httpx.AsyncClient, models: Models, version: int) -> None:
    """v1 answers; an assignment of v2 replaces it, and then v2 answers."""
    x = np.ones((2, 8), np.float32)
    np.testing.assert_allclose(await infer(client, x), reference(models.v1, 0, x), rtol=1e-5)
    cp.hub.set_assignments(SITE, [assignment(models.v2_url, models.v2)], version=version)
    await wait_model(cp, lambda s: s.phase is model.ModelPhase.READY and s.serving_sha256 == models.v2.sha256)
    np.testing.assert_allclose(await infer(client, x), reference(models.v2, 1, x), rtol=1e-5)


async def test_assignment_is_downloaded_verified_served_and_reported(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent = await make_agent(control_plane)
    joined = await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    assert joined.status.location == model.Location("FR", "eu-west", 48.85, 2.35)
    assert joined.status.labels == {"tier": "edge"}

    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    state = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    assert state.serving_sha256 == models.v1.sha256
    assert state.provider == "CPUExecutionProvider"

    status = control_plane.hub.status(SITE)
    assert status is not None and status.healthy
    assert status.endpoint_url == agent.endpoint_url
    # measured, and never more than the host has (a container's limits may make it less)
    measured = capacity.CapacityProbe(lambda: [], gpus=lambda: ()).capacity()
    assert status.capacity.cpu_cores == measured.cpu_cores <= psutil.cpu_count(logical=True)
    assert status.capacity.memory_total_bytes == measured.memory_total_bytes <= psutil.virtual_memory().total
    assert "CPUExecutionProvider" in status.providers
    assert 0 < status.memory_available_bytes <= status.capacity.memory_total_bytes
    assert (agent.config.data_dir / "cache" / "sha256" / models.v1.sha256).is_file()

    x = np.random.default_rng(7).standard_normal((5, 8)).astype(np.float32)
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        for binary in (False, True):
            out = await infer(client, x, binary=binary)
            np.testing.assert_allclose(out, reference(models.v1, 0, x), rtol=1e-5, atol=1e-6)
        meta = (await client.get("/v2/models/mlp")).json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
        assert (await client.get("/v2/models/mlp/ready")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'edgeplane_agent_infer_requests_total{code="200",model="mlp"} 2.0' in metrics
        assert "edgeplane_agent_http_connections 1.0" in metrics  # this client's one kept-alive connection
        assert "edgeplane_agent_http_connections_refused_total 0.0" in metrics

    for _ in range(5):  # a heartbeat built before the last request may still be in flight
        status = await asyncio.wait_for(control_plane.hub.next_heartbeat(SITE), 5)
        if status.models["mlp"].requests_served == 2:
            break
    assert status.models["mlp"].requests_served == 2
    assert status.inflight == 0


async def test_a_model_no_longer_assigned_leaves_the_agents_load_reports_and_metrics(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    """Models come and go over months: the load each heartbeat carries for the autoscaler,
    and the agent's metrics, are of the models assigned now. One assigned again counts anew."""
    agent = await make_agent(control_plane)
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    x = np.ones((1, 8), np.float32)
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        for version in (1, 3):
            control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=version)
            await harness.wait_until(lambda: (s := control_plane.hub.status(SITE)) is not None and "mlp" in s.models
                                     and s.models["mlp"].phase is model.ModelPhase.READY, 30, what="mlp ready")
            await infer(client, x)
            assert [(name, n) for name, n, _ in agent.model_load()] == [("mlp", 1)]
            assert 'edgeplane_agent_infer_requests_total{code="200",model="mlp"} 1.0' in (await client.get("/metrics")).text
            control_plane.hub.set_assignments(SITE, [], version=version + 1)
            await harness.wait_until(lambda unassigned=version + 1: agent.assignment_version() == unassigned, 30, what="mlp unassigned")
            assert agent.model_load() == []
            assert 'model="mlp"' not in (await client.get("/metrics")).text


async def test_an_agent_told_no_interval_reports_at_the_control_planes(control_plane: ControlPlane, make_agent: MakeAgent) -> None:
    agent = await make_agent(control_plane, heartbeat_interval=None)
    joined = await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    assert joined.status.heartbeat_interval == 0.2  # the hub's (the fixture's), not the agent's own 5 s fallback
    await harness.wait_until(lambda: agent.uplink is not None and agent.uplink.interval == 0.2, 10,
                             what="the agent to take the interval the join answered")


async def test_an_agent_asking_for_an_interval_past_the_control_planes_bounds_joins_at_the_bound(
        control_plane: ControlPlane, make_agent: MakeAgent) -> None:
    # 5,000,000 s is past what a Join's uint32 milliseconds carry: no join could be sent
    await make_agent(control_plane, heartbeat_interval=5_000_000.0)
    joined = await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    assert joined.status.heartbeat_interval == 300.0


async def test_corrupt_upgrade_is_refused_and_previous_version_keeps_serving(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent = await make_agent(control_plane)
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)

    bad = model.Assignment("mlp", "intent", "small", models.corrupt_url, models.v2.sha256)
    control_plane.hub.set_assignments(SITE, [bad], version=2)
    failed = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.FAILED)
    assert failed.sha256 == models.v2.sha256
    assert "expected " + models.v2.sha256 in failed.message
    assert failed.serving_sha256 == models.v1.sha256
    assert not (agent.config.data_dir / "cache" / "sha256" / models.v2.sha256).exists()

    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        await v1_then_v2(control_plane, client, models, version=3)
        # Removing the assignment unloads the model.
        control_plane.hub.set_assignments(SITE, [], version=4)
        await control_plane.events.wait_for(
            lambda e: e.kind is model.AgentEventKind.MODELS_CHANGED and not e.status.models
        )
        assert (await client.post("/v2/models/mlp/infer", content=b"{}")).status_code == 404


async def test_the_artifact_cache_holds_only_what_the_assignments_need(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent = await make_agent(control_plane)
    cached = agent.config.data_dir / "cache" / "sha256"
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    (cached / ("ab" * 32 + ".partial")).write_bytes(b"a download abandoned by an agent before this one")

    def held() -> set[str]:
        return {p.name for p in cached.iterdir()}

    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        await v1_then_v2(control_plane, client, models, version=2)
    await harness.wait_until(lambda: held() == {models.v2.sha256}, what=f"v1 removed from the cache, not {held()}")
    control_plane.hub.set_assignments(SITE, [], version=3)
    await harness.wait_until(lambda: held() == set(), what=f"an empty cache, not {held()}")


@pytest.mark.parametrize("saved", ["damaged", "another site's"])
async def test_an_agent_that_cannot_tell_what_was_assigned_keeps_its_files_until_the_control_plane_says(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models, tmp_path: pathlib.Path, saved: str
) -> None:
    data_dir = tmp_path / "agent"
    cached = data_dir / "cache" / "sha256"
    cached.mkdir(parents=True)
    shutil.copyfile(models.v1.path, cached / models.v1.sha256)
    unpacked = data_dir / "models" / ("cd" * 32)
    unpacked.mkdir(parents=True)
    (unpacked / "genai_config.json").write_text("{}")
    state = {"format": 1, "site": "edge-elsewhere", "assignments": {"version": 7, "assignments": []}}
    (data_dir / "state.json").write_text('{"format": 1, "si' if saved == "damaged" else json.dumps(state))
    agent = await make_agent(control_plane, data_dir=data_dir)
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    await harness.wait_until(lambda: agent.server.ready, 10, what="the agent's first pass over what it has")
    assert (cached / models.v1.sha256).is_file() and unpacked.is_dir()  # many GB, maybe: not dropped on a guess
    control_plane.hub.set_assignments(SITE, [], version=1)
    await harness.wait_until(lambda: not (cached / models.v1.sha256).exists() and not unpacked.exists(), 10,
                             what="the files removed once the control plane said nothing is assigned")


async def test_a_download_under_way_holds_up_neither_another_model_nor_a_new_assignment_set(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models, artifact_server: ArtifactServer
) -> None:
    name = "mlp-beside-a-download.onnx"
    shutil.copyfile(models.v1.path, artifact_server.root / name)
    artifact_server.fail_next(name, 503)
    agent = await make_agent(control_plane, model_retry=registry.RetryPolicy(initial=0.05, maximum=0.2))
    slow = _SilentServer(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000)  # then nothing for a while
    async with slow as big_url:
        big = model.Assignment("big", "intent", "large", big_url, "ab" * 32)
        control_plane.hub.set_assignments(SITE, [big, assignment(artifact_server.url(name), models.v1)], version=1)
        # refused once (503), retried and served while the big one is still on its way
        await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY and s.serving_sha256 == models.v1.sha256)
        assert {s.name: s.phase for s in agent.registry.statuses()}["big"] is registry.ModelPhase.LOADING
        # the big one unassigned and another model assigned: acted on at once, the download stopped
        control_plane.hub.set_assignments(SITE, [assignment(models.v2_url, models.v2, name="other")], version=2)
        await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY, name="other")
        await asyncio.wait_for(slow.closed.wait(), 10)
    assert sorted(s.name for s in agent.registry.statuses()) == ["other"]


async def test_agent_keeps_serving_without_control_plane_and_rejoins(
    make_agent: MakeAgent, models: Models
) -> None:
    cp = await start_control_plane()
    port = cp.server.port
    agent = await make_agent(cp)
    cp.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(cp, lambda s: s.phase is model.ModelPhase.READY)
    await cp.server.stop(grace=None)

    x = np.ones((1, 8), np.float32)
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        for _ in range(3):
            np.testing.assert_allclose(await infer(client, x), reference(models.v1, 0, x), rtol=1e-5)

    # A fresh control plane on the same address: the agent reconnects (backoff) and rejoins.
    cp2 = await start_control_plane(port)
    try:
        rejoined = await cp2.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
        assert rejoined.status.site == SITE
    finally:
        await cp2.server.stop(grace=None)


async def test_an_identity_the_full_disk_refused_is_saved_at_the_next_join_and_a_restart_keeps_it(
    control_plane: ControlPlane, make_agent: MakeAgent, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = state.StateStore.save_identity
    refused: list[state.Identity] = []

    def full_once(store: state.StateStore, identity: state.Identity) -> None:
        if not refused:  # the disk is full at the first join, and has room again after
            refused.append(identity)
            raise OSError(errno.ENOSPC, "No space left on device")
        save(store, identity)

    monkeypatch.setattr(state.StateStore, "save_identity", full_once)
    agent = await make_agent(control_plane)
    # the session whose save failed ends; the agent reconnects and the hub hears from it again
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.RECONNECTED and e.site == SITE, 30)
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.REPORTED and e.site == SITE, 30)
    assert refused and agent.uplink is not None
    joined_as = agent.uplink.identity
    assert joined_as == refused[0]
    assert state.StateStore(agent.config.data_dir).load_identity(SITE) == joined_as
    await agent.stop()
    # a restart rejoins as the same agent, from identity.json, not as a new one from the token
    again = await make_agent(control_plane, data_dir=tmp_path / SITE)
    assert again.uplink is not None and again.uplink.identity == joined_as
    await asyncio.wait_for(control_plane.hub.next_heartbeat(SITE), 30)
    status = control_plane.hub.status(SITE)
    assert status is not None and status.agent_id == joined_as.agent_id


async def test_agent_given_several_control_plane_addresses_moves_to_the_next_when_one_fails(make_agent: MakeAgent) -> None:
    first, second = await start_control_plane(), await start_control_plane()
    with socket.socket() as s:  # a replica that is down: nothing listens there
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    try:
        await make_agent(first, control_plane=f"{down},{first.target},{second.target}")
        joined = await first.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED, timeout=30)
        assert joined.status.site == SITE
        await first.server.stop(grace=None)  # the replica it talks to fails: the next address takes it
        rejoined = await second.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED, timeout=30)
        assert rejoined.status.site == SITE
    finally:
        await second.server.stop(grace=None)


BAD_BODIES = [
    pytest.param(b"not json", {}, 400, "not valid JSON", id="garbage"),
    pytest.param(b"[]", {}, 400, "JSON object", id="not-an-object"),
    pytest.param(
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}).encode(),
        {}, 400, "must have shape [-1, 8]", id="wrong-shape",
    ),
    pytest.param(
        json.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 8], "data": [1] * 8}]}).encode(),
        {}, 400, "must be FP32, got INT64", id="wrong-dtype",
    ),
    pytest.param(
        json.dumps({"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 8], "data": [0] * 8}]}).encode(),
        {}, 400, "unknown input 'nope'", id="unknown-input",
    ),
    pytest.param(
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 8], "data": [0] * 8}]}).encode(),
        {}, 400, "needs 16 elements", id="count-mismatch",
    ),
    pytest.param(
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [0] * 8}],
                    "outputs": [{"name": "secret"}]}).encode(),
        {}, 400, "unknown output(s) secret", id="unknown-output",
    ),
    pytest.param(
        json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8],
                                "parameters": {"binary_data_size": 32}}]}).encode() + b"\0" * 16,
        {"x-binary": True}, 400, "binary data runs past", id="short-binary",
    ),
    pytest.param(b"{}", {oip.BINARY_HEADER: "abc"}, 400, "non-negative integer", id="bad-header"),
    # '²' in latin-1, which header values are read as: a digit to str.isdigit, not to int()
    pytest.param(b"{}", {oip.BINARY_HEADER: b"\xb2"}, 400, "non-negative integer", id="non-ascii-digit-header"),
    pytest.param(b"x" * 5000, {}, 413, "exceeds 4096 bytes", id="too-large"),
]


@pytest.mark.parametrize(("body", "headers", "status", "fragment"), BAD_BODIES)
async def test_bad_infer_requests_get_clear_errors(
    control_plane: ControlPlane,
    make_agent: MakeAgent,
    models: Models,
    body: bytes,
    headers: dict[str, object],
    status: int,
    fragment: str,
) -> None:
    agent = await make_agent(control_plane, max_body_bytes=4096)
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    if headers.pop("x-binary", False):
        headers[oip.BINARY_HEADER] = str(len(body) - 16)
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        response = await client.post(
            "/v2/models/mlp/infer", content=body, headers={k: v if isinstance(v, bytes) else str(v) for k, v in headers.items()}
        )
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]
        unknown = await client.post("/v2/models/ghost/infer", content=b"{}")
        assert unknown.status_code == 404 and "ghost" in unknown.json()["error"]
        assert (await client.get("/v2/health/live")).status_code == 200
        x = np.ones((1, 8), np.float32)
        np.testing.assert_allclose(await infer(client, x), reference(models.v1, 0, x), rtol=1e-5)
