"""A control plane stopped while a distillation trains: the run stops at its next step, within
the stop, and says so (the caller's result and the ``distill`` event: ``stopped``), leaving
nothing in the artifact root and the Model as it was. In-process control plane on real
SQLite, real zone stores and real onnxruntime; no fleet (nothing is placed)."""

from __future__ import annotations

import asyncio
import json
import re
import pathlib
import time
from typing import Any

import httpx
import numpy as np
import pytest

from edgeplane_proto import oip
from orchestrator import catalog
from orchestrator.distill import store as capture_store
from orchestrator.manifests import loader
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import cascade_task, harness

THRESHOLD = 0.9
CAPTURE = {"sampleRate": 1.0, "dailyCap": 100_000, "retentionDays": 30, "zones": ["EU"]}


@pytest.fixture(scope="module")
def task() -> cascade_task.Task:
    return cascade_task.build(teacher_width=64, teacher_depth=2, student_hidden=32, train=300, validation=10, test=10, epochs=30)


def captured(t: cascade_task.Task, n: int, created: float) -> list[capture_store.Record]:
    """``n`` records of cascade traffic as the gateway captures it for deployment "task"."""
    x = np.random.default_rng(3).standard_normal((n, t.dim)).astype(np.float32)
    sp, tp = t.student.probabilities(x), t.teacher.probabilities(x)
    now, out = time.time(), []
    for i in range(n):
        escalated = bool(sp[i].max() < THRESHOLD)
        body, _ = oip.encode_request({cascade_task.INPUT: x[i:i + 1]})
        answer, _ = oip.encode_response(oip.InferResponse("task", (oip.Tensor(cascade_task.OUTPUT, (tp if escalated else sp)[i:i + 1]),)))
        out.append(capture_store.Record(capture_store.Record.new_id(), "task", "task", "EU", now, now + 86_400, "edge-paris",
                                        "teacher" if escalated else "student", float(sp[i].max()), body, None, answer, None, created))
    return out


async def test_a_run_under_way_when_the_control_plane_stops_is_stopped_at_its_next_step_and_recorded_so(
        task: cascade_task.Task, tmp_path: pathlib.Path) -> None:
    artifacts = tmp_path / "artifacts"
    student, teacher = cascade_task.write_models(task, artifacts)
    text = cascade_task.manifests(student, teacher, threshold=THRESHOLD, edges={"edge-paris": ("FR", 48.85, 2.35)},
                                  datacentre=("dc-paris", "FR", 48.86, 2.34), capture=CAPTURE)
    docs = [d for d in loader.load_text(text) if d.kind != "Site"]  # no site: nothing is placed, no Ray started
    before = sorted(p.name for p in artifacts.rglob("*"))
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane(artifact_roots=(artifacts,))
    try:
        catalog.apply_documents(cp.store, docs, actor="test")
        model = cp.store.get("Model", "task")
        created = cp.store.get("ModelDeployment", "task").created_at  # type: ignore[union-attr]
        cp.captures.zone("EU").add(captured(task, 20_000, created))  # 1,000 epochs of it: half a minute
        result: dict[str, Any] = {}
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=60) as http:
            async with http.stream("POST", "/v1/distill/task", json={"epochs": 1000}) as resp:
                assert resp.status_code == 200
                stopping: asyncio.Task[None] | None = None
                async for line in resp.aiter_lines():
                    item = json.loads(line) if line.strip() else {}
                    if item.get("progress", {}).get("epoch") == 1 and stopping is None:
                        stopping = asyncio.create_task(fleet.stop())
                    result = item.get("result", result)
        assert stopping is not None
        await asyncio.wait_for(stopping, 30)
    finally:
        await fleet.stop()
    assert result.get("state") == "stopped" and not result["published"], result
    assert "stopped" in result["error"] and "Traceback" not in result["error"], result
    done = re.search(r"after epoch (\d+) of 1000", result["error"])
    assert done is not None and int(done[1]) < 900, f"the stop waited for the whole run: {result}"
    store = store_mod.Store(tmp_path / "control-plane" / "state.db")
    try:
        events = [e for e in store.recent_events("ModelDeployment", "task") if e.action == "distill"]
        assert [e.details.get("state") for e in events] == ["stopped"], events
        assert store.get("Model", "task").spec == model.spec  # type: ignore[union-attr]
    finally:
        store.close()
    assert sorted(p.name for p in artifacts.rglob("*")) == before  # no candidate, whole or half written
