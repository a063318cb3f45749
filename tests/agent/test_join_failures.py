"""A flood of joins that fail to authenticate (made-up bootstrap tokens, a certificate for
another site) is slowed per peer before it takes a place at the join gate or costs a store
lookup, while agents elsewhere join as before. Real gRPC on loopback, a real SQLite store
(its token lookups counted), the failure budget's clock handed to its limiter."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from edgeplane_proto import reconnect
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator.agents import admission, auth, hub, service
from orchestrator.security import ca, ratelimit
from orchestrator.store import sqlite as store_mod
from tests import token_lookups

BURST = 3
RATE = 0.01  # one failure earned every 100 s: none while the test runs, unless its clock is moved


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Guarded:
    store: store_mod.Store
    failures: admission.FailedJoins
    gate: admission.JoinGate
    clock: Clock
    port: int
    token: str


@pytest.fixture
async def guarded(tmp_path: pathlib.Path) -> AsyncIterator[Guarded]:
    """A control plane's agent service on its store, listening on every loopback address
    (127.0.0.1 and ::1 are two peers), allowing BURST failed joins per peer."""
    store = store_mod.Store(tmp_path / "state.db")
    token, _ = store.create_token("bootstrap", "agent", 3600, "admin")
    clock = Clock()
    failures = admission.FailedJoins(ratelimit.RateLimiter(ratelimit.RateLimit(RATE, BURST), clock=clock))
    gate = admission.JoinGate()
    agent_hub = hub.AgentHub(auth.StoreJoinAuthenticator(store), heartbeat_interval=1.0)
    server = await service.start_agent_server(agent_hub, "::", 0, joins=gate, failures=failures)
    try:
        yield Guarded(store, failures, gate, clock, server.port, token)
    finally:
        await server.stop(grace=None)
        store.close()


def join_request(site: str, token: str) -> pb.JoinRequest:
    return pb.JoinRequest(site=site, bootstrap_token=token, endpoint_url="http://127.0.0.1:9", agent_version="test",
                          capacity=pb.Capacity(cpu_cores=1, memory_total_bytes=1 << 30))


async def join(target: str, site: str, token: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await pb_grpc.AgentControlStub(channel).Join(join_request(site, token), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_an_address_failing_joins_is_refused_before_a_lookup_while_others_join(
        guarded: Guarded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each made-up token took a place at the join gate and a store lookup, as many as were
    sent, and was refused UNAUTHENTICATED every time: never slowed."""
    flooder, elsewhere = f"127.0.0.1:{guarded.port}", f"[::1]:{guarded.port}"
    # agents behind the flooder's address (a NAT) that join well spend none of its failures
    assert [await join(flooder, f"edge-nat-{i}", guarded.token) for i in range(BURST + 2)] == [grpc.StatusCode.OK] * (BURST + 2)

    looked_up = token_lookups.counted(monkeypatch, guarded.store)
    codes = [await join(flooder, "edge-x", f"ep_guess{i}") for i in range(12)]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * BURST + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 9, codes
    assert looked_up == [f"ep_guess{i}" for i in range(BURST)]  # the refused cost no lookup
    assert guarded.failures.refused_total == 9 and guarded.gate.in_progress == 0

    async with grpc.aio.insecure_channel(flooder) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.AgentControlStub(channel).Join(join_request("edge-x", "ep_more"), timeout=10)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "failed to authenticate" in (refused.value.details() or "") and "--join-failure-rate" in (refused.value.details() or "")
    pushback_ms = int(dict(refused.value.trailing_metadata() or ())[reconnect.PUSHBACK_KEY])
    assert admission.MIN_RETRY_S * 1000 <= pushback_ms <= reconnect.PUSHBACK_MAX_S * 1000

    # an agent at another address joins as before, and its lookup is its own
    assert await join(elsewhere, "edge-elsewhere", guarded.token) is grpc.StatusCode.OK
    # a good agent behind the flooder's address waits with it; once the address earned a
    # failure back it joins, spending none: the next comes in too
    assert await join(flooder, "edge-nat-late", guarded.token) is grpc.StatusCode.RESOURCE_EXHAUSTED
    guarded.clock.now += 1 / RATE
    assert await join(flooder, "edge-nat-late", guarded.token) is grpc.StatusCode.OK
    assert await join(flooder, "edge-nat-later", guarded.token) is grpc.StatusCode.OK
    assert looked_up == [f"ep_guess{i}" for i in range(BURST)] + [guarded.token] * 3


async def test_joins_with_a_client_certificate_spend_their_sites_failures_not_their_addresss(tmp_path: pathlib.Path) -> None:
    """A certificate holder's failed joins (one asking for another site than its certificate
    names) are counted by its certificate's site: another enrolled agent at the same address
    rejoins, however many the first failed."""
    authority = ca.CertificateAuthority.load_or_create(tmp_path / "ca")
    server_cert, server_key = authority.issue_server(["127.0.0.1"])
    failures = admission.FailedJoins(ratelimit.RateLimiter(ratelimit.RateLimit(RATE, BURST), clock=Clock()))
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator(["t"]), heartbeat_interval=1.0)
    server = await service.start_agent_server(
        agent_hub, "127.0.0.1", 0, tls=service.ServerTls(server_cert, server_key, client_ca=authority.certificate_pem),
        failures=failures)

    def holder(site: str) -> grpc.ChannelCredentials:
        key, csr = ca.new_key_and_csr(site)
        return grpc.ssl_channel_credentials(authority.certificate_pem, key, authority.issue_agent(site, csr))

    async def join_as(creds: grpc.ChannelCredentials, site: str) -> grpc.StatusCode:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds) as channel:
            try:
                await pb_grpc.AgentControlStub(channel).Join(join_request(site, "t"), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    try:
        stray = holder("edge-a")
        codes = [await join_as(stray, "edge-b") for _ in range(BURST + 2)]
        assert codes == [grpc.StatusCode.PERMISSION_DENIED] * BURST + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, codes
        assert await join_as(holder("edge-c"), "edge-c") is grpc.StatusCode.OK
    finally:
        await server.stop(None)


@pytest.mark.parametrize(("peer", "site", "key"), [
    ("ipv4:10.0.0.7:51234", None, "addr:10.0.0.7"),
    ("ipv6:[2001:db8::1]:443", None, "addr:2001:db8::1"),
    ("ipv6:[::ffff:127.0.0.1]:9", None, "addr:::ffff:127.0.0.1"),
    ("unix:/run/edgeplane.sock", None, "addr:unix:/run/edgeplane.sock"),
    ("ipv4:10.0.0.7:51234", "edge-a", "site:edge-a"),
])
def test_whose_failures_a_join_spends(peer: str, site: str | None, key: str) -> None:
    assert admission.peer_key(peer, site) == key


@pytest.mark.parametrize(("rate", "burst", "problem"), [
    (0.2, 20.0, None), (0.0, 0.0, None),
    (-1.0, 0.0, "must be >= 0"), (1e-9, 0.0, "--join-failure-rate 1e-09 is too slow"),
    (1.0, 0.5, "--join-failure-burst 0.5 is less than one failed join"),
])
def test_a_failure_limit_that_cannot_work_is_named(rate: float, burst: float, problem: str | None) -> None:
    wrong = admission.failure_limit_problem(rate, burst)
    assert wrong is None if problem is None else problem in (wrong or "")
