"""``POST /v1/distill/{deployment}`` against a real store, real zone stores and real
onnxruntime, without a fleet: which records a run trains on, and what it publishes."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from edgeplane_proto import oip
from orchestrator import catalog
from orchestrator.api import auth
from orchestrator.api import distill as distill_api
from orchestrator.artifacts.catalog import ArtifactCatalog
from orchestrator.distill import store as capture_store
from orchestrator.manifests import loader
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import cascade_task

THRESHOLD = 0.9
CAPTURE = {"sampleRate": 1.0, "dailyCap": 100_000, "retentionDays": 30, "zones": ["EU"]}
DAY = 86_400.0
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def task() -> cascade_task.Task:
    return cascade_task.build(teacher_width=64, teacher_depth=2, student_hidden=32, train=300, validation=10, test=10, epochs=30)


class Plane:
    """The control plane's parts the distill route uses, on files under one folder."""

    def __init__(self, t: cascade_task.Task, root: pathlib.Path):
        self.task, self.artifacts = t, root / "artifacts"
        self.student, self.teacher = cascade_task.write_models(t, self.artifacts)
        self.store = store_mod.Store(root / "state.db")
        self.apply(self.manifests())
        self.captures = capture_store.ZoneStores(root / "captures")

    def manifests(self, **capture: object) -> str:
        return cascade_task.manifests(self.student, self.teacher, threshold=THRESHOLD, edges={"edge-paris": ("FR", 48.85, 2.35)},
                                      datacentre=("dc-paris", "FR", 48.86, 2.34), capture={**CAPTURE, **capture})

    def apply(self, text: str) -> None:
        catalog.apply_documents(self.store, loader.load_text(text), actor="test")

    def capture(self, n: int, *, model: str = "task", input_name: str = cascade_task.INPUT, output_name: str = cascade_task.OUTPUT,
                age_days: float = 1.0) -> None:
        """``n`` records of cascade traffic as the gateway captures it, ``age_days`` old."""
        t = self.task
        x = np.random.default_rng(3).standard_normal((n, t.dim)).astype(np.float32)
        sp, tp = t.student.probabilities(x), t.teacher.probabilities(x)
        at = NOW - age_days * DAY
        records = []
        for i in range(n):
            escalated = bool(sp[i].max() < THRESHOLD)
            body, _ = oip.encode_request({input_name: x[i:i + 1]})
            answer, _ = oip.encode_response(oip.InferResponse("task", (oip.Tensor(output_name, (tp if escalated else sp)[i:i + 1]),)))
            records.append(capture_store.Record(capture_store.Record.new_id(), "task", model, "EU", at, at + 30 * DAY, "edge-paris",
                                                "teacher" if escalated else "student", float(sp[i].max()), body, None, answer, None))
        self.captures.zone("EU").add(records)

    def distill(self, **options: Any) -> tuple[int, dict[str, Any]]:
        app = Starlette(routes=distill_api.routes(auth.Authenticator(self.store, required=False), self.store, self.captures,
                                                  ArtifactCatalog((self.artifacts,)), lambda _: None, lambda: {"items": []},
                                                  clock=lambda: NOW))
        with TestClient(app) as client:
            resp = client.post("/v1/distill/task", json=options)
        if resp.status_code != 200:
            return resp.status_code, resp.json()
        return 200, [json.loads(line) for line in resp.text.splitlines() if line.strip()][-1]["result"]

    def close(self) -> None:
        self.captures.close()
        self.store.close()


@pytest.fixture
def plane(task: cascade_task.Task, tmp_path: pathlib.Path) -> Any:
    p = Plane(task, tmp_path)
    yield p
    p.close()


def test_records_of_another_model_under_the_same_deployment_name_are_not_trained_on(plane: Plane) -> None:
    # captured when ModelDeployment "task" served another Model (same widths): not this model's traffic
    plane.capture(500, model="old-intent-model")
    status, body = plane.distill(epochs=1)
    assert status == 409 and "zones with records: none" in body["error"], body
    plane.capture(300)
    status, result = plane.distill(epochs=1)
    assert status == 200 and result["trainExamples"] + result["heldOutExamples"] == 300, result


def test_records_older_than_the_current_retention_are_not_trained_on(plane: Plane) -> None:
    plane.capture(400, age_days=10)  # captured under retentionDays 30
    plane.capture(300, age_days=0.5)
    plane.apply(plane.manifests(retentionDays=1))  # lowered since
    status, result = plane.distill(epochs=1)
    assert status == 200 and result["trainExamples"] + result["heldOutExamples"] == 300, result
