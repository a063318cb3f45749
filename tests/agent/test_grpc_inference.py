"""The v2 protocol over gRPC on a real agent (in process, real onnxruntime, loopback
gRPC): the standard service answers as the HTTP API does, and refuses what it should."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest

from edgeplane_proto import oip_tensors
from edgeplane_proto.inference.v2 import inference_pb2 as pb
from edgeplane_proto.inference.v2 import inference_pb2_grpc as pb_grpc
from orchestrator.agents import model

from .conftest import SITE, ControlPlane, MakeAgent, Models
from .test_agent import assignment, reference, wait_model


async def serving_agent(control_plane: ControlPlane, make_agent: MakeAgent, models: Models, **overrides: object):  # noqa: ANN201
    agent = await make_agent(control_plane, grpc_listen=("127.0.0.1", 0), **overrides)
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    return agent


def raw_request(x: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp", id="r-1", **fields)
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


async def test_grpc_v2_answers_like_http(control_plane: ControlPlane, make_agent: MakeAgent, models: Models) -> None:
    agent = await serving_agent(control_plane, make_agent, models)
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp"))).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="nope"))).ready
        server_meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"))
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 8])]
        async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:  # the same server, the same model
            http_server, http_model = (await client.get("/v2")).json(), (await client.get("/v2/models/mlp")).json()
        assert (server_meta.name, server_meta.version, list(server_meta.extensions)) == (
            http_server["name"], http_server["version"], http_server["extensions"])
        assert (meta.name, list(meta.versions), meta.platform) == (
            http_model["name"], http_model["versions"], http_model["platform"])
        version = models.v1.sha256[:12]
        assert list(meta.versions) == [version]
        # a version is the file's, as over HTTP: the one listed answers, another is unknown
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version=version))).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="1"))).ready
        assert (await stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp", version=version))).name == "mlp"
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.ModelInfer(pb.ModelInferRequest(model_name="mlp", model_version="1"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and version in (unknown.value.details() or "")
        versioned = raw_request(x)
        versioned.model_version = version
        assert (await stub.ModelInfer(versioned)).model_version == version

        answer = await stub.ModelInfer(raw_request(x))
        assert answer.id == "r-1" and answer.model_name == "mlp"
        [out] = answer.outputs
        got = oip_tensors.array_from_raw(answer.raw_output_contents[0], out.datatype, out.shape, "output")
        np.testing.assert_allclose(got, reference(models.v1, 0, x), rtol=1e-5, atol=1e-6)

        typed = pb.ModelInferRequest(model_name="mlp")
        typed.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.reshape(-1).tolist())
        answer = await stub.ModelInfer(typed)
        np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(4, -1), got, rtol=1e-6)


async def test_a_request_limit_beyond_what_grpc_takes_holds_for_http_and_grpc_serves_up_to_its_own(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent = await serving_agent(control_plane, make_agent, models, max_body_bytes=2**40)
    x = np.ones((2, 8), np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        answer = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw_request(x))
    assert answer.outputs[0].shape == [2, 4]


@pytest.mark.parametrize(("case", "code", "words"), [
    ("unknown model", grpc.StatusCode.NOT_FOUND, "not served by this agent"),
    ("wrong shape", grpc.StatusCode.INVALID_ARGUMENT, "input 'input' must have shape"),
    ("bytes do not match the shape", grpc.StatusCode.INVALID_ARGUMENT, "needs 128 bytes"),
    ("raw and inputs disagree", grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries for 1 inputs"),
    ("unknown datatype", grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype 'FP99'"),
    ("over the size limit", grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
async def test_bad_grpc_requests_get_clear_status_codes(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models, case: str, code: grpc.StatusCode, words: str
) -> None:
    agent = await serving_agent(control_plane, make_agent, models, max_body_bytes=64 << 10)
    x = np.ones((4, 8), dtype=np.float32)
    request = raw_request(x)
    if case == "unknown model":
        request.model_name = "nope"
    elif case == "wrong shape":
        request = raw_request(np.ones((4, 3), dtype=np.float32))
    elif case == "bytes do not match the shape":
        request.raw_input_contents[0] = b"\0" * 12
    elif case == "raw and inputs disagree":
        request.raw_input_contents.append(b"")
    elif case == "unknown datatype":
        request.inputs[0].datatype = "FP99"
    else:
        request = raw_request(np.ones((4096, 8), dtype=np.float32))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(request)
        assert refused.value.code() == code, refused.value.details()
        assert words in (refused.value.details() or "")
        # and the agent goes on serving
        assert len((await stub.ModelInfer(raw_request(x))).raw_output_contents) == 1


async def test_garbage_on_the_wire_is_refused_and_the_agent_goes_on(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    agent = await serving_agent(control_plane, make_agent, models)
    rng = np.random.default_rng(11)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for size in (1, 7, 64, 4096):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw_call(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
            # parsed as far as it goes: a malformed message, or a well-formed one for no model served here
            assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), refused.value.details()
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert len((await stub.ModelInfer(raw_request(np.ones((1, 8), dtype=np.float32)))).raw_output_contents) == 1
