"""The edge student of a tensor cascade: a small MLP, its Adam trainer on soft labels, ONNX both ways.

Distillation trains on the teacher's *probabilities* (soft labels), which is what carries
the teacher's uncertainty near a class boundary. scikit-learn's ``MLPClassifier`` fits
hard labels only and PyTorch is too heavy for the default install, so the student is
trained here with plain NumPy: one hidden ReLU layer, softmax cross-entropy against the
soft labels, Adam — a few dozen lines whose gradients are the textbook ones. Warm start is
exact: :func:`read_onnx` recovers the layers of a student this module wrote
(``MatMul``/``Add``/activation chain, ``Softmax`` on ``probabilities``), and training
continues from them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orchestrator.artifacts.catalog import sha256_file

INPUT = "input"
OUTPUT = "probabilities"
OPSET = 17

Layers = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class BuiltModel:
    path: pathlib.Path
    sha256: str
    input_name: str
    output_name: str
    in_dim: int
    out_dim: int


@dataclass(frozen=True)
class Mlp:
    layers: Layers
    activation: str  # "Tanh" or "Relu"
    # the tensor names of the ONNX file it was read from: a Model declares them and a cascade's
    # rule reads them, so a student that replaces this one must answer under the same names
    input_name: str = INPUT
    output_name: str = OUTPUT

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float32)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = np.tanh(h) if self.activation == "Tanh" else np.maximum(h, 0)
        return h

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    @property
    def parameters(self) -> int:
        return sum(w.size + b.size for w, b in self.layers)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def distil(teacher_probs: np.ndarray, x: np.ndarray, hidden: int, seed: int, epochs: int = 60, batch: int = 256,
           lr: float = 3e-3, init: Mlp | None = None, progress: Callable[[int, float], None] | None = None,
           stopped: Callable[[], bool] = lambda: False) -> Mlp | None:
    """Train a one-hidden-layer ReLU student on ``teacher_probs`` (soft targets) with Adam;
    ``init`` warm-starts from an existing student of that shape; ``progress(epoch, loss)``.
    None when ``stopped`` was true before an epoch: the training ended there."""
    rng = np.random.default_rng(seed)
    dim, classes = x.shape[1], teacher_probs.shape[1]
    if init is not None:
        params = [np.asarray(a, np.float64) for layer in init.layers for a in layer]
    else:
        params = [rng.standard_normal((dim, hidden)) * np.sqrt(2 / dim), np.zeros(hidden),
                  rng.standard_normal((hidden, classes)) * np.sqrt(1 / hidden), np.zeros(classes)]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    step = 0
    for epoch in range(epochs):
        if stopped():
            return None
        loss, seen = 0.0, 0
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            xb, tb = x[idx].astype(np.float64), teacher_probs[idx].astype(np.float64)
            w1, b1, w2, b2 = params
            pre = xb @ w1 + b1
            h = np.maximum(pre, 0)
            p = softmax(h @ w2 + b2)
            loss -= float((tb * np.log(p + 1e-12)).sum())
            seen += len(idx)
            d_logits = (p - tb) / len(idx)
            d_h = d_logits @ w2.T * (pre > 0)
            grads = [xb.T @ d_h, d_h.sum(0), h.T @ d_logits, d_logits.sum(0)]
            step += 1
            for i, g in enumerate(grads):
                moments[i] = 0.9 * moments[i] + 0.1 * g
                squares[i] = 0.999 * squares[i] + 0.001 * g * g
                m_hat = moments[i] / (1 - 0.9 ** step)
                v_hat = squares[i] / (1 - 0.999 ** step)
                params[i] = params[i] - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        if progress is not None:
            progress(epoch + 1, loss / max(seen, 1))
    w1, b1, w2, b2 = (p.astype(np.float32) for p in params)
    return Mlp([(w1, b1), (w2, b2)], "Relu")


def write_onnx(mlp: Mlp, path: pathlib.Path, name: str) -> BuiltModel:
    """The network as ONNX: ``mlp.input_name`` [batch, dim] -> ``mlp.output_name`` [batch, classes]."""
    nodes, inits = [], []
    current = mlp.input_name
    for i, (w, b) in enumerate(mlp.layers):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]), helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"])]
        current = f"z{i}"
        if i < len(mlp.layers) - 1:
            nodes.append(helper.make_node(mlp.activation, [current], [f"h{i}"]))
            current = f"h{i}"
    nodes.append(helper.make_node("Softmax", [current], [mlp.output_name], axis=-1))
    dim, classes = mlp.layers[0][0].shape[0], mlp.layers[-1][0].shape[1]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(mlp.input_name, TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info(mlp.output_name, TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeplane")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return BuiltModel(path, sha256_file(path), mlp.input_name, mlp.output_name, dim, classes)


class NotAStudent(ValueError):
    """The ONNX file is not a MatMul/Add MLP with a Softmax output: no warm start from it."""


def read_onnx(path: pathlib.Path) -> Mlp:
    """The layers and tensor names of an MLP student written by :func:`write_onnx` (or shaped like one)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]  # before IR 4, initializers are listed as inputs too
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise NotAStudent(f"{path.name}: {len(inputs)} inputs and {len(model.graph.output)} outputs, not one of each")
    layers: Layers = []
    activation = "Relu"
    pending: np.ndarray | None = None
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            pending = inits[node.input[1]]
        elif node.op_type == "Add" and pending is not None and node.input[1] in inits:
            layers.append((pending.astype(np.float32), inits[node.input[1]].astype(np.float32)))
            pending = None
        elif node.op_type in ("Relu", "Tanh"):
            activation = node.op_type
        elif node.op_type != "Softmax":
            raise NotAStudent(f"{path.name}: node {node.op_type} is not part of an MLP student")
    if not layers:
        raise NotAStudent(f"{path.name}: no MatMul/Add layers")
    return Mlp(layers, activation, inputs[0], model.graph.output[0].name)
