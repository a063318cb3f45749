"""A classification task with a large teacher and a distilled student, built on the spot.

Cascades are measured (``bench/cascade.py``) and tested on this task, and a distillation
loop can reuse it: :func:`distil` trains a student from any teacher's soft answers.

- The **teacher** is constructed: a deep, wide tanh network with random weights. It
  *defines* the task — an input's class is the teacher's top class — so it stands for a
  large model that knows the task; the held-out labels add label noise (a share of labels
  flipped at random: errors nobody can learn), so the teacher is not 100 % right either.
- The **student** is small (one narrow ReLU layer) and trained with NumPy by distillation:
  cross-entropy against the teacher's probabilities on unlabelled inputs (Adam). It is
  right on most inputs and unsure near the teacher's class boundaries, which is what a
  confidence threshold needs.

Both are written as ONNX (``MatMul``/``Add``/activation, ``Softmax`` on the output
``probabilities``, input ``input`` of shape ``[batch, dim]``), nothing downloaded.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orchestrator.testing import onnx_models

INPUT = "input"
OUTPUT = "probabilities"

Layers = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Mlp:
    layers: Layers
    activation: str  # "Tanh" or "Relu"

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


@dataclass(frozen=True)
class Task:
    dim: int
    classes: int
    teacher: Mlp
    student: Mlp
    x_test: np.ndarray  # held out: neither the student nor a threshold saw these
    y_test: np.ndarray  # labels: the teacher's class, with label noise
    x_val: np.ndarray  # for choosing a threshold
    y_val: np.ndarray


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def construct_teacher(dim: int, classes: int, width: int, depth: int, seed: int, gain: float = 0.4, logit_std: float = 12.0) -> Mlp:
    """A random deep tanh network. ``gain`` sets how far from linear its class boundaries
    are; the last layer is scaled so that its logits have ``logit_std`` over the input
    distribution (how sure it is away from a boundary)."""
    rng = np.random.default_rng(seed)
    dims = [dim] + [width] * depth + [classes]
    layers: Layers = [((rng.standard_normal((a, b)) * gain / np.sqrt(a)).astype(np.float32), np.zeros(b, np.float32))
                      for a, b in zip(dims[:-1], dims[1:])]
    spread = float(Mlp(layers, "Tanh").logits(rng.standard_normal((2000, dim)).astype(np.float32)).std())
    w, b = layers[-1]
    layers[-1] = ((w * (logit_std / spread)).astype(np.float32), b)
    return Mlp(layers, "Tanh")


def distil(teacher_probs: np.ndarray, x: np.ndarray, hidden: int, seed: int, epochs: int = 60, batch: int = 256,
           lr: float = 3e-3) -> Mlp:
    """Train a one-hidden-layer ReLU student on ``teacher_probs`` (soft targets) with Adam."""
    rng = np.random.default_rng(seed)
    dim, classes = x.shape[1], teacher_probs.shape[1]
    params = [rng.standard_normal((dim, hidden)) * np.sqrt(2 / dim), np.zeros(hidden),
              rng.standard_normal((hidden, classes)) * np.sqrt(1 / hidden), np.zeros(classes)]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            xb, tb = x[idx].astype(np.float64), teacher_probs[idx].astype(np.float64)
            w1, b1, w2, b2 = params
            pre = xb @ w1 + b1
            h = np.maximum(pre, 0)
            p = softmax(h @ w2 + b2)
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
    w1, b1, w2, b2 = (p.astype(np.float32) for p in params)
    return Mlp([(w1, b1), (w2, b2)], "Relu")


def build(*, dim: int = 16, classes: int = 4, teacher_width: int = 1024, teacher_depth: int = 3, student_hidden: int = 128,
          train: int = 20_000, validation: int = 2_000, test: int = 2_000, label_noise: float = 0.02, epochs: int = 100,
          seed: int = 0) -> Task:
    """The task: a constructed teacher, a student distilled from it, and labelled held-out data."""
    rng = np.random.default_rng(seed + 1)
    teacher = construct_teacher(dim, classes, teacher_width, teacher_depth, seed)
    x = rng.standard_normal((train + validation + test, dim)).astype(np.float32)
    probs = teacher.probabilities(x)
    labels = probs.argmax(-1)
    flip = rng.random(len(x)) < label_noise
    labels = np.where(flip, rng.integers(0, classes, len(x)), labels)
    student = distil(probs[:train], x[:train], student_hidden, seed + 2, epochs=epochs)
    v_end = train + validation
    return Task(dim, classes, teacher, student, x[v_end:], labels[v_end:], x[train:v_end], labels[train:v_end])


def write_onnx(mlp: Mlp, path: pathlib.Path, name: str) -> onnx_models.BuiltModel:
    """The network as ONNX: ``input`` [batch, dim] -> ``probabilities`` [batch, classes]."""
    nodes, inits = [], []
    current = INPUT
    for i, (w, b) in enumerate(mlp.layers):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]), helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"])]
        current = f"z{i}"
        if i < len(mlp.layers) - 1:
            nodes.append(helper.make_node(mlp.activation, [current], [f"h{i}"]))
            current = f"h{i}"
    nodes.append(helper.make_node("Softmax", [current], [OUTPUT], axis=-1))
    dim, classes = mlp.layers[0][0].shape[0], mlp.layers[-1][0].shape[1]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)], producer_name="edgeplane")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return onnx_models.BuiltModel(path, onnx_models.sha256_file(path), INPUT, OUTPUT, dim, classes)


def write_jsonl(path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> None:
    """A labelled sample for ``edgeplane cascade tune``: one ``{"input": [[...]], "label": k}`` a line."""
    with path.open("w") as f:
        for row, label in zip(x, y):
            f.write(json.dumps({INPUT: [[round(float(v), 6) for v in row]], "label": int(label)}) + "\n")


def manifests(student: onnx_models.BuiltModel, teacher: onnx_models.BuiltModel, *, threshold: float,
              edges: dict[str, tuple[str, float, float]], datacentre: tuple[str, str, float, float],
              student_watts: float = 10.0, teacher_watts: float = 250.0, residency: tuple[str, ...] = ("EU",),
              name: str = "task", deployment: str | None = None, dc_cpu: float = 1.0) -> str:
    """Sites (``edges``: name -> (country, lat, lon); ``datacentre``: (name, country, lat,
    lon) on the local Ray cluster), the Model with both variants (artifacts named by file
    under an artifact root), and the cascading deployment: one replica per site."""
    docs: list[dict[str, object]] = []
    for site, (country, lat, lon) in edges.items():
        docs.append({"kind": "Site", "metadata": {"name": site},
                     "spec": {"tier": "edge", "location": {"country": country, "lat": lat, "lon": lon}}})
    dc, country, lat, lon = datacentre
    docs.append({"kind": "Site", "metadata": {"name": dc},
                 "spec": {"tier": "datacenter", "location": {"country": country, "lat": lat, "lon": lon},
                          "capacity": {"cpu": 64, "memoryGiB": 256}, "energy": {"carbonGramsPerKWh": 60, "pue": 1.3},
                          "ray": {"address": "local"}}})
    io = {"inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, student.in_dim]}],
          "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, student.out_dim]}]}
    docs.append({"kind": "Model", "metadata": {"name": name}, "spec": {"variants": [
        {"name": "student", "runtime": "onnx", "artifact": {"uri": student.path.name, "sha256": student.sha256},
         "resources": {"cpu": 0.5, "memoryMiB": 128}, "powerWatts": student_watts, **io},
        {"name": "teacher", "runtime": "onnx", "artifact": {"uri": teacher.path.name, "sha256": teacher.sha256},
         "resources": {"cpu": dc_cpu, "memoryMiB": 256}, "powerWatts": teacher_watts, **io},
    ]}})
    replicas = len(edges) + 1
    docs.append({"kind": "ModelDeployment", "metadata": {"name": deployment or name}, "spec": {
        "model": name, "variant": {"edge": "student", "datacenter": "teacher"},
        "replicas": {"min": replicas, "max": replicas},
        "placement": {"residency": list(residency), "spread": {"by": "site", "maxSkew": 1}},
        "cascade": {"stages": [
            {"variant": "student", "escalate": {"confidence": {"output": OUTPUT, "below": threshold}}},
            {"variant": "teacher"},
        ]},
    }})
    return "---\n".join(json.dumps({"apiVersion": "edgeplane.io/v1alpha1", **d}) + "\n" for d in docs)
