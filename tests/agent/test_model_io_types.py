"""Models whose inputs and outputs are not plain tensors, as real exporters write them,
served by a real agent (downloaded over HTTP, run by onnxruntime, asked over v2) and by the
data centre's ONNX application: a scikit-learn classifier's probabilities as skl2onnx gives
them by default (a sequence of maps, which the Open Inference Protocol has no datatype for),
and an optional input (``optional(tensor(float))``), which onnxruntime runs with or without."""

from __future__ import annotations

import pathlib
import re

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from starlette.requests import Request

from edge_agent import errors
from edgeplane_proto import oip
from orchestrator.agents import model
from orchestrator.artifacts import signature
from orchestrator.serving import onnx_app
from orchestrator.testing import onnx_models

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent
from .test_agent import wait_model


def save(graph: onnx.GraphProto, path: pathlib.Path, *, ml: bool = False) -> str:
    opsets = [helper.make_opsetid("", onnx_models.OPSET)] + ([helper.make_opsetid("ai.onnx.ml", 1)] if ml else [])
    built = helper.make_model(graph, opset_imports=opsets)
    built.ir_version = 8
    onnx.checker.check_model(built)
    onnx.save(built, str(path))
    return onnx_models.sha256_file(path)


def zipmap_classifier(path: pathlib.Path) -> str:
    """``label`` (the class with the larger score) and ``probabilities`` as skl2onnx writes a
    classifier's by default: ZipMap's ``seq(map(int64, tensor(float)))``, one map per row."""
    probabilities = helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
         helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])],
        "classifier", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), helper.make_value_info("probabilities", probabilities)])
    return save(graph, path, ml=True)


async def serve(cp: ControlPlane, server: ArtifactServer, name: str, sha256: str) -> model.ModelState:
    cp.hub.set_assignments(SITE, [model.Assignment("m", "intent", "small", server.url(name), sha256)], version=1)
    return await wait_model(cp, lambda s: s.phase in (model.ModelPhase.READY, model.ModelPhase.FAILED), name="m")


ZIPMAP_REFUSAL = "output 'probabilities' is seq(map(int64,tensor(float))), not a tensor"


async def test_a_classifier_whose_probabilities_are_maps_is_refused_saying_how_to_export_it(
    control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer
) -> None:
    sha256 = zipmap_classifier(artifact_server.root / "zipmap.onnx")
    await make_agent(control_plane)
    state = await serve(control_plane, artifact_server, "zipmap.onnx", sha256)
    assert state.phase is model.ModelPhase.FAILED, state
    assert ZIPMAP_REFUSAL in state.message and "zipmap" in state.message, state.message


def test_the_data_centre_replica_refuses_it_alike(tmp_path: pathlib.Path) -> None:
    sha256 = zipmap_classifier(tmp_path / "zipmap.onnx")
    with pytest.raises(errors.ModelLoadError, match=re.escape(ZIPMAP_REFUSAL)):
        onnx_app.OnnxModel.func_or_class(str(tmp_path / "zipmap.onnx"), sha256, "m")


def optional_bias(path: pathlib.Path) -> str:
    """``y = x + bias`` when ``bias`` is given, else ``y = x``: ``bias`` is an optional input."""
    given = helper.make_graph([helper.make_node("OptionalGetElement", ["bias"], ["b"]), helper.make_node("Add", ["x", "b"], ["with_bias"])],
                              "given", [], [helper.make_tensor_value_info("with_bias", TensorProto.FLOAT, [2])])
    absent = helper.make_graph([helper.make_node("Identity", ["x"], ["as_is"])], "absent", [],
                               [helper.make_tensor_value_info("as_is", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("OptionalHasElement", ["bias"], ["has_bias"]),
         helper.make_node("If", ["has_bias"], ["y"], then_branch=given, else_branch=absent)],
        "optional_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_value_info("bias", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2])))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])  # optionals came in opset 18's OptionalHasElement
    built.ir_version = 8
    onnx.checker.check_model(built)
    onnx.save(built, str(path))
    return onnx_models.sha256_file(path)


X = np.array([1.0, 2.0], np.float32)
BIAS = np.array([10.0, 20.0], np.float32)
OPTIONAL_METADATA = [{"name": "x", "datatype": "FP32", "shape": [2]}, {"name": "bias", "datatype": "FP32", "shape": [2]}]


async def infer(client: httpx.AsyncClient, inputs: dict[str, np.ndarray]) -> np.ndarray:
    answer = await client.post("/v2/models/m/infer", content=oip.encode_request(inputs)[0])
    assert answer.status_code == 200, answer.text
    return oip.decode_response(answer.content).outputs[0].array


async def test_an_optional_input_may_be_given_or_left_out(
    control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer
) -> None:
    sha256 = optional_bias(artifact_server.root / "optional.onnx")
    agent = await make_agent(control_plane)
    state = await serve(control_plane, artifact_server, "optional.onnx", sha256)
    assert state.phase is model.ModelPhase.READY, state
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        assert (await client.get("/v2/models/m")).json()["inputs"] == OPTIONAL_METADATA
        np.testing.assert_array_equal(await infer(client, {"x": X}), X)
        np.testing.assert_array_equal(await infer(client, {"x": X, "bias": BIAS}), X + BIAS)
        refused = await client.post("/v2/models/m/infer", content=oip.encode_request({"bias": BIAS})[0])
        assert refused.status_code == 400 and "missing input(s): x" in refused.text, refused.text


async def test_the_data_centre_replica_takes_an_optional_input_alike(tmp_path: pathlib.Path) -> None:
    sha256 = optional_bias(tmp_path / "optional.onnx")
    served = onnx_app.OnnxModel.func_or_class(str(tmp_path / "optional.onnx"), sha256, "m")
    transport = httpx.ASGITransport(app=lambda scope, receive, send: _asgi(served, scope, receive, send))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        assert (await client.get("/v2/models/m")).json()["inputs"] == OPTIONAL_METADATA
        np.testing.assert_array_equal(await infer(client, {"x": X}), X)
        np.testing.assert_array_equal(await infer(client, {"x": X, "bias": BIAS}), X + BIAS)


async def _asgi(served: onnx_app.OnnxModel, scope: dict[str, object], receive: object, send: object) -> None:
    response = await served(Request(scope, receive))  # type: ignore[arg-type]
    await response(scope, receive, send)  # type: ignore[arg-type]


def test_describe_model_gives_an_optional_input_its_tensors_datatype(tmp_path: pathlib.Path) -> None:
    sha256 = optional_bias(tmp_path / "optional.onnx")
    assert signature.read(tmp_path / "optional.onnx", sha256)["inputs"] == OPTIONAL_METADATA
