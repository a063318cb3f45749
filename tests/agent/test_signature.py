"""A model file against the inputs and outputs its variant declares (edge_agent.signature),
and the declaration on its way to the agent: over the wire and through the state file, an
absent one read as none."""

from __future__ import annotations

import pathlib

import pytest

from edge_agent import signature
from edge_agent.runtime import onnx
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.assignment import Assignment, DeclaredTensor
from orchestrator.testing import onnx_models


def t(name: str, datatype: str, *shape: int) -> DeclaredTensor:
    return DeclaredTensor(name, datatype, shape)


FILE_IN = (t("input", "FP32", -1, 8),)  # a file whose batch axis is symbolic
FILE_OUT = (t("output", "FP32", -1, 4), t("logits", "FP32", -1, 4))


@pytest.mark.parametrize(("inputs", "outputs", "problem"), [
    ((), (), None),  # nothing declared, nothing checked
    ((t("input", "FP32", -1, 8),), (), None),
    ((t("input", "FP32", 16, 8),), (), None),  # a fixed size where the file's is symbolic
    ((t("input", "FP32", -1, -1),), (), None),
    ((), (t("output", "FP32", -1, 4),), None),  # the file may answer more than declared
    ((t("input", "FP32", -1, 5),), (), "input 'input' is declared FP32 [-1, 5], but the file takes FP32 [-1, 8]"),
    ((t("input", "INT64", -1, 8),), (), "input 'input' is declared INT64 [-1, 8], but the file takes FP32 [-1, 8]"),
    ((t("input", "FP32", -1),), (), "input 'input' is declared FP32 [-1], but the file takes FP32 [-1, 8]"),
    ((t("input", "FP32", -1, 8, 1),), (), "declared FP32 [-1, 8, 1], but the file takes FP32 [-1, 8]"),
    ((t("features", "FP32", -1, 8),), (), "input 'features' is declared, but the file takes no input of that name (it takes: 'input')"),
    ((t("input", "FP32", -1, 8), t("mask", "BOOL", -1)), (), "input 'mask' is declared, but the file takes no input"),
    ((), (t("output", "FP32", -1, 3),), "output 'output' is declared FP32 [-1, 3], but the file answers FP32 [-1, 4]"),
    ((), (t("scores", "FP32", -1, 4),), "output 'scores' is declared, but the file answers no output of that name"),
])
def test_a_file_against_its_declaration(inputs: tuple[DeclaredTensor, ...], outputs: tuple[DeclaredTensor, ...],
                                        problem: str | None) -> None:
    found = signature.mismatch(inputs, outputs, FILE_IN, FILE_OUT)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found


def test_a_file_taking_an_input_the_declaration_leaves_out_does_not_fit() -> None:
    found = signature.mismatch((t("input", "FP32", -1, 8),), (), (*FILE_IN, t("mask", "BOOL", -1, 8)), FILE_OUT)
    assert found is not None and "also takes input(s) 'mask', which the variant does not declare" in found


def test_every_tensor_that_differs_is_named() -> None:
    found = signature.mismatch((t("input", "FP32", -1, 5),), (t("output", "FP16", -1, 4),), FILE_IN, FILE_OUT)
    assert found is not None and "input 'input'" in found and "output 'output'" in found


def test_a_loaded_files_symbolic_batch_axis_fits_a_declared_any_size(tmp_path: pathlib.Path) -> None:
    built = onnx_models.build_mlp(tmp_path / "m.onnx", in_dim=8, out_dim=4)
    model = onnx.OnnxModel.load(built.path.read_bytes())
    assert model.inputs[0].shape == (-1, 8)
    assert signature.mismatch((t("input", "FP32", -1, 8),), (t("output", "FP32", -1, 4),), model.inputs, model.outputs) is None
    refused = signature.mismatch((t("input", "FP32", -1, 5),), (), model.inputs, model.outputs)
    assert refused is not None and "[-1, 5]" in refused and "[-1, 8]" in refused


def test_the_declaration_travels_to_the_agent_and_an_absent_one_is_none() -> None:
    sent = Assignment("m", "d", "v", "https://a/m.onnx", "0" * 64, inputs=(t("input", "FP32", -1, 8),),
                      outputs=(t("output", "FP32", -1, 4),))
    assert Assignment.from_proto(pb.Assignment.FromString(sent.to_proto().SerializeToString())) == sent
    assert Assignment.from_json(sent.to_json()) == sent
    older = Assignment("m", "d", "v", "https://a/m.onnx", "0" * 64)  # from a control plane before the field
    assert Assignment.from_proto(older.to_proto()).inputs == () and Assignment.from_proto(older.to_proto()).outputs == ()
    state = older.to_json()
    del state["inputs"], state["outputs"]  # a state file an older agent wrote
    assert Assignment.from_json(state) == older
