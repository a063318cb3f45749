"""Models whose inputs and outputs are not plain tensors, as real exporters write them,
served by a real agent (downloaded over HTTP, run by onnxruntime, asked over v2) and by the
data centre's ONNX application: a scikit-learn classifier's probabilities as skl2onnx gives
them by default (a sequence of maps, which the Open Inference Protocol has no datatype for)."""

from __future__ import annotations

import pathlib
import re

import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent import errors
from orchestrator.agents import model
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
