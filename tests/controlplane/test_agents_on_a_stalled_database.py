"""Agents joining and opening their streams while the database is stalled (its server process
stopped here; a frozen VM or a lock held elsewhere alike): their credentials are checked and
written on the store's own worker threads, so the replica's health probes, gateway and API go
on answering, work that never touches the database still finds a thread, and the join
completes once the database is back; and a replica stopped meanwhile stops within seconds."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import httpx
import pytest
from starlette.concurrency import run_in_threadpool

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator import server
from orchestrator.agents import service
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness, stall
from orchestrator.testing.postgres import PostgresServer

T = TypeVar("T")

#: More calls than asyncio's default pool has threads (at most 32) and the API's pool (40).
FLEET = 48


async def while_stalled(cp: server.ControlPlane, call: Callable[[], Awaitable[T]]) -> tuple[int | None, T]:
    """Make ``call`` to the replica with its database stopped; return what the liveness probe
    answered meanwhile, and ``call``'s result once the database is back."""
    pid = cp.store.backend_pid
    assert pid
    with stall.stalled(pid) as database:
        pending = asyncio.ensure_future(call())
        [live] = await stall.probe([f"{cp.http_url}/v2/health/live"], within=3, then=database.resume)
        return live, await pending


def join_request(site: str) -> pb.JoinRequest:
    return pb.JoinRequest(site=site, bootstrap_token=harness.BOOTSTRAP_TOKEN, endpoint_url="http://127.0.0.1:9999",
                          heartbeat_interval_ms=500, capacity=pb.Capacity(cpu_cores=2, memory_total_bytes=1 << 30))


async def answers_within(seconds: float, call: Awaitable[object]) -> bool:
    try:
        await asyncio.wait_for(call, seconds)
    except TimeoutError:
        return False
    return True


async def test_a_fleet_joining_on_a_stalled_database_leaves_the_worker_threads_to_other_work(
        tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """A fleet of agents rejoins and callers read the API while the database is stalled: their
    store calls queue on the store's own threads, so the work that never touches the database
    (a body inflated, a TLS chain fetched, a manifest parsed) still gets a worker thread at
    once, the liveness probe answers, and every join and read completes once it is back."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(store=postgres.create_database(), resync_s=3600.0, insecure_agents=True)
        await cp.reconciler.wait_for_pass(0)
        pid = cp.store.backend_pid
        assert pid
        async with grpc.aio.insecure_channel(cp.agent_target) as channel, \
                httpx.AsyncClient(base_url=cp.http_url, timeout=60, limits=httpx.Limits(max_connections=FLEET)) as api:
            stub = pb_grpc.AgentControlStub(channel)
            with stall.stalled(pid):
                joins = [asyncio.ensure_future(stub.Join(join_request(f"edge-{i}"), timeout=60)) for i in range(FLEET)]
                reads = [asyncio.ensure_future(api.get(f"/v1/sites/edge-{i}")) for i in range(FLEET)]
                [live] = await stall.probe([f"{cp.http_url}/v2/health/live"], within=3, settle=1.0)  # once they all wait
                default_pool = await answers_within(1.0, asyncio.to_thread(lambda: 1))
                api_pool = await answers_within(1.0, run_in_threadpool(lambda: 1))
            assert live == 200, "the liveness probe got no answer while a fleet's joins waited on the database"
            assert default_pool, "asyncio's default pool had no thread free while joins waited on the database"
            assert api_pool, "the API's worker threads were all taken while its reads waited on the database"
            joined = await asyncio.gather(*joins)
            assert all(j.agent_id for j in joined)
            assert {r.status_code for r in await asyncio.gather(*reads)} <= {200, 404}
    finally:
        await fleet.stop()


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


#: How long the database stays stalled in a stop: past all a stop waits for that is not the
#: database (the step-down, bounded by a lease; a second for the agents' streams; the change
#: feed's and the store's close, a few at most), so that a stop that waits for it ends after.
STOP_OUTLASTS_S = 8


async def test_a_control_plane_stopped_on_a_stalled_database_stops_before_it_answers(tmp_path: pathlib.Path,
                                                                                      postgres: PostgresServer) -> None:
    """SIGTERM while an agent's join, a read and the endpoint table's write wait on a stalled
    database: the replica stops while the database is still stalled, not when (if ever) it
    answers: the step-down gives the table's write and the lease's release up when the lease
    would have run out (a write waiting past it is refused anyway), and the store's thread
    that waited on the database is freed, the call failing, so nothing is left for the
    process's exit to wait for."""
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane(store=postgres.create_database(), resync_s=3600.0, insecure_agents=True)
    await cp.reconciler.wait_for_pass(0)
    pid = cp.store.backend_pid
    assert pid and cp.elector is not None
    entered = threading.Event()
    answered = threading.Event()

    def read() -> object:  # as the join's, or an API read
        entered.set()
        return cp.store.list("Site")

    async with grpc.aio.insecure_channel(cp.agent_target) as channel:
        stub = pb_grpc.AgentControlStub(channel)
        with stall.stalled(pid) as database:
            def back() -> None:  # a stop that waits for the database ends once it is back
                answered.set()
                database.resume()

            watchdog = threading.Timer(cp.elector.ttl_s + STOP_OUTLASTS_S, back)
            watchdog.start()
            try:
                joining = asyncio.ensure_future(stub.Join(join_request("edge-1"), timeout=60))
                waiting = asyncio.ensure_future(cp.store.run(read))
                assert await asyncio.to_thread(entered.wait, 10)
                cp.reconciler.publisher.forget()  # written again: the table's write waits behind the read
                cp.reconciler.publisher.table_changed()
                cp.reconciler.trigger("a pass in flight as the replica stops")
                await asyncio.sleep(0)  # the woken pass starts before this goes on, and waits behind the read
                await fleet.stop()
            finally:
                watchdog.cancel()
            assert not answered.is_set(), "the control plane waited for its stalled database to answer before it stopped"
            with pytest.raises(store_mod.StoreError):
                await asyncio.wait_for(waiting, 5)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await joining
