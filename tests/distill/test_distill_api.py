"""``POST /v1/distill/{deployment}`` against a real store, real zone stores and real
onnxruntime, without a fleet: which records a run trains on, and what it publishes."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from edgeplane_proto import oip
from orchestrator import catalog
from orchestrator.api import auth
from orchestrator.api import captures as captures_api
from orchestrator.api import distill as distill_api
from orchestrator.artifacts.catalog import ArtifactCatalog
from orchestrator.distill import store as capture_store
from orchestrator.manifests import loader
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import cascade_task, loopback
from tests.distill.test_capture import filled

THRESHOLD = 0.9
CAPTURE = {"sampleRate": 1.0, "dailyCap": 100_000, "retentionDays": 30, "zones": ["EU"]}
DAY = 86_400.0
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def task() -> cascade_task.Task:
    return cascade_task.build(teacher_width=64, teacher_depth=2, student_hidden=32, train=300, validation=10, test=10, epochs=30)


class Plane:
    """The control plane's parts the distill route uses, on files under one folder."""

    def __init__(self, t: cascade_task.Task, root: pathlib.Path, store_threads: int = 4):
        self.task, self.artifacts = t, root / "artifacts"
        self.student, self.teacher = cascade_task.write_models(t, self.artifacts)
        self.store = store_mod.Store(root / "state.db", threads=store_threads)
        self.apply(self.manifests())
        self.captures = capture_store.ZoneStores(root / "captures")

    def manifests(self, **capture: object) -> str:
        return cascade_task.manifests(self.student, self.teacher, threshold=THRESHOLD, edges={"edge-paris": ("FR", 48.85, 2.35)},
                                      datacentre=("dc-paris", "FR", 48.86, 2.34), capture={**CAPTURE, **capture})

    def apply(self, text: str) -> None:
        catalog.apply_documents(self.store, loader.load_text(text), actor="test")

    def capture(self, n: int, *, model: str = "task", input_name: str = cascade_task.INPUT, output_name: str = cascade_task.OUTPUT,
                age_days: float = 1.0, stamp: float | None = None) -> None:
        """``n`` records of cascade traffic as the gateway captures it, ``age_days`` old;
        ``stamp``: the capture in force they were captured under (``Record.deployment_created``)."""
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
                                                "teacher" if escalated else "student", float(sp[i].max()), body, None, answer, None,
                                                stamp))
        self.captures.zone("EU").add(records)

    def app(self, artifacts: ArtifactCatalog | None = None, *, tokens: bool = False) -> Starlette:
        """``tokens``: the API needs a bearer token, as on a non-loopback address."""
        return Starlette(routes=distill_api.routes(auth.Authenticator(self.store, required=tokens), self.store, self.captures,
                                                   artifacts or ArtifactCatalog((self.artifacts,)), lambda _: None, lambda: {"items": []},
                                                   clock=lambda: NOW))

    def distill(self, **options: Any) -> tuple[int, dict[str, Any]]:
        with TestClient(self.app()) as client:
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


def test_records_captured_before_capture_was_turned_off_and_on_again_are_not_trained_on(plane: Plane) -> None:
    def in_force() -> float | None:
        covered = catalog.capture_retention(plane.store)["task"]
        return covered.created if covered is not None else None

    plane.capture(400, stamp=in_force())
    without = json.loads(json.dumps([d for d in map(json.loads, plane.manifests().split("---\n")) if d["kind"] == "ModelDeployment"][0]))
    del without["spec"]["cascade"]["capture"]
    plane.apply(json.dumps(without))  # capture off: what it captured is kept for nothing now
    plane.apply(plane.manifests())  # and on again, before any purge
    plane.capture(300, stamp=in_force())
    status, result = plane.distill(epochs=1)
    assert status == 200 and result["trainExamples"] + result["heldOutExamples"] == 300, result
    assert plane.captures.zone("EU").count("task") == 300


def test_records_older_than_the_current_retention_are_not_trained_on(plane: Plane) -> None:
    plane.capture(400, age_days=10)  # captured under retentionDays 30
    plane.capture(300, age_days=0.5)
    plane.apply(plane.manifests(retentionDays=1))  # lowered since
    status, result = plane.distill(epochs=1)
    assert status == 200 and result["trainExamples"] + result["heldOutExamples"] == 300, result


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` behind uvicorn on loopback, so that a run's progress streams while it trains."""
    async with loopback.serving(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        yield http


async def run_while(http: httpx.AsyncClient, meanwhile: Callable[[], Awaitable[None]], token: str | None = None) -> dict[str, Any]:
    """POST a run (with bearer ``token``); call ``meanwhile`` once it trains; its result."""
    result: dict[str, Any] = {}
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    async with http.stream("POST", "/v1/distill/task", json={"epochs": 60}, headers=headers) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            item = json.loads(line) if line.strip() else {}
            if item.get("progress", {}).get("epoch") == 1:
                await meanwhile()
            result = item.get("result", result)
    return result


def with_variant(plane: Plane, variant: str, **changes: Any) -> str:
    """The stored Model "task" with ``changes`` made to ``variant``, as an operator applies it."""
    spec = json.loads(json.dumps(plane.store.get("Model", "task").spec))
    next(v for v in spec["variants"] if v["name"] == variant).update(changes)
    return json.dumps({"apiVersion": "edgeplane.io/v1alpha1", "kind": "Model", "metadata": {"name": "task"}, "spec": spec})


async def test_a_model_change_applied_during_a_run_survives_its_publish_and_a_second_run_waits(plane: Plane) -> None:
    plane.capture(2000)

    async def meanwhile() -> None:
        plane.apply(with_variant(plane, "teacher", powerWatts=300.0))  # an operator's apply while the run trains
        second = await http.post("/v1/distill/task", json={"epochs": 1})
        assert second.status_code == 409 and "is running" in second.json()["error"]
    async with serving(plane.app()) as http:
        result = await run_while(http, meanwhile)
        assert result["published"], result
        variants = {v["name"]: v for v in plane.store.get("Model", "task").spec["variants"]}
        assert variants["student"]["artifact"]["uri"] == result["artifact"]["uri"]  # the new student is published ...
        assert variants["teacher"]["powerWatts"] == 300.0  # ... without undoing the operator's change
        assert (await http.post("/v1/distill/task", json={"epochs": 1, "minGain": 0.9})).status_code == 200  # the run is over


async def test_a_run_whose_serving_student_was_replaced_meanwhile_publishes_nothing(plane: Plane) -> None:
    plane.capture(2000)
    other = {"uri": plane.teacher.path.name, "sha256": plane.teacher.sha256}  # another file now serves at the edge

    async def meanwhile() -> None:
        plane.apply(with_variant(plane, "student", artifact=other))
    async with serving(plane.app()) as http:
        result = await run_while(http, meanwhile)
    assert not result["published"] and "changed during the run" in result["error"], result
    assert plane.store.get("Model", "task").spec["variants"][0]["artifact"] == other


async def test_a_run_whose_admin_token_is_revoked_meanwhile_publishes_nothing(plane: Plane) -> None:
    """Revoking a leaked admin token stops what it started: revoked on another replica (this
    process keeps its verdict a few seconds), the run still publishes no new edge artifact."""
    plane.capture(2000)
    secret, token = plane.store.create_token("api", "admin", None, "test", "leaked")
    before = plane.store.get("Model", "task").spec["variants"][0]["artifact"]

    async def meanwhile() -> None:
        assert plane.store.revoke_token(token.id, "token:other-admin", "leaked")
    async with serving(plane.app(tokens=True)) as http:
        result = await run_while(http, meanwhile, secret)
    assert not result["published"] and result["state"] == "failed", result
    assert "revoked or has expired" in result["error"], result
    assert plane.store.get("Model", "task").spec["variants"][0]["artifact"] == before
    [event] = [e for e in plane.store.events(limit=100) if e.action == "distill"]
    assert event.reason.startswith("not published: the new Model was not applied: the token"), event.reason


async def test_a_record_erased_while_a_run_trains_is_in_no_student_it_publishes(plane: Plane) -> None:
    """A data subject's erasure lands while the run trains on what it read before: the
    student learned from the erased record, so it is not published, and its file, a copy
    derived from the record, is not kept either."""
    plane.capture(2000)
    before = plane.store.get("Model", "task").spec["variants"][0]["artifact"]
    erased = plane.captures.zone("EU").records(now=NOW, limit=1)[0].id
    app = Starlette(routes=[*plane.app().routes, *captures_api.routes(auth.Authenticator(plane.store, required=False), plane.store,
                                                                        plane.captures, clock=lambda: NOW)])

    async def meanwhile() -> None:
        assert (await http.delete(f"/v1/captures/EU/{erased}")).status_code == 200
    async with serving(app) as http:
        result = await run_while(http, meanwhile)
    assert not result["published"] and result["state"] == "failed", result
    assert "1 of the records it trained on was erased" in result["error"], result["error"]
    assert plane.store.get("Model", "task").spec["variants"][0]["artifact"] == before
    assert list((plane.artifacts / "distilled").glob("*.onnx")) == []


async def test_records_a_retention_lowered_during_a_run_purges_are_expired_not_erased(plane: Plane) -> None:
    """The operator lowers retentionDays while the run trains, and the retention purge
    deletes what it trained on that is older than that now: those records expired, as one
    past its own expiry would have, and no data subject asked for them to go, so the run is
    not failed as if they had."""
    plane.capture(2000, age_days=0.5)
    plane.capture(500, age_days=10)  # kept under retentionDays 30, past the 1 the operator lowers it to

    async def meanwhile() -> None:
        plane.apply(plane.manifests(retentionDays=1))
        assert plane.captures.purge(NOW, catalog.capture_retention(plane.store)) == 500
    async with serving(plane.app()) as http:
        result = await run_while(http, meanwhile)
    assert "erased" not in result.get("error", ""), result["error"]
    assert result["published"], result


async def test_a_run_whose_publish_the_store_refuses_still_ends_with_its_result(plane: Plane) -> None:
    """The state store's disk fills while the run trains: neither the new Model nor the
    distill event can be written, and the caller is told so in the result line, where the
    stream ended with none."""
    plane.capture(2000)
    before = plane.store.get("Model", "task").spec["variants"][0]["artifact"]

    async def meanwhile() -> None:
        await asyncio.to_thread(filled, plane.store)
    async with serving(plane.app()) as http:
        result = await run_while(http, meanwhile)
    assert result.get("state") == "failed" and not result["published"], result
    assert "may or may not have taken effect" in result["error"] and "full" in result["error"], result["error"]
    assert "not recorded" in result["notRecorded"], result
    assert plane.store.get("Model", "task").spec["variants"][0]["artifact"] == before


async def test_a_run_whose_token_the_store_cannot_check_again_says_nothing_was_applied(plane: Plane) -> None:
    """The store stops answering while the run trains: the token that started it cannot be
    looked up again, so the Model is not applied, and the result says so rather than that
    the apply may have taken effect."""
    plane.capture(2000)
    secret, _ = plane.store.create_token("api", "admin", None, "test", "operator")
    before = plane.store.get("Model", "task").spec["variants"][0]["artifact"]

    async def meanwhile() -> None:
        plane.store.threads.close()  # what the store's calls meet while it is closing
    async with serving(plane.app(tokens=True)) as http:
        result = await run_while(http, meanwhile, secret)
    assert not result["published"] and result["state"] == "failed", result
    assert result["error"].startswith("the new Model was not applied: the store did not answer"), result["error"]
    assert "may or may not" not in result["error"] and "not recorded" in result["notRecorded"], result
    assert plane.store.get("Model", "task").spec["variants"][0]["artifact"] == before


def test_a_deployment_that_does_not_exist_is_not_found(plane: Plane) -> None:
    """404, as every route answers a missing object; 409 stays for one that exists but cannot be distilled."""
    with TestClient(plane.app()) as client:
        resp = client.post("/v1/distill/nope", json={"epochs": 1})
    assert resp.status_code == 404 and resp.json() == {"error": "ModelDeployment 'nope' does not exist", "reason": "NotFound"}, resp.text


def test_a_run_asked_for_while_the_store_does_not_answer_is_told_to_ask_again(plane: Plane) -> None:
    plane.capture(300)
    plane.store.threads.close()  # what the store's calls meet while it is closing
    with TestClient(plane.app(), raise_server_exceptions=False) as client:
        resp = client.post("/v1/distill/task", json={"epochs": 1})
    assert resp.status_code == 503 and resp.headers.get("retry-after"), (resp.status_code, resp.text[:300])
    assert "closed" in resp.json()["error"]


async def test_a_run_whose_artifacts_lie_on_a_mount_that_stalls_leaves_the_store_to_other_callers(
        task: cascade_task.Task, tmp_path: pathlib.Path) -> None:
    """Looking up the serving student (on a network mount that stopped answering, say) is
    not the store's work: with one store thread, the store still answers meanwhile."""
    stalled, answers = threading.Event(), threading.Event()

    class StalledMount(ArtifactCatalog):
        def local_path(self, uri: str) -> pathlib.Path | None:
            stalled.set()
            answers.wait(30)
            return super().local_path(uri)

    plane = Plane(task, tmp_path, store_threads=1)
    try:
        async with serving(plane.app(StalledMount((plane.artifacts,)))) as http:
            run = asyncio.create_task(http.post("/v1/distill/task", json={"epochs": 1}))
            try:
                assert await asyncio.to_thread(stalled.wait, 30), "the run did not look its artifact up"
                async with asyncio.timeout(10):
                    assert await plane.store.run(plane.store.get, "Model", "task") is not None
            finally:
                answers.set()
            refused = await run
            assert refused.status_code == 409 and "zones with records: none" in refused.json()["error"], refused.text
    finally:
        plane.close()


def stored_as_an_earlier_version_left_it(plane: Plane, kind: str, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """``kind`` ``name`` rewritten in the store as ``change`` makes its spec, past the checks of an apply."""
    obj = plane.store.get(kind, name)
    assert obj is not None
    spec = json.loads(json.dumps(obj.spec))
    change(spec)
    plane.store.apply([store_mod.ObjectWrite(kind, name, dict(obj.labels), spec)], store_mod.Event("earlier-version", "apply", kind, name, "apply"))


@pytest.mark.parametrize(("kind", "change", "why"), [
    ("Model", lambda spec: spec["variants"][0].update(throughputRps=1e-320), "throughputRps"),  # overflows demand / rate
    ("ModelDeployment", lambda spec: spec.update(priority="high"), "priority"),  # a field this version does not have
], ids=["model", "deployment"])
def test_a_deployment_or_model_this_version_cannot_read_is_refused_naming_it(
        plane: Plane, kind: str, change: Callable[[dict[str, Any]], None], why: str) -> None:
    plane.capture(300)
    stored_as_an_earlier_version_left_it(plane, kind, "task", change)
    with TestClient(plane.app(), raise_server_exceptions=False) as client:
        resp = client.post("/v1/distill/task", json={"epochs": 1})
    assert resp.status_code == 409, resp.text
    error = resp.json()["error"]
    assert f"{kind} 'task'" in error and why in error and "apply it again or delete it" in error, error


@pytest.mark.parametrize("scores", ["independent", "independent-logits", "logits"])
def test_a_cascade_whose_student_is_not_a_softmax_classifier_is_refused_saying_what_is_trained(plane: Plane, scores: str) -> None:
    """A multi-label cascade (or one reading logits) was told to capture more records while it
    had none, and once it had, that 'the edge student must output probabilities': refused
    only after the wait, and never saying that multi-label students are not trained at all."""
    plane.apply(cascade_task.manifests(plane.student, plane.teacher, threshold=THRESHOLD, edges={"edge-paris": ("FR", 48.85, 2.35)},
                                       datacentre=("dc-paris", "FR", 48.86, 2.34), capture=CAPTURE, scores=scores))
    status, body = plane.distill(epochs=1)  # no record yet: refused for what it is, not sent to capture more
    assert status == 409, body
    assert (f"distillation trains single-label students only: a softmax over classes, whose rule reads its probabilities "
            f"(escalate.confidence.scores: probabilities); the first stage's rule reads scores: {scores}") in body["error"], body
    assert "zones with records" not in body["error"]
    if scores.startswith("independent"):
        assert "a multi-label student (one sigmoid per label) is not trained here" in body["error"], body
