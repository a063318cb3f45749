"""A model that takes and answers BF16 (bfloat16) tensors, served by a real agent (HTTP JSON
and binary, gRPC), by the data centre's ONNX application, and described by the control
plane: the v2 protocol names the datatype BF16, numpy has none of its own, and ml_dtypes
(a dependency of onnx) gives the arrays; the values travel bit for bit."""

from __future__ import annotations

import pathlib
import re

import grpc
import httpx
import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

from edge_agent import errors
from edgeplane_proto import oip, oip_tensors
from edgeplane_proto.inference.v2 import inference_pb2 as pb
from edgeplane_proto.inference.v2 import inference_pb2_grpc as pb_grpc
from orchestrator.agents import model
from orchestrator.artifacts import signature
from orchestrator.serving import onnx_app

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent
from .test_agent import wait_model
from .test_model_io_types import _asgi, save

BF16 = np.dtype(ml_dtypes.bfloat16)
#: 1.5, -2, the largest bfloat16, the smallest subnormal, -0, an infinity: each bit pattern must come back.
X = np.array([0x3FC0, 0xC000, 0x7F7F, 0x0001, 0x8000, 0x7F80], np.uint16).view(BF16)
METADATA = {"inputs": [{"name": "x", "datatype": "BF16", "shape": [-1]}],
            "outputs": [{"name": "same", "datatype": "BF16", "shape": [-1]},
                        {"name": "wide", "datatype": "FP32", "shape": [-1]}]}


def bf16_model(path: pathlib.Path) -> str:
    """``same`` = x (BF16), ``wide`` = x as FP32."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.FLOAT)],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N"])],
        [helper.make_tensor_value_info("same", TensorProto.BFLOAT16, ["N"]),
         helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["N"])])
    return save(graph, path)


def declared(name: str, datatype: str) -> model.DeclaredTensor:
    return model.DeclaredTensor(name, datatype, (-1,))


async def check_answers(client: httpx.AsyncClient) -> None:
    assert {k: v for k, v in (await client.get("/v2/models/m")).json().items() if k in METADATA} == METADATA
    for binary in (False, True):
        body, length = oip.encode_request({"x": X}, binary=binary)
        answer = await client.post("/v2/models/m/infer", content=body,
                                   headers={oip.BINARY_HEADER: str(length)} if binary else {})
        assert answer.status_code == 200, answer.text
        same, wide = oip.decode_response(answer.content, oip.header_length(answer.headers.get(oip.BINARY_HEADER))).outputs
        assert (same.datatype, wide.datatype) == ("BF16", "FP32")
        assert same.array.dtype == BF16 and same.array.tobytes() == X.tobytes(), same.array
        assert wide.array.tolist() == X.astype(np.float32).tolist()
    # JSON numbers round to the nearest bfloat16, as FP16's do; one past its largest is refused
    rounded = await client.post("/v2/models/m/infer", content=oip.dumps(
        {"inputs": [{"name": "x", "datatype": "BF16", "shape": [2], "data": [0.1, 3]}], "outputs": [{"name": "wide"}]}))
    assert oip.decode_response(rounded.content).outputs[0].array.tolist() == np.array([0.1, 3], BF16).astype(np.float32).tolist()
    past = await client.post("/v2/models/m/infer", content=oip.dumps(
        {"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1e39]}]}))
    assert past.status_code == 400 and "data does not fit BF16: 1e+39 is past" in past.json()["error"], past.text
    # NaN goes out as JSON's NaN literal, not as null
    nan = await client.post("/v2/models/m/infer", content=oip.encode_request({"x": np.array([np.nan], BF16)})[0])
    assert b"null" not in nan.content and np.isnan(oip.decode_response(nan.content).outputs[0].array.astype(np.float32)).all()
    wrong = await client.post("/v2/models/m/infer", content=oip.encode_request({"x": X.astype(np.float32)})[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "input 'x' must be BF16, got FP32"


async def test_an_agent_serves_a_bf16_model_over_http_and_grpc_bit_for_bit(
    control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer
) -> None:
    sha256 = bf16_model(artifact_server.root / "bf16.onnx")
    agent = await make_agent(control_plane, grpc_listen=("127.0.0.1", 0))
    # the variant declares what the file takes: BF16 is a datatype a manifest may name
    control_plane.hub.set_assignments(SITE, [model.Assignment(
        "m", "intent", "small", artifact_server.url("bf16.onnx"), sha256,
        inputs=(declared("x", "BF16"),), outputs=(declared("same", "BF16"), declared("wide", "FP32")))], version=1)
    state = await wait_model(control_plane, lambda s: s.phase in (model.ModelPhase.READY, model.ModelPhase.FAILED), name="m")
    assert state.phase is model.ModelPhase.READY, state
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        await check_answers(client)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="m"))
        assert [t.datatype for t in (*meta.inputs, *meta.outputs)] == ["BF16", "BF16", "FP32"]
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name="x", datatype="BF16", shape=X.shape)
        request.raw_input_contents.append(X.tobytes())
        answer = await stub.ModelInfer(request)
        same = answer.outputs[0]
        assert same.datatype == "BF16"
        assert oip_tensors.array_from_raw(answer.raw_output_contents[0], same.datatype, same.shape, "same").tobytes() == X.tobytes()
        typed = pb.ModelInferRequest(model_name="m")
        typed.inputs.add(name="x", datatype="BF16", shape=[1]).contents.fp32_contents.append(1.5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(typed)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "BF16 tensors travel in raw_input_contents only" in (refused.value.details() or "")


async def test_the_data_centre_replica_serves_it_alike(tmp_path: pathlib.Path) -> None:
    sha256 = bf16_model(tmp_path / "bf16.onnx")
    served = onnx_app.OnnxModel.func_or_class(str(tmp_path / "bf16.onnx"), sha256, "m")
    transport = httpx.ASGITransport(app=lambda scope, receive, send: _asgi(served, scope, receive, send))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        await check_answers(client)


def test_describe_model_names_its_tensors_bf16(tmp_path: pathlib.Path) -> None:
    sha256 = bf16_model(tmp_path / "bf16.onnx")
    assert signature.read(tmp_path / "bf16.onnx", sha256) == METADATA


def test_a_model_that_takes_strings_and_answers_bf16_is_refused_at_load_saying_why(tmp_path: pathlib.Path) -> None:
    """onnxruntime's Python API gives a BF16 output only from a run on OrtValues, which it
    makes of no string: such a model would load and answer every request with an error."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16), helper.make_node("Identity", ["text"], ["echo"])],
        "strings_to_bf16", [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"]),
                            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N"]), helper.make_tensor_value_info("echo", TensorProto.STRING, ["N"])])
    sha256 = save(graph, tmp_path / "mixed.onnx")
    with pytest.raises(errors.ModelLoadError, match=re.escape("the model takes strings ('text') and answers BF16 ('y')")):
        onnx_app.OnnxModel.func_or_class(str(tmp_path / "mixed.onnx"), sha256, "m")
