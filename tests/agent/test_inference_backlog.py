"""Inference runs waiting for a worker: a caller that leaves (a gRPC deadline, a closed HTTP
connection) before its run starts leaves no run behind, and past the agent's queue a call is
refused at once (HTTP 503 with Retry-After, gRPC RESOURCE_EXHAUSTED) instead of waiting
behind a backlog. Real HTTP and gRPC servers on loopback, real onnxruntime; the runs wait on
a gate, so that which are running and which are queued is known."""

from __future__ import annotations

import asyncio
import pathlib
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from edge_agent import grpc_inference, http, registry
from edge_agent.runtime import onnx
from edgeplane_proto import oip
from edgeplane_proto.inference.v2 import inference_pb2_grpc as pb_grpc
from orchestrator.testing import onnx_models
from orchestrator.testing.agent_parts import OneModel

from .conftest import serve_http
from .test_dispatch import X, Recorded, request
from .test_grpc_inference import raw_request

WORKERS = 2


@dataclass
class Agent:
    app: http.InferenceServer
    runtime: Recorded
    gate: threading.Event
    stub: pb_grpc.GRPCInferenceServiceStub
    http_port: int

    async def running(self, n: int) -> None:
        """Until ``n`` runs have started (each waits on the gate)."""
        for _ in range(1000):  # bounded: 10 s
            if len(self.runtime.threads) >= n:
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"{len(self.runtime.threads)} runs started, not {n}")

    async def inflight(self, n: int) -> None:
        for _ in range(1000):  # bounded: 10 s
            if self.app.inflight == n:
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"{self.app.inflight} runs in flight, not {n}")

    async def post(self) -> bytes:
        """One v2 request over a connection of its own: the answer's head and body."""
        one = request(X)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
        writer.write(f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n{oip.BINARY_HEADER}: {one.headers[oip.BINARY_HEADER.lower()]}\r\n"
                     f"Content-Length: {len(one.body)}\r\nConnection: close\r\n\r\n".encode() + one.body)
        try:
            return await reader.read()
        finally:
            writer.close()


@pytest.fixture(params=[None])
async def agent(tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> AsyncIterator[Agent]:
    """Two workers; ``max_inflight`` from the test's parameter (None: no bound)."""
    built = onnx_models.build_mlp(tmp_path / "m.onnx", in_dim=8, hidden=16, out_dim=4)
    runtime = Recorded(onnx.OnnxModel.load(built.path.read_bytes()))
    gate = runtime.gate = threading.Event()
    served = registry.ServedModel("mlp", built.sha256, runtime)  # type: ignore[arg-type]
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="infer") as pool:
        app = http.InferenceServer(OneModel(served), pool, inline_max_s=0, max_inflight=request.param)  # type: ignore[arg-type]
        http_server, port = await serve_http(app.handle)
        grpc_server, grpc_port = await grpc_inference.start("127.0.0.1", 0, app, 1 << 20)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                yield Agent(app, runtime, gate, pb_grpc.GRPCInferenceServiceStub(channel), port)
        finally:
            gate.set()
            await grpc_server.stop(grace=None)
            await http_server.shutdown(1)


async def test_grpc_calls_whose_deadline_passed_leave_no_run_behind(agent: Agent) -> None:
    held = [asyncio.ensure_future(agent.stub.ModelInfer(raw_request(X), timeout=30)) for _ in range(WORKERS)]
    await agent.running(WORKERS)  # both workers busy
    late = await asyncio.gather(*(agent.stub.ModelInfer(raw_request(X), timeout=0.3) for _ in range(20)), return_exceptions=True)
    assert {e.code() for e in late} == {grpc.StatusCode.DEADLINE_EXCEEDED}  # type: ignore[union-attr]
    await agent.inflight(WORKERS)  # the runs under way hold their workers; none is left queued
    agent.gate.set()
    assert [answer.model_name for answer in await asyncio.gather(*held)] == ["mlp"] * WORKERS
    await agent.inflight(0)
    assert len(agent.runtime.threads) == WORKERS  # no run was computed for a caller that had gone


async def test_an_http_client_that_hung_up_before_its_run_started_leaves_no_run_behind(agent: Agent) -> None:
    held = [asyncio.create_task(agent.post()) for _ in range(WORKERS)]
    await agent.running(WORKERS)
    gone = [asyncio.create_task(agent.post()) for _ in range(5)]
    await agent.inflight(WORKERS + 5)
    for call in gone:  # the clients close their connections
        call.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    await agent.inflight(WORKERS)
    agent.gate.set()
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in await asyncio.gather(*held))
    await agent.inflight(0)
    assert len(agent.runtime.threads) == WORKERS


@pytest.mark.parametrize("agent", [WORKERS + 1], indirect=True)
async def test_past_the_queue_a_call_is_refused_at_once_over_http_and_grpc(agent: Agent) -> None:
    held = [asyncio.create_task(agent.post()) for _ in range(WORKERS + 1)]  # two running, one queued
    await agent.inflight(WORKERS + 1)
    async with asyncio.timeout(10):
        refused = await agent.post()
    head = refused.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.1 503") and "retry-after: " in head
    with pytest.raises(grpc.aio.AioRpcError) as exhausted:
        await agent.stub.ModelInfer(raw_request(X), timeout=10)
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(exhausted.value.trailing_metadata())["grpc-retry-pushback-ms"]) >= 1000
    agent.gate.set()
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in await asyncio.gather(*held))
    assert (await agent.stub.ModelInfer(raw_request(X), timeout=10)).model_name == "mlp"  # room again
