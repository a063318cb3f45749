"""The uplink's reconnect backoff: an outage climbs the ladder, a control plane that answered
starts it over. A real agent against a real control-plane gRPC server on loopback,
restarted on the same address; the step of the ladder each reconnect took is read from the
agent's own log, its jitter held at the top of its range so that the delay logged is the
step itself (the decision, not how long anything took)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Callable

import pytest

from edge_agent.retry import RECONNECT
from orchestrator.agents import model

from .conftest import SITE, ControlPlane, MakeAgent, start_control_plane

RESTARTS = 4
HEARTBEAT_S = 0.2  # the interval the test control plane gives agents
DELAY = re.compile(r"reconnecting to \S+ in ([0-9.]+)s")


class _Top:
    """The top of the jitter range: each reconnect waits its ladder step exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def delays_after_joins(records: list[logging.LogRecord]) -> list[float]:
    """The delay of each reconnect that follows a join (a session the control plane answered)."""
    delays, joined = [], False
    for record in records:
        message = record.getMessage()
        if message.startswith("joined control plane"):
            joined = True
        elif (found := DELAY.fullmatch(message)) and joined:
            delays.append(float(found.group(1)))
            joined = False
    return delays


async def answered(cp: ControlPlane) -> None:
    """Until the agent's first heartbeat since its join: it has the join's answer. (The hub
    records a join before its answer is sent; a control plane stopped at that moment leaves
    the agent with no answered session to count.)"""
    status = cp.hub.status(SITE)
    if status is None or status.last_heartbeat <= status.joined_at:
        await asyncio.wait_for(cp.hub.next_heartbeat(SITE), 30)


async def restart_after_each_join(make_agent: MakeAgent, caplog: pytest.LogCaptureFixture, connected_s: float,
                                  restarts: int = RESTARTS, heartbeat_s: float = HEARTBEAT_S,
                                  clock: Callable[[], float] = time.time) -> list[float]:
    """Restart the control plane ``restarts`` times, each ``connected_s`` after the agent
    (its wall clock ``clock``) joined it; the ladder step of each reconnect that followed
    those joins, one a restart."""
    caplog.set_level(logging.INFO, logger="edge_agent.uplink")
    cp = await start_control_plane(heartbeat_interval=heartbeat_s)
    port = cp.server.port
    await make_agent(cp, clock=clock, reconnect_rng=_Top())
    try:
        for _ in range(restarts):
            await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED and e.site == SITE)
            await answered(cp)
            await asyncio.sleep(connected_s)  # the rule is about how long the session lasted
            await cp.server.stop(grace=None)
            cp = await start_control_plane(port, heartbeat_interval=heartbeat_s)
        await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED and e.site == SITE)
        # Read before the last stop: the session it ends is cut as it is answered, whose
        # reconnect steps up the ladder as it should (a crash loop), and is logged before
        # this reads the log or after, as fast as the loop gets to it.
        records = list(caplog.records)
    finally:
        await cp.server.stop(grace=None)
    steps = delays_after_joins(records)
    assert len(steps) == restarts, caplog.text
    return steps


async def test_restarts_that_each_come_back_do_not_climb_the_backoff(make_agent: MakeAgent, caplog: pytest.LogCaptureFixture) -> None:
    # Each session lasts a heartbeat or two (0.2 s here): far shorter than the four the ladder used to need.
    steps = await restart_after_each_join(make_agent, caplog, connected_s=2 * HEARTBEAT_S)
    assert steps == [RECONNECT.initial] * RESTARTS, steps  # the first step of the ladder each time


async def test_a_wall_clock_stepped_back_during_sessions_does_not_climb_the_backoff(
        make_agent: MakeAgent, caplog: pytest.LogCaptureFixture) -> None:
    """An edge machine's wall clock stepped back (NTP correcting one that ran ahead, a virtual
    machine resumed): a session that lasted heartbeats looked as if it had lasted less than
    none, as a crash loop's do, and each reconnect waited a step higher up the ladder."""
    steps = itertools.count()
    ladder = await restart_after_each_join(make_agent, caplog, connected_s=2 * HEARTBEAT_S,
                                           clock=lambda: time.time() - 3600.0 * next(steps))  # an hour back at each read
    assert ladder == [RECONNECT.initial] * RESTARTS, ladder


async def test_a_control_plane_that_drops_every_session_at_once_is_backed_off_from(
        make_agent: MakeAgent, caplog: pytest.LogCaptureFixture) -> None:
    """A crash loop right after each join: were every answered join to start the ladder over,
    a fleet would rejoin it twice a second per agent."""
    # a step up the ladder at each restart (more where the agent tried before the control plane
    # was back); a long heartbeat interval keeps each session shorter than one however slow the machine is
    steps = await restart_after_each_join(make_agent, caplog, connected_s=0.0, restarts=3, heartbeat_s=3.0)
    assert steps[0] >= RECONNECT.initial and all(later > earlier for earlier, later in zip(steps, steps[1:])), steps
