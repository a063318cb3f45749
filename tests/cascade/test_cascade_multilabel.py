"""A cascade of multi-label (sigmoid) models end to end: a real edge agent (the student), a
real local Ray data centre (the teacher), the control plane's gateway in front, and the CLI.

Both models are written here: ``input`` [batch, 4] -> MatMul, Add, Sigmoid -> ``tags``
[batch, 3], one independent probability per tag, rows not summing to 1. The student's tag
``k`` is ``sigmoid(x[k] + bias[k])``, so a test picks how sure each tag is by its input; the
teacher is sharper (``sigmoid(3 x[k])``) and, near ``x[1] = 0``, answers tag 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import pytest_asyncio
from onnx import TensorProto, helper, numpy_helper

from orchestrator.adapters import local_ray
from orchestrator.distill.student import BuiltModel
from orchestrator.testing import cascade_task, harness
from orchestrator.artifacts.catalog import sha256_file

EDGES = {"edge-paris": ("FR", 48.8566, 2.3522)}
DC = ("dc-paris", "FR", 48.86, 2.34)
PARIS = {"x-edgeplane-location": "48.85,2.35"}
THRESHOLD = 0.9
TAGS = 3
STUDENT = (np.eye(4, TAGS, dtype=np.float32), np.array([0.0, 0.4, 0.0], np.float32))
TEACHER = (3 * np.eye(4, TAGS, dtype=np.float32), np.zeros(TAGS, np.float32))
EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


def write_sigmoid_model(path: pathlib.Path, weights: np.ndarray, bias: np.ndarray) -> BuiltModel:
    nodes = [helper.make_node("MatMul", ["input", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["tags"])]
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("tags", TensorProto.FLOAT, ["batch", TAGS])],
                              [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeplane")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return BuiltModel(path, sha256_file(path), "input", "tags", 4, TAGS)


def tags(model: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    weights, bias = model
    return 1 / (1 + np.exp(-(np.atleast_2d(x).astype(np.float32) @ weights + bias)))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, str]:
    root = tmp_path_factory.mktemp("cascade-multilabel")
    student = write_sigmoid_model(root / "artifacts" / "student.onnx", *STUDENT)
    teacher = write_sigmoid_model(root / "artifacts" / "teacher.onnx", *TEACHER)
    return root, cascade_task.manifests(student, teacher, threshold=THRESHOLD, edges=EDGES, datacentre=DC, dc_cpu=0.2,
                                        deployment="tags-cascade", scores="independent")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(built: tuple[pathlib.Path, str], ray_cluster: local_ray.LocalRayEndpoints):
    root, yaml_text = built
    async with cascade_task.serving_fleet(root, yaml_text, edges=EDGES, datacentre=DC, local_ray_endpoints=ray_cluster) as f:
        yield f


async def infer(cp: Any, x: list[float]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        return await http.post("/v2/models/task/infer", json=cascade_task.infer_body(np.array(x, np.float32)), headers=PARIS)


async def test_an_answer_sure_of_every_tag_stays_at_the_edge(fleet: harness.Fleet) -> None:
    """Its tags' probabilities (0.993, 0.018, 0.982) sum to 1.99: read as one class per row,
    the answer was refused and escalated, as every answer of such a model was."""
    x = [5.0, -4.4, 4.0, 0.0]
    resp = await infer(fleet.cp, x)
    assert resp.status_code == 200, resp.text
    h = resp.headers
    assert (h["x-edgeplane-site"], h["x-edgeplane-cascade-escalation"]) == ("edge-paris", "none"), h.get("x-edgeplane-cascade-reason")
    expected = tags(STUDENT, np.array(x))[0]
    assert float(h["x-edgeplane-cascade-confidence"]) == pytest.approx(float(np.maximum(expected, 1 - expected).min()), abs=1e-4)
    np.testing.assert_allclose(resp.json()["outputs"][0]["data"], expected, rtol=1e-5)


async def test_an_answer_unsure_of_one_tag_escalates_saying_which_measure(fleet: harness.Fleet) -> None:
    resp = await infer(fleet.cp, [5.0, -0.1, -5.0, 0.0])  # tag 1 at sigmoid(0.3) = 0.574
    assert resp.status_code == 200, resp.text
    h = resp.headers
    assert (h["x-edgeplane-site"], h["x-edgeplane-cascade-stage"], h["x-edgeplane-cascade-escalation"]) == ("dc-paris", "teacher", "escalated")
    assert "student: least sure label's top probability 0.574 < 0.9" in h["x-edgeplane-cascade-reason"]


async def test_cascade_tune_scores_multi_label_answers_by_their_sets_of_tags(fleet: harness.Fleet, built: tuple[pathlib.Path, str]) -> None:
    root, _ = built
    x = np.random.default_rng(7).uniform(-2, 2, (30, 4)).astype(np.float32)
    x[:10, 1] = np.linspace(-0.35, -0.05, 10)  # where the student says tag 1, the teacher does not
    truth = tags(TEACHER, x) >= 0.5
    sample = root / "tags.jsonl"
    lines = [json.dumps({"input": [[float(v) for v in row]], "label": [int(k) for k in np.flatnonzero(t)]}) for row, t in zip(x, truth)]
    # a sample of two rows: one list of the tags that apply per row
    lines.append(json.dumps({"input": [[float(v) for v in row] for row in x[:2]],
                             "label": [[int(k) for k in np.flatnonzero(t)] for t in truth[:2]]}))
    sample.write_text("\n".join(lines) + "\n")
    cmd = [str(EDGEPLANE), "cascade", "tune", "tags-cascade", "-f", str(sample), "--thresholds", "0.6,0.99", "--location", "48.85,2.35",
           "--server", fleet.cp.http_url]
    out = await asyncio.to_thread(subprocess.run, [*cmd, "-o", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["rule"]["independent"] is True
    rows = {r["name"]: r for r in doc["rows"]}
    student = tags(STUDENT, x) >= 0.5
    right = (student == truth).all(-1)
    assert rows["first stage only"]["accuracy"] == pytest.approx((right.sum() + right[:2].sum()) / 32, abs=1e-4)
    assert rows["last stage only"]["accuracy"] == 1
    p = tags(STUDENT, x)
    sure = np.maximum(p, 1 - p).min(-1)
    kept = (sure >= np.float32(0.99)).sum() + (sure[:2].min() >= np.float32(0.99))
    assert rows["cascade below 0.99"]["firstStageShare"] == pytest.approx(kept / 31, abs=1e-4)
    table = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "independent label probabilities of 'tags'" in table.stdout, table.stdout + table.stderr
    bad = sample.with_name("bad.jsonl")
    bad.write_text(json.dumps({"input": [[0.0] * 4], "label": 2}) + "\n")
    out = await asyncio.to_thread(subprocess.run, [*cmd[:5], str(bad), "--server", fleet.cp.http_url], capture_output=True, text=True,
                                  timeout=60)
    assert out.returncode == 1 and "bad.jsonl:1: \"label\" must list the labels that apply" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
