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
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.adapters import local_ray
from orchestrator.distill.student import INPUT, OUTPUT, BuiltModel, Layers, Mlp, distil, softmax, write_onnx
from orchestrator.testing import harness

__all__ = ["INPUT", "OUTPUT", "Mlp", "Task", "build", "distil", "infer_body", "manifests", "serving_fleet", "softmax", "write_jsonl",
           "write_models", "write_onnx"]


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
    assert student is not None  # nothing asks it to stop
    v_end = train + validation
    return Task(dim, classes, teacher, student, x[v_end:], labels[v_end:], x[train:v_end], labels[train:v_end])


def write_models(task: Task, folder: pathlib.Path) -> tuple[BuiltModel, BuiltModel]:
    """The student and the teacher written as ``student.onnx`` and ``teacher.onnx`` in ``folder``."""
    return write_onnx(task.student, folder / "student.onnx", "student"), write_onnx(task.teacher, folder / "teacher.onnx", "teacher")


def infer_body(x: np.ndarray) -> dict[str, Any]:
    """The Open Inference Protocol request for one input of the task."""
    return {"inputs": [{"name": INPUT, "datatype": "FP32", "shape": [1, len(x)], "data": [float(v) for v in x]}]}


def write_jsonl(path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> None:
    """A labelled sample for ``edgeplane cascade tune``: one ``{"input": [[...]], "label": k}`` a line."""
    with path.open("w") as f:
        for row, label in zip(x, y):
            f.write(json.dumps({INPUT: [[round(float(v), 6) for v in row]], "label": int(label)}) + "\n")


def manifests(student: BuiltModel, teacher: BuiltModel, *, threshold: float,
              edges: dict[str, tuple[str, float, float]], datacentre: tuple[str, str, float, float],
              student_watts: float = 10.0, teacher_watts: float = 250.0, residency: tuple[str, ...] = ("EU",),
              name: str = "task", deployment: str | None = None, dc_cpu: float = 1.0,
              capture: dict[str, object] | None = None, scores: str = "probabilities") -> str:
    """Sites (``edges``: name -> (country, lat, lon); ``datacentre``: (name, country, lat,
    lon) on the local Ray cluster), the Model with both variants (artifacts named by file
    under an artifact root), and the cascading deployment: one replica per site; ``capture``
    is its ``spec.cascade.capture``, ``scores`` its first stage's ``confidence.scores``."""
    docs: list[dict[str, object]] = []
    for site, (country, lat, lon) in edges.items():
        docs.append({"kind": "Site", "metadata": {"name": site},
                     "spec": {"tier": "edge", "location": {"country": country, "lat": lat, "lon": lon}}})
    dc, country, lat, lon = datacentre
    docs.append({"kind": "Site", "metadata": {"name": dc},
                 "spec": {"tier": "datacenter", "location": {"country": country, "lat": lat, "lon": lon},
                          "capacity": {"cpu": 64, "memoryGiB": 256}, "energy": {"carbonGramsPerKWh": 60, "pue": 1.3},
                          "ray": {"address": "local"}}})
    io = {"inputs": [{"name": student.input_name, "datatype": "FP32", "shape": [-1, student.in_dim]}],
          "outputs": [{"name": student.output_name, "datatype": "FP32", "shape": [-1, student.out_dim]}]}
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
            {"variant": "student", "escalate": {"confidence": {"output": student.output_name, "scores": scores, "below": threshold}}},
            {"variant": "teacher"},
        ], **({"capture": capture} if capture is not None else {})},
    }})
    return "---\n".join(json.dumps({"apiVersion": "edgeplane.io/v1alpha1", **d}) + "\n" for d in docs)


def serving_fleet(root: pathlib.Path, yaml_text: str, *, edges: dict[str, tuple[str, float, float]],
                  datacentre: tuple[str, str, float, float], local_ray_endpoints: local_ray.LocalRayEndpoints,
                  name: str = "task") -> AbstractAsyncContextManager[harness.Fleet]:
    """A fleet serving :func:`manifests`' ``yaml_text``: an agent per edge site, the data
    centre on ``local_ray_endpoints``; it is yielded once every replica is healthy and the
    cascade is routed, and leaves no Serve application behind."""
    agents = {site: dict(country=country, lat=lat, lon=lon) for site, (country, lat, lon) in edges.items()}

    def ready(cp: Any) -> bool:
        sites = {e.site for e in cp.table.endpoints(name) if e.healthy}
        return sites == {*edges, datacentre[0]} and name in cp.table.cascades

    return harness.serving_fleet(root, yaml_text, agents, ready=ready, what="the edge replicas and the data-centre replica", timeout=240,
                                 interval=0.2, local_ray_endpoints=local_ray_endpoints, resync_s=1.0)
