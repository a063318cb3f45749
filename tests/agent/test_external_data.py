"""A model saved with its weights in ONNX external data (``model.onnx`` beside
``model.onnx.data``, as every exporter writes a model past 2 GB), given as a ``runtime:
onnx`` artifact: one file whose sha256 covers the graph only. The agent and the data
centre's replica load the verified bytes, never a file beside them, so it cannot load:
each says why, in words a user acts on, not onnxruntime's about its working directory."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent import errors
from orchestrator.agents import model
from orchestrator.serving import onnx_app
from orchestrator.testing import onnx_models

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent
from .test_agent import wait_model

REFUSAL = ("the model keeps its weights in ONNX external data (model.onnx.data), which an onnx artifact does not carry: "
           "it is one self-contained ONNX file")


def with_external_data(folder: pathlib.Path) -> str:
    """``y = x + w`` with ``w`` in ``model.onnx.data`` beside ``model.onnx``; the sha256 of ``model.onnx``."""
    weights = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "external",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])], [weights])
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    built.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(built, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert (folder / "model.onnx.data").is_file()
    return onnx_models.sha256_file(folder / "model.onnx")


async def test_an_agent_says_why_a_model_with_external_data_does_not_load(
    control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer
) -> None:
    sha256 = with_external_data(artifact_server.root / "external")
    await make_agent(control_plane)
    control_plane.hub.set_assignments(
        SITE, [model.Assignment("m", "intent", "small", artifact_server.url("external/model.onnx"), sha256)], version=1)
    state = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.FAILED, name="m")
    assert REFUSAL in state.message, state.message
    assert "working directory" not in state.message


def test_a_data_centre_replica_says_why_alike(tmp_path: pathlib.Path) -> None:
    sha256 = with_external_data(tmp_path)
    with pytest.raises(errors.ModelLoadError, match=re.escape(REFUSAL)):
        onnx_app.OnnxModel.func_or_class(str(tmp_path / "model.onnx"), sha256, "m")


def test_weights_beside_it_in_the_working_directory_are_not_read(tmp_path: pathlib.Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime, given a model's bytes, looks for its external data in the process's
    working directory: a file found there by that name, which no sha256 covers, would be
    read as its weights (a replica started in the folder the model was exported to)."""
    sha256 = with_external_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.ModelLoadError, match=re.escape(REFUSAL)):
        onnx_app.OnnxModel.func_or_class(str(tmp_path / "model.onnx"), sha256, "m")


async def test_an_agent_reads_no_weights_from_its_working_directory(
    control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha256 = with_external_data(artifact_server.root / "external")
    monkeypatch.chdir(artifact_server.root / "external")  # the agent started where the model was exported
    await make_agent(control_plane)
    control_plane.hub.set_assignments(
        SITE, [model.Assignment("m", "intent", "small", artifact_server.url("external/model.onnx"), sha256)], version=1)
    state = await wait_model(control_plane, lambda s: s.phase in (model.ModelPhase.FAILED, model.ModelPhase.READY), name="m")
    assert state.phase is model.ModelPhase.FAILED and REFUSAL in state.message, state
