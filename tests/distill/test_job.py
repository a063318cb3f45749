"""The training run and its gate: what passes is content-addressed in the artifact root;
what fails or is worse leaves nothing behind."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import onnxruntime as ort
import pytest

from edgeplane_proto import oip
from orchestrator.artifacts.catalog import sha256_file
from orchestrator.distill import job
from orchestrator.distill import student as student_mod
from orchestrator.distill.store import Record
from orchestrator.testing import cascade_task

THRESHOLD = job.Threshold(0.9)


@pytest.fixture(scope="module")
def task() -> cascade_task.Task:
    return cascade_task.build(teacher_width=64, teacher_depth=2, student_hidden=32, train=300, validation=10, test=10, epochs=30)


def records(t: cascade_task.Task, n: int, seed: int = 3, teacher: cascade_task.Mlp | None = None,
            names: tuple[str, str] = (cascade_task.INPUT, cascade_task.OUTPUT)) -> list[Record]:
    """Traffic as the cascade captures it: the teacher's answer when the student was unsure."""
    x = np.random.default_rng(seed).standard_normal((n, t.dim)).astype(np.float32)
    sp, tp = t.student.probabilities(x), (teacher or t.teacher).probabilities(x)
    out = []
    for i in range(n):
        escalated = bool(sp[i].max() < THRESHOLD.below)
        body, _ = oip.encode_request({names[0]: x[i:i + 1]})
        answer, _ = oip.encode_response(oip.InferResponse("m", (oip.Tensor(names[1], (tp if escalated else sp)[i:i + 1]),)))
        out.append(Record(Record.new_id(), "d", "m", "EU", 0.0, 1e12, "edge", "teacher" if escalated else "student",
                          float(sp[i].max()), body, None, answer, None))
    return out


def go(t: cascade_task.Task, recs: list[Record], root: pathlib.Path, **kw: object) -> job.Outcome:
    current = cascade_task.write_onnx(t.student, root / "student.onnx", "student")
    return job.run(recs, current.path, root, input_name=cascade_task.INPUT, output_name=cascade_task.OUTPUT,
                   teacher_variant="teacher", threshold=THRESHOLD, **kw)  # type: ignore[arg-type]


def test_a_passing_run_writes_a_content_addressed_student_warm_started(task: cascade_task.Task, tmp_path: pathlib.Path) -> None:
    seen: list[dict[str, object]] = []
    outcome = go(task, records(task, 2000), tmp_path, epochs=20, progress=seen.append)
    assert outcome.artifact is not None, outcome.report
    assert outcome.artifact.path == tmp_path / "distilled" / f"{outcome.artifact.sha256}.onnx"
    assert sha256_file(outcome.artifact.path) == outcome.artifact.sha256
    gate = outcome.report["gate"]
    assert gate["passed"] and gate["candidate"]["agreement"] > gate["current"]["agreement"]  # type: ignore[index]
    assert [p["epoch"] for p in seen if "epoch" in p] == list(range(1, 21))
    new = student_mod.read_onnx(outcome.artifact.path)
    assert [w.shape for w, _ in new.layers] == [w.shape for w, _ in task.student.layers]


def test_a_worse_run_publishes_nothing(task: cascade_task.Task, tmp_path: pathlib.Path) -> None:
    # the training side labelled by another network: the candidate learns it and loses agreement with
    # the real teacher on the held-out side
    other = cascade_task.construct_teacher(task.dim, task.classes, 64, 2, seed=99)
    right, wrong = records(task, 3000), records(task, 3000, teacher=other)  # same inputs, other answers
    mixed = [dataclasses.replace(w, id=r.id) if not job.held_out(r.id, 0.2) else r for r, w in zip(right, wrong)]
    assert sum(job.held_out(r.id, 0.2) for r in mixed) > 0
    outcome = go(task, mixed, tmp_path, epochs=20)
    gate = outcome.report["gate"]
    assert not gate["passed"] and gate["candidate"]["agreement"] < gate["current"]["agreement"]  # type: ignore[index]
    assert outcome.artifact is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]  # no candidate left behind


@pytest.mark.parametrize(("asked_at", "step"), [
    ({"phase": "train", "epoch": 3}, "after epoch 3 of 20"),  # between two epochs
    ({"phase": "verify"}, "after verifying, before the candidate was kept"),  # the candidate written, passing, not yet in place
])
def test_a_run_asked_to_stop_ends_at_its_next_step_and_leaves_nothing(task: cascade_task.Task, tmp_path: pathlib.Path,
                                                                       asked_at: dict[str, object], step: str) -> None:
    seen: list[dict[str, object]] = []

    def stopped() -> bool:
        return any(asked_at.items() <= p.items() for p in seen)

    with pytest.raises(job.Stopped) as stop:
        go(task, records(task, 2000), tmp_path, epochs=20, progress=seen.append, stopped=stopped)
    assert stop.value.step == step
    assert max(p.get("epoch", 0) for p in seen) == (3 if "epoch" in asked_at else 20)  # type: ignore[type-var]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]


def test_too_little_data_is_refused(task: cascade_task.Task, tmp_path: pathlib.Path) -> None:
    with pytest.raises(job.DistillError, match="too little captured data"):
        go(task, records(task, 20), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]


def test_records_the_student_does_not_take_are_left_out_and_counted(task: cascade_task.Task, tmp_path: pathlib.Path) -> None:
    """Records captured for an earlier model (other widths), with text or a scalar where rows
    are expected, or that do not decode, teach nothing: the run goes on with the others and
    says how many it left out."""
    good = records(task, 2000)
    wider = [dataclasses.replace(r, input=oip.encode_request({cascade_task.INPUT: np.zeros((1, task.dim + 3), np.float32)})[0])
             for r in records(task, 200, seed=5)]
    scalar = [dataclasses.replace(r, output=oip.encode_response(oip.InferResponse("m", (
        oip.Tensor(cascade_task.OUTPUT, np.float32(0.5)),)))[0]) for r in records(task, 50, seed=6)]
    text = [dataclasses.replace(r, output=oip.encode_response(oip.InferResponse("m", (
        oip.Tensor(cascade_task.OUTPUT, np.array([[b"0.5"] * task.classes], dtype=object)),)))[0]) for r in records(task, 50, seed=7)]
    undecodable = [dataclasses.replace(r, output=b"{") for r in records(task, 10, seed=8)]
    seen: list[dict[str, object]] = []
    outcome = go(task, good + wider + scalar + text + undecodable, tmp_path, epochs=2, progress=seen.append)
    assert outcome.report["leftOutRecords"] == 310 and seen[0]["leftOut"] == 310
    with pytest.raises(job.DistillError, match=r"too little captured data: 0 training examples .*\(250 records left out: they do not decode, or "
                                                  r"their 'input' and 'probabilities' are not rows of the serving student's 16 "):
        go(task, wider + scalar, tmp_path)


def test_a_record_that_is_not_finite_is_left_out_and_does_not_spoil_the_run(task: cascade_task.Task, tmp_path: pathlib.Path) -> None:
    """A caller may send NaN or infinity (the v2 JSON decoder takes NaN, a binary tensor any
    float), and the cascade captures it: trained on, it would turn every weight into NaN."""
    good = records(task, 2000)
    train_side = [r for r in records(task, 40, seed=9) if not job.held_out(r.id, 0.2)][:2]
    nan_input = dataclasses.replace(train_side[0], input=oip.encode_request({cascade_task.INPUT: np.full((1, task.dim), np.nan, np.float32)})[0])
    inf_answer = dataclasses.replace(train_side[1], output=oip.encode_response(oip.InferResponse("m", (
        oip.Tensor(cascade_task.OUTPUT, np.full((1, task.classes), np.inf, np.float32)),)))[0])
    outcome = go(task, [*good, nan_input, inf_answer], tmp_path, epochs=20)
    assert outcome.artifact is not None, outcome.report["gate"]
    assert outcome.report["leftOutRecords"] == 2


def test_a_distilled_student_answers_under_the_serving_students_tensor_names(task: cascade_task.Task, tmp_path: pathlib.Path) -> None:
    """The Model declares the edge variant's input and the cascade's rule reads its output by
    name; publishing swaps only the artifact, so the new file must keep both names."""
    names = ("features", "scores")
    serving = dataclasses.replace(task.student, input_name=names[0], output_name=names[1])
    current = student_mod.write_onnx(serving, tmp_path / "student.onnx", "student")
    kw = dict(teacher_variant="teacher", threshold=THRESHOLD, epochs=20)
    outcome = job.run(records(task, 2000, names=names), current.path, tmp_path, input_name=names[0], output_name=names[1], **kw)  # type: ignore[arg-type]
    assert outcome.artifact is not None, outcome.report
    session = ort.InferenceSession(str(outcome.artifact.path), providers=["CPUExecutionProvider"])
    assert ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]) == ([names[0]], [names[1]])
    assert (outcome.artifact.input_name, outcome.artifact.output_name) == names
    # a Model or rule naming other tensors than the serving file has: nothing is trained that could not be served
    with pytest.raises(job.DistillError, match="the serving student takes 'features' and answers 'scores'"):
        job.run(records(task, 2000), current.path, tmp_path, input_name=cascade_task.INPUT, output_name=cascade_task.OUTPUT, **kw)  # type: ignore[arg-type]


def test_the_gate() -> None:
    cur = job.Evaluation(agreement=0.80, escalation=0.2, latency_ms=0.10, records=100)
    assert job.gate(cur, job.Evaluation(0.82, 0.18, 0.12, 100)).passed
    assert not job.gate(cur, job.Evaluation(0.80, 0.18, 0.10, 100)).passed  # no gain
    slow = job.gate(cur, job.Evaluation(0.90, 0.1, 0.30, 100))
    assert not slow.passed and "latency" in slow.reasons[0]
    assert job.held_out("abc", 0.2) == job.held_out("abc", 0.2)
