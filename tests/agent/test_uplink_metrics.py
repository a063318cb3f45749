"""What an edge site's own monitoring reads of the agent's link to the control plane while
the uplink is down: whether it is connected now and when it last was, on the agent's
/metrics, so that a site cut off for days alerts there (the agent itself serves on and its
readiness stays 200). A real agent against a real control-plane gRPC server on loopback,
stopped and started again on the same address."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.agents import model

from .conftest import SITE, MakeAgent, start_control_plane

CONNECTED = "edgeplane_agent_control_plane_connected"
LAST_CONTACT = "edgeplane_agent_control_plane_last_contact_timestamp_seconds"


async def scrape(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url) as client:
        text = (await client.get("/metrics")).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


async def until(url: str, predicate, what: str, timeout: float = 30.0) -> dict[str, float]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate(samples := await scrape(url)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}: {samples}")
        await asyncio.sleep(0.05)
    return samples


async def test_the_metrics_say_whether_the_control_plane_is_reached_and_when_it_last_was(
        make_agent: MakeAgent, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.uplink")  # each attempt, said once in the log's own lines
    cp = await start_control_plane()
    port = cp.server.port
    started = time.time()
    agent = await make_agent(cp)
    try:
        await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED and e.site == SITE)
        up = await until(agent.endpoint_url, lambda s: s.get(CONNECTED) == 1, "connected")
        assert started <= up[LAST_CONTACT] <= time.time()
        # the uplink goes down: not connected, and the last contact stays where it was while
        # the agent tries again and again
        await cp.server.stop(grace=None)
        cut = time.time()
        down = await until(agent.endpoint_url, lambda s: s.get(CONNECTED) == 0, "disconnected")
        assert up[LAST_CONTACT] <= down[LAST_CONTACT] <= cut
        tries = sum("control plane unavailable" in r.getMessage() for r in caplog.records)
        deadline = time.monotonic() + 30
        while sum("control plane unavailable" in r.getMessage() for r in caplog.records) < tries + 2:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.05)
        later = await scrape(agent.endpoint_url)
        assert later[CONNECTED] == 0 and later[LAST_CONTACT] == down[LAST_CONTACT]
        # the link comes back: connected again, the last contact now
        back = time.time()
        cp = await start_control_plane(port)
        again = await until(agent.endpoint_url, lambda s: s.get(CONNECTED) == 1, "connected again")
        assert again[LAST_CONTACT] >= back
    finally:
        await cp.server.stop(grace=None)
