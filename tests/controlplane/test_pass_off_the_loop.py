"""A reconcile pass plans in a worker thread: while it plans (0.4-0.6 s at 1,000 Sites), the
control plane's one event loop goes on answering the API, the gateway and the agents'
heartbeats. Shown by events, not timed: the pass's planning step is held on a
``threading.Event`` that the test sets only after an API call and an agent's heartbeat
have been answered; planning on the loop, neither could be answered while it was held."""

from __future__ import annotations

import asyncio
import threading

import grpc
import httpx

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator.agents import service
from orchestrator.reconciler import planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import standing as standing_mod
from orchestrator.testing import harness

#: How long a held planning step waits for the test to let it go: only reached when the
#: test cannot run meanwhile (the step holds its event loop), and then the test fails.
HOLD_S = 20.0


class HeldPlanning:
    """The pass's planning step, held once until ``release`` is set (at most ``HOLD_S``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.planning = asyncio.Event()  # set on the loop once the step is held
        self.release = threading.Event()
        self.released: list[bool] = []  # per hold: whether the test let it go (False: HOLD_S ran out)

    def __call__(self, snapshot: snap.Snapshot, standing: standing_mod.Standing | None) -> planning.PassPlan:
        if not self.released:
            self.loop.call_soon_threadsafe(self.planning.set)
            self.released.append(self.release.wait(HOLD_S))
        return planning.plan_pass(snapshot, standing)


async def test_the_api_and_an_agents_heartbeat_are_answered_while_a_pass_plans(fleet: harness.Fleet) -> None:
    cp = await fleet.start_control_plane(resync_s=3600.0, insecure_agents=True)
    async with grpc.aio.insecure_channel(cp.agent_target) as channel, httpx.AsyncClient(base_url=cp.http_url, timeout=60) as api:
        stub = pb_grpc.AgentControlStub(channel)
        joined = await stub.Join(pb.JoinRequest(site="edge-1", bootstrap_token=harness.BOOTSTRAP_TOKEN, endpoint_url="http://127.0.0.1:9999",
                                                heartbeat_interval_ms=60_000, capacity=pb.Capacity(cpu_cores=2, memory_total_bytes=1 << 30)),
                                 timeout=30)
        identity = ((service.SITE_KEY, "edge-1"), (service.AGENT_ID_KEY, joined.agent_id), (service.CREDENTIAL_KEY, joined.credential))
        passes = await cp.reconciler.wait_for_pass(0)
        held = HeldPlanning(asyncio.get_running_loop())
        cp.reconciler.planner = held
        cp.reconciler.trigger("a pass the test holds mid-plan")
        async with asyncio.timeout(60):
            await held.planning.wait()
        try:
            sites = await api.get("/v1/sites")
            summary = await stub.Heartbeats(iter([pb.Heartbeat(seq=1, inflight=3)]), metadata=identity, timeout=30)
        finally:
            held.release.set()
        assert await cp.reconciler.wait_for_pass(passes) > passes  # and the held pass ends as any other
        assert held.released == [True], (
            "the pass planned on the event loop: neither the API call nor the heartbeat was answered while its planning step was held")
        assert sites.status_code == 200 and sites.json()["kind"] == "Site"
        status = cp.hub.status("edge-1")
        assert summary.received == 1 and status is not None and status.inflight == 3
