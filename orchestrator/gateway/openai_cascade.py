"""Cascades of generative models on the OpenAI routes: the edge answers first, a later
stage when the edge is unsure, never outside the caller's residency.

A chat or text completion whose ``model`` names a deployment with ``spec.cascade`` (by the
deployment's name or its model's) comes here from :mod:`orchestrator.gateway.openai_routes`.
The decisions are the v2 cascade's, pure, in :mod:`orchestrator.gateway.cascade_rules`:
``stage_ranking`` (the nearest allowed replicas of a stage: residency binds every stage),
``overloaded``, ``judge_generative`` (mean token log-probability, ``max_tokens`` reached,
refusal patterns) and ``after_stage`` (answer, escalate, or answer saying why not
escalated); the counters and energy are the v2 cascade's too (``CascadeHandler``), and
so are ``edgeplane_gateway_requests_total`` (one caller request counts once, as the answer
the caller got, however many stages ran for it) and ``edgeplane_gateway_failovers_total``
(the trip's :class:`~orchestrator.gateway.failover.Failovers`, which the relay of its last stage goes on with).
A replica at capacity (429) is overloaded, as ``maxInflight`` reached is: the stage's next
replica is tried, then the next stage; the caller gets the 429, with its ``Retry-After``,
only when the stage the cascade ends on is at capacity.

A stage with a rule runs non-streaming, whatever the caller asked, because only a whole
answer can be judged; when the rule has ``meanLogprobBelow`` the stage is asked for token
logprobs (removed again from the answer unless the caller asked for them). For a streaming
caller the judged answer is then replayed as server-sent events, or — escalated — the
answering stage's stream is relayed chunk by chunk as it is generated. So a streaming
caller's first token comes after stage 1's whole answer: the added latency is stage 1's
full generation time (docs/generative.md).

The answer carries the v2 cascade's headers (``X-Edgeplane-Cascade-Stage``,
``-Confidence``, ``-Sites``, ``-Escalation``, ``-Reason``, ``-Energy-J``) and, in a JSON
body or in a replayed stream's last chunk, an ``edgeplane`` object with the same facts.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from orchestrator.gateway import cascade as cascade_mod
from orchestrator.gateway import cascade_rules as rules
from orchestrator.gateway import correlation
from orchestrator.gateway import failover
from orchestrator.gateway import openai_relay, openai_routes, routing
from orchestrator.gateway import scoping
from orchestrator.gateway.upstream import OutOfDescriptors, UpstreamError, UpstreamTimeout


@dataclass
class _Answer:
    stage: int
    status: int
    body: dict[str, Any] | bytes  # parsed JSON of a 200, the raw body otherwise
    site: str
    tier: str
    retry_after: str | None = None  # of a 429


@dataclass
class _Request:
    """One cascade request's way through the stages."""

    owner: openai_routes.OpenAIGateway
    handler: cascade_mod.CascadeHandler
    route: rules.CascadeRoute
    body: dict[str, Any]
    suffix: str
    stream: bool
    started: float  # the handler's clock, for the cascade's stats
    arrived: float  # the caller's request (time.perf_counter), which its first token is timed from
    totals: cascade_mod.Totals
    trip: cascade_mod.Trip
    forwarded: Mapping[str, str]  # the caller's id and trace context, and its token (scoping.passed_on), for every stage's replicas

    @property
    def chat(self) -> bool:
        return self.suffix == "/chat/completions"


async def generate(owner: openai_routes.OpenAIGateway, route: rules.CascadeRoute, mode: rules.Mode, request: Request,
                   body: dict[str, Any], suffix: str, stream: bool, arrived: float) -> Response:
    handler = owner.gw.cascade
    assert handler is not None  # openai_routes sends cascades here only when the gateway runs them
    caller = owner.gw.caller(request)
    if isinstance(caller, routing.NoRoute):
        owner.gw.refused(route.model, caller.status)
        return openai_routes.caller_error(caller)
    totals = handler.stats.totals(route.deployment)
    totals.requests += 1
    trip = cascade_mod.Trip(caller=caller, mode=mode, failovers=failover.Failovers(owner.gw.metrics.failovers, route.model,
                                                                                   owner.gw.metrics.skipped))
    req = _Request(owner, handler, route, body, suffix, stream, handler.clock(), arrived, totals, trip,
                   {**correlation.forwarded(request.scope), **scoping.passed_on(request.scope)})
    stage = rules.first_stage(route, mode)
    ranked = handler.ranking(route, stage, caller)
    answer: _Answer | None = None
    answer_confidence: float | None = None
    escalated_at: float | None = None
    escalated_why = ""
    while True:
        rule = route.stages[stage].rule if mode == "on" else None
        judged = isinstance(rule, rules.GenerativeRule)
        last = stage == len(route.stages) - 1
        got: _Answer | None = None
        busy: _Answer | None = None  # this stage's last 429, when no replica of it answered otherwise
        verdict: rules.Verdict | None = None
        unavailable: list[int | None] = []  # the Retry-After of each of this stage's replicas that answered 503, None for a 404
        tried_from = len(req.trip.failures)
        if isinstance(ranked, routing.NoRoute):
            req.trip.failures.append(f"{route.stages[stage].variant}: {ranked.reason}")
            cause = "down"
        elif rules.overloaded(route, stage, ranked):
            verdict = rules.Verdict(True, None, f"stage {route.stages[stage].variant!r} is overloaded "
                                                f"({ranked[0].endpoint.inflight} in flight at {ranked[0].endpoint.site})")
            cause = "overloaded"
        elif stream and not judged and (last or mode != "on"):
            # the stage that answers streams: relay it as it is generated
            fallback = None if answer is None else (answer, answer_confidence, f"{escalated_why}, but")
            return _relay(req, stage, ranked, escalated_at, escalated_why, fallback)
        else:
            try:
                got = await _call(req, stage, ranked, unavailable, logprobs=isinstance(rule, rules.GenerativeRule) and rule.mean_logprob_below is not None)
            except OutOfDescriptors as exc:  # the gateway's own: no stage's replica failed, and none can be reached now
                if answer is not None:  # an earlier stage answered: its answer stands
                    return _not_escalated(req, answer, answer_confidence, f"{escalated_why}, but {exc}")
                return _unanswered(req, openai_routes.error(503, f"cascade {route.deployment!r}: {exc}", code="unavailable",
                                                            headers={"retry-after": str(exc.retry_after)}))
            cause = "down" if got is None else "unsure"
            if got is not None and got.status == 429:  # at capacity: overloaded, so it hands over
                busy, got, cause = got, None, "overloaded"
                verdict = rules.Verdict(True, None, f"stage {route.stages[stage].variant!r} is at capacity ({busy.site}: HTTP 429)")
                if mode != "on":  # the stage the caller chose: nothing to hand over to
                    return _at_capacity(req, busy, f"{verdict.reason} (X-Edgeplane-Cascade: {mode})")
        if got is not None:
            if got.status != 200 and answer is not None:
                # a later stage refused what an earlier one answered: the earlier answer stands
                return _not_escalated(req, answer, answer_confidence, f"{escalated_why}, but stage "
                                      f"{route.stages[stage].variant!r} refused the request (HTTP {got.status})")
            if got.status != 200 or mode != "on":  # a caller's error, or a stage the caller chose
                confidence = _confidence(got)
                return _respond(req, got, confidence, escalated_at, "none", "")
            answer = got
            assert isinstance(got.body, dict)
            verdict = rules.judge_generative(rule, got.body) if isinstance(rule, rules.GenerativeRule) else None
        if got is None and mode == "force-first":
            why = "; ".join(req.trip.failures) or (verdict.reason if verdict is not None else "no answer")
            return _unanswered(req, openai_routes.error(503, f"cascade {route.deployment!r}: stage {route.stages[stage].variant!r} "
                                                             f"(X-Edgeplane-Cascade: force-first) gave no answer: {why}",
                                                        code="stage_unavailable"))
        later = handler.later(route, stage, caller)
        unroutable = ranked if isinstance(ranked, routing.NoRoute) else None
        match rules.after_stage(route, stage, verdict, got is not None, later, unroutable=unroutable):
            case rules.Answer(not_escalated=why):
                assert answer is not None  # after_stage answers only with this stage's answer in hand
                confidence = verdict.confidence if verdict is not None else _confidence(answer)
                if why:
                    return _not_escalated(req, answer, confidence, why)
                return _respond(req, answer, confidence, escalated_at, "escalated" if escalated_at is not None else "none", escalated_why)
            case rules.Fail(status=code, reason=reason):
                if answer is not None:  # an earlier stage answered: its answer stands
                    return _not_escalated(req, answer, answer_confidence, f"{escalated_why}, but {reason}")
                if busy is not None:  # the stage it ended on was at capacity: the caller may retry as that replica said
                    return _at_capacity(req, busy, reason)
                tried = "; ".join(req.trip.failures) or "nothing"
                if (retry := handler.retry_after(route, code, unavailable, len(req.trip.failures) - tried_from)) is not None:
                    return _unanswered(req, openai_routes.error(503, f"cascade {route.deployment!r}: {reason}; tried: {tried}; retry",
                                                                code="unavailable", headers={"retry-after": str(retry)}))
                return _unanswered(req, openai_routes.error(code, f"cascade {route.deployment!r}: {reason}; tried: {tried}",
                                                            code="upstream_failed" if code == 502 else "stage_unavailable"))
            case rules.Escalate(stage=next_stage, candidates=candidates, reason=why):
                handler.escalation(route, stage, cause, totals, req.trip)
                escalated_at = handler.clock()  # the next stage begins: every stage before it added its time
                if got is not None:
                    answer_confidence = verdict.confidence if verdict is not None else None
                escalated_why = f"{route.stages[stage].variant}: {why}"
                req.trip.failures.extend(cascade_mod.skipped(route, stage, next_stage, later.ranked))
                stage, ranked = next_stage, list(candidates)


def _at_capacity(req: _Request, busy: _Answer, reason: str) -> Response:
    """The 429 of a cascade that ends on a stage at capacity: no stage answered (counted
    failed, streamed or not), and the caller may retry when that replica said."""
    tried = "; ".join(req.trip.failures) or "nothing"
    return _unanswered(req, openai_routes.error(429, f"cascade {req.route.deployment!r}: {reason}; tried: {tried}", code="rate_limit_exceeded",
                                                headers=failover.passed_on(busy.retry_after)))


def _unanswered(req: _Request, answer: Response) -> Response:
    """``answer``, the gateway's own error for a request no stage answered: counted failed
    in the cascade's stats and in the gateway's requests."""
    req.totals.failed += 1
    req.totals.latency_s += req.handler.clock() - req.started
    req.owner.gw.refused(req.route.model, answer.status_code)
    return answer


def _confidence(answer: _Answer) -> float | None:
    """exp(mean token logprob) of an answer that carries logprobs."""
    if not isinstance(answer.body, dict):
        return None
    mean = rules.mean_logprob(answer.body)
    return None if mean is None else math.exp(mean)


async def _call(req: _Request, stage: int, ranked: list[routing.Ranked], unavailable: list[int | None], *, logprobs: bool) -> _Answer | None:
    """Run ``stage`` non-streaming at the first of ``ranked`` that answers (failover on a
    refused connection, a cut answer or a 5xx, as a plain request, and on a 429: a replica
    at capacity); None when none did, or the last 429 when one was at capacity. Each
    replica's 503 adds its Retry-After to ``unavailable``, and each 404 None."""
    owner, handler = req.owner, req.handler
    body = {k: v for k, v in req.body.items() if k != "stream_options"}
    body["stream"] = False
    echoed = ""  # the prompt this gateway echoes, having asked the stage for logprobs instead
    if logprobs and not _asks_logprobs(body):
        body["logprobs"] = True if req.chat else 1
        if not req.chat and body.get("echo") is True and (prompt := _one_prompt(body.get("prompt"))) is not None:
            # echo with logprobs asks for the prompt's logprobs too (which the agent refuses, and
            # which would be judged as the answer's): the stage answers alone, the prompt is put back here
            body["echo"], echoed = False, prompt
    busy: _Answer | None = None
    for choice in ranked[: owner.gw.max_attempts]:
        e = choice.endpoint
        req.trip.failovers.attempt(e.site)
        owner.gw.table.started(e.url)
        began = handler.clock()
        try:
            try:
                # The head comes once the answer is generated (OpenAIGateway.post); the body right after it.
                async with await owner.post(f"{e.url}/v1{req.suffix}", json.dumps({**body, "model": openai_relay.engine_model(e, e.model)}).encode(),
                                            scoping.to_replica({"content-type": "application/json", **req.forwarded}, e),
                                            stream=False) as resp:
                    async with asyncio.timeout(owner.first_token_timeout):
                        status, content = resp.status, await resp.body()
                    headers = resp.headers
                    retry_after, ejection = headers.get("retry-after"), failover.ejection_s(headers)
            except (UpstreamError, TimeoutError) as exc:
                req.trip.failures.append(f"{e.site}: {exc or type(exc).__name__}")
                # slow at this request (a long prompt on slow hardware): ejected only at the fifth in a row, as by the relay
                owner.gw.table.failed(e.url, slow=isinstance(exc, (UpstreamTimeout, TimeoutError)))
                continue
        finally:
            owner.gw.table.finished(e.url)
            handler.charge(req.route, stage, e.site, handler.clock() - began, req.trip, req.totals)
        parsed = openai_relay.json_object(content) if status == 200 else None
        if status == 200 and parsed is None:  # cut short, or a proxy's own page: the next replica may answer
            owner.gw.table.malformed(e.url)
            req.trip.failures.append(f"{e.site}: the answer is not a JSON object")
            continue
        owner.gw.table.answered(e.url, status, ejection)
        if (redirected := failover.redirect(status, headers)) is not None:
            req.trip.failures.append(f"{e.site}: {redirected}")
            continue
        if status >= 500:
            req.trip.failures.append(f"{e.site}: HTTP {status}")
            if status == 503:
                unavailable.append(failover.retry_after_s(retry_after))
            continue
        if status == 404:  # the stage's model moved away a moment ago: the next replica may serve it
            unavailable.append(None)
            req.trip.failures.append(f"{e.site}: does not serve {e.model!r} now (HTTP 404)")
            continue
        if status == 429:  # its sequences are full (the replica is fine): another replica, or the next stage, may not be
            req.trip.failures.append(f"{e.site}: at capacity (HTTP 429)")
            busy = _Answer(stage, status, content, e.site, e.tier, retry_after)
            continue
        if parsed is None:  # not a 200: the caller's error, an answer all the same
            req.trip.failovers.answered()
            return _Answer(stage, status, content, e.site, e.tier)
        req.trip.failovers.answered()
        return _Answer(stage, 200, _with_prompt(parsed, echoed) if echoed else parsed, e.site, e.tier)
    return busy


def _one_prompt(value: Any) -> str | None:
    """A completion's prompt as the agent reads it: a string, or a list of one string."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, str) else None


def _with_prompt(answer: dict[str, Any], prompt: str) -> dict[str, Any]:
    """A text completion as it would be echoed: each choice's text after the prompt."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return answer
    return {**answer, "choices": [{**c, "text": prompt + c["text"]} if isinstance(c, dict) and isinstance(c.get("text"), str) else c
                                  for c in choices]}


def _asks_logprobs(body: Mapping[str, Any]) -> bool:
    """Whether a body asks for token logprobs: a chat's ``true``, or a completion's number,
    0 included (the sampled tokens' own, with no alternatives)."""
    value = body.get("logprobs")
    return value is not None and value is not False


def _explain_by(req: _Request, stage: int) -> None:
    """The request's answer says why nearer replicas of ``stage`` were skipped (``X-Edgeplane-Skipped``)."""
    if req.trip.caller is not None:
        req.trip.failovers.explain_by(functools.partial(req.handler.table.skipped_stage, req.route, stage, req.trip.caller,
                                                        req.handler.position))


def _headers(req: _Request, stage: int, site: str, tier: str, confidence: float | None, escalation: str, reason: str,
             sites: list[str]) -> dict[str, str]:
    _explain_by(req, stage)
    out = {"x-edgeplane-site": site, "x-edgeplane-tier": tier, "x-edgeplane-cascade-stage": req.route.stages[stage].variant,
           "x-edgeplane-cascade-sites": ",".join(sites), "x-edgeplane-cascade-escalation": escalation,
           "x-edgeplane-cascade-energy-j": f"{req.trip.joules:.6g}", **req.trip.failovers.header()}
    if confidence is not None:
        out["x-edgeplane-cascade-confidence"] = f"{confidence:.4f}"
    if reason:
        out["x-edgeplane-cascade-reason"] = cascade_mod.header_value(reason)
    return out


def _metadata(req: _Request, stage: int, confidence: float | None, escalation: str, reason: str, sites: list[str]) -> dict[str, Any]:
    return {"cascade": req.route.deployment, "stage": req.route.stages[stage].variant, "confidence": confidence,
            "sites": list(sites), "escalated": escalation == "escalated", "escalation": escalation, "reason": reason or None}


def _not_escalated(req: _Request, answer: _Answer, confidence: float | None, why: str, *, sites: list[str] | None = None) -> Response:
    req.handler.not_escalated(req.route, answer.stage, req.totals)
    return _respond(req, answer, confidence, None, "not-escalated", why, sites=sites)


def _respond(req: _Request, answer: _Answer, confidence: float | None, escalated_at: float | None, escalation: str,
             reason: str, *, sites: list[str] | None = None) -> Response:
    req.handler.answered(req.route, answer.stage, req.started, escalated_at, req.totals)
    # the caller's one request, whichever stages ran for it (as the v2 cascade counts)
    req.owner.gw.metrics.requests.labels(req.route.model, answer.site, str(answer.status)).inc()
    if answer.status == 200:  # sent whole (or replayed as a stream at once): its first token is the caller's now
        req.owner.ttft.labels(req.route.model).observe(time.perf_counter() - req.arrived)
    sites = req.trip.sites if sites is None else sites
    headers = _headers(req, answer.stage, answer.site, answer.tier, confidence, escalation, reason, sites)
    if not isinstance(answer.body, dict):
        headers.update(failover.passed_on(answer.retry_after))
        return Response(answer.body, status_code=answer.status, media_type="application/json", headers=headers)
    body = {**answer.body, "edgeplane": _metadata(req, answer.stage, confidence, escalation, reason, sites)}
    if not _asks_logprobs(req.body) and isinstance(body.get("choices"), list):
        # asked of the stage for its judge only: not the caller's
        body["choices"] = [{**c, "logprobs": None} if isinstance(c, dict) else c for c in body["choices"]]
    if not req.stream:
        return Response(json.dumps(body), media_type="application/json", headers=headers)
    return Response(b"".join(replay(body, chat=req.chat, usage=_wants_usage(req.body))), media_type="text/event-stream",
                    headers={**headers, "cache-control": "no-cache"})


def _wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def replay(answer: Mapping[str, Any], *, chat: bool, usage: bool) -> list[bytes]:
    """A whole chat or text completion as the server-sent events a streaming caller expects:
    per choice, its text in one chunk and its end (a chat choice opens with its role); the
    usage chunk when asked; ``[DONE]``.
    The ``edgeplane`` object rides on the last chunk."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": answer.get("id", ""), "object": kind, "created": answer.get("created", int(time.time())),
            "model": answer.get("model", "")}
    events: list[dict[str, Any]] = []
    for c in answer.get("choices") or []:
        if not isinstance(c, Mapping):
            continue
        index = c.get("index", 0)
        if chat:
            message = c.get("message") if isinstance(c.get("message"), Mapping) else {}
            events.append({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            events.append({**head, "choices": [{"index": index, "delta": {"content": message.get("content") or ""},
                                                "logprobs": c.get("logprobs"), "finish_reason": None}]})
            events.append({**head, "choices": [{"index": index, "delta": {}, "finish_reason": c.get("finish_reason")}]})
        else:
            events.append({**head, "choices": [{"index": index, "text": c.get("text") or "", "logprobs": c.get("logprobs"),
                                                "finish_reason": c.get("finish_reason")}]})
    if usage:
        events.append({**head, "choices": [], "usage": answer.get("usage")})
    if events and "edgeplane" in answer:
        events[-1]["edgeplane"] = answer["edgeplane"]
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [openai_relay.SSE_DONE]


class _StageHooks:
    """Cascade headers and energy for the stage whose stream the relay passes on; when its
    every replica fails or is at capacity, or one refuses the request, the answer of an
    earlier stage (if any) is replayed instead, as it stands in a non-streaming cascade;
    with none, a stage at capacity is answered 429 and the request counted failed, as there."""

    def __init__(self, req: _Request, stage: int, escalated_at: float | None, escalated_why: str,
                 fallback: tuple[_Answer, float | None, str] | None) -> None:
        self.req, self.stage, self.escalated_at, self.escalated_why, self.fallback = req, stage, escalated_at, escalated_why, fallback

    def committed(self, e: routing.Endpoint) -> dict[str, str]:
        req = self.req
        req.handler.answered(req.route, self.stage, req.started, self.escalated_at, req.totals)
        escalation = "escalated" if self.escalated_at is not None else "none"
        return _headers(req, self.stage, e.site, e.tier, None, escalation, self.escalated_why, [*req.trip.sites, e.site])

    def busy(self, e: routing.Endpoint, seconds: float) -> None:
        self.req.handler.charge(self.req.route, self.stage, e.site, seconds, self.req.trip, self.req.totals)

    async def refused(self, send: Send, e: routing.Endpoint, status: int, body: bytes, retry_after: str | None) -> None:
        req = self.req
        sites = [*req.trip.sites, e.site]  # this attempt is charged once the relay is done with it
        if self.fallback is not None:  # a later stage refused what an earlier one answered: the earlier answer stands
            answer, confidence, why = self.fallback
            response = _not_escalated(req, answer, confidence, f"{why} stage {req.route.stages[self.stage].variant!r} refused "
                                                               f"the request (HTTP {status})", sites=sites)
        else:
            refusal = _Answer(self.stage, status, body, e.site, e.tier, retry_after)
            response = _respond(req, refusal, None, self.escalated_at, "none", "", sites=sites)
        await response({"type": "http"}, _never, send)

    async def failed(self, send: Send, failures: list[str], at_capacity: openai_relay.AtCapacity | None) -> bool:
        req = self.req
        if self.fallback is None and at_capacity is not None:  # as a non-streaming cascade ending at capacity
            variant = req.route.stages[self.stage].variant
            e = at_capacity.endpoint
            req.trip.failures.extend(failures)
            busy = _Answer(self.stage, 429, at_capacity.body, e.site, e.tier, at_capacity.retry_after)
            why = f"stage {variant!r} is at capacity ({e.site}: HTTP 429)"
            why = f"the last stage ({variant}) gave no answer: {why}" if req.trip.mode == "on" else f"{why} (X-Edgeplane-Cascade: {req.trip.mode})"
            await _at_capacity(req, busy, why)({"type": "http"}, _never, send)
            return True
        if self.fallback is None:
            req.totals.failed += 1
            req.totals.latency_s += req.handler.clock() - req.started
            return False
        answer, confidence, why = self.fallback
        response = _not_escalated(req, answer, confidence, f"{why} stage {req.route.stages[self.stage].variant!r} failed: "
                                                           f"{'; '.join(failures)}")
        await response({"type": "http"}, _never, send)
        return True


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


def _relay(req: _Request, stage: int, ranked: list[routing.Ranked], escalated_at: float | None, escalated_why: str,
           fallback: tuple[_Answer, float | None, str] | None) -> Response:
    raw = json.dumps({**req.body, "model": req.route.model}).encode()
    hooks = _StageHooks(req, stage, escalated_at, escalated_why, fallback)
    _explain_by(req, stage)
    return openai_relay.relay(req.owner, req.route.model, ranked[: req.owner.gw.max_attempts], req.suffix, raw, req.stream,
                               chat=req.chat, arrived=req.arrived, forwarded=req.forwarded, hooks=hooks, failovers=req.trip.failovers)

