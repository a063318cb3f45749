"""The control plane's gRPC face against raw clients: authentication, the site identity
rule, and hostile input (garbage bytes, oversized messages) on a real loopback server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from edge_agent import uplink
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator.agents import model, service

from .conftest import TOKEN, ControlPlane

JOIN = "/edgeplane.agent.v1.AgentControl/Join"


@pytest.fixture
async def channel(control_plane: ControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(control_plane.target) as ch:
        yield ch


def join_request(site: str = "edge-1", token: str = TOKEN, **fields: object) -> pb.JoinRequest:
    return pb.JoinRequest(
        site=site,
        bootstrap_token=token,
        endpoint_url="http://127.0.0.1:9999",
        heartbeat_interval_ms=100,
        capacity=pb.Capacity(cpu_cores=2, memory_total_bytes=1 << 30),
        **fields,  # type: ignore[arg-type]
    )


def identity(site: str, response: pb.JoinResponse) -> tuple[tuple[str, str], ...]:
    return (
        (service.SITE_KEY, site),
        (service.AGENT_ID_KEY, response.agent_id),
        (service.CREDENTIAL_KEY, response.credential),
    )


async def test_join_with_good_and_wrong_token(channel: grpc.aio.Channel, control_plane: ControlPlane) -> None:
    stub = pb_grpc.AgentControlStub(channel)
    response = await stub.Join(join_request())
    assert response.agent_id.startswith("agt-") and len(response.credential) >= 32
    assert response.heartbeat_interval_ms == 100 and response.missed_heartbeats_allowed == 3
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Join(join_request("edge-2", token="guess"))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert [s.site for s in control_plane.hub.snapshot()] == ["edge-1"]


async def test_duplicate_site_refused_until_holder_is_lost(
    channel: grpc.aio.Channel, control_plane: ControlPlane
) -> None:
    stub = pb_grpc.AgentControlStub(channel)
    first = await stub.Join(join_request())
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await stub.Join(join_request())
    assert taken.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert "held by live agent " + first.agent_id in (taken.value.details() or "")
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.LOST, timeout=5)
    second = await stub.Join(join_request())
    assert second.agent_id != first.agent_id


async def test_heartbeat_stream_needs_the_joined_identity(
    channel: grpc.aio.Channel, control_plane: ControlPlane
) -> None:
    stub = pb_grpc.AgentControlStub(channel)
    joined = await stub.Join(join_request())
    bad_credential = (("x-edgeplane-site", "edge-1"), ("x-edgeplane-agent-id", joined.agent_id),
                      ("x-edgeplane-credential", "forged"))
    for metadata, code in [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (bad_credential, grpc.StatusCode.UNAUTHENTICATED),
        (identity("edge-1", pb.JoinResponse(agent_id="agt-other", credential=joined.credential)),
         grpc.StatusCode.FAILED_PRECONDITION),
    ]:
        # The identity is checked before the first message is read: the call is refused
        # without writing (a write racing the refusal fails on the client with INTERNAL).
        call = stub.Heartbeats(metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call, 30)  # an accepted call would wait for heartbeats: TimeoutError
        assert refused.value.code() is code

    call = stub.Heartbeats(metadata=identity("edge-1", joined))
    for seq in range(5):
        await call.write(pb.Heartbeat(seq=seq, inflight=seq, cpu_percent=12.5))
    await call.done_writing()
    assert (await call).received == 5
    status = control_plane.hub.status("edge-1")
    assert status is not None and status.inflight == 4 and status.cpu_percent == 12.5


async def test_assignments_stream_sends_latest_set(
    channel: grpc.aio.Channel, control_plane: ControlPlane
) -> None:
    stub = pb_grpc.AgentControlStub(channel)
    joined = await stub.Join(join_request())
    a = model.Assignment("m", "dep", "small", "http://x/m.onnx", "b" * 64)
    for version in (1, 2, 3):
        control_plane.hub.set_assignments("edge-1", [a] * version, version)
    watch = stub.WatchAssignments(pb.WatchAssignmentsRequest(), metadata=identity("edge-1", joined))
    first = await asyncio.wait_for(watch.read(), 5)
    assert first.version == 3 and len(first.assignments) == 3
    assert first.assignments[0].desired_state == pb.DESIRED_STATE_SERVING
    control_plane.hub.set_assignments("edge-1", [], 4)
    assert (await asyncio.wait_for(watch.read(), 5)).version == 4
    # A takeover ends the old agent's stream with a clear status.
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.LOST, timeout=5)
    await stub.Join(join_request())
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(watch.read(), 5)
    assert ended.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_a_watch_opened_with_the_version_the_agent_applied_still_gets_the_current_set(
    channel: grpc.aio.Channel, control_plane: ControlPlane
) -> None:
    """A control plane restored from an older backup numbers its next set with a version the
    agent already applied (a set the restore lost): the agent's reopened watch names that
    version, and must be sent the restored control plane's set all the same."""
    stub = pb_grpc.AgentControlStub(channel)
    joined = await stub.Join(join_request())
    kept = model.Assignment("kept", "dep", "small", "http://x/m.onnx", "b" * 64)
    control_plane.hub.set_assignments("edge-1", [kept], 7)
    watch = stub.WatchAssignments(pb.WatchAssignmentsRequest(known_version=7), metadata=identity("edge-1", joined))
    first = await asyncio.wait_for(watch.read(), 5)
    assert first.version == 7 and [a.model for a in first.assignments] == ["kept"]
    watch.cancel()


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff\xff\x0f garbage", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)) * 4],
    ids=["varint-overflow", "truncated-field", "noise"],
)
async def test_garbage_protobuf_gets_clean_error(
    channel: grpc.aio.Channel, control_plane: ControlPlane, payload: bytes
) -> None:
    raw = channel.unary_unary(JOIN, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await raw(payload, timeout=5)
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed JoinRequest" in (failed.value.details() or "")
    assert control_plane.hub.snapshot() == []
    # Still serving.
    assert (await pb_grpc.AgentControlStub(channel).Join(join_request())).agent_id


async def test_oversized_message_is_refused(channel: grpc.aio.Channel, control_plane: ControlPlane) -> None:
    stub = pb_grpc.AgentControlStub(channel)
    huge = join_request(labels={"blob": "x" * (service.MAX_RECEIVE_BYTES + 1)})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Join(huge, timeout=5)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stub.Join(join_request())).agent_id


async def test_invalid_join_fields(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.AgentControlStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Join(join_request("Not A Site"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "DNS label" in (refused.value.details() or "")


async def test_a_fleet_opening_its_streams_at_once_is_not_cancelled(
    control_plane: ControlPlane, channel: grpc.aio.Channel
) -> None:
    """Thousands of streams arriving together (a fleet reconnecting) all reach the servicer.

    With gRPC core's default pending-call limits (1,000 soft / 3,000 hard) part of such a
    burst was cancelled before the servicer saw it; here every stream gets the servicer's
    own answer (UNAUTHENTICATED: no credentials), none a transport-level CANCELLED.
    """
    stub = pb_grpc.AgentControlStub(channel)
    calls = [stub.Heartbeats(metadata=((service.SITE_KEY, f"s-{i}"),)) for i in range(3500)]
    codes: dict[grpc.StatusCode, int] = {}
    for call in calls:
        code = await call.code()
        codes[code] = codes.get(code, 0) + 1
    assert codes == {grpc.StatusCode.UNAUTHENTICATED: 3500}


@pytest.mark.parametrize(("fields", "named"), [
    ({"site": "\u0440aris"}, "site name '\u0440aris' must be a DNS label: lowercase letters, digits and '-', at most 63 "
                             "characters; its character 1 is U+0440 CYRILLIC SMALL LETTER ER, not ASCII"),
    ({"site": "cafe\u0301"}, "; its character 5 is U+0301 COMBINING ACUTE ACCENT, not ASCII"),
    ({"labels": {"z\u043ene": "eu"}}, "; its character 2 is U+043E CYRILLIC SMALL LETTER O, not ASCII"),
    ({"labels": {"zone": "eu\u00a0west"}}, "; its character 3 is U+00A0 NO-BREAK SPACE, not ASCII"),
])
async def test_a_look_alike_join_is_refused_naming_its_character_in_the_agents_one_line(
    channel: grpc.aio.Channel, fields: dict[str, object], named: str
) -> None:
    """As ``edgeplane-agent --site`` and a manifest's refusal do: the operator knows what to retype."""
    request = join_request(**fields) if "site" not in fields else join_request(str(fields["site"]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await pb_grpc.AgentControlStub(channel).Join(request)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    level, line, traceback = uplink._report(uplink.translate(refused.value))
    assert (level, traceback) == (logging.ERROR, False)
    assert line.startswith("control plane refused this agent: INVALID_ARGUMENT: ")
    assert named in line and "\n" not in line
