"""How a follower finds and trusts the leader: the relay presents a certificate from the shared
agent CA and says once why it cannot relay past that CA's end, a leader document that cannot
be used is refused with a reason, and a replica whose agent CA is not the leader's says what
to do."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import pathlib
from collections.abc import Callable

import pytest

from orchestrator import server as control_plane
from orchestrator import server_config
from orchestrator.agents import auth, hub, model, relay, relay_leader, service
from orchestrator.security import ca
from orchestrator.testing import certificates

from .conftest import SECRET, SITE, TOKEN, EventLog, Leader
from .relaying import of, until


def replica_relay_tls(replica: control_plane.ControlPlane) -> Callable[[], relay.ClientTls]:
    """What a replica on the shared CA gives its relay client for a certificate. Read from
    the replica's private method: it hands it only to the relay client it builds as it
    starts, which these tests build themselves."""
    return replica._relay_tls


async def test_the_relay_presents_a_certificate_from_the_shared_agent_ca(tmp_path: pathlib.Path) -> None:
    authority = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    server_cert, server_key = authority.issue_server(["127.0.0.1"])
    events = EventLog()
    leader_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), on_change=events, heartbeat_interval=1.0)
    servicer = relay_leader.RelayServicer(leader_hub, lambda: SECRET)
    server = await service.start_agent_server(leader_hub, "127.0.0.1", 0, more=(servicer.handler(),),
                                              tls=service.ServerTls(server_cert, server_key, client_ca=authority.certificate_pem))
    follower_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), heartbeat_interval=1.0)
    follower_hub.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test", 1.0,
                                            model.Capacity(cpu_cores=2)))

    def certificate(by: ca.CertificateAuthority) -> relay.ClientTls:
        key, csr = ca.new_key_and_csr("control-plane-relay")
        return relay.ClientTls(authority.certificate_pem, key, by.issue_agent("control-plane-relay", csr))

    stranger = ca.CertificateAuthority.load_or_create(tmp_path / "other")
    clients = [relay.RelayClient(follower_hub, "cp-f", tls=lambda: certificate(stranger), flush_s=0.05)]
    task = asyncio.create_task(clients[0].run())
    try:
        clients[0].point(relay.Leader("cp-leader", f"127.0.0.1:{server.port}", SECRET, answers_claims=True))
        await until(lambda: clients[0].last_error.startswith("UNAVAILABLE"), "a certificate from another CA refused")
        assert leader_hub.status(SITE) is None
        task.cancel()
        replica = control_plane.ControlPlane(server_config.ServerConfig(data_dir=tmp_path))
        replica.ca = authority  # what a replica started on the shared CA holds; its relay certificate comes from it
        clients.append(relay.RelayClient(follower_hub, "cp-f", tls=replica_relay_tls(replica), flush_s=0.05))
        task = asyncio.create_task(clients[1].run())
        clients[1].point(relay.Leader("cp-leader", f"127.0.0.1:{server.port}", SECRET, answers_claims=True))
        joined = await events.wait_for(of(model.AgentEventKind.JOINED))
        assert joined.status.via == "cp-f" and joined.status.capacity.cpu_cores == 2
        assert leader_hub.reporting() == 0  # joined, no heartbeat yet: the leader does not count it as reporting
    finally:
        task.cancel()
        await server.stop(None)


async def test_past_the_agent_cas_end_a_follower_says_once_why_it_cannot_relay(
    leader: Leader, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A follower that runs on past the agents' CA's notAfter can no longer be given a
    client certificate for the relay stream: each try says why in its relay view (what
    ``edgeplane status`` shows), and its log says it once, not a traceback at every try."""
    expired = certificates.ca_ending(tmp_path / "ca", datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1))
    replica = control_plane.ControlPlane(server_config.ServerConfig(data_dir=tmp_path))
    replica.ca = expired  # what a replica started on the shared CA holds, a day past its end
    tries: list[None] = []

    def relay_tls() -> relay.ClientTls:
        tries.append(None)
        return replica_relay_tls(replica)()

    client = relay.RelayClient(hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN])), "cp-f", tls=relay_tls, flush_s=0.05)
    task = asyncio.create_task(client.run())
    try:
        with caplog.at_level(logging.INFO, logger=relay.__name__):
            client.point(leader.named())
            await until(lambda: len(tries) >= 3, "the relay to try three times")
        ends = f"{expired.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        assert client.view()["lastError"] == (f"no client certificate to relay this replica's agents with: the agents' CA expired at {ends} "
                                              "(its notAfter): no certificate it signs is trusted; agents must join a new CA")
        said = [r for r in caplog.records if r.name == relay.__name__]
        assert [(r.levelname, r.exc_info) for r in said] == [("ERROR", None)], [r.getMessage() for r in said]
        assert f"expired at {ends}" in said[0].getMessage()
        assert not client.connected
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("body", ["not json", "[]", '{"replica": "cp-1", "address": "h:1"}', '{"replica": "cp-1", "address": 7, "secret": "s"}',
                                  '{"replica": "cp-1", "address": "h:1", "secret": "s", "agentCa": 5}',
                                  '{"replica": "cp-1", "address": "h:1", "secret": "s", "answersClaims": "yes"}'])
def test_a_leader_document_that_cannot_be_used_is_refused_with_a_reason(body: str) -> None:
    with pytest.raises(ValueError):
        relay.Leader.from_json(body)
    assert relay.Leader.from_json('{"replica": "cp-1", "address": "h:1", "secret": "s", "fencingToken": 3, "answersClaims": true}'
                                  ) == relay.Leader("cp-1", "h:1", "s", answers_claims=True)
    assert relay.Leader.from_json('{"replica": "cp-1", "address": "h:1", "secret": "s", "agentCa": "ab"}').agent_ca == "ab"
    # a leader of a later release: what this one does not know is ignored
    assert relay.Leader.from_json('{"replica": "cp-1", "address": "h:1", "secret": "s", "addedLater": {"what": [1]}, "answersClaims": true}'
                                  ) == relay.Leader("cp-1", "h:1", "s", answers_claims=True)
    # an earlier release's leader says nothing of claims: it answers none
    assert not relay.Leader.from_json('{"replica": "cp-1", "address": "h:1", "secret": "s"}').answers_claims


def test_a_replica_whose_agent_ca_is_not_the_leader_s_says_what_to_do(tmp_path: pathlib.Path) -> None:
    ours, theirs = (ca.CertificateAuthority.load_or_create(tmp_path / n) for n in ("ours", "theirs"))
    copied = ca.CertificateAuthority.load_or_create(tmp_path / "theirs")  # the same files, loaded again
    leader = relay.Leader("cp-1", "h:1", "s", agent_ca=theirs.fingerprint)
    assert copied.fingerprint == theirs.fingerprint and leader.unlike(copied.fingerprint) is None
    unlike = leader.unlike(ours.fingerprint)
    assert unlike is not None and "copy <data-dir>/ca" in unlike and ours.fingerprint[:16] in unlike and theirs.fingerprint[:16] in unlike
    assert "without TLS" in (leader.unlike(None) or "")
    assert "without TLS" in (relay.Leader("cp-1", "h:1", "s").unlike(ours.fingerprint) or "")
    assert relay.Leader("cp-1", "h:1", "s").unlike(None) is None
