"""Agent identity end to end: bootstrap join over TLS, client certificate, mutual TLS after."""

from __future__ import annotations

import pathlib
import stat

import grpc
import pytest

from edgeplane_proto import identity
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator.agents import service
from orchestrator.testing import harness

pytestmark = pytest.mark.asyncio


def _beats():
    yield pb.Heartbeat()


async def _stream_status(target: str, creds: grpc.ChannelCredentials, site: str) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(target, creds) as channel:
        call = pb_grpc.AgentControlStub(channel).Heartbeats(
            _beats(), metadata=((service.SITE_KEY, site), (service.AGENT_ID_KEY, "x"), (service.CREDENTIAL_KEY, "y")), timeout=5)
        try:
            await call
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_agents_enrol_then_talk_mutual_tls_and_cannot_pose_as_another_site(tmp_path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        assert cp.ca_file is not None and cp.agent_join_target
        agent = await fleet.start_agent("edge-a", country="FR", lat=48.8, lon=2.3)
        cert_path, key_path = agent.data_dir / "agent.crt", agent.data_dir / "agent.key"
        assert identity.site_of(cert_path.read_bytes()) == "edge-a"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        ca = cp.ca_file.read_bytes()

        # No client certificate: the agent port refuses the handshake itself.
        with pytest.raises(grpc.RpcError) as no_cert:
            async with grpc.aio.secure_channel(cp.agent_target, grpc.ssl_channel_credentials(ca)) as ch:
                await pb_grpc.AgentControlStub(ch).Join(pb.JoinRequest(site="edge-a"), timeout=5)
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
        # The join port has no client certificates, so it serves no streams.
        assert await _stream_status(cp.agent_join_target, grpc.ssl_channel_credentials(ca), "edge-a") == grpc.StatusCode.UNAUTHENTICATED
        # edge-a's certificate cannot open streams for edge-b, nor join as edge-b.
        mine = grpc.ssl_channel_credentials(ca, private_key=key_path.read_bytes(), certificate_chain=cert_path.read_bytes())
        assert await _stream_status(cp.agent_target, mine, "edge-b") == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as other:
            async with grpc.aio.secure_channel(cp.agent_target, mine) as ch:
                await pb_grpc.AgentControlStub(ch).Join(pb.JoinRequest(site="edge-b", bootstrap_token=harness.BOOTSTRAP_TOKEN), timeout=5)
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A CA of someone else's: refused in the handshake.
        foreign_dir = tmp_path / "foreign"
        from orchestrator.security import ca as ca_mod

        foreign = ca_mod.CertificateAuthority.load_or_create(foreign_dir)
        fkey, fcsr = identity.new_key_and_csr("edge-a")
        forged = grpc.ssl_channel_credentials(ca, private_key=fkey, certificate_chain=foreign.issue_agent("edge-a", fcsr))
        assert await _stream_status(cp.agent_target, forged, "edge-a") == grpc.StatusCode.UNAVAILABLE

        # The agent's TLS is gRPC's own: Python's ssl module (1.7 MB resident) is never loaded.
        maps = pathlib.Path(f"/proc/{agent.pid}/maps").read_text()
        assert "/_ssl." not in maps and "libssl.so" not in maps

        # Restart: the agent comes back on its certificate, without spending a token.
        agent.stop()
        restarted = await fleet.restart_agent("edge-a")
        await harness.wait_until(lambda: cp.hub.status("edge-a") is not None and cp.hub.status("edge-a").healthy, 20, what="rejoin")
        assert "enrolled" not in restarted.log().split("serving")[-1]
        assert cert_path.read_bytes() == (agent.data_dir / "agent.crt").read_bytes()
    finally:
        await fleet.stop()


async def test_a_bad_csr_is_refused_before_the_join_touches_the_site(tmp_path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        assert cp.ca_file is not None and cp.agent_join_target
        await fleet.start_agent("edge-a", country="FR", lat=48.8, lon=2.3)
        await harness.wait_until(lambda: cp.hub.status("edge-a") is not None and cp.hub.status("edge-a").healthy, 20, what="join")
        before = cp.hub.status("edge-a")
        enrolled = [e for e in cp.store.events(kind="Site", name="edge-a") if e.reason == "agent joined with a bootstrap token"]
        assert enrolled and enrolled[-1].details["agentId"] == before.agent_id  # the audit names the agent
        creds = grpc.ssl_channel_credentials(cp.ca_file.read_bytes())
        for csr in ("not a csr", identity.new_key_and_csr("edge-a")[1].decode().replace("A", "B", 40)):
            with pytest.raises(grpc.RpcError) as refused:
                async with grpc.aio.secure_channel(cp.agent_join_target, creds) as ch:
                    await pb_grpc.AgentControlStub(ch).Join(
                        pb.JoinRequest(site="edge-a", bootstrap_token=harness.BOOTSTRAP_TOKEN, csr_pem=csr), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cannot sign this CSR" in (refused.value.details() or "")
        after = cp.hub.status("edge-a")
        assert after is not None and after.healthy and after.agent_id == before.agent_id
    finally:
        await fleet.stop()


async def test_the_join_port_issues_a_certificate_for_a_valid_bootstrap_token_only(tmp_path) -> None:
    """A site's credential never expires: on the join port (no client certificate) it must not
    mint certificates, or a copy of it would make the certificates' lifetime bound nothing."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        assert cp.ca_file is not None and cp.agent_join_target
        creds = grpc.ssl_channel_credentials(cp.ca_file.read_bytes())

        async def join(token: str, credential: str = "", agent_id: str = "") -> pb.JoinResponse:
            async with grpc.aio.secure_channel(cp.agent_join_target, creds) as ch:
                return await pb_grpc.AgentControlStub(ch).Join(
                    pb.JoinRequest(site="edge-a", bootstrap_token=token, agent_id=agent_id, endpoint_url="http://127.0.0.1:9",
                                   csr_pem=identity.new_key_and_csr("edge-a")[1].decode()),
                    metadata=((service.CREDENTIAL_KEY, credential),) if credential else (), timeout=5)

        enrolled = await join(harness.BOOTSTRAP_TOKEN)
        assert identity.site_of(enrolled.certificate_pem.encode()) == "edge-a" and enrolled.credential
        revoked, info = cp.store.create_token("bootstrap", "agent", 60, "test", "")
        cp.store.revoke_token(info.id, "test")
        for token in ("not-a-token", revoked, ""):
            with pytest.raises(grpc.RpcError) as refused:
                await join(token, enrolled.credential, enrolled.agent_id)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert "only for a valid bootstrap token" in (refused.value.details() or "")
        assert cp.hub.status("edge-a").agent_id == enrolled.agent_id  # the refusals touched nothing
        again = await join(harness.BOOTSTRAP_TOKEN, enrolled.credential, enrolled.agent_id)  # with a valid token: same agent
        assert again.agent_id == enrolled.agent_id and identity.site_of(again.certificate_pem.encode()) == "edge-a"
    finally:
        await fleet.stop()


async def test_an_agent_that_must_enrol_again_with_a_spent_token_says_to_give_a_fresh_one(tmp_path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        await fleet.start_control_plane()
        agent = await fleet.start_agent("edge-a", country="FR", lat=48.8, lon=2.3)
        agent.stop()
        (agent.data_dir / "agent.key").write_bytes(identity.new_key_and_csr("edge-a")[0])  # not the certificate's: enrol again
        cmd = [("spent-token" if arg == harness.BOOTSTRAP_TOKEN else arg) for arg in agent.process.args]  # type: ignore[union-attr]
        fleet.agents["edge-a"] = restarted = await harness.spawn_agent_async(cmd, "edge-a", agent.data_dir)
        await harness.wait_until(lambda: "restart the agent with a fresh bootstrap token" in restarted.log(), 30,
                                 what="the agent to say what it needs")
        line = next(x for x in restarted.log().splitlines() if "fresh bootstrap token" in x)
        assert "cannot enrol: no client certificate for site 'edge-a'" in line and "Traceback" not in restarted.log()
    finally:
        await fleet.stop()


async def test_a_damaged_client_key_is_set_aside_and_the_agent_enrols_again(tmp_path) -> None:
    """Every handshake with a key that is not the certificate's fails: the agent sees it
    before dialling, keeps the pair aside for inspection and enrols again with its token."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        agent = await fleet.start_agent("edge-a", country="FR", lat=48.8, lon=2.3)
        await harness.wait_until(lambda: cp.hub.status("edge-a") is not None and cp.hub.status("edge-a").healthy, 20, what="join")
        agent.stop()
        cert = (agent.data_dir / "agent.crt").read_bytes()
        stranger_key = identity.new_key_and_csr("edge-a")[0]
        (agent.data_dir / "agent.key").write_bytes(stranger_key)
        restarted_at = cp.hub.now()  # the clock the hub stamps its statuses with (monotonic)
        restarted = await fleet.restart_agent("edge-a")
        await harness.wait_until(lambda: (s := cp.hub.status("edge-a")) is not None and s.healthy and s.last_heartbeat > s.joined_at > restarted_at,
                                 20, what="the agent to enrol again and be heard from over mutual TLS")
        assert "is not the certificate's: set aside as agent.key.unreadable, agent.crt.unreadable" in restarted.log()
        assert (agent.data_dir / "agent.key.unreadable").read_bytes() == stranger_key
        assert (agent.data_dir / "agent.crt.unreadable").read_bytes() == cert
        assert identity.site_of((agent.data_dir / "agent.crt").read_bytes()) == "edge-a"
    finally:
        await fleet.stop()



async def test_an_agent_given_another_ca_says_what_to_check(tmp_path) -> None:
    """The commonest mistake of a first install: --ca-file of another control plane (or a
    CA made again). The handshake fails; the agent's log says what to check, and it retries."""
    from orchestrator.security import ca as ca_mod

    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        assert cp.agent_join_target
        ca_mod.CertificateAuthority.load_or_create(tmp_path / "other-ca")
        # at debug level: a failure said once is said again only every 10 minutes at warning level
        cmd = harness.agent_command(cp.agent_target, "edge-a", tmp_path / "agent", tls=(tmp_path / "other-ca" / "ca.crt", cp.agent_join_target),
                                    extra=("--log-level", "debug"))
        agent = await harness.spawn_agent_async(cmd, "edge-a", tmp_path / "agent")
        fleet.agents["edge-a"] = agent
        hint = f"the control plane's certificate is not signed by --ca-file {tmp_path / 'other-ca' / 'ca.crt'}: give --ca-file the ca.crt"
        await harness.wait_until(lambda: agent.log().count(hint) >= 2, 30, what="the handshake's failure, twice, with what to check")
        assert cp.hub.status("edge-a") is None and not (tmp_path / "agent" / "agent.crt").exists()
    finally:
        await fleet.stop()
