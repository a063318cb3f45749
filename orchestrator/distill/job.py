"""One distillation run: captured records in, a verified candidate student (or nothing) out.

The run reads one zone's records (the caller runs it where that zone's store is, so no
record leaves it), splits them by record id into training and held-out sets, and
trains a new student warm-started from the serving one (:mod:`orchestrator.distill.student`):

- soft labels: a record answered by the last stage carries the teacher's probabilities
  — the hard cases the cascade escalated; a record the first stage answered carries that
  stage's own (confident) probabilities, replayed so the new student keeps what the old
  one knew;
- the gate (:func:`gate`, pure) compares the serving student and the candidate on the
  held-out records: agreement with the teacher's class on the escalated ones must rise by
  at least ``min_gain``, and the candidate's batch-1 latency must stay within
  ``latency_factor`` × the serving one's (plus a small absolute slack for timer noise).
  It also reports the escalation rate each would have at the cascade's threshold.

Only a passing candidate's ONNX file is kept, named by its sha256 under the artifact
root (``distilled/<sha256>.onnx``). Publishing it is the caller's: a new artifact on the
Model's edge variant, applied like any manifest, so the deployment's rollout takes it.

A run asked to stop (its control plane stops) ends at its next step's boundary, between
two epochs of training or before the candidate is written or moved into place, with
:class:`Stopped`: its candidate, if written, was in a temporary folder, which goes with it.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnxruntime as ort

from edgeplane_proto import oip
from orchestrator.artifacts.catalog import sha256_file
from orchestrator.distill import student as student_mod
from orchestrator.distill.store import Record

Progress = Callable[[dict[str, object]], None]


class DistillError(ValueError):
    """The run cannot start or cannot finish (too few records, wrong model); nothing is published."""


class Stopped(Exception):
    """The run was asked to stop and ended at a step's boundary (``step`` says which); it wrote nothing."""

    def __init__(self, step: str) -> None:
        super().__init__(f"stopped {step}: the control plane stopped; nothing was written or published")
        self.step = step


@dataclass(frozen=True)
class Threshold:
    """The first stage's ``escalate.confidence`` rule."""

    below: float
    measure: str = "top"  # or "margin"


@dataclass(frozen=True)
class Evaluation:
    agreement: float  # share of held-out escalated records whose teacher class this student picks
    escalation: float  # share of all held-out records this student would escalate at the threshold
    latency_ms: float  # median batch-1 latency with onnxruntime on this machine
    records: int


@dataclass(frozen=True)
class GateReport:
    passed: bool
    reasons: tuple[str, ...]
    current: Evaluation
    candidate: Evaluation

    def to_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "reasons": list(self.reasons), "current": asdict(self.current),
                "candidate": asdict(self.candidate)}


def gate(current: Evaluation, candidate: Evaluation, *, min_gain: float = 0.005, latency_factor: float = 1.5,
         latency_slack_ms: float = 0.05) -> GateReport:
    """Publish only a candidate that agrees more with the teacher and is not much slower."""
    reasons = []
    if candidate.agreement < current.agreement + min_gain:
        reasons.append(f"agreement with the teacher {candidate.agreement:.4f} does not beat the serving student's "
                       f"{current.agreement:.4f} by {min_gain}")
    bound = current.latency_ms * latency_factor + latency_slack_ms
    if candidate.latency_ms > bound:
        reasons.append(f"latency {candidate.latency_ms:.3f} ms exceeds the bound {bound:.3f} ms")
    return GateReport(not reasons, tuple(reasons), current, candidate)


def held_out(record_id: str, share: float) -> bool:
    """A fixed split by record id: the same record is always on the same side."""
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


@dataclass(frozen=True)
class Examples:
    x: np.ndarray
    soft: np.ndarray  # the probabilities of the stage that answered
    by_teacher: np.ndarray  # bool: answered by the last stage (the teacher)
    left_out: int = 0  # records that teach nothing: they do not decode, or hold no tensors the student takes


def _rows(array: np.ndarray, width: int) -> np.ndarray | None:
    """``array`` as finite float32 rows of ``width`` numbers, or None where it holds something
    else. One NaN or infinity (a v2 request may carry them) would turn every weight the
    trainer touches into NaN, so such a record teaches nothing."""
    if array.dtype.kind not in "biuf" or array.ndim < 1 or array.shape[-1] != width:
        return None
    rows = np.asarray(array, np.float32).reshape(-1, width)
    return rows if np.isfinite(rows).all() else None


def examples(records: Sequence[Record], input_name: str, output_name: str, teacher_variant: str, in_dim: int,
             out_dim: int) -> Examples:
    """The captured examples a student of ``in_dim`` inputs and ``out_dim`` classes learns from.
    A record that does not decode, or whose tensors are missing, not rows of those widths
    (captured for an earlier model, or sent with another shape) or not finite, teaches
    nothing: it is left out, and counted."""
    xs, ps, flags = [], [], []
    left_out = 0
    for r in records:
        try:
            request = oip.decode_request(r.input, r.input_binary)
            response = oip.decode_response(r.output, r.output_binary)
        except (oip.ProtocolError, ValueError):
            left_out += 1
            continue
        x = next((_rows(t.array, in_dim) for t in request.inputs if t.name == input_name), None)
        p = next((_rows(t.array, out_dim) for t in response.outputs if t.name == output_name), None)
        if x is None or p is None or len(x) != len(p):
            left_out += 1
            continue
        xs.append(x)
        ps.append(p)
        flags.append(np.full(len(x), r.stage == teacher_variant))
    if not xs:
        return Examples(np.zeros((0, in_dim), np.float32), np.zeros((0, out_dim), np.float32), np.zeros(0, bool), left_out)
    return Examples(np.concatenate(xs), np.concatenate(ps), np.concatenate(flags), left_out)


def confidence(p: np.ndarray, measure: str) -> np.ndarray:
    top = np.sort(p, axis=-1)
    return top[:, -1] - top[:, -2] if measure == "margin" else top[:, -1]


def evaluate(path: pathlib.Path, held: Examples, threshold: Threshold, latency_runs: int = 200) -> Evaluation:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    probs = session.run(None, {name: held.x})[0]
    hard = held.by_teacher
    agreement = float((probs[hard].argmax(-1) == held.soft[hard].argmax(-1)).mean()) if hard.any() else 0.0
    escalation = float((confidence(probs, threshold.measure) < threshold.below).mean()) if len(probs) else 0.0
    timings = []
    for row in held.x[:latency_runs]:
        began = time.perf_counter()
        session.run(None, {name: row[None, :]})
        timings.append((time.perf_counter() - began) * 1000)
    return Evaluation(round(agreement, 4), round(escalation, 4), round(statistics.median(timings), 4), int(hard.sum()))


@dataclass(frozen=True)
class Outcome:
    report: dict[str, object]
    artifact: student_mod.BuiltModel | None  # the passing candidate, content-addressed; None: nothing to publish


def run(records: Sequence[Record], current: pathlib.Path, artifact_root: pathlib.Path, *, input_name: str, output_name: str,
        teacher_variant: str, threshold: Threshold, epochs: int = 60, lr: float = 3e-4, held_out_share: float = 0.2,
        min_records: int = 50, seed: int = 0, progress: Progress | None = None, min_gain: float = 0.005,
        stopped: Callable[[], bool] = lambda: False) -> Outcome:
    """Train, evaluate, gate; write the candidate into the artifact root only when it passes.
    ``stopped``: asked at each step's boundary; once true, the run ends there (:class:`Stopped`)."""
    say = progress or (lambda _: None)

    def boundary(step: str) -> None:
        if stopped():
            raise Stopped(step)

    train_records = [r for r in records if not held_out(r.id, held_out_share)]
    test_records = [r for r in records if held_out(r.id, held_out_share)]
    try:
        serving = student_mod.read_onnx(current)
    except student_mod.NotAStudent as exc:
        raise DistillError(f"the serving student cannot be warm-started: {exc}") from None
    if (serving.input_name, serving.output_name) != (input_name, output_name):
        # the new student only replaces the artifact: the Model's declared input and the rule's output stay
        raise DistillError(f"the serving student takes {serving.input_name!r} and answers {serving.output_name!r}, but the Model "
                           f"declares the input {input_name!r} and the cascade's rule reads {output_name!r}")
    in_dim, out_dim = serving.layers[0][0].shape[0], serving.layers[-1][0].shape[1]
    train = examples(train_records, input_name, output_name, teacher_variant, in_dim, out_dim)
    held = examples(test_records, input_name, output_name, teacher_variant, in_dim, out_dim)
    left_out = train.left_out + held.left_out
    if len(train.x) < min_records or not held.by_teacher.any():
        why = (f" ({left_out} records left out: they do not decode, or their {input_name!r} and {output_name!r} are not "
               f"rows of the serving student's {in_dim} inputs and {out_dim} classes, or not finite)") if left_out else ""
        raise DistillError(f"too little captured data: {len(train.x)} training examples (need {min_records}) and "
                           f"{int(held.by_teacher.sum())} held-out escalated ones (need 1){why}; capture more traffic first")
    say({"phase": "train", "examples": len(train.x), "escalated": int(train.by_teacher.sum()), "heldOut": len(held.x),
         "leftOut": left_out})
    hidden = serving.layers[0][0].shape[1]
    epoch_done = 0

    def trained_epoch(epoch: int, loss: float) -> None:
        nonlocal epoch_done
        epoch_done = epoch
        say({"phase": "train", "epoch": epoch, "epochs": epochs, "loss": round(loss, 5)})

    boundary("before training")
    trained = student_mod.distil(train.soft, train.x, hidden, seed, epochs=epochs, lr=lr,
                                 init=serving if len(serving.layers) == 2 and serving.activation == "Relu" else None,
                                 progress=trained_epoch, stopped=stopped)
    if trained is None:
        raise Stopped(f"after epoch {epoch_done} of {epochs}")
    candidate = replace(trained, input_name=serving.input_name, output_name=serving.output_name)
    boundary("after training, before the candidate was written")
    artifact_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=artifact_root) as tmp:
        built = student_mod.write_onnx(candidate, pathlib.Path(tmp) / "candidate.onnx", "distilled")
        say({"phase": "verify"})
        report = gate(evaluate(current, held, threshold), evaluate(built.path, held, threshold), min_gain=min_gain)
        out: dict[str, object] = {"gate": report.to_dict(), "trainExamples": len(train.x), "heldOutExamples": len(held.x),
                                  "leftOutRecords": left_out}
        if not report.passed:
            return Outcome(out, None)
        boundary("after verifying, before the candidate was kept")
        final = artifact_root / "distilled" / f"{built.sha256}.onnx"
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built.path, final)
    if sha256_file(final) != built.sha256:
        raise DistillError(f"{final} changed while it was written")
    out["artifact"] = {"uri": final.relative_to(artifact_root).as_posix(), "sha256": built.sha256}
    return Outcome(out, student_mod.BuiltModel(final, built.sha256, built.input_name, built.output_name, built.in_dim, built.out_dim))
