"""An agent whose client certificate ran out while its uplink was down (longer than the
third of the certificate's life left after its renewal was due) comes back when the link
does: with a bootstrap token that still enrols it enrols again by itself; with one the join
port refuses it says, once, that it needs a fresh token, and it keeps serving meanwhile.
A real control plane under mutual TLS with short-lived certificates; the uplink cut by a
proxy that answers nothing (a partition), then healed."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time

import httpx
import pytest

from edge_agent import daemon
from edgeplane_proto import identity
from orchestrator.testing import harness
from tests.chaos.proxy import ChaosProxy

TTL_S = 9.0  # the agents' certificate life: renewed about 6 s in (time enough on a loaded machine to be heard from first)


async def cut_until_expired(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, *, revoke: bool
                            ) -> tuple[harness.Fleet, ChaosProxy, daemon.Agent, bytes]:
    """An agent enrolled over mutual TLS, its uplink then cut until its certificate expired
    (and, with ``revoke``, its bootstrap token revoked meanwhile, as a one-hour token from
    'edgeplane token create' has expired after a week), then healed: (fleet, proxy, agent,
    the expired certificate)."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane(agent_cert_ttl_s=TTL_S)
    assert cp.ca_file is not None
    host, _, port = cp.agent_target.rpartition(":")
    proxy = await ChaosProxy(host, int(port)).start()
    token, info = cp.store.create_token("bootstrap", "agent", None, "test", "edge-a install")
    agent = daemon.Agent(daemon.AgentConfig(
        control_plane=proxy.address, site="edge-a", token=token, data_dir=tmp_path / "agent",
        listen_port=0, heartbeat_interval=0.5, ca_file=cp.ca_file, join_address=cp.agent_join_target, workers=1,
        country="FR", lat=48.8, lon=2.3))
    await agent.start()
    cert_path = tmp_path / "agent" / "agent.crt"
    await harness.wait_until(cert_path.exists, 30, what="enrolment")
    await asyncio.wait_for(cp.hub.next_heartbeat("edge-a"), 10)
    proxy.blackhole()  # the uplink goes down; the join port (another link here) stays reachable
    proxy.cut()
    expired = cert_path.read_bytes()
    await harness.wait_until(lambda: time.time() > identity.validity(expired)[1] + 1, 30, what="the certificate expired")
    if revoke:
        cp.store.revoke_token(info.id, "test")
    proxy.heal()
    return fleet, proxy, agent, expired


@pytest.mark.asyncio
async def test_an_agent_whose_certificate_expired_offline_enrols_again_with_its_token(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    fleet, proxy, agent, expired = await cut_until_expired(tmp_path, caplog, revoke=False)
    try:
        cp = fleet.cp
        assert cp is not None
        cert_path = tmp_path / "agent" / "agent.crt"
        # back within the reconnect cap and a join, with a new certificate for the same site
        await harness.wait_until(lambda: cert_path.read_bytes() != expired, 45, what="a new certificate")
        renewed = cert_path.read_bytes()
        assert identity.site_of(renewed) == "edge-a"
        assert identity.validity(renewed)[1] > time.time()
        after = await asyncio.wait_for(cp.hub.next_heartbeat("edge-a"), 30)
        assert after.healthy
        # the site's monitoring reads the new certificate's end on the agent's /metrics
        assert agent.uplink is not None
        await harness.wait_until(lambda: agent.uplink.contact()[2] == identity.validity(renewed)[1], 10,
                                 what="the new certificate's expiry read")
        async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
            text = (await client.get("/metrics")).text
        assert f"edgeplane_agent_client_certificate_expiry_timestamp_seconds {float(identity.validity(renewed)[1])!r}" in text
        said = [r.getMessage() for r in caplog.records if "expired at" in r.getMessage()]
        assert said and "enrolling again with the bootstrap token" in said[0], said
    finally:
        await agent.stop()
        await proxy.stop()
        await fleet.stop()


@pytest.mark.asyncio
async def test_an_agent_whose_certificate_expired_offline_says_once_that_its_token_no_longer_enrols(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    fleet, proxy, agent, expired = await cut_until_expired(tmp_path, caplog, revoke=True)
    try:
        await harness.wait_until(lambda: any("cannot enrol" in r.getMessage() for r in caplog.records), 45,
                                 what="the refused enrolment")
        refused = [r.getMessage() for r in caplog.records if "cannot enrol" in r.getMessage()]
        assert "fresh bootstrap token" in refused[0], refused
        # the refused token is not spent again on every reconnect (each refusal counts against
        # the address's join failures, which agents behind the same NAT share)...
        caplog.set_level(logging.DEBUG, logger="edge_agent.renewal")  # a later attempt's line, not said again for 10 minutes
        await harness.wait_until(lambda: sum("must enrol again" in r.getMessage() for r in caplog.records) >= 2, 45,
                                 what="a later attempt")
        assert sum("cannot enrol" in r.getMessage() for r in caplog.records) == 1
        assert sum("must enrol again" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING) == 1
        # ... and the saved certificate is kept, never set aside
        assert (tmp_path / "agent" / "agent.crt").read_bytes() == expired
        assert agent.server.ready
    finally:
        await agent.stop()
        await proxy.stop()
        await fleet.stop()
