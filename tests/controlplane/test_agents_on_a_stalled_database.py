"""Agents joining and opening their streams while the database is stalled (its server process
stopped here; a frozen VM or a lock held elsewhere alike): their credentials are checked and
written in worker threads, so the replica's health probes, gateway and API go on answering,
and the join completes once the database is back."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator import server
from orchestrator.agents import service
from orchestrator.testing import harness, stall
from orchestrator.testing.postgres import PostgresServer

T = TypeVar("T")


async def while_stalled(cp: server.ControlPlane, call: Callable[[], Awaitable[T]]) -> tuple[int | None, T]:
    """Make ``call`` to the replica with its database stopped; return what the liveness probe
    answered meanwhile, and ``call``'s result once the database is back."""
    pid = cp.store.backend_pid
    assert pid
    with stall.stalled(pid) as database:
        pending = asyncio.ensure_future(call())
        [live] = await stall.probe([f"{cp.http_url}/v2/health/live"], within=3, then=database.resume)
        return live, await pending


async def test_an_agent_joining_on_a_stalled_database_holds_up_no_other_request(tmp_path: pathlib.Path,
                                                                                 postgres: PostgresServer) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(store=postgres.create_database(), resync_s=3600.0, insecure_agents=True)
        await cp.reconciler.wait_for_pass(0)
        async with grpc.aio.insecure_channel(cp.agent_target) as channel:
            stub = pb_grpc.AgentControlStub(channel)
            request = pb.JoinRequest(site="edge-1", bootstrap_token=harness.BOOTSTRAP_TOKEN, endpoint_url="http://127.0.0.1:9999",
                                     heartbeat_interval_ms=500, capacity=pb.Capacity(cpu_cores=2, memory_total_bytes=1 << 30))
            live, joined = await while_stalled(cp, lambda: stub.Join(request, timeout=30))
            assert live == 200, "the liveness probe got no answer while an agent's join waited on the database"
            status = cp.hub.status("edge-1")
            assert joined.agent_id and status is not None and status.agent_id == joined.agent_id

            # and its heartbeat stream opens, its credential checked on the stalled database
            identity = ((service.SITE_KEY, "edge-1"), (service.AGENT_ID_KEY, joined.agent_id),
                        (service.CREDENTIAL_KEY, joined.credential))
            live, summary = await while_stalled(cp, lambda: stub.Heartbeats(iter([pb.Heartbeat()]), metadata=identity, timeout=30))
            assert live == 200, "the liveness probe got no answer while a stream's credential was checked on the database"
            assert summary.received == 1
    finally:
        await fleet.stop()
