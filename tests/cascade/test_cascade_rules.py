"""The cascade's pure decisions, table-tested: judges on v2 tensors and on OpenAI-shaped
responses, the per-stage ranking, and what happens after each stage."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import pytest

from orchestrator.gateway import cascade_rules as rules
from orchestrator.gateway import routing

TOP = rules.TensorRule("probabilities", logits=False, measure="top", below=0.8)
MARGIN = rules.TensorRule("probabilities", logits=False, measure="margin", below=0.3)
LOGITS = rules.TensorRule("logits", logits=True, measure="top", below=0.8)


@pytest.mark.parametrize(("rule", "outputs", "escalate", "confidence"), [
    (TOP, {"probabilities": np.array([[0.9, 0.05, 0.05]])}, False, 0.9),
    (TOP, {"probabilities": np.array([[0.7, 0.2, 0.1]])}, True, 0.7),
    (TOP, {"probabilities": np.array([0.85, 0.15])}, False, 0.85),  # one row without a batch axis
    (TOP, {"probabilities": np.array([[0.95, 0.05], [0.6, 0.4]])}, True, 0.6),  # a batch: its least sure row
    (TOP, {"probabilities": np.array([[0.8, 0.2]])}, False, 0.8),  # at the threshold: confident enough
    (MARGIN, {"probabilities": np.array([[0.5, 0.4, 0.1]])}, True, 0.1),
    (MARGIN, {"probabilities": np.array([[0.6, 0.2, 0.2]])}, False, 0.4),
    (LOGITS, {"logits": np.array([[4.0, 0.0, 0.0]])}, False, math.exp(4) / (math.exp(4) + 2)),
    (LOGITS, {"logits": np.array([[1.0, 0.5, 0.0]])}, True, math.exp(1) / (math.exp(1) + math.exp(0.5) + 1)),
    (LOGITS, {"logits": np.array([[1000.0, 0.0]])}, False, 1.0),  # no overflow
    (LOGITS, {"logits": np.array([[1e308, -1e308]])}, False, 1.0),  # nor a warning where the difference overflows
    (TOP, {"probabilities": np.array([[True, False]])}, False, 1.0),  # BOOL reads as 1 and 0
])
def test_judge_tensor(rule: rules.TensorRule, outputs: dict[str, np.ndarray], escalate: bool, confidence: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warnings would reach the gateway's log
        verdict = rules.judge_tensor(rule, outputs)
    assert verdict.escalate is escalate
    assert verdict.confidence == pytest.approx(confidence)
    assert bool(verdict.reason) is escalate


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_an_answer_at_the_threshold_in_its_own_precision_is_confident_enough(dtype: type) -> None:
    """float32(0.7) widened to float64 is 0.69999998…: the model's 0.7 is not below 0.7."""
    rule = rules.TensorRule("p", logits=False, measure="top", below=0.7)
    at = dtype(0.7)
    verdict = rules.judge_tensor(rule, {"p": np.array([[at, 1 - at]], dtype)})
    assert not verdict.escalate and verdict.confidence == float(at)
    just_below = np.nextafter(at, dtype(0))
    assert rules.judge_tensor(rule, {"p": np.array([[just_below, 1 - just_below]], dtype)}).escalate


@pytest.mark.parametrize(("outputs", "reason"), [
    ({"other": np.array([[0.9, 0.1]])}, "has no output 'probabilities'"),
    ({"probabilities": np.array([[1.0]])}, "classes >= 2"),
    ({"probabilities": np.zeros((2, 2, 2))}, "classes >= 2"),
    ({"probabilities": np.array([[np.nan, 0.5]])}, "NaN"),
    # a signalling NaN, as a replica's binary answer may carry: numpy warns when it widens one
    ({"probabilities": np.frombuffer(b"\x01\x00\x80\x7f" * 2, dtype=np.float32).reshape(1, 2)}, "NaN"),
    ({"probabilities": np.array([[b"0.9", b"0.1"]], dtype=object)}, "holds bytes, not scores"),  # a BYTES output
    ({"probabilities": np.array([[b"high", b"low"]], dtype=object)}, "holds bytes, not scores"),
])
def test_an_answer_that_cannot_be_judged_escalates(outputs: dict[str, np.ndarray], reason: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused with its reason, not a RuntimeWarning in the gateway's log
        verdict = rules.judge_tensor(TOP, outputs)
    assert verdict.escalate and verdict.confidence is None and reason in verdict.reason


@pytest.mark.parametrize(("scores", "what"), [
    (np.array([[2.1, -0.3, 0.5]], np.float32), "from -0.3 to 2.1"),  # logits: the top one is no probability
    (np.array([[0.9, 0.8, 0.7]], np.float32), "sums to 2.4"),  # logits that fall inside [0, 1]: a row is no distribution
    (np.array([[0.95, 0.05], [3.0, 1.0]], np.float32), "from 0.05 to 3"),  # a batch: any row read wrong
    (np.array([[230, 25]], np.uint8), "from 25 to 230"),  # a quantized output's 0..255
])
def test_scores_that_are_no_probabilities_escalate_saying_the_rule_reads_them_wrong(scores: np.ndarray, what: str) -> None:
    """``scores`` defaults to probabilities: a model answering logits under it was read as
    sure of every answer (a top "probability" of 2.1 is not below 0.8), so the edge answered
    everything, its confidence header above 1. Such an answer cannot be judged: it escalates,
    and the reason says what to set."""
    verdict = rules.judge_tensor(TOP, {"probabilities": scores})
    assert verdict.escalate and verdict.confidence is None
    assert what in verdict.reason and "scores: logits" in verdict.reason, verdict.reason


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_probabilities_in_any_precision_are_judged_as_they_are(dtype: type) -> None:
    """A softmax's rows sum to 1 only up to their precision's rounding (float16: ~3e-4 at
    32,000 classes): that is no reason to doubt them."""
    z = np.random.default_rng(0).standard_normal((8, 32_000)) * 3
    p = np.exp(z - z.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(dtype)
    verdict = rules.judge_tensor(rules.TensorRule("p", logits=False, measure="top", below=1e-3), {"p": p})
    assert not verdict.escalate and verdict.confidence is not None, verdict.reason


TAGS = rules.TensorRule("tags", logits=False, measure="top", below=0.9, independent=True)
TAGS_MARGIN = rules.TensorRule("tags", logits=False, measure="margin", below=0.6, independent=True)
TAG_LOGITS = rules.TensorRule("tags", logits=True, measure="top", below=0.9, independent=True)


@pytest.mark.parametrize(("rule", "scores", "escalate", "confidence"), [
    (TAGS, np.array([[0.98, 0.02, 0.97]]), False, 0.97),  # every label far from 0.5: sure (its row sums to 1.97)
    (TAGS, np.array([[0.98, 0.02, 0.6]]), True, 0.6),  # one label in doubt: the answer is
    (TAGS, np.array([[0.98, 0.05, 0.0]]), False, 0.95),  # a label sure it does not apply is as sure as one that does
    (TAGS, np.array([[0.0, 0.0, 0.0]]), False, 1.0),  # no label applies, surely
    (TAGS, np.array([0.99, 0.93]), False, 0.93),  # one row without a batch axis
    (TAGS, np.array([[0.99], [0.4]]), True, 0.6),  # one label (a binary sigmoid): the least sure row
    (TAGS_MARGIN, np.array([[0.9, 0.15]]), False, 0.7),  # |2p - 1|
    (TAGS_MARGIN, np.array([[0.9, 0.25]]), True, 0.5),
    (TAG_LOGITS, np.array([[4.0, -5.0]]), False, 1 / (1 + math.exp(-4))),  # a sigmoid first
    (TAG_LOGITS, np.array([[4.0, 0.5]]), True, 1 / (1 + math.exp(-0.5))),
    (TAG_LOGITS, np.array([[1e308, -1e308]]), False, 1.0),  # no overflow warning
])
def test_a_multi_label_answer_is_as_sure_as_its_least_sure_label(rule: rules.TensorRule, scores: np.ndarray, escalate: bool,
                                                                  confidence: float) -> None:
    """A multi-label (sigmoid) model answers one probability per label, rows not summing to
    1: read as probabilities, every answer was refused and escalated. Under ``scores:
    independent`` each label is a yes/no answer, sure as far as it is from 0.5."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdict = rules.judge_tensor(rule, {"tags": scores})
    assert (verdict.escalate, verdict.confidence) == (escalate, pytest.approx(confidence))
    if escalate:
        assert verdict.reason.startswith("least sure label's"), verdict.reason


@pytest.mark.parametrize(("scores", "reason"), [
    (np.array([[2.5, -1.0]]), "scores: independent-logits"),  # a sigmoid's logits read as probabilities
    (np.zeros((1, 0)), "[batch, labels >= 1]"),
    (np.array([[np.nan, 0.9]]), "NaN"),
])
def test_a_multi_label_answer_that_cannot_be_judged_escalates(scores: np.ndarray, reason: str) -> None:
    verdict = rules.judge_tensor(TAGS, {"tags": scores})
    assert verdict.escalate and verdict.confidence is None and reason in verdict.reason, verdict.reason


def test_a_multi_label_answer_read_as_probabilities_says_to_set_independent() -> None:
    verdict = rules.judge_tensor(TOP, {"probabilities": np.array([[0.98, 0.02, 0.97]], np.float32)})
    assert verdict.escalate and "scores: independent" in verdict.reason, verdict.reason


def chat(content: str = "Paris.", finish: str = "stop", logprobs: list[float] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": f"t{i}", "logprob": lp, "top_logprobs": []} for i, lp in enumerate(logprobs)]}
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": [choice]}


def completion(text: str = "Paris.", finish: str = "stop", logprobs: list[float] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"tokens": ["a"] * len(logprobs), "token_logprobs": logprobs}
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice]}


LOGPROB = rules.GenerativeRule(mean_logprob_below=-1.0)
TRUNCATED = rules.GenerativeRule(truncated=True)
REFUSAL = rules.GenerativeRule(refusal=(r"(?i)\bI can(no|')t help\b", r"^As an AI"))


@pytest.mark.parametrize(("rule", "response", "escalate", "reason"), [
    (LOGPROB, chat(logprobs=[-0.1, -0.3, -0.2]), False, ""),
    (LOGPROB, chat(logprobs=[-0.5, -2.5, -1.5]), True, "mean token logprob -1.500 < -1"),
    (LOGPROB, completion(logprobs=[-0.2, -0.4]), False, ""),
    (LOGPROB, completion(logprobs=[-3.0, None, -2.0]), True, "-2.500"),  # the first token of a prompt echo has none
    (LOGPROB, chat(), True, "no token logprobs"),
    (TRUNCATED, chat(finish="length"), True, "max_tokens"),
    (TRUNCATED, completion(finish="length"), True, "max_tokens"),
    (TRUNCATED, chat(finish="stop"), False, ""),
    (REFUSAL, chat("Sorry, I can't help with that."), True, "refusal pattern"),
    (REFUSAL, completion("As an AI model I won't"), True, "refusal pattern"),
    (REFUSAL, chat("The capital is Paris."), False, ""),
    (REFUSAL, {"choices": []}, True, "no choices"),
    (REFUSAL, {"error": "x"}, True, "no choices"),
])
def test_judge_generative(rule: rules.GenerativeRule, response: dict[str, Any], escalate: bool, reason: str) -> None:
    verdict = rules.judge_generative(rule, response)
    assert verdict.escalate is escalate
    assert reason in verdict.reason


@pytest.mark.parametrize(("logprob", "reason", "confidence"), [
    ("-Infinity", "mean token logprob -inf < -1", 0.0),  # a token of probability 0
    ("NaN", "NaN or +inf", None),
    ("Infinity", "NaN or +inf", None),
])
def test_a_non_finite_token_logprob_escalates(logprob: str, reason: str, confidence: float | None) -> None:
    """As the gateway reads a replica's body: Python's JSON parse accepts these literals.
    The answer is not judged on its other, surer tokens."""
    body = json.loads('{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "yes no"}, '
                      '"logprobs": {"content": [{"token": "yes", "logprob": -0.01}, {"token": " no", "logprob": ' + logprob + '}]}}]}')
    verdict = rules.judge_generative(LOGPROB, body)
    assert verdict.escalate and reason in verdict.reason and verdict.confidence == confidence
    assert rules.judge_generative(LOGPROB, completion(logprobs=[-0.01, float(logprob)])).escalate


def test_generative_confidence_is_the_geometric_mean_token_probability() -> None:
    verdict = rules.judge_generative(LOGPROB, chat(logprobs=[-0.2, -0.4]))
    assert verdict.confidence == pytest.approx(math.exp(-0.3))


def endpoint(site: str, tier: str, country: str, lat: float = 48.0, lon: float = 2.0, **kw: Any) -> routing.Endpoint:
    return routing.Endpoint(model="task", deployment="task", site=site, tier=tier, country=country, region="", lat=lat, lon=lon,
                            url=f"http://{site}", **kw)


ROUTE = rules.CascadeRoute("task", "task", (
    rules.StageRoute("small", frozenset({"edge"}), TOP, max_inflight=4, watts=10.0),
    rules.StageRoute("large", frozenset({"datacenter"}), None, watts=300.0),
), {"dc": rules.SiteEnergy(400.0, 1.5)})

FLEET = [endpoint("edge-fr", "edge", "FR"), endpoint("edge-de", "edge", "DE", 52.5, 13.4),
         endpoint("dc", "datacenter", "FR", 48.9, 2.4), endpoint("dc-us", "datacenter", "US", 40.0, -74.0)]


def test_each_stage_ranks_its_own_tiers_inside_the_callers_residency() -> None:
    caller = routing.Caller(48.8, 2.3, residency=frozenset({"FR"}))
    first = rules.stage_ranking(ROUTE, 0, FLEET, caller)
    last = rules.stage_ranking(ROUTE, 1, FLEET, caller)
    assert isinstance(first, list) and [r.endpoint.site for r in first] == ["edge-fr"]
    assert isinstance(last, list) and [r.endpoint.site for r in last] == ["dc"]
    nowhere = rules.stage_ranking(ROUTE, 1, FLEET[:2], caller)
    assert isinstance(nowhere, routing.NoRoute) and "no replica running" in nowhere.reason


def test_other_deployments_of_the_model_are_not_stages() -> None:
    other = [endpoint("edge-x", "edge", "FR")]
    other = [routing.Endpoint(**{**e.__dict__, "deployment": "other"}) for e in other]
    assert isinstance(rules.stage_ranking(ROUTE, 0, other, routing.Caller()), routing.NoRoute)


def of(deployment: str, site: str, country: str, lat: float, lon: float, healthy: bool = True) -> routing.Endpoint:
    return routing.Endpoint("task", deployment, site, "edge", country, "", lat, lon, f"http://{site}", healthy=healthy,
                            allowed_countries=frozenset({country}))


EU_CASCADE, CH_CASCADE = (rules.CascadeRoute("task", d, ROUTE.stages) for d in ("task-eu", "task-ch"))
MODEL = [of("task-eu", "edge-fr", "FR", 48.85, 2.35), of("task-ch", "edge-ch", "CH", 46.2, 6.1),
         of("task-us", "edge-us", "US", 40.7, -74.0)]  # task-us has no cascade


@pytest.mark.parametrize(("routes", "fleet", "caller", "runs"), [
    ([EU_CASCADE], MODEL, routing.Caller(40.7, -74.0), "task-eu"),  # no residency: the model's cascade, wherever it runs
    ([EU_CASCADE], MODEL, routing.Caller(residency=frozenset({"FR"})), "task-eu"),
    ([EU_CASCADE], MODEL, routing.Caller(residency=frozenset({"US"})), None),  # only task-us may serve it: plain routing
    ([EU_CASCADE, CH_CASCADE], MODEL, routing.Caller(residency=frozenset({"CH"})), "task-ch"),
    ([EU_CASCADE, CH_CASCADE], MODEL, routing.Caller(46.5, 6.6), "task-ch"),  # the nearest
    ([EU_CASCADE, CH_CASCADE], MODEL, routing.Caller(residency=frozenset({"US"})), None),
    ([EU_CASCADE], [of("task-eu", "edge-fr", "FR", 48.85, 2.35, healthy=False), MODEL[2]], routing.Caller(), None),  # the cascade is down
    ([EU_CASCADE], MODEL[:1], routing.Caller(residency=frozenset({"US"})), "task-eu"),  # no replica at all: the cascade says why
    ([EU_CASCADE], [], routing.Caller(), "task-eu"),  # scaled to zero: the cascade is woken
])
def test_cascade_for(routes: list[rules.CascadeRoute], fleet: list[routing.Endpoint], caller: routing.Caller, runs: str | None) -> None:
    chosen = rules.cascade_for(routes, fleet, caller)
    assert (chosen.deployment if chosen is not None else None) == runs


def test_overloaded_when_the_best_replica_is_at_max_inflight() -> None:
    busy = [routing.Ranked(endpoint("edge-fr", "edge", "FR", inflight=4), 1.0)]
    calm = [routing.Ranked(endpoint("edge-fr", "edge", "FR", inflight=3), 1.0)]
    assert rules.overloaded(ROUTE, 0, busy) and not rules.overloaded(ROUTE, 0, calm) and not rules.overloaded(ROUTE, 1, busy)


SURE = rules.Verdict(False, 0.9, "")
UNSURE = rules.Verdict(True, 0.5, "top probability 0.500 < 0.8")
NEXT = [routing.Ranked(endpoint("dc", "datacenter", "FR"), 2.0)]


@pytest.mark.parametrize(("stage", "verdict", "answered", "later", "expected"), [
    (0, SURE, True, [NEXT], rules.Answer()),
    (0, UNSURE, True, [NEXT], rules.Escalate(1, tuple(NEXT), UNSURE.reason)),
    (0, None, False, [NEXT], rules.Escalate(1, tuple(NEXT), "the stage gave no answer")),
    (0, UNSURE, True, [routing.NoRoute("no replica in the caller's residency (FR)")],
     rules.Answer("top probability 0.500 < 0.8, but no replica in the caller's residency (FR)")),
    (0, None, False, [routing.NoRoute("nothing", 503)], rules.Fail(503, "stage 'small' gave no answer and stage 'large' cannot run: nothing")),
    (1, None, True, [], rules.Answer()),
    (1, None, False, [], rules.Fail(502, "the last stage (large) gave no answer")),
])
def test_after_stage(stage: int, verdict: rules.Verdict | None, answered: bool, later: Any, expected: Any) -> None:
    assert rules.after_stage(ROUTE, stage, verdict, answered, later) == expected


THREE = rules.CascadeRoute("task", "task", (
    rules.StageRoute("tiny", frozenset({"edge"}), TOP),
    rules.StageRoute("mid", frozenset({"regional"}), TOP),
    rules.StageRoute("large", frozenset({"datacenter"}), None),
))
ABROAD = routing.NoRoute("no replica in the caller's residency (FR); replicas run in DE")


@pytest.mark.parametrize(("verdict", "answered"), [(UNSURE, True), (None, False)], ids=["unsure", "down"])
def test_a_middle_stage_the_caller_may_not_use_is_passed_over_for_the_last(verdict: rules.Verdict | None, answered: bool) -> None:
    """A first stage with no allowed replica hands over; a middle one must too, or an
    unsure (or down) first stage would end a three-stage cascade that its last stage could answer."""
    decision = rules.after_stage(THREE, 0, verdict, answered, [ABROAD, NEXT])
    assert decision == rules.Escalate(2, tuple(NEXT), verdict.reason if verdict is not None else "the stage gave no answer")


def test_no_later_stage_that_can_run_keeps_the_answer_in_hand_or_fails_with_every_reason() -> None:
    nowhere = routing.NoRoute("stage 'large' has no replica running", 503)
    assert rules.after_stage(THREE, 0, UNSURE, True, [ABROAD, nowhere]) == rules.Answer(f"{UNSURE.reason}, but {ABROAD.reason}; {nowhere.reason}")
    assert rules.after_stage(THREE, 0, None, False, [ABROAD, nowhere]) == rules.Fail(
        503, f"stage 'tiny' gave no answer and no later stage ('mid', 'large') can run: {ABROAD.reason}; {nowhere.reason}")


def test_a_last_stage_with_no_replica_to_try_fails_as_plain_routing_does() -> None:
    """Nothing was tried, so nothing failed upstream: 503 (was 502), as a model with no
    replica for the caller is answered without a cascade."""
    nowhere = routing.NoRoute("no replica in the caller's residency (DE); replicas run in FR")
    assert rules.after_stage(ROUTE, 1, None, False, [], unroutable=nowhere) == rules.Fail(503, "the last stage (large) cannot run")
    refused = routing.NoRoute("X-Edgeplane-Location is outside -90..90, -180..180", 400)
    assert rules.after_stage(ROUTE, 1, None, False, [], unroutable=refused) == rules.Fail(400, "the last stage (large) cannot run")


def test_energy_and_co2() -> None:
    joules = rules.energy_joules(ROUTE, 1, "dc", 0.01)
    assert joules == pytest.approx(300.0 * 1.5 * 0.01)
    assert rules.grams_co2(ROUTE, "dc", joules) == pytest.approx(joules / 3.6e6 * 400.0)
    assert rules.energy_joules(ROUTE, 0, "edge-fr", 0.01) == pytest.approx(0.1)


@pytest.mark.parametrize(("header", "mode"), [(None, "on"), ("off", "off"), (" Force-Last ", "force-last"),
                                              ("force-first", "force-first"), ("maybe", None)])
def test_parse_mode(header: str | None, mode: str | None) -> None:
    assert rules.parse_mode(header) == mode
