"""gRPC fuzzing of the agent service: random bytes as serialized requests to each RPC
(over a raw channel, no serializer) and random identity metadata. Every call ends with a
deliberate status code, the server keeps serving, and the real agent's state is intact."""

from __future__ import annotations

import sqlite3

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeplane_proto import identity
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import service
from orchestrator.testing import harness

from .conftest import FUZZ, TRIED, FleetThread

PREFIX = f"/{service.SERVICE_NAME}/"
CLEAN = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
}
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
metadata = st.lists(st.tuples(st.sampled_from([service.SITE_KEY, service.AGENT_ID_KEY, service.CREDENTIAL_KEY]), header_text), max_size=3)
payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda m, cut: m.SerializeToString()[:cut], st.builds(
        pb.JoinRequest, site=header_text, bootstrap_token=header_text, endpoint_url=header_text, agent_id=header_text,
        heartbeat_interval_ms=st.integers(0, 2**32 - 1)), st.integers(0, 400)),
)


@pytest.fixture(scope="module")
def channel(fuzz_fleet: FleetThread):
    """Mutual TLS with a real client certificate for site edge-hb, so the fuzz reaches the
    parsing and hub code behind authentication (the handshake itself is tests/security's)."""
    cp = fuzz_fleet.fleet.cp
    assert cp is not None and cp.ca_file is not None
    key, csr = identity.new_key_and_csr("edge-hb")
    creds = grpc.ssl_channel_credentials(cp.ca_file.read_bytes(), private_key=key, certificate_chain=cp.ca.issue_agent("edge-hb", csr))
    with grpc.secure_channel(cp.agent_target, creds) as ch:
        yield ch


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _intact(fuzz_fleet: FleetThread, agent_id: str) -> None:
    cp = fuzz_fleet.fleet.cp
    assert cp is not None
    status = cp.hub.status("edge-fuzz")
    assert status is not None and status.healthy and status.agent_id == agent_id
    assert fuzz_fleet.fleet.agents["edge-fuzz"].process.poll() is None
    db = sqlite3.connect(cp.store.path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def test_random_requests_to_every_rpc(fuzz_fleet: FleetThread, channel: grpc.Channel) -> None:
    cp = fuzz_fleet.fleet.cp
    assert cp is not None
    agent_id = cp.hub.status("edge-fuzz").agent_id  # type: ignore[union-attr]
    join = channel.unary_unary(PREFIX + "Join", request_serializer=None, response_deserializer=None)
    beats = channel.stream_unary(PREFIX + "Heartbeats", request_serializer=None, response_deserializer=None)
    watch = channel.unary_stream(PREFIX + "WatchAssignments", request_serializer=None, response_deserializer=None)
    codes: dict[str, int] = {}

    @FUZZ
    @given(st.sampled_from(["Join", "Heartbeats", "WatchAssignments"]), payloads, st.lists(st.binary(max_size=100), max_size=4), metadata)
    def fuzz(rpc: str, raw: bytes, stream: list[bytes], meta: list[tuple[str, str]]) -> None:
        TRIED[f"gRPC {rpc}"] += 1
        if rpc == "Join":
            code = _code(lambda: join(raw, metadata=meta, timeout=5))
        elif rpc == "Heartbeats":
            code = _code(lambda: beats(iter(stream), metadata=meta, timeout=5))
        else:
            code = _code(lambda: list(watch(raw, metadata=meta, timeout=5)))
        codes[code.name] = codes.get(code.name, 0) + 1
        assert code in CLEAN, f"{rpc} answered {code}"

    fuzz()
    print(f"gRPC status codes: {sorted(codes.items())}")
    _intact(fuzz_fleet, agent_id)


def test_random_heartbeats_from_a_joined_agent(fuzz_fleet: FleetThread, channel: grpc.Channel) -> None:
    """With a genuine identity the payload is trusted less than nothing: garbage and wild
    values are refused or absorbed, and other sites are unaffected."""
    cp = fuzz_fleet.fleet.cp
    assert cp is not None
    agent_id = cp.hub.status("edge-fuzz").agent_id  # type: ignore[union-attr]
    join = channel.unary_unary(PREFIX + "Join", request_serializer=pb.JoinRequest.SerializeToString,
                               response_deserializer=pb.JoinResponse.FromString)
    grant = join(pb.JoinRequest(site="edge-hb", bootstrap_token=harness.BOOTSTRAP_TOKEN, endpoint_url="http://127.0.0.1:9",
                                heartbeat_interval_ms=60_000), timeout=5)
    meta = ((service.SITE_KEY, "edge-hb"), (service.AGENT_ID_KEY, grant.agent_id), (service.CREDENTIAL_KEY, grant.credential))
    beats = channel.stream_unary(PREFIX + "Heartbeats", request_serializer=None, response_deserializer=None)
    beat_fields = st.builds(
        pb.Heartbeat, seq=st.integers(0, 2**63 - 1), sent_unix_ms=st.integers(0, 2**64 - 1), inflight=st.integers(0, 2**31 - 1),
        cpu_percent=st.floats(width=32), memory_available_bytes=st.integers(0, 2**63 - 1), assignment_version=st.integers(0, 2**63 - 1),
        draining=st.booleans(),
    )

    @FUZZ
    @given(st.lists(st.one_of(st.binary(max_size=120), beat_fields.map(lambda b: b.SerializeToString())), min_size=1, max_size=5))
    def fuzz(stream: list[bytes]) -> None:
        TRIED["gRPC Heartbeats (joined)"] += 1
        code = _code(lambda: beats(iter(stream), metadata=meta, timeout=5))
        assert code in CLEAN | {grpc.StatusCode.OK}, code

    fuzz()
    _intact(fuzz_fleet, agent_id)
