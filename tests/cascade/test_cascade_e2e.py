"""Cascades end to end: real edge agents (the student), a real local Ray data centre (the
teacher), the control plane's gateway in front, and the CLI.

One fleet per module: edge-paris (FR), edge-berlin (DE) and dc-paris (FR, Ray). The task is
:mod:`orchestrator.testing.cascade_task`, small enough to build in a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import subprocess
import sys
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio

from orchestrator.adapters import local_ray
from orchestrator.testing import cascade_task, harness

EDGES = {"edge-paris": ("FR", 48.8566, 2.3522), "edge-berlin": ("DE", 52.52, 13.405)}
DC = ("dc-paris", "FR", 48.86, 2.34)
THRESHOLD = 0.9
PARIS = {"x-edgeplane-location": "48.85,2.35"}
BERLIN = {"x-edgeplane-location": "52.5,13.4", "x-edgeplane-residency": "DE"}
EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, cascade_task.Task, str]:
    root = tmp_path_factory.mktemp("cascade")
    task = cascade_task.build(teacher_width=64, teacher_depth=2, student_hidden=32, train=3000, validation=200, test=400, epochs=30)
    student, teacher = cascade_task.write_models(task, root / "artifacts")
    return root, task, cascade_task.manifests(student, teacher, threshold=THRESHOLD, edges=EDGES, datacentre=DC, dc_cpu=0.2,
                                                          deployment="task-cascade")


@pytest.fixture(scope="module")
def samples(task: tuple[pathlib.Path, cascade_task.Task, str]) -> tuple[np.ndarray, np.ndarray]:
    """A confident input and an unsure one, by the student's own confidence."""
    _, t, _ = task
    conf = t.student.probabilities(t.x_test).max(-1)
    return t.x_test[int(np.argmax(conf))], t.x_test[int(np.argmin(conf))]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(task: tuple[pathlib.Path, cascade_task.Task, str], ray_cluster: local_ray.LocalRayEndpoints):
    root, _, yaml_text = task
    async with cascade_task.serving_fleet(root, yaml_text, edges=EDGES, datacentre=DC, local_ray_endpoints=ray_cluster) as f:
        yield f


async def infer(cp: Any, x: np.ndarray, headers: dict[str, str], name: str = "task") -> httpx.Response:
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        return await http.post(f"/v2/models/{name}/infer", json=cascade_task.infer_body(x), headers=headers)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_confident_answer_stays_at_the_edge(fleet: harness.Fleet, samples: tuple[np.ndarray, np.ndarray]) -> None:
    resp = await infer(fleet.cp, samples[0], PARIS)
    assert resp.status_code == 200, resp.text
    h = resp.headers
    assert (h["x-edgeplane-site"], h["x-edgeplane-cascade-stage"], h["x-edgeplane-cascade-escalation"]) == ("edge-paris", "student", "none")
    assert h["x-edgeplane-cascade-sites"] == "edge-paris"
    assert float(h["x-edgeplane-cascade-confidence"]) >= THRESHOLD
    assert float(h["x-edgeplane-cascade-energy-j"]) > 0
    by_name = await infer(fleet.cp, samples[0], PARIS, name="task-cascade")  # the deployment's name calls it too
    assert by_name.status_code == 200 and by_name.headers["x-edgeplane-cascade-stage"] == "student"
    async with httpx.AsyncClient(base_url=fleet.cp.http_url, timeout=30) as http:
        assert (await http.get("/v2/models/task-cascade/ready", headers=PARIS)).status_code == 200
        meta = await http.get("/v2/models/task-cascade", headers=PARIS)
        assert meta.status_code == 200 and meta.json()["inputs"][0]["name"] == cascade_task.INPUT


@pytest.mark.asyncio(loop_scope="module")
async def test_an_unsure_answer_escalates_to_the_data_centre(fleet: harness.Fleet, samples: tuple[np.ndarray, np.ndarray],
                                                             task: tuple[pathlib.Path, cascade_task.Task, str]) -> None:
    resp = await infer(fleet.cp, samples[1], PARIS)
    assert resp.status_code == 200, resp.text
    h = resp.headers
    assert (h["x-edgeplane-site"], h["x-edgeplane-tier"], h["x-edgeplane-cascade-stage"]) == ("dc-paris", "datacenter", "teacher")
    assert h["x-edgeplane-cascade-escalation"] == "escalated"
    assert h["x-edgeplane-cascade-sites"] == "edge-paris,dc-paris"
    assert "student: top probability" in h["x-edgeplane-cascade-reason"]
    served = np.array(resp.json()["outputs"][0]["data"], dtype=np.float32)
    expected = task[1].teacher.probabilities(samples[1][None, :])[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.asyncio(loop_scope="module")
async def test_no_escalation_outside_the_callers_residency(fleet: harness.Fleet, samples: tuple[np.ndarray, np.ndarray]) -> None:
    resp = await infer(fleet.cp, samples[1], BERLIN)
    assert resp.status_code == 200, resp.text
    h = resp.headers
    assert (h["x-edgeplane-site"], h["x-edgeplane-cascade-stage"], h["x-edgeplane-cascade-escalation"]) == ("edge-berlin", "student", "not-escalated")
    assert h["x-edgeplane-cascade-sites"] == "edge-berlin"
    assert "caller's residency (DE)" in h["x-edgeplane-cascade-reason"]
    assert float(h["x-edgeplane-cascade-confidence"]) < THRESHOLD


@pytest.mark.asyncio(loop_scope="module")
async def test_caller_modes(fleet: harness.Fleet, samples: tuple[np.ndarray, np.ndarray]) -> None:
    last = await infer(fleet.cp, samples[0], {**PARIS, "x-edgeplane-cascade": "force-last"})
    assert (last.headers["x-edgeplane-site"], last.headers["x-edgeplane-cascade-sites"]) == ("dc-paris", "dc-paris")
    first = await infer(fleet.cp, samples[1], {**PARIS, "x-edgeplane-cascade": "force-first"})
    assert (first.headers["x-edgeplane-site"], first.headers["x-edgeplane-cascade-escalation"]) == ("edge-paris", "none")
    off = await infer(fleet.cp, samples[1], {**PARIS, "x-edgeplane-cascade": "off"})
    assert off.status_code == 200 and "x-edgeplane-cascade-stage" not in off.headers
    bad = await infer(fleet.cp, samples[1], {**PARIS, "x-edgeplane-cascade": "sometimes"})
    assert bad.status_code == 400 and "force-last" in bad.json()["error"]
    # the last stage runs in FR only: a DE caller forcing it is unavailable (503), not a failed upstream (was 502)
    nowhere = await infer(fleet.cp, samples[1], {**BERLIN, "x-edgeplane-cascade": "force-last"})
    assert nowhere.status_code == 503, nowhere.text
    assert "the last stage (teacher) cannot run; tried: teacher: no replica in the caller's residency (DE)" in nowhere.json()["error"]


@pytest.mark.asyncio(loop_scope="module")
async def test_get_cascades_and_metrics(fleet: harness.Fleet, samples: tuple[np.ndarray, np.ndarray]) -> None:
    for x in samples:
        assert (await infer(fleet.cp, x, PARIS)).status_code == 200
    cp = fleet.cp
    out = await asyncio.to_thread(subprocess.run, [str(EDGEPLANE), "get", "cascades", "-o", "json", "--server", cp.http_url],
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [item] = json.loads(out.stdout)["items"]
    assert (item["name"], item["model"]) == ("task-cascade", "task") and item["stages"] == ["student", "teacher"]
    assert item["answered"]["student"] >= 1 and item["answered"]["teacher"] >= 1
    assert item["requests"] == sum(item["answered"].values()) + item["failed"]
    assert 0 < item["escalationRate"] < 1 and item["energyPerRequestJ"] > 0 and item["co2PerRequestG"] > 0
    table = await asyncio.to_thread(subprocess.run, [str(EDGEPLANE), "get", "cascades", "--server", cp.http_url],
                                    capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "student > teacher" in table.stdout
    described = await asyncio.to_thread(subprocess.run, [str(EDGEPLANE), "describe", "md", "task-cascade", "-o", "json",
                                                         "--server", cp.http_url], capture_output=True, text=True, timeout=60)
    assert described.returncode == 0 and json.loads(described.stdout)["cascade"]["requests"] == item["requests"]
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        metrics = (await http.get("/metrics")).text
    assert 'edgeplane_cascade_answered_total{cascade="task-cascade",stage="teacher"}' in metrics
    assert 'edgeplane_cascade_escalations_total{cascade="task-cascade",cause="unsure",stage="student"}' in metrics
    assert "edgeplane_cascade_energy_joules_total" in metrics and "edgeplane_cascade_added_seconds_bucket" in metrics


@pytest.mark.asyncio(loop_scope="module")
async def test_cascade_tune_prints_a_sweep(fleet: harness.Fleet, task: tuple[pathlib.Path, cascade_task.Task, str]) -> None:
    root, t, _ = task
    sample = root / "sample.jsonl"
    cascade_task.write_jsonl(sample, t.x_val[:40], t.y_val[:40])
    cmd = [str(EDGEPLANE), "cascade", "tune", "task-cascade", "-f", str(sample), "--thresholds", "0.5,0.9,1", "--location", "48.85,2.35",
           "--server", fleet.cp.http_url]
    out = await asyncio.to_thread(subprocess.run, [*cmd, "-o", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["rows"]}
    first, last = rows["first stage only"], rows["last stage only"]
    assert first["firstStageShare"] == 1 and last["firstStageShare"] == 0 and last["agreement"] == 1
    # replayed answers equal the local models' answers
    student = t.student.probabilities(t.x_val[:40]).argmax(-1)
    teacher = t.teacher.probabilities(t.x_val[:40]).argmax(-1)
    assert first["accuracy"] == pytest.approx(float((student == t.y_val[:40]).mean()), abs=1e-4)
    assert last["accuracy"] == pytest.approx(float((teacher == t.y_val[:40]).mean()), abs=1e-4)
    assert rows["cascade below 1"]["firstStageShare"] <= rows["cascade below 0.9"]["firstStageShare"] <= rows["cascade below 0.5"]["firstStageShare"]
    assert rows["cascade below 0.9"]["energyPerRequestJ"] > first["energyPerRequestJ"]
    table = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "cascade below 0.9" in table.stdout and "AGREES WITH LAST" in table.stdout
    bad = sample.with_name("bad.jsonl")
    bad.write_text('{"input": [[1, 2]]}\nnot json\n')
    out = await asyncio.to_thread(subprocess.run, [*cmd[:5], str(bad), "--server", fleet.cp.http_url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "bad.jsonl:2: not JSON" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.asyncio(loop_scope="module")
async def test_a_versioned_request_goes_to_the_stage_that_holds_that_file(
        fleet: harness.Fleet, task: tuple[pathlib.Path, cascade_task.Task, str], samples: tuple[np.ndarray, np.ndarray]) -> None:
    """A version names one file, so it runs no cascade: the teacher's version from Paris is
    answered by the data centre holding it (its Serve app reports it), though the edge is
    nearer; the student's by the edge."""
    root, _, _ = task
    teacher = hashlib.sha256((root / "artifacts" / "teacher.onnx").read_bytes()).hexdigest()[:12]
    student = hashlib.sha256((root / "artifacts" / "student.onnx").read_bytes()).hexdigest()[:12]
    async with httpx.AsyncClient(base_url=fleet.cp.http_url, timeout=30) as http:
        listed = {e["site"]: e.get("version") for e in (await http.get("/v1/endpoints/task")).json()["endpoints"]}
        assert listed.get("dc-paris") == teacher and listed.get("edge-paris") == student, listed
        for version, site in ((teacher, "dc-paris"), (student, "edge-paris")):
            resp = await http.post(f"/v2/models/task/versions/{version}/infer", json=cascade_task.infer_body(samples[0]), headers=PARIS)
            assert resp.status_code == 200 and resp.headers["x-edgeplane-site"] == site, resp.text
            assert resp.json()["model_version"] == version



@pytest.mark.asyncio(loop_scope="module")
async def test_stage_one_killed_under_load_fails_no_request(fleet: harness.Fleet, task: tuple[pathlib.Path, cascade_task.Task, str]) -> None:
    """Last in this module: it leaves edge-paris dead. A French caller's only first stage is
    edge-paris; killed with SIGKILL mid-load, every request is answered by the data centre."""
    cp, t = fleet.cp, task[1]
    french = {**PARIS, "x-edgeplane-residency": "FR"}
    statuses: list[tuple[int, str, float]] = []  # status, site, time
    killed_at: list[float] = []
    loop = asyncio.get_running_loop()

    async def worker(offset: int) -> None:
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            # Bounded by count; ends once 40 answers arrived more than 0.5 s after the kill
            # (on a quiet machine all of the first 60 after it can come within 0.5 s).
            for i in range(offset, 8000, 4):
                resp = await http.post("/v2/models/task/infer", json=cascade_task.infer_body(t.x_test[i % len(t.x_test)]), headers=french)
                statuses.append((resp.status_code, resp.headers.get("x-edgeplane-site", ""), loop.time()))
                settled = [s for s in statuses if killed_at and s[2] > killed_at[0] + 0.5]
                if len(settled) >= 40:
                    return

    async def killer() -> None:
        await harness.wait_until(lambda: sum(s[1] == "edge-paris" for s in statuses) >= 20, 60, interval=0.01, what="load at edge-paris")
        fleet.agents["edge-paris"].kill()
        killed_at.append(loop.time())

    await asyncio.gather(killer(), *(worker(k) for k in range(4)))
    assert killed_at, "the agent was never killed"
    failed = [s for s in statuses if s[0] != 200]
    assert not failed, failed[:5]
    after = [s for s in statuses if s[2] > killed_at[0] + 0.5]
    assert after and {s[1] for s in after} == {"dc-paris"}

