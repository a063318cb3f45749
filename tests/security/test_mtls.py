"""The agent CA: certificates it issues, and a real mutual-TLS handshake on loopback
against the agent gRPC listener (the wiring of Join -> certificate -> reconnect is not
done yet; see docs/security.md)."""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib
import shutil
import socket
import ssl
import stat

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgeplane_proto import identity
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator import server_config
from orchestrator.agents import auth, hub, service
from orchestrator.security import ca
from orchestrator.testing import certificates, harness
from tests.foundation import support

TOKEN = "mtls-bootstrap"


def test_ca_is_created_once_with_a_private_key(tmp_path: pathlib.Path) -> None:
    first = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    again = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    assert first.certificate_pem == again.certificate_pem
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600


def test_a_ca_creation_cut_short_is_completed_or_made_again_and_a_whole_one_kept(tmp_path: pathlib.Path) -> None:
    """A kill while the CA is made leaves its files aside, or its key in place and its
    certificate aside: never a key alone, which the next start would refuse."""
    made = tmp_path / "made"
    original = ca.CertificateAuthority.load_or_create(made)
    assert sorted(p.name for p in made.iterdir()) == ["ca.crt", "ca.key"]  # nothing left aside
    between = tmp_path / "between-the-renames"
    between.mkdir()
    (between / "ca.key").write_bytes((made / "ca.key").read_bytes())
    (between / ".ca.crt.new").write_bytes((made / "ca.crt").read_bytes())
    assert ca.CertificateAuthority.load_or_create(between).fingerprint == original.fingerprint
    assert sorted(p.name for p in between.iterdir()) == ["ca.crt", "ca.key"]
    aside = tmp_path / "before-the-renames"
    aside.mkdir()
    (aside / ".ca.key.new").write_bytes((made / "ca.key").read_bytes()[:30])
    again = ca.CertificateAuthority.load_or_create(aside)
    assert again.fingerprint != original.fingerprint
    assert sorted(p.name for p in aside.iterdir()) == ["ca.crt", "ca.key"]
    assert stat.S_IMODE((aside / "ca.key").stat().st_mode) == 0o600


def test_a_damaged_or_half_missing_ca_is_refused_never_replaced(tmp_path: pathlib.Path) -> None:
    """Agents trust the CA certificate they joined with: a new CA made in place of a damaged
    or half-missing one would orphan them all, so loading refuses, naming the file."""
    folder = tmp_path / "ca"
    ca.CertificateAuthority.load_or_create(folder)
    key, cert = (folder / "ca.key").read_bytes(), (folder / "ca.crt").read_bytes()
    (folder / "ca.crt").unlink()
    with pytest.raises(ca.CertificateError, match="holds ca.key but not ca.crt: restore it"):
        ca.CertificateAuthority.load_or_create(folder)
    assert (folder / "ca.key").read_bytes() == key and not (folder / "ca.crt").exists()  # nothing replaced
    (folder / "ca.crt").write_bytes(cert[:40])
    with pytest.raises(ca.CertificateError, match="ca.crt is not a PEM certificate"):
        ca.CertificateAuthority.load_or_create(folder)
    ca.CertificateAuthority.load_or_create(tmp_path / "other")
    (folder / "ca.crt").write_bytes((tmp_path / "other" / "ca.crt").read_bytes())
    with pytest.raises(ca.CertificateError, match="do not belong together"):
        ca.CertificateAuthority.load_or_create(folder)
    (folder / "ca.key").write_text("not a key")
    with pytest.raises(ca.CertificateError, match="ca.key is not an unencrypted PEM private key"):
        ca.CertificateAuthority.load_or_create(folder)
    assert (folder / "ca.key").read_text() == "not a key"


async def test_a_control_plane_whose_ca_folder_was_lost_refuses_to_start_until_told_to_make_a_new_ca(
        tmp_path: pathlib.Path) -> None:
    """The store comes back with its enrolled agents but ``ca/`` does not (a backup of the
    store alone, a new disk): a new CA made silently would orphan every agent. The start is
    refused, naming the folder and the CA the agents trust, until the operator restores the
    folder or asks for a new CA with --new-agent-ca."""
    fleet = harness.Fleet(tmp_path)
    folder = tmp_path / "control-plane" / "ca"
    try:
        trusted = (await fleet.start_control_plane()).ca.fingerprint
        await fleet.stop()
        kept = tmp_path / "ca-backup"
        folder.rename(kept)
        with pytest.raises(server_config.ConfigError) as refused:
            await fleet.start_control_plane()
        assert f"{folder} holds no CA" in str(refused.value) and trusted in str(refused.value)
        assert "--new-agent-ca" in str(refused.value) and not (folder / "ca.key").exists()
        shutil.rmtree(folder)
        kept.rename(folder)  # restored: it starts with the CA its agents trust
        assert (await fleet.start_control_plane()).ca.fingerprint == trusted
        await fleet.stop()
        shutil.rmtree(folder)
        made = (await fleet.start_control_plane(new_agent_ca=True)).ca.fingerprint
        assert made != trusted
        await fleet.stop()
        assert (await fleet.start_control_plane()).ca.fingerprint == made  # the new CA is the one trusted now
    finally:
        await fleet.stop()


def test_agent_identity_comes_from_the_ca_not_the_csr(tmp_path: pathlib.Path) -> None:
    authority = ca.CertificateAuthority.load_or_create(tmp_path)
    _, csr = ca.new_key_and_csr("edge-evil-wants-this")
    cert = authority.issue_agent("edge-lyon", csr)
    assert ca.site_of(cert) == "edge-lyon"
    assert ca.site_of(b"garbage") is None
    with pytest.raises(ca.CertificateError):
        authority.issue_agent("edge-lyon", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")


@pytest.mark.parametrize("make_key", [lambda: ec.generate_private_key(ec.SECP192R1()),
                                      lambda: ec.generate_private_key(ec.SECP256K1()),
                                      lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
                                      lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)],
                         ids=["P-192", "secp256k1", "brainpoolP256r1", "RSA"])
def test_a_csr_whose_key_is_not_p256_is_refused(tmp_path: pathlib.Path, make_key) -> None:
    """Agents' gRPC TLS negotiates P-256 only: a certificate on another curve would fail every
    handshake (and P-192 is weak), so the CA refuses to sign it."""
    authority = ca.CertificateAuthority.load_or_create(tmp_path)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .sign(make_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ca.CertificateError, match=r"agent keys must be EC \(P-256\), not "):
        authority.issue_agent("edge-lyon", csr)


async def test_mutual_tls_handshake_on_the_agent_listener(tmp_path: pathlib.Path) -> None:
    authority = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    server_cert, server_key = authority.issue_server(["127.0.0.1"])
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), heartbeat_interval=1.0)
    server = await service.start_agent_server(
        agent_hub, "127.0.0.1", 0, tls=service.ServerTls(server_cert, server_key, client_ca=authority.certificate_pem))
    target = f"127.0.0.1:{server.port}"
    request = pb.JoinRequest(site="edge-lyon", bootstrap_token=TOKEN, endpoint_url="http://127.0.0.1:9", heartbeat_interval_ms=1000)
    try:
        key, csr = ca.new_key_and_csr("edge-lyon")
        cert = authority.issue_agent("edge-lyon", csr)
        good = grpc.ssl_channel_credentials(authority.certificate_pem, key, cert)
        async with grpc.aio.secure_channel(target, good) as ch:
            grant = await pb_grpc.AgentControlStub(ch).Join(request, timeout=10)
            assert grant.agent_id

        # no client certificate, or one from another CA: the handshake itself fails
        stranger = ca.CertificateAuthority.load_or_create(tmp_path / "other")
        other_key, other_csr = ca.new_key_and_csr("edge-lyon")
        for creds in (grpc.ssl_channel_credentials(authority.certificate_pem),
                      grpc.ssl_channel_credentials(authority.certificate_pem, other_key, stranger.issue_agent("edge-lyon", other_csr))):
            async with grpc.aio.secure_channel(target, creds) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await pb_grpc.AgentControlStub(ch).Join(request, timeout=5)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

        # the agent checks the server too: a server certificate from another CA is refused
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(stranger.certificate_pem, key, cert)) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.AgentControlStub(ch).Join(request, timeout=5)
    finally:
        await server.stop(None)


def _ca_made_earlier(folder: pathlib.Path, days: int, agent_ttl: datetime.timedelta = datetime.timedelta(days=ca.AGENT_DAYS)) -> ca.CertificateAuthority:
    """A CA as one made ``days`` ago would be (it ends ``days`` sooner than a new one)."""
    made = ca.CertificateAuthority.load_or_create(folder)
    subject, earlier = made.certificate.subject, datetime.timedelta(days=days)
    older = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(made.key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(made.certificate.not_valid_before_utc - earlier)
             .not_valid_after(made.certificate.not_valid_after_utc - earlier)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(made.key, hashes.SHA256()))
    return ca.CertificateAuthority(made.key, older, agent_ttl=agent_ttl)


def test_no_certificate_outlives_the_ca_and_none_is_signed_once_it_expired(tmp_path: pathlib.Path) -> None:
    authority = _ca_made_earlier(tmp_path, 400, agent_ttl=datetime.timedelta(days=3650))  # --agent-cert-days 3650
    ca_ends = authority.certificate.not_valid_after_utc
    agent = x509.load_pem_x509_certificate(authority.issue_agent("edge-lyon", ca.new_key_and_csr("edge-lyon")[1]))
    assert agent.not_valid_after_utc == ca_ends
    late = ca_ends - datetime.timedelta(days=100)
    server = x509.load_pem_x509_certificate(authority.issue_server(["127.0.0.1"], late)[0])
    assert server.not_valid_after_utc == ca_ends
    with pytest.raises(ca.CertificateError, match="CA expired"):
        authority.issue_server(["127.0.0.1"], ca_ends)


def test_past_the_cas_end_the_listener_keeps_its_last_certificate_and_says_so_once(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every handshake asks for the listener's certificate: past the CA's end none can be
    issued, and the one it has is served on (nothing the CA signs is trusted any more,
    which is logged once, not for every agent's every handshake)."""
    authority = _ca_made_earlier(tmp_path, 400)
    ca_ends = authority.certificate.not_valid_after_utc
    now = [ca_ends - datetime.timedelta(days=100)]
    certificate = ca.ServerCertificate(authority, ["127.0.0.1"], clock=lambda: now[0])
    last = certificate.current()
    for step in (datetime.timedelta(days=99), datetime.timedelta(hours=23, minutes=59, seconds=59), datetime.timedelta(seconds=1),
                 datetime.timedelta(days=1), datetime.timedelta(days=30)):
        now[0] += step  # up to the CA's last second: it ends with the CA, so no other would last longer
        assert certificate.current() == last
    said = [r for r in caplog.records if r.name == ca.__name__]
    assert len(said) == 1 and said[0].levelname == "ERROR"
    assert f"expired at {ca_ends:%Y-%m-%d %H:%M:%S} UTC" in said[0].getMessage()


async def test_a_join_is_refused_before_it_is_recorded_once_the_ca_expired(tmp_path: pathlib.Path) -> None:
    """No agent certificate can be signed: the agent is told why (the CA's end) as a control
    plane it should try again later, and its site is not joined without a certificate."""
    expired = _ca_made_earlier(tmp_path / "expired", ca.CA_DAYS + 1)
    listener = ca.CertificateAuthority.load_or_create(tmp_path / "listener")  # a listener the agent still trusts
    chain, key = listener.issue_server(["127.0.0.1"])
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), heartbeat_interval=1.0)
    server = await service.start_agent_server(agent_hub, "127.0.0.1", 0, mtls=service.MutualTls(expired, lambda: (chain, key)))
    csr = ca.new_key_and_csr("edge-lyon")[1].decode()
    request = pb.JoinRequest(site="edge-lyon", bootstrap_token=TOKEN, endpoint_url="http://127.0.0.1:9", heartbeat_interval_ms=1000,
                             csr_pem=csr)
    try:
        assert server.join_port is not None
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.join_port}", grpc.ssl_channel_credentials(listener.certificate_pem)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.AgentControlStub(ch).Join(request, timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert f"CA expired at {expired.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC" in (refused.value.details() or "")
        assert agent_hub.status("edge-lyon") is None
    finally:
        await server.stop(None)


async def test_status_shows_when_the_agents_ca_ends_and_warns_in_its_last_month(tmp_path: pathlib.Path) -> None:
    """Past the CA's end no agent joins or renews: ``edgeplane status`` says when that is, and
    within 30 days of it says what it means, in text and in ``-o json``."""
    ends = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(days=10, hours=1)
    authority = certificates.ca_ending(tmp_path / "control-plane" / "ca", ends)
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane()
        shown = await asyncio.to_thread(support.cli, "status", server_url=cp.http_url)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert f"agents' CA (SHA-256 {authority.fingerprint[:16]}...): valid until {ends:%Y-%m-%d %H:%M:%S} UTC" in lines, lines
        assert (f"warning: the agents' CA ends in 10 day(s) ({ends:%Y-%m-%d %H:%M:%S} UTC): from then on no agent can join or renew "
                "its certificate, and agents must join a new CA (docs/security.md)") in lines, lines
        asked = datetime.datetime.now(datetime.timezone.utc).timestamp()
        shown = await asyncio.to_thread(support.cli, "status", "-o", "json", server_url=cp.http_url)
        answered = datetime.datetime.now(datetime.timezone.utc).timestamp()
        assert shown.returncode == 0, shown.stderr
        agent_ca = json.loads(shown.stdout)["controlPlane"]["agentCa"]
        assert agent_ca["sha256"] == authority.fingerprint and agent_ca["notAfter"] == f"{ends:%Y-%m-%dT%H:%M:%SZ}"
        # counted at some moment between the question and the answer, in whole seconds
        assert ends.timestamp() - answered - 1 <= agent_ca["expiresInSeconds"] <= ends.timestamp() - asked + 1
    finally:
        await fleet.stop()


def _served_certificate(port: int, authority: ca.CertificateAuthority) -> x509.Certificate:
    """The certificate a TLS handshake with the listener on ``port`` is given."""
    context = ssl.create_default_context(cadata=authority.certificate_pem.decode())
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_the_agent_listener_renews_its_certificate_before_it_expires(tmp_path: pathlib.Path) -> None:
    """A control plane up for longer than its listener certificate lives still completes the
    agents' handshakes: the certificate is issued again two thirds into its life."""
    authority = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) - datetime.timedelta(days=300)  # both valid now
    now = [started]
    certificate = ca.ServerCertificate(authority, ["127.0.0.1"], clock=lambda: now[0])
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), heartbeat_interval=1.0)
    server = await service.start_agent_server(agent_hub, "127.0.0.1", 0, mtls=service.MutualTls(authority, certificate.current))
    request = pb.JoinRequest(site="edge-lyon", bootstrap_token=TOKEN, endpoint_url="http://127.0.0.1:9", heartbeat_interval_ms=1000)
    try:
        assert server.join_port is not None
        first = await asyncio.to_thread(_served_certificate, server.join_port, authority)
        assert first.not_valid_after_utc - started == datetime.timedelta(days=ca.SERVER_DAYS)
        now[0] = started + datetime.timedelta(days=250)  # past two thirds of its year
        second = await asyncio.to_thread(_served_certificate, server.join_port, authority)
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc - now[0] == datetime.timedelta(days=ca.SERVER_DAYS)
        key, csr = ca.new_key_and_csr("edge-lyon")
        creds = grpc.ssl_channel_credentials(authority.certificate_pem, key, authority.issue_agent("edge-lyon", csr))
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds) as ch:  # the agent port: renewed there too
            assert (await pb_grpc.AgentControlStub(ch).Join(request, timeout=10)).agent_id
    finally:
        await server.stop(None)


@pytest.mark.parametrize("damage", ["cut certificate", "stranger key", "garbage key", "fine"])
def test_the_identity_tool_tells_a_damaged_pair_from_a_good_one(damage: str, tmp_path) -> None:
    authority = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    key, csr = identity.new_key_and_csr("edge-a")
    cert = authority.issue_agent("edge-a", csr)
    if damage == "cut certificate":
        cert = cert[:60]
    elif damage == "stranger key":
        key = identity.new_key_and_csr("edge-a")[0]
    elif damage == "garbage key":
        key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    (tmp_path / "agent.crt").write_bytes(cert)
    (tmp_path / "agent.key").write_bytes(key)
    code = identity.main(["validity", str(tmp_path / "agent.crt"), str(tmp_path / "agent.key")])
    assert code == (0 if damage == "fine" else identity.UNUSABLE)
    assert identity.main(["validity", str(tmp_path / "absent.crt")]) == 1  # unreadable is not damaged: nothing is set aside
