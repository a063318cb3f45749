"""What a cascade decides, as pure functions: is this answer good enough, and who is next.

The gateway's cascade handler (:mod:`orchestrator.gateway.cascade`) does the I/O; every
decision it takes is one of these functions of data, so each can be table-tested:

- :func:`judge_tensor` — an Open Inference Protocol answer (its decoded output tensors)
  against a confidence rule;
- :func:`judge_generative` — an OpenAI-shaped chat or text completion (a ``dict`` as the
  OpenAI routes return it, with ``logprobs`` when the stage was asked for them) against a
  generative rule: mean token log-probability, ``max_tokens`` reached, refusal patterns;
- :func:`cascade_for` — of a model's cascades (one per deployment with one), the one a
  call by the model's name runs for a caller: that of the deployment plain routing would
  send the caller to, or none when only deployments without one may serve the caller;
- :func:`stage_ranking` — the replicas that may run a stage for a caller, best first:
  ``routing.rank`` on that stage's tiers only, so residency binds every stage exactly as it
  binds a plain request;

  :func:`cascade_for` and :func:`stage_ranking` state the rule over a list; the gateway
  applies it to its table's arrays (``EndpointTable.cascade_for``, ``rank_stage``), which
  answer the same;
- :func:`after_stage` — given what a stage did, answer now or go to the next stage that
  can run, and why.

A batched tensor request is judged as a whole: its confidence is that of its least sure
row, and the whole request escalates when that is below the threshold. A multi-label
(sigmoid) model's row is as sure as its least sure label: each label is a yes/no answer of
its own, sure as far as its probability is from 0.5 (``max(p, 1 - p)``), and one label in
doubt makes the answer one to check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from orchestrator.distill.capture import DAY_S, CapturePolicy
from orchestrator.gateway import routing
from orchestrator.manifests import cascade as cascade_schema
from orchestrator.manifests import schema

#: ``X-Edgeplane-Cascade``: ``on`` (default), ``off`` (plain routing over every stage's
#: replicas), ``force-last`` (the last stage only), ``force-first`` (the first stage only,
#: never escalated: what ``edgeplane cascade tune`` replays).
Mode = Literal["on", "off", "force-last", "force-first"]
MODES: tuple[Mode, ...] = ("on", "off", "force-last", "force-first")


@dataclass(frozen=True)
class TensorRule:
    output: str
    logits: bool  # scores are logits: take a softmax (a sigmoid, when independent) first
    measure: Literal["top", "margin"]
    below: float
    independent: bool = False  # a multi-label model's: each score its own label's, rows need not sum to 1


@dataclass(frozen=True)
class GenerativeRule:
    mean_logprob_below: float | None = None
    truncated: bool = False
    refusal: tuple[str, ...] = ()


Rule = TensorRule | GenerativeRule


@dataclass(frozen=True)
class StageRoute:
    variant: str
    tiers: frozenset[str]  # where this deployment places the variant
    rule: Rule | None  # None: the last stage, or a stage that escalates on load only
    max_inflight: int | None = None
    watts: float = 0.0  # one busy replica's draw (declared powerWatts, or estimated)


@dataclass(frozen=True)
class SiteEnergy:
    carbon_g_per_kwh: float
    pue: float = 1.0


@dataclass(frozen=True)
class CascadeRoute:
    """A deployment's cascade as the gateway routes it: requests to ``model`` run it."""

    model: str
    deployment: str
    stages: tuple[StageRoute, ...]
    energy: Mapping[str, SiteEnergy] = field(default_factory=dict)  # by site
    capture: CapturePolicy | None = None  # spec.cascade.capture: None = nothing is kept


@dataclass(frozen=True)
class Verdict:
    escalate: bool
    confidence: float | None
    reason: str  # why it escalates, or "" when it does not


@dataclass(frozen=True)
class Answer:
    """Return the answer in hand; ``not_escalated`` says why a wanted escalation did not happen."""

    not_escalated: str = ""


@dataclass(frozen=True)
class Escalate:
    stage: int
    candidates: tuple[routing.Ranked, ...]
    reason: str


@dataclass(frozen=True)
class Fail:
    """No stage answered and none is left: the caller gets ``status`` with ``reason``."""

    status: int
    reason: str


def rule_of(escalation: cascade_schema.Escalation | None) -> Rule | None:
    if escalation is None:
        return None
    if escalation.confidence is not None:
        c = escalation.confidence
        return TensorRule(c.output, c.scores in ("logits", "independent-logits"), c.measure, c.below,
                          independent=c.scores in cascade_schema.INDEPENDENT_SCORES)
    if escalation.generative:
        return GenerativeRule(escalation.meanLogprobBelow, escalation.truncated, tuple(escalation.refusal))
    return None


def route_of(deployment: str, spec: schema.ModelDeploymentSpec, watts: Mapping[str, float],
             energy: Mapping[str, SiteEnergy], created: float | None = None) -> CascadeRoute | None:
    """The gateway's view of a deployment's cascade (None without one); ``watts`` by variant.
    ``energy`` is kept as given, not copied: the routes of a pass share the fleet's one map,
    which the table document carries once (:func:`orchestrator.gateway.wire.fleet_energy`).
    ``created``: the deployment's creation time as stored, which its records are stamped with."""
    if spec.cascade is None or not isinstance(spec.variant, dict):
        return None
    stages = []
    for stage in spec.cascade.stages:
        tiers = frozenset(t for t, v in spec.variant.items() if v == stage.variant)
        max_inflight = stage.escalate.maxInflight if stage.escalate is not None else None
        stages.append(StageRoute(stage.variant, tiers, rule_of(stage.escalate), max_inflight, watts.get(stage.variant, 0.0)))
    c = spec.cascade.capture
    policy = CapturePolicy(c.sampleRate, c.dailyCap, c.retentionDays * DAY_S, tuple(c.zones), created) if c is not None else None
    return CascadeRoute(spec.model, deployment, tuple(stages), energy, policy)


def routes_by_name(routes: Iterable[CascadeRoute]) -> dict[str, CascadeRoute]:
    """The gateway's cascades by the names callers call them by, of ``routes`` (one per
    deployment, in the order the deployments are stored): each under its deployment's name,
    and the first of a model's under the model's (a call by the model's name runs whichever
    of the model's the caller is routed to: :func:`cascade_for`). The reconciler's planner
    publishes these, and a pass on hold re-points a model's name by them when its cascade
    was deleted, so both choose alike."""
    out: dict[str, CascadeRoute] = {}
    for route in routes:
        out.setdefault(route.model, route)
        out.setdefault(route.deployment, route)
    return out


def parse_mode(header: str | None) -> Mode | None:
    """``X-Edgeplane-Cascade``: absent means ``on``; None when the value is not a mode."""
    value = (header or "on").strip().lower()
    return value if value in MODES else None  # type: ignore[return-value]


# --- judges -----------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # logits a float64 apart: the smaller one's probability is 0
        z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence_of(rule: TensorRule, scores: np.ndarray) -> float:
    """The least sure row's confidence (top probability or margin) in ``scores``; for
    independent scores, the least sure label's: ``max(p, 1 - p)``, or its margin ``|2p - 1|``."""
    kind = np.asarray(scores).dtype.kind
    if kind not in "biuf":  # a BYTES tensor holds text, even where the text reads as a number
        raise ValueError(f"output {rule.output!r} holds {'bytes' if kind in 'OSU' else 'no numbers'}, not scores")
    with np.errstate(invalid="ignore"):  # a signalling NaN (a binary answer's) widens to NaN, refused below
        x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    least = 1 if rule.independent else 2  # one sigmoid label is an answer; one softmax class is none
    if x.ndim != 2 or x.shape[1] < least or x.shape[0] < 1:
        raise ValueError(f"output {rule.output!r} has shape {list(np.shape(scores))}; a confidence needs "
                         f"{'[batch, labels >= 1]' if rule.independent else '[batch, classes >= 2]'}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"output {rule.output!r} holds NaN or infinite scores")
    if rule.independent:
        p = _sigmoid(x) if rule.logits else _check_independent(rule, x)
        sure = np.maximum(p, 1.0 - p)  # each label's own top probability: yes or no
        per_label = sure if rule.measure == "top" else 2.0 * sure - 1.0
        return float(per_label.min())
    if rule.logits:
        p = _softmax(x)
    else:
        _check_probabilities(rule, x)
        p = x
    top2 = np.partition(p, -2, axis=-1)[:, -2:]  # the two largest, in order: nothing else is sorted
    per_row = top2[:, 1] if rule.measure == "top" else top2[:, 1] - top2[:, 0]
    return float(per_row.min())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp of a large negative logit's negation: inf, and the label's probability 0
        return 1.0 / (1.0 + np.exp(-x))


def _check_independent(rule: TensorRule, x: np.ndarray) -> np.ndarray:
    """Refuse independent scores outside 0..1: a sigmoid's logits read as probabilities
    would make most labels look sure."""
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"output {rule.output!r} holds no probabilities (its scores range from {low:g} to {high:g}); if the "
                         f"model answers logits before its sigmoid, set escalate.confidence.scores: independent-logits")
    return x


#: How far a row of probabilities may sum from 1: a softmax's rows are 1 only up to their
#: precision's rounding (float16 at 32,000 classes: ~3e-4), far from what logits sum to.
PROBABILITY_SUM_TOLERANCE = 1e-2


def _check_probabilities(rule: TensorRule, x: np.ndarray) -> None:
    """Refuse scores the rule reads as probabilities that are none: logits (or a quantized
    0..255 output) read so would make the top one a "probability" above any threshold, and
    the stage sure of every answer."""
    low, high = float(x.min()), float(x.max())
    sums = x.sum(axis=-1)
    worst = float(sums[np.argmax(np.abs(sums - 1.0))])
    if low < 0.0 or high > 1.0:
        found, fix = f"range from {low:g} to {high:g}", "if the model answers logits, set escalate.confidence.scores: logits"
    elif abs(worst - 1.0) > PROBABILITY_SUM_TOLERANCE:
        found = f"has a row that sums to {worst:.4g}"
        fix = ("if the model answers one probability per label (a multi-label, sigmoid model), set escalate.confidence.scores: "
               "independent; if it answers logits, scores: logits")
    else:
        return
    raise ValueError(f"output {rule.output!r} holds no probabilities (its scores {found}); {fix}")


def precision_of(scores: np.ndarray) -> np.dtype[Any]:
    """The precision ``scores`` are judged in: their own float type (float64 for integers)."""
    dtype = np.asarray(scores).dtype
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


def is_below(confidence: float, threshold: float, precision: np.dtype[Any]) -> bool:
    """``confidence < threshold``, both in the scores' own precision: a float32 model's 0.7
    is float32(0.7), which widened to float64 (0.69999998…) would be below 0.7 and escalate
    an answer exactly at the threshold. ``cascade tune`` predicts with the same comparison."""
    return bool(precision.type(confidence) < precision.type(threshold))


def judge_tensor(rule: TensorRule, outputs: Mapping[str, np.ndarray]) -> Verdict:
    """Escalate when the confidence in ``rule.output`` is below the threshold, or when the
    answer cannot be judged (missing or malformed output): a wrong-looking answer is no
    reason to trust it."""
    scores = outputs.get(rule.output)
    if scores is None:
        return Verdict(True, None, f"the answer has no output {rule.output!r} (has: {', '.join(outputs) or 'none'})")
    try:
        confidence = confidence_of(rule, scores)
    except ValueError as exc:
        return Verdict(True, None, str(exc))
    if is_below(confidence, rule.below, precision_of(scores)):
        what = "top probability" if rule.measure == "top" else "margin"
        if rule.independent:
            what = f"least sure label's {what}"
        return Verdict(True, confidence, f"{what} {confidence:.3f} < {rule.below:g}")
    return Verdict(False, confidence, "")


def _choices(response: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    choices = response.get("choices")
    return [c for c in choices if isinstance(c, Mapping)] if isinstance(choices, list) else []


def _text(choice: Mapping[str, Any]) -> str:
    message = choice.get("message")
    if isinstance(message, Mapping):
        content = message.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _token_logprobs(choice: Mapping[str, Any]) -> list[float] | None:
    """Token log-probabilities of a chat (``logprobs.content[].logprob``) or text completion
    (``logprobs.token_logprobs``); None when the stage returned none. ``-inf`` (a token of
    probability 0) and NaN (JSON ``-Infinity`` and ``NaN``, which the gateway's parse reads)
    are kept: dropped, they would leave the answer judged on its surer tokens."""
    lp = choice.get("logprobs")
    if not isinstance(lp, Mapping):
        return None
    if isinstance(lp.get("content"), list):
        values = [t.get("logprob") for t in lp["content"] if isinstance(t, Mapping)]
    elif isinstance(lp.get("token_logprobs"), list):
        values = list(lp["token_logprobs"])
    else:
        return None
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def mean_logprob(response: Mapping[str, Any]) -> float | None:
    """Mean token log-probability over every choice's tokens; None when none were returned,
    ``-inf`` when a token had probability 0, NaN when one is no log-probability (NaN, +inf)."""
    tokens: list[float] = []
    for choice in _choices(response):
        values = _token_logprobs(choice)
        if values:
            tokens.extend(values)
    return sum(tokens) / len(tokens) if tokens else None


def judge_generative(rule: GenerativeRule, response: Mapping[str, Any]) -> Verdict:
    """Judge an OpenAI chat/text completion. The confidence reported is ``exp`` of the mean
    token log-probability (the geometric-mean token probability), when logprobs came back."""
    choices = _choices(response)
    if not choices:
        return Verdict(True, None, "the answer has no choices")
    mean = mean_logprob(response)
    if mean is not None and (math.isnan(mean) or mean == math.inf):
        # a broken answer's numbers (+inf cannot be a log-probability): no reason to trust it
        return Verdict(True, None, "the answer's token logprobs hold NaN or +inf")
    confidence = math.exp(mean) if mean is not None else None
    if rule.truncated and any(c.get("finish_reason") == "length" for c in choices):
        return Verdict(True, confidence, "the answer stopped at max_tokens")
    for pattern in rule.refusal:
        if any(re.search(pattern, _text(c)) for c in choices):
            return Verdict(True, confidence, f"the answer matches refusal pattern {pattern!r}")
    if rule.mean_logprob_below is not None:
        if mean is None:
            return Verdict(True, None, "the answer carries no token logprobs to judge")
        if mean < rule.mean_logprob_below:
            return Verdict(True, confidence, f"mean token logprob {mean:.3f} < {rule.mean_logprob_below:g}")
    return Verdict(False, confidence, "")


# --- routing ----------------------------------------------------------------------------


def cascade_for(routes: Sequence[CascadeRoute], endpoints: Sequence[routing.Endpoint], caller: routing.Caller, *,
                regions: routing.RegionIndex | None = None, gateway_position: tuple[float, float] | None = None,
                ejected: frozenset[str] = frozenset()) -> CascadeRoute | None:
    """Which of one model's cascades (``routes``, each another deployment's) a call by the
    model's name runs for ``caller`` (``endpoints``: all the model's): the deployment of the
    best of their replicas, ranked as plain routing ranks the model's (residency, health,
    nearest, load), since each deployment may place its stages in other jurisdictions.
    None when the caller may reach none of them but may reach another deployment of the
    model (one without a cascade, say in the caller's jurisdiction): plain routing then
    serves it, as it would a model without cascades. The first when it may reach no
    replica of the model at all: its cascade then says why (or wakes it from zero)."""
    theirs = {r.deployment for r in routes}
    regions = regions if regions is not None else routing.RegionIndex()

    def ranked(excluded: bool) -> list[routing.Ranked] | routing.NoRoute:
        return routing.rank([e for e in endpoints if (e.deployment in theirs) != excluded], caller, regions=regions,
                            gateway_position=gateway_position, ejected=ejected)

    return cascade_of(routes, ranked)


def cascade_of(routes: Sequence[CascadeRoute],
               ranked: Callable[[bool], Sequence[routing.Ranked] | routing.NoRoute]) -> CascadeRoute | None:
    """:func:`cascade_for`'s choice, ``ranked(excluded)`` ranking the replicas of the
    cascades' deployments (False) or of the model's other deployments (True; asked only
    when the caller may reach none of the former). The gateway ranks them from its table's
    arrays (``EndpointTable.cascade_for``)."""
    mine = ranked(False)
    if not isinstance(mine, routing.NoRoute):
        return {r.deployment: r for r in routes}[mine[0].endpoint.deployment]
    return routes[0] if isinstance(ranked(True), routing.NoRoute) else None


def stage_ranking(route: CascadeRoute, stage: int, endpoints: Sequence[routing.Endpoint], caller: routing.Caller, *,
                  regions: routing.RegionIndex | None = None, gateway_position: tuple[float, float] | None = None,
                  ejected: frozenset[str] = frozenset()) -> list[routing.Ranked] | routing.NoRoute:
    """Replicas that may run ``stage`` for ``caller``, best first (residency never crossed).
    Ejected replicas are tried when all are ejected only at the last stage: an earlier one
    hands over to the next stage instead."""
    spec = route.stages[stage]
    mine = [e for e in endpoints if e.deployment == route.deployment and e.tier in spec.tiers]
    if not mine:
        return no_stage_replica(spec)
    return routing.rank(mine, caller, regions=regions if regions is not None else routing.RegionIndex(), gateway_position=gateway_position,
                        ejected=ejected, panic=stage_panics(route, stage))


def no_stage_replica(spec: StageRoute) -> routing.NoRoute:
    return routing.NoRoute(f"stage {spec.variant!r} has no replica running")


def stage_panics(route: CascadeRoute, stage: int) -> bool:
    """Whether ``stage``'s ejected replicas are tried when all are: at the last stage only."""
    return stage == len(route.stages) - 1


def first_stage(route: CascadeRoute, mode: Mode) -> int:
    return len(route.stages) - 1 if mode == "force-last" else 0


def overloaded(route: CascadeRoute, stage: int, ranked: Sequence[routing.Ranked]) -> bool:
    """The stage's best replica already has ``maxInflight`` requests in flight."""
    limit = route.stages[stage].max_inflight
    return limit is not None and bool(ranked) and ranked[0].endpoint.inflight >= limit


def after_stage(route: CascadeRoute, stage: int, verdict: Verdict | None, has_answer: bool,
                later: Sequence[list[routing.Ranked] | routing.NoRoute], *,
                unroutable: routing.NoRoute | None = None) -> Answer | Escalate | Fail:
    """What to do once ``stage`` ran (or could not run).

    ``verdict`` is the judge's (None when the stage gave no answer: down, failing, or
    overloaded, which always escalates); ``later`` each later stage's candidates for this
    caller, in order (empty when ``stage`` is the last), read only as far as the decision
    needs (none for a sure answer); ``unroutable`` why ``stage`` had
    no replica to try, if it had none. A later stage with no allowed replica is passed
    over for the one after it, as a first stage with none hands over. A manifest's cascade
    has two stages (one per tier); the rule does not depend on it.
    """
    if has_answer and (verdict is None or not verdict.escalate):
        return Answer()
    why = verdict.reason if verdict is not None else "the stage gave no answer"
    if not later:
        if has_answer:
            return Answer("no later stage")
        if unroutable is not None:  # nothing was tried: as plain routing says it (503), not as a failed upstream
            return Fail(unroutable.status, f"the last stage ({route.stages[stage].variant}) cannot run")
        return Fail(502, f"the last stage ({route.stages[stage].variant}) gave no answer"
                         + (f": {verdict.reason}" if verdict is not None else ""))  # overloaded: say so
    for offset, ranked in enumerate(later):
        if not isinstance(ranked, routing.NoRoute):
            return Escalate(stage + 1 + offset, tuple(ranked), why)
    blocked = [r for r in later if isinstance(r, routing.NoRoute)]
    reasons = "; ".join(r.reason for r in blocked)
    if has_answer:
        return Answer(f"{why}, but {reasons}")
    cannot = (f"stage {route.stages[stage + 1].variant!r} cannot run" if len(blocked) == 1
              else f"no later stage ({', '.join(repr(s.variant) for s in route.stages[stage + 1:])}) can run")
    # the status the last stage's (the fallback's) ranking gave, as plain routing would
    return Fail(blocked[-1].status, f"stage {route.stages[stage].variant!r} gave no answer and {cannot}: {reasons}")


def energy_joules(route: CascadeRoute, stage: int, site: str, busy_s: float) -> float:
    """Energy one request took at ``site``: the replica's draw × its busy time × the site's PUE."""
    pue = route.energy[site].pue if site in route.energy else 1.0
    return route.stages[stage].watts * pue * max(busy_s, 0.0)


def grams_co2(route: CascadeRoute, site: str, joules: float) -> float:
    carbon = route.energy[site].carbon_g_per_kwh if site in route.energy else 0.0
    return joules / 3.6e6 * carbon
