"""Small ONNX models built on the spot with ``onnx.helper``.

Nothing is downloaded: tests, benchmarks and the demo generate the models they serve.
The models are deterministic for a given seed so a test can compare outputs with a
NumPy reference or across execution providers.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orchestrator.artifacts import catalog
from orchestrator.distill.student import BuiltModel

OPSET = 17


sha256_file = catalog.sha256_file


def mlp_weights(in_dim: int, hidden: int, out_dim: int, layers: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    return [
        (
            (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
            (rng.standard_normal(b) * 0.01).astype(np.float32),
        )
        for a, b in zip(dims[:-1], dims[1:])
    ]


def mlp_reference(x: np.ndarray, weights: list[tuple[np.ndarray, np.ndarray]], softmax: bool) -> np.ndarray:
    """NumPy forward pass of :func:`build_mlp`, for checking served outputs."""
    h = x.astype(np.float32)
    for i, (w, b) in enumerate(weights):
        h = h @ w + b
        if i < len(weights) - 1:
            h = np.maximum(h, 0)
    if softmax:
        e = np.exp(h - h.max(axis=-1, keepdims=True))
        h = e / e.sum(axis=-1, keepdims=True)
    return h


def build_mlp(
    path: pathlib.Path,
    *,
    in_dim: int = 8,
    hidden: int = 16,
    out_dim: int = 4,
    layers: int = 2,
    seed: int = 0,
    softmax: bool = True,
    input_name: str = "input",
    output_name: str = "output",
) -> BuiltModel:
    """Write a ReLU MLP (``MatMul``/``Add``, optional ``Softmax``) with a dynamic batch axis."""
    weights = mlp_weights(in_dim, hidden, out_dim, layers, seed)
    nodes = []
    inits = []
    current = input_name
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(weights) - 1
        mm, add = f"mm{i}", ("logits" if last else f"add{i}")
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [mm]), helper.make_node("Add", [mm, f"b{i}"], [add])]
        if not last:
            nodes.append(helper.make_node("Relu", [add], [f"relu{i}"]))
            current = f"relu{i}"
        else:
            current = add
    if softmax:
        nodes.append(helper.make_node("Softmax", [current], [output_name], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", [current], [output_name]))
    graph = helper.make_graph(
        nodes,
        f"mlp_{in_dim}x{hidden}x{out_dim}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", out_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeplane")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return BuiltModel(path, sha256_file(path), input_name, output_name, in_dim, out_dim)


def build_identity(path: pathlib.Path, inputs: dict[str, int], width: int = 3) -> BuiltModel:
    """Write a model answering each input as it came (``Identity``), ``inputs`` naming each
    input and its ``TensorProto`` element type (``TensorProto.FLOAT16``, ``BOOL``...): the
    output of input ``x`` is ``x_out``, both of shape ``[batch, width]``."""
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in inputs]
    graph = helper.make_graph(
        nodes,
        "identity",
        [helper.make_tensor_value_info(name, kind, ["batch", width]) for name, kind in inputs.items()],
        [helper.make_tensor_value_info(f"{name}_out", kind, ["batch", width]) for name, kind in inputs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeplane")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    first = next(iter(inputs))
    return BuiltModel(path, sha256_file(path), first, f"{first}_out", width, width)


def external_data_graph() -> onnx.ModelProto:
    """``y = relu(x @ w + b)``: two weights, so two external data entries of one file."""
    rng = np.random.default_rng(7)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])], "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], weights)
    made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    made.ir_version = 8
    return made


def save_with_external_data(folder: pathlib.Path, location: str = "model.onnx.data") -> pathlib.Path:
    """The model as exporters write it past 2 GB: ``model.onnx`` beside ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(external_data_graph(), str(folder / "model.onnx"), save_as_external_data=True, location=location,
                    size_threshold=0)
    return folder


def run_in_one_file(x: np.ndarray) -> np.ndarray:
    """What the same model saved as one file answers."""
    import onnxruntime as ort  # only the tests that compare load it

    session = ort.InferenceSession(external_data_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]
