"""A fleet rejoining at once meets a bound on the joins worked on together: one over it is
refused at once with when to come back, and loses nothing; an agent so refused waits that
long, not its backoff step, and then joins. Real gRPC on loopback; a join is held in
progress by an authenticator whose proofs wait until the test lets them go (the hub's
constructor takes it), and the agent's waits go through the sleep its uplink is given."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import grpc
import pytest

from edge_agent import capacity, errors, registry, state, uplink
from edgeplane_proto import reconnect
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator.agents import admission, auth, hub, model, service

from .conftest import TOKEN, EventLog

P = ParamSpec("P")
T = TypeVar("T")
HELD, LATE = "edge-held", "edge-late"
HINT_S = 2.0  # the shortest wait the gate asks: the first refusal's (its bounds, below)


class HeldAuthenticator(auth.InMemoryJoinAuthenticator):
    """The in-memory authenticator, each of its proofs waiting until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__([TOKEN])
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        self.entered.set()
        await self.release.wait()
        return await super().run(fn, *args, **kwargs)


@dataclass
class Gated:
    hub: hub.AgentHub
    gate: admission.JoinGate
    authenticator: HeldAuthenticator
    events: EventLog
    target: str


@pytest.fixture
async def gated() -> AsyncIterator[Gated]:
    """A control plane that works on one join at a time."""
    authenticator = HeldAuthenticator()
    events = EventLog()
    agent_hub = hub.AgentHub(authenticator, on_change=events, heartbeat_interval=0.2)
    gate = admission.JoinGate(1, retry_bounds=(HINT_S, reconnect.PUSHBACK_MAX_S))
    server = await service.start_agent_server(agent_hub, "127.0.0.1", 0, joins=gate)
    yield Gated(agent_hub, gate, authenticator, events, f"127.0.0.1:{server.port}")
    await server.stop(grace=None)


def join_request(site: str) -> pb.JoinRequest:
    return pb.JoinRequest(site=site, bootstrap_token=TOKEN, endpoint_url="http://127.0.0.1:9", agent_version="test",
                          capacity=pb.Capacity(cpu_cores=1, memory_total_bytes=1 << 30))


async def hold_a_join(cp: Gated, stub: pb_grpc.AgentControlStub) -> asyncio.Task[pb.JoinResponse]:
    """A join of site HELD, in progress until ``cp.authenticator.release`` is set."""
    held = asyncio.ensure_future(stub.Join(join_request(HELD), timeout=30))
    await asyncio.wait_for(cp.authenticator.entered.wait(), 10)
    return held


async def test_a_join_over_the_limit_is_refused_at_once_with_when_to_retry_and_leaves_nothing(gated: Gated) -> None:
    async with grpc.aio.insecure_channel(gated.target) as channel:
        stub = pb_grpc.AgentControlStub(channel)
        held = await hold_a_join(gated, stub)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Join(join_request(LATE), timeout=5)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 agent join" in (refused.value.details() or "")
        pushback = dict(refused.value.trailing_metadata() or ())
        assert pushback[reconnect.PUSHBACK_KEY] == str(round(HINT_S * 1000))
        # nothing of the refused join was kept: no record, no event, no credential
        assert gated.hub.status(LATE) is None
        assert LATE not in {e.site for e in gated.events.events}
        assert gated.authenticator.holder_of(LATE) == ""
        assert gated.gate.refused_total == 1

        gated.authenticator.release.set()
        await held
        late = await stub.Join(join_request(LATE), timeout=10)  # the place is free again
    assert gated.hub.status(LATE) is not None and late.agent_id
    assert gated.gate.in_progress == 0


@pytest.mark.parametrize(("now", "last_turn", "join_s", "limit", "wait"), [
    (100.0, float("-inf"), 0.05, 64, 0.5),   # the first refusal: the shortest wait
    (100.0, 101.0, 0.64, 64, 1.01),          # the next: one join's share of the gate after the last turn
    (100.0, 101.0, 0.05, 1, 1.05),           # a gate of one: a whole join later
    (100.0, 99.0, 0.05, 64, 0.5),            # a turn past: from now again
    (100.0, 123.9, 1.0, 1, reconnect.PUSHBACK_MAX_S),  # never past the protocol's longest
])
def test_each_refused_join_is_given_the_turn_after_the_one_before(now: float, last_turn: float, join_s: float,
                                                                    limit: int, wait: float) -> None:
    assert admission.retry_after(now, last_turn, join_s, limit) == pytest.approx(wait)


def test_a_gate_of_no_joins_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        admission.JoinGate(0)


# --- the agent's side --------------------------------------------------------------------------


class _Top:
    """The top of every jitter range."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Reporter:
    def capacity(self) -> capacity.Capacity:
        return capacity.Capacity(cpu_cores=1, memory_total_bytes=1 << 30, gpus=(), execution_providers=())

    def load(self) -> capacity.Load:
        return capacity.Load(0.0, 1 << 30, ())

    def inflight(self) -> int:
        return 0

    def model_statuses(self) -> tuple[registry.ModelStatus, ...]:
        return ()

    def model_load(self) -> list[tuple[str, int, float]]:
        return []

    def assignment_version(self) -> int:
        return 0

    def draining(self) -> bool:
        return False


async def _ignore(_: object) -> None:
    return None


async def test_an_agent_refused_for_a_busy_control_plane_waits_the_time_asked_then_joins(
        gated: Gated, tmp_path: pathlib.Path) -> None:
    async with grpc.aio.insecure_channel(gated.target) as channel:
        held = await hold_a_join(gated, pb_grpc.AgentControlStub(channel))
        asked: list[float] = []

        async def sleep(seconds: float) -> None:
            """The agent's wait: the held join ends meanwhile."""
            asked.append(seconds)
            gated.authenticator.release.set()
            await held

        facts = uplink.JoinFacts(site=LATE, bootstrap_token=TOKEN, endpoint_url="http://127.0.0.1:9", agent_version="test",
                                 heartbeat_interval=None)
        up = uplink.Uplink(gated.target, facts, state.StateStore(tmp_path), Reporter(), _ignore, rng=_Top(), sleep=sleep)
        running = asyncio.create_task(up.run())
        try:
            await gated.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED and e.site == LATE)
        finally:
            await up.stop()
            await asyncio.wait_for(running, 10)
    # the time asked, at the top of its jitter; the backoff's first step would have been 0.5 s
    assert asked == [pytest.approx(HINT_S * reconnect.PUSHBACK_JITTER)]


class DueCertificate:
    """The agent's TLS material as its uplink asks it at a join: a client certificate due for
    renewal (two thirds through a day's life at the uplink's clock, NOW), and a key and CSR."""

    NOW = 1_000_000.0

    async def renewal_time(self) -> tuple[float, float]:
        return self.NOW - 1.0, self.NOW + 86400.0

    async def new_request(self, site: str) -> tuple[bytes, bytes]:
        return b"key", b"csr"


async def test_a_renewal_refused_for_a_busy_control_plane_is_asked_again_at_the_next_join(
        gated: Gated, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """The refusal is of any join for now, not of the renewal: the agent joined again at once
    without its CSR (into the same busy gate) and put the renewal off an hour, or past the
    expiry of a short-lived certificate. The join asks for the renewal through the uplink's
    private steps: no public call reaches it without mutual TLS."""
    caplog.set_level(logging.WARNING, logger="edge_agent")
    facts = uplink.JoinFacts(site=LATE, bootstrap_token=TOKEN, endpoint_url="http://127.0.0.1:9", agent_version="test",
                             heartbeat_interval=None)
    up = uplink.Uplink(gated.target, facts, state.StateStore(tmp_path), Reporter(), _ignore,
                       agent_tls=DueCertificate(), clock=lambda: DueCertificate.NOW)  # type: ignore[arg-type]
    async with grpc.aio.insecure_channel(gated.target) as channel:
        stub = pb_grpc.AgentControlStub(channel)
        held = await hold_a_join(gated, stub)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await up._join(stub)
        gated.authenticator.release.set()
        await held
    assert isinstance(uplink.translate(refused.value), errors.ControlPlaneBusy)
    assert gated.gate.refused_total == 1  # no second join into the busy gate
    assert not [r for r in caplog.records if "renewal" in r.getMessage()]
    assert up._renewal is not None
    assert await up._renewal.request() == (b"key", b"csr")  # still due: the next join asks with the same CSR
