"""Agents renew their client certificates before they expire, over mutual TLS, without
cryptography ever entering the daemon."""

from __future__ import annotations

import asyncio
import pathlib
import time

import pytest

from edge_agent import daemon
from edge_agent import tls as agent_tls
from edgeplane_proto import identity
from orchestrator.testing import harness

@pytest.mark.asyncio
async def test_an_agent_renews_its_certificate_twice_and_outlives_the_first(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        # 9 s certificates: renewed about 6 s in, so the agent outlives its first one
        cp = await fleet.start_control_plane(agent_cert_ttl_s=9.0)
        agent = await fleet.start_agent("edge-a", country="FR", lat=48.8, lon=2.3)
        cert_path = agent.data_dir / "agent.crt"
        certs = [cert_path.read_bytes()]
        for renewal in (1, 2):
            await harness.wait_until(lambda: cert_path.read_bytes() != certs[-1], 30, interval=0.1, what=f"renewal {renewal}")
            certs.append(cert_path.read_bytes())
        first_expires = identity.validity(certs[0])[1]
        assert identity.validity(certs[2])[1] > identity.validity(certs[1])[1] > first_expires
        assert {identity.site_of(c) for c in certs} == {"edge-a"}
        # past the first certificate's expiry, the agent is still heard from over mutual TLS
        await harness.wait_until(lambda: time.time() > first_expires + 1, 30, what="first certificate expired")
        before = cp.hub.status("edge-a")
        assert before is not None and before.healthy
        after = await asyncio.wait_for(cp.hub.next_heartbeat("edge-a"), 10)
        assert after.healthy
        maps = pathlib.Path(f"/proc/{agent.pid}/maps").read_text()
        assert "cryptography" not in maps  # keys, CSRs and dates came from a child process
        assert "renewed" in agent.log()
    finally:
        await fleet.stop()


@pytest.mark.asyncio
async def test_an_agent_whose_clock_is_behind_renews_before_its_certificate_expires(tmp_path: pathlib.Path) -> None:
    """An edge machine's clock a while behind the control plane's (no NTP since it was powered
    off): by its own clock the certificate it receives begins later than it does, and two
    thirds into its life by that clock is past its end by the control plane's, which then
    refuses it (the agent must enrol again with a new bootstrap token). The agent's clock is
    its uplink's, injected; TLS itself checks by the machine's (right) clock."""
    fleet = harness.Fleet(tmp_path)
    agent = None
    try:
        # 9 s certificates, renewed about 6 s in: an agent 6 s behind would ask 12 s in, after its expiry
        cp = await fleet.start_control_plane(agent_cert_ttl_s=9.0)
        assert cp.ca_file is not None
        data_dir = tmp_path / "agent"
        agent = daemon.Agent(daemon.AgentConfig(
            control_plane=cp.agent_target, site="edge-a", token=harness.BOOTSTRAP_TOKEN, data_dir=data_dir, listen_port=0,
            heartbeat_interval=0.5, ca_file=cp.ca_file, join_address=cp.agent_join_target, workers=1, country="FR",
            lat=48.8, lon=2.3), clock=lambda: time.time() - 6.0)
        await agent.start()
        cert_path = data_dir / "agent.crt"
        await harness.wait_until(cert_path.exists, 30, what="enrolment")
        first = cert_path.read_bytes()
        # renewed (the control plane signs a renewal only over a certificate still valid) ...
        await harness.wait_until(lambda: cert_path.read_bytes() != first, 30, interval=0.1, what="the renewal")
        renewed = cert_path.read_bytes()
        assert identity.site_of(renewed) == "edge-a"
        # ... and heard from over mutual TLS with the new certificate once the first has expired
        await harness.wait_until(lambda: time.time() > identity.validity(first)[1] + 1, 30, what="first certificate expired")
        after = await asyncio.wait_for(cp.hub.next_heartbeat("edge-a"), 10)
        assert after.healthy
    finally:
        if agent is not None:
            await agent.stop()
        await fleet.stop()


@pytest.mark.parametrize("crash", ["after both .new files", "after the key's rename", "while writing the key"])
def test_a_crash_while_saving_never_leaves_key_and_certificate_mismatched(tmp_path: pathlib.Path, crash: str) -> None:
    from edge_agent import tls

    agent_tls = tls.AgentTls(tmp_path, "127.0.0.1:1")
    agent_tls.save(b"old key", b"old cert", b"")
    key_new, cert_new = tmp_path / "agent.key.new", tmp_path / "agent.crt.new"
    if crash == "after both .new files":
        key_new.write_bytes(b"new key")
        cert_new.write_bytes(b"new cert")
        expected = (b"new key", b"new cert")
    elif crash == "after the key's rename":
        (tmp_path / "agent.key").write_bytes(b"new key")
        cert_new.write_bytes(b"new cert")
        expected = (b"new key", b"new cert")
    else:
        key_new.write_bytes(b"new k")
        expected = (b"old key", b"old cert")
    assert agent_tls.enrolled()  # recovers first
    assert (agent_tls.key_path.read_bytes(), agent_tls.cert_path.read_bytes()) == expected
    assert not key_new.exists() and not cert_new.exists()


@pytest.mark.parametrize("fixed,dialled,expected", [
    (None, "cp-1.example.test:8081", "cp-1.example.test:8082"),
    (None, "10.0.0.7:9001", "10.0.0.7:9002"),
    (None, "[2001:db8::1]:8081", "[2001:db8::1]:8082"),
    ("join.example.test:443", "cp-2.example.test:8081", "join.example.test:443"),
])
def test_the_first_join_goes_beside_the_replica_in_use_unless_fixed(fixed: str | None, dialled: str, expected: str,
                                                                    tmp_path: pathlib.Path) -> None:
    assert agent_tls.AgentTls(tmp_path, fixed).join_target_for(dialled) == expected
