"""``edgeplane get cascades`` and ``edgeplane cascade tune``.

``tune`` replays a labelled sample through the gateway twice per line — the first stage
alone (``X-Edgeplane-Cascade: force-first``) and the last stage alone (``force-last``),
each at the nearest replica of the named deployment the caller may use (called by the
deployment's name: by its model's, another deployment's cascade may run) — and computes from those answers, for a
sweep of thresholds, what the cascade would do: the share answered by the first stage,
accuracy against the labels (or agreement with the last stage where a line has none),
mean latency and energy per request. The sweep itself (:func:`sweep`) is a pure function
of the replayed answers, so a platform team reads the trade-off from a table instead of
guessing a threshold.

Sample lines are JSON objects: ``{"inputs": [...v2 inputs...], "label": 2}`` or
``{"input": [[...]], "label": [2, 0]}`` (tensor name → nested list, as ``infer --data``);
``label`` is a class index per row, optional. ``-f -`` reads the sample from standard input.
Under a multi-label rule (``scores: independent``) a row's answer is the set of labels
whose probability is at least 0.5, and ``label`` lists the labels that apply: ``[0, 3]``
for a sample of one row, ``[[0, 3], []]`` one list per row; a row is right when its set is.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeplane_proto import oip_tensors
from orchestrator.cli import infer, render, textfile
from orchestrator.cli.http import ApiClient, CliError, json_of
from orchestrator.gateway import cascade_rules
from orchestrator.manifests import cascade as cascade_schema
from orchestrator.urlpath import path_segment

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
MAX_LINES = 100_000


def cmd_get(api: ApiClient, args: argparse.Namespace) -> int:
    data = api.request("GET", "/v1/cascades" + (f"/{path_segment(args.name)}" if args.name else ""))
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    items = data["items"] if "items" in data else [data]
    if not items:
        print("No cascades (deployments with spec.cascade).")
        return 0

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [[c["name"], " > ".join(c["stages"]), c["requests"], " / ".join(str(c["answered"][s]) for s in c["stages"]),
             num(c["escalationRate"], ".1%"), c["notEscalated"], num(c["meanLatencyMs"], ".2f"), num(c["meanAddedLatencyMs"], ".2f"),
             num(c["energyPerRequestJ"], ".4g"), num(c["co2PerRequestG"], ".3g"), captured_today(c.get("capture"))] for c in items]
    render.table(None, ["NAME", "STAGES", "REQUESTS", "ANSWERED", "ESCALATED", "NOT ESCALATED", "MEAN MS", "ADDED MS",
                        "J/REQ", "gCO2/REQ", "CAPTURED TODAY"], rows)
    for c in items:
        if (said := capture_stopped(c["name"], c.get("capture"))) is not None:
            print(said)
    return 0


def captured_today(capture: dict[str, Any] | None) -> str:
    """The CAPTURED TODAY cell: each zone's records kept today of its ``dailyCap``."""
    if capture is None:
        return "-"
    if "error" in capture:
        return "unknown (the state store did not answer)"
    return ", ".join(f"{z['zone']} {z['captured']}/{capture['dailyCap']}" + (" capped" if z["capped"] else "") for z in capture["zones"])


def capture_stopped(name: str, capture: dict[str, Any] | None) -> str | None:
    """The line saying where cascade ``name``'s capture stopped for the day and until when; None
    where it goes on (or captures nothing, or its count is unknown)."""
    capped = [z["zone"] for z in (capture or {}).get("zones", []) if z["capped"]]
    if not capped or capture is None:
        return None
    return (f"{name}: capture stopped for the day in {', '.join(capped)} (dailyCap {capture['dailyCap']} reached); "
            f"it starts again at {capture['resetsAt']} (UTC midnight)")


#: One row's answer: its class, or a multi-label answer's labels that apply (in order).
Prediction = int | tuple[int, ...]


@dataclass(frozen=True)
class Replayed:
    """One sample line's answers from the first and the last stage."""

    confidence: float  # the first stage's, under its rule (least sure row)
    first: tuple[Prediction, ...]  # predicted class (or labels) per row
    last: tuple[Prediction, ...]
    labels: tuple[Prediction, ...] | None
    first_ms: float
    last_ms: float
    first_j: float
    last_j: float
    precision: np.dtype[Any] = np.dtype(np.float64)  # of the first stage's scores, as the gateway compares them


@dataclass(frozen=True)
class SweepRow:
    threshold: float | None  # None: a baseline row
    name: str
    firstStageShare: float
    accuracy: float | None  # against labels, over the rows that have one
    agreement: float  # with the last stage
    meanMs: float
    energyPerRequestJ: float


def _score(answers: Sequence[tuple[Replayed, bool]], threshold: float | None, name: str) -> SweepRow:
    """``answers``: each sample with whether the first stage's answer stands."""
    rows = labelled = correct = agree = 0
    ms = joules = 0.0
    for r, stays in answers:
        chosen = r.first if stays else r.last
        rows += len(chosen)
        agree += sum(a == b for a, b in zip(chosen, r.last))
        if r.labels is not None:
            labelled += len(r.labels)
            correct += sum(a == b for a, b in zip(chosen, r.labels))
        ms += r.first_ms + (0.0 if stays else r.last_ms) if threshold is not None else (r.first_ms if stays else r.last_ms)
        joules += r.first_j + (0.0 if stays else r.last_j) if threshold is not None else (r.first_j if stays else r.last_j)
    n = max(len(answers), 1)
    return SweepRow(threshold, name, round(sum(s for _, s in answers) / n, 4), round(correct / labelled, 4) if labelled else None,
                    round(agree / max(rows, 1), 4), round(ms / n, 3), round(joules / n, 6))


def sweep(replayed: Sequence[Replayed], thresholds: Sequence[float]) -> list[SweepRow]:
    """Baselines (first stage only, last stage only), then one row per threshold: a sample
    stays at the first stage when its confidence is at least the threshold, compared in the
    precision of its scores (as the gateway decides), and otherwise pays for both stages."""
    out = [_score([(r, True) for r in replayed], None, "first stage only"),
           _score([(r, False) for r in replayed], None, "last stage only")]
    out.extend(_score([(r, not cascade_rules.is_below(r.confidence, t, r.precision)) for r in replayed], t, f"cascade below {t:g}")
               for t in thresholds)
    return out


def _rule(api: ApiClient, name: str) -> cascade_rules.TensorRule:
    dep = api.request("GET", f"/v1/modeldeployments/{path_segment(name)}")
    cascade = dep.get("spec", {}).get("cascade")
    if not cascade:
        raise CliError(f"deployment {name!r} has no spec.cascade")
    rule = cascade_rules.rule_of(cascade_schema.Escalation.model_validate(cascade["stages"][0].get("escalate") or {}))
    if not isinstance(rule, cascade_rules.TensorRule):
        raise CliError(f"cascade tune sweeps a confidence threshold; the first stage of {name!r} has no 'confidence' rule")
    return rule


def _sample_text(path: str) -> str:
    """The sample file's text; ``-`` reads standard input."""
    if path == "-":
        return textfile.read_stdin("-f -")
    try:
        return textfile.read(path)
    except OSError as exc:
        raise CliError(f"-f {path}: cannot read the file: {exc.strerror or exc}", 2) from exc


def _lines(path: str) -> list[tuple[dict[str, Any], Any, str]]:
    """The sample's lines, read and checked before anything is sent: each one's request
    body, its ``label`` as written (read by :func:`_labelled` once the rule is known) and
    where it is written (``file:line``)."""
    text = _sample_text(path)
    path = "<stdin>" if path == "-" else path
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(out) >= MAX_LINES:
            raise CliError(f"{path}: more than {MAX_LINES} samples; replay a sample of them")
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}:{number}: not JSON: {exc.msg}") from None
        except ValueError:  # what the JSON parser leaves to int(), which reads at most 4,300 digits
            raise CliError(f"{path}:{number}: an integer too long to read") from None
        except RecursionError:
            raise CliError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise CliError(f"{path}:{number}: a sample is a JSON object with \"inputs\" (or tensor names) and an optional \"label\"")
        label = doc.pop("label", None)
        try:
            body = infer.body_of(json.dumps(doc), what="the sample")
        except CliError as exc:
            raise CliError(f"{path}:{number}: {exc}") from None
        out.append((body, label, f"{path}:{number}"))
    if not out:
        raise CliError(f"{path}: no samples")
    return out


def _labelled(samples: Sequence[tuple[dict[str, Any], Any, str]],
              rule: cascade_rules.TensorRule) -> list[tuple[dict[str, Any], tuple[Prediction, ...] | None]]:
    """Each sample's body and its labels as ``rule`` answers: a class per row, or under a
    multi-label rule the labels that apply per row."""
    out = []
    for body, label, where in samples:
        labels: tuple[Prediction, ...] | None
        if label is None:
            labels = None
        elif rule.independent:
            labels = _label_sets(label)
            if labels is None:
                raise CliError(f"{where}: \"label\" must list the labels that apply (label indices, 0 or more): [0, 3] "
                               "for one row, or one such list per row ([[0, 3], []])")
        elif _class_index(label):
            labels = (label,)
        elif isinstance(label, list) and label and all(_class_index(x) for x in label):
            labels = tuple(label)
        else:
            raise CliError(f"{where}: \"label\" must be a class index (0 or more) or a list of them (one per row)")
        out.append((body, labels))
    return out


def _class_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _label_set(x: Any) -> tuple[int, ...] | None:
    if not isinstance(x, list) or not all(_class_index(i) for i in x):
        return None
    return tuple(sorted(set(x)))


def _label_sets(label: Any) -> tuple[tuple[int, ...], ...] | None:
    """A multi-label sample's labels, one set per row: a flat list is one row's."""
    if isinstance(label, list) and label and all(isinstance(row, list) for row in label):
        rows = [_label_set(row) for row in label]
        return None if any(r is None for r in rows) else tuple(r for r in rows if r is not None)
    one = _label_set(label)
    return None if one is None else (one,)


def predictions(rule: cascade_rules.TensorRule, scores: np.ndarray) -> tuple[Prediction, ...]:
    """Each row's answer: its top class, or under a multi-label rule the labels whose
    probability is at least 0.5 (a logit at least 0)."""
    rows = np.atleast_2d(scores)
    if rule.independent:
        return tuple(tuple(int(i) for i in np.flatnonzero(row >= (0.0 if rule.logits else 0.5))) for row in rows)
    return tuple(int(x) for x in rows.argmax(-1))


def _call(api: ApiClient, name: str, body: dict[str, Any], mode: str, headers: dict[str, str], rule: cascade_rules.TensorRule,
          where: str) -> tuple[np.ndarray, float, float]:
    started = time.perf_counter()
    resp = api.raw("POST", f"/v2/models/{path_segment(name)}/infer", json=body, headers={**headers, "x-edgeplane-cascade": mode})
    ms = (time.perf_counter() - started) * 1000
    doc = json_of(resp)
    if doc is None:
        raise CliError(f"{where}: HTTP {resp.status_code}: {resp.text[:200]}")
    if resp.status_code >= 400:
        raise CliError(f"{where}: {doc.get('error', resp.reason_phrase) if isinstance(doc, dict) else resp.reason_phrase}")
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list):
        raise CliError(f"{where}: HTTP {resp.status_code} with no v2 inference response (no \"outputs\" list)")
    output = next((o for o in outputs if isinstance(o, dict) and o.get("name") == rule.output), None)
    if output is None:
        raise CliError(f"{where}: the answer has no output {rule.output!r}")
    # in the answer's own datatype, as the gateway judges it: JSON's 0.7 from an FP32 output is float32(0.7)
    datatype = output.get("datatype")
    dtype = oip_tensors.DATATYPES.get(datatype, np.dtype(np.float64)) if isinstance(datatype, str) else np.dtype(np.float64)
    try:
        scores = np.asarray(output["data"], dtype=np.float64).reshape(output["shape"]).astype(dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"{where}: output {rule.output!r} is not a tensor of numbers: {exc}") from None
    try:
        joules = float(resp.headers.get("x-edgeplane-cascade-energy-j", "0"))
    except ValueError:
        joules = 0.0
    return scores, ms, joules


def replay(api: ApiClient, name: str, rule: cascade_rules.TensorRule, samples: Sequence[tuple[dict[str, Any], tuple[Prediction, ...] | None]],
           headers: dict[str, str], path: str) -> list[Replayed]:
    out = []
    for i, (body, labels) in enumerate(samples, 1):
        where = f"{path} sample {i}"
        first, first_ms, first_j = _call(api, name, body, "force-first", headers, rule, where)
        last, last_ms, last_j = _call(api, name, body, "force-last", headers, rule, where)
        if not np.isfinite(first).all():
            confidence = -np.inf  # the gateway escalates an answer with NaN or infinite scores, at any threshold
        else:
            try:
                confidence = cascade_rules.confidence_of(rule, first)
            except ValueError as exc:  # no answer of this shape is ever judged: the rule does not fit the model
                raise CliError(f"{where}: {exc}") from None
        rows = len(np.atleast_2d(first))
        if labels is not None and len(labels) != rows:
            raise CliError(f"{where}: {len(labels)} label(s) for {rows} row(s): give one label per row")
        out.append(Replayed(confidence, predictions(rule, first), predictions(rule, last), labels, first_ms, last_ms, first_j, last_j,
                            cascade_rules.precision_of(first)))
    return out


def _thresholds(text: str | None) -> tuple[float, ...]:
    if not text:
        return DEFAULT_THRESHOLDS
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CliError("--thresholds is a comma-separated list of numbers in (0, 1], e.g. 0.6,0.8,0.9", 2) from None
    if not values or not all(0 < v <= 1 for v in values):
        raise CliError("--thresholds must be numbers in (0, 1]", 2)
    return values


_SCORES = {(False, False): "probabilities", (True, False): "logits→softmax", (False, True): "independent label probabilities",
           (True, True): "independent logits→sigmoid"}


def cmd_tune(api: ApiClient, args: argparse.Namespace) -> int:
    if not args.name:
        raise CliError("the cascade's deployment name is empty (edgeplane get cascades)", 2)
    thresholds = _thresholds(args.thresholds)
    lines = _lines(args.file)  # read and checked before anything is sent
    rule = _rule(api, args.name)
    samples = _labelled(lines, rule)  # a sample's labels read as its rule answers (a class, or labels that apply)
    headers = infer.caller_headers(args)
    # by the deployment's name: its own cascade (by the model's, another deployment's may run for this caller)
    rows = sweep(replay(api, args.name, rule, samples, headers, "<stdin>" if args.file == "-" else args.file), thresholds)
    if args.output in ("json", "yaml"):
        render.dump({"cascade": args.name, "samples": len(samples), "rule": asdict(rule), "rows": [asdict(r) for r in rows]}, args.output)
        return 0
    print(f"cascade {args.name}: {len(samples)} samples, {rule.measure} {_SCORES[rule.logits, rule.independent]} of {rule.output!r}")
    render.table(None, ["ROUTE", "FIRST STAGE", "ACCURACY", "AGREES WITH LAST", "MEAN MS", "J/REQ"],
                 [[r.name, f"{r.firstStageShare:.1%}", "-" if r.accuracy is None else f"{r.accuracy:.2%}", f"{r.agreement:.2%}",
                   f"{r.meanMs:.2f}", f"{r.energyPerRequestJ:.4g}"] for r in rows])
    return 0
