"""What the agent's log holds after a long outage of its uplink: the failure when it begins,
then a reminder every ten minutes that says since when and how many attempts, not two lines
at every reconnect (over a week at the 30 s cap, forty thousand alike); and when the link is
back, how long it was gone. A real uplink dialling a real address (nothing listens there,
then a control plane does); its waits and clocks are injected, so hours pass at once."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import socket

import pytest

from edge_agent import outage, state, uplink
from orchestrator.agents import model

from .conftest import TOKEN, start_control_plane
from .test_join_admission import Reporter, _ignore, _Top

HOURS = 2.0


class Clocks:
    """The uplink's wall clock and monotonic clock, moved on by its own waits."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_an_uplink_down_for_hours_is_logged_every_ten_minutes_and_its_end_says_how_long(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.uplink")
    port = free_port()  # nothing listens: every attempt is refused at once
    clocks = Clocks()
    start = clocks.now
    facts = uplink.JoinFacts(site="edge-a", bootstrap_token=TOKEN, endpoint_url="http://127.0.0.1:9", agent_version="test",
                             heartbeat_interval=None)
    up = uplink.Uplink(f"127.0.0.1:{port}", facts, state.StateStore(tmp_path), Reporter(), _ignore, rng=_Top(),
                       clock=clocks.wall, monotonic=clocks.monotonic, sleep=clocks.sleep)
    running = asyncio.create_task(up.run())
    cp = None
    try:
        deadline = asyncio.get_running_loop().time() + 120
        while clocks.now - start < HOURS * 3600:
            assert asyncio.get_running_loop().time() < deadline, "the outage took too long to play"
            await asyncio.sleep(0.01)
        cp = await start_control_plane(port)  # the link is back
        await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED and e.site == "edge-a", 60)
    finally:
        await up.stop()
        await asyncio.wait_for(running, 10)
        if cp is not None:
            await cp.server.stop(grace=None)
    lines = [r.getMessage() for r in caplog.records]
    failures = [m for m in lines if m.startswith("control plane unavailable")]
    attempts = HOURS * 3600 / 30  # at the cap
    assert len(failures) <= HOURS * 6 + 2, failures[:3]  # the first, then one per ten minutes
    assert attempts > 10 * len(failures)
    assert sum(m.startswith("reconnecting to") for m in lines) <= len(failures) + 1
    assert "unreachable since 2027-01-15 08:00:00 UTC" in failures[-1], failures[-1]
    joined = [m for m in lines if m.startswith("joined control plane")]
    assert joined and "after 2h" in joined[0] and "failed attempts" in joined[0], joined


@pytest.mark.parametrize(("seconds", "said"), [
    (0.4, "0s"), (45, "45s"), (725, "12m 5s"), (7200, "2h 0m"), (7 * 86400 + 3 * 3600 + 59, "7d 3h"),
])
def test_how_long_an_outage_lasted_is_said_in_its_largest_units(seconds: float, said: str) -> None:
    assert outage.duration(seconds) == said


def test_a_reason_that_changes_is_said_at_once_and_each_one_again_after_ten_minutes() -> None:
    gone = outage.Outage()
    assert gone.failed("refused", 0.0, 0.0) == "refused"
    assert gone.failed("refused", 30.0, 30.0) is None
    assert (gone.failed("timed out", 60.0, 60.0) or "").startswith("timed out; unreachable since 1970-01-01 00:00:00 UTC (1m 0s, 3 attempts")
    assert gone.failed("refused", 90.0, 90.0) is None  # alternating reasons are each said once a window
    assert (gone.failed("refused", 600.0, 600.0) or "").startswith("refused; unreachable since")
    assert gone.ended(630.0) == " after 10m 30s unreachable (5 failed attempts since 1970-01-01 00:00:00 UTC)"
    assert gone.ended(660.0) == ""
    assert gone.failed("refused", 700.0, 700.0) == "refused"  # a new outage
