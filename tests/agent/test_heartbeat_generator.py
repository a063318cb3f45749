"""The C++ load generator behind ``bench.agent_heartbeats --generator native``: its simulated
agents join a real hub over loopback gRPC and beat at their interval, and a failure reaches
the benchmark as an error in its report, not as silence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from bench import native
from orchestrator.agents import auth, hub, service

TOKEN = "generator-token"


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    try:
        native.hbgen()
    except native.BuildError as exc:  # tests/install-system-packages installs what it needs
        pytest.skip(f"the native heartbeat generator cannot be built here: {exc}")


@pytest.fixture
async def target() -> AsyncIterator[tuple[hub.AgentHub, str]]:
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), heartbeat_interval=0.2)
    server = await service.start_agent_server(agent_hub, "127.0.0.1", 0)
    yield agent_hub, f"127.0.0.1:{server.port}"
    await server.stop(grace=None)


def start(target: str, agents: int, token: str = TOKEN) -> native.Hbgen:
    return native.Hbgen(target, agents, interval=0.2, token=token, first_site=7, max_seconds=120)


async def test_simulated_agents_join_and_beat_at_their_interval(target: tuple[hub.AgentHub, str]) -> None:
    """The beats are counted against the generator's own schedule, not as a rate over a window
    that a loaded machine slows: the agents keep beating (the hub hears 600 beats, 15 an agent's
    share, in however long that takes, within a minute), and never faster than their interval (the hub
    hears no more than 40 agents at 0.2 s offer in the time the generator ran, which it cannot
    get ahead of however it is delayed). A generator that stalls, or stops pacing, fails."""
    agent_hub, address = target
    began = time.monotonic()
    generator = start(address, 40)
    try:
        deadline = time.monotonic() + 30
        while agent_hub.reporting() < 40 and time.monotonic() < deadline and generator.running():
            await asyncio.sleep(0.05)
        assert agent_hub.reporting() == 40
        deadline = time.monotonic() + 60
        while agent_hub.heartbeats_total < 40 * 15 and time.monotonic() < deadline and generator.running():
            await asyncio.sleep(0.05)
        heard = agent_hub.heartbeats_total
    finally:
        report = await generator.stop()
    ran_s = time.monotonic() - began
    assert generator.process.returncode == 0 and report["error"] == ""
    assert heard >= 40 * 15, f"the agents stopped beating: {heard} beats heard in a minute, 600 due in 3 s"
    offered = 40 / 0.2 * ran_s + 40  # beats a paced generator can have sent while it ran, and a turn's more
    assert agent_hub.heartbeats_total <= offered, f"{agent_hub.heartbeats_total} beats heard in {ran_s:.1f} s, " \
        f"past the {offered:.0f} that 40 agents at 0.2 s offer"
    assert report["sent"] >= agent_hub.heartbeats_total - 1
    statuses = {status.site: status for status in agent_hub.snapshot()}
    assert sorted(statuses) == sorted(f"site-{7 + i}" for i in range(40))
    assert all(status.healthy for status in statuses.values())


async def test_a_refused_join_ends_the_run_with_the_reason(target: tuple[hub.AgentHub, str]) -> None:
    agent_hub, address = target
    generator = start(address, 3, token="not-the-token")
    await asyncio.to_thread(generator.process.wait, 30)  # it stops on its own
    report = await generator.stop()
    assert generator.process.returncode == 2
    assert report["error"].startswith("join of site-") and "failed: 16" in report["error"]  # UNAUTHENTICATED
    assert report["sent"] == 0 and agent_hub.reporting() == 0
