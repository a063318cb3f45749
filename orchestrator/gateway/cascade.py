"""The gateway's cascade: run the cheap stage, judge its answer, escalate when unsure.

A v2 inference request to a model whose deployment has ``spec.cascade`` comes here from
``proxy.Gateway.infer``. Stage by stage, the nearest allowed replica of that stage runs the
request (with the same failover as a plain request: the next replica of the stage on a
connection error or a 5xx, counted in ``edgeplane_gateway_failovers_total`` as there, by
the site moved on from, whether the next replica tried is the stage's or a later stage's); its answer is decoded and judged
(:mod:`orchestrator.gateway.cascade_rules`, pure), and either returned or the request
goes to the next stage. A stage with no allowed replica, failing, or overloaded
(``maxInflight``) hands over at once, so the cascade is also the fallback. A replica at capacity
(429) is overloaded too, as on the OpenAI routes: the stage's next replica is tried, then
the next stage; the caller gets a 429, with the ``Retry-After`` of the last replica that
said so, only when no stage answered and the stage the cascade ended on was at capacity. Residency
binds every stage: the next stage's candidates are ranked for the same caller, and when
none is allowed the answer in hand is returned with ``X-Edgeplane-Cascade-Escalation:
not-escalated`` and the reason.

Response headers: ``X-Edgeplane-Site`` / ``-Tier`` (who answered),
``X-Edgeplane-Cascade-Stage`` (its variant), ``X-Edgeplane-Cascade-Confidence`` (the
answering stage's confidence under the first stage's rule, when it can be computed),
``X-Edgeplane-Cascade-Sites`` (every site that ran, in order),
``X-Edgeplane-Cascade-Escalation`` (``none``, ``escalated`` or ``not-escalated``) and
``X-Edgeplane-Cascade-Reason``. Callers may send ``X-Edgeplane-Cascade: off`` (route like
a deployment without a cascade: the nearest allowed replica of any stage) or
``force-last`` (the last stage only).

Measurement: per cascade, requests answered per stage, escalations by cause, the latency
the earlier stages added to escalated requests, and energy per request — each stage's
declared (or estimated) power per replica × the site's PUE × the busy time the gateway
measured for the call (the upstream round trip, which on a local network is the
replica's service time) — with its gCO2 at the site's grid intensity. Prometheus metrics
``edgeplane_cascade_*`` and :meth:`CascadeStats.snapshot` (``edgeplane get cascades``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase
from starlette.requests import Request
from starlette.responses import Response

from edgeplane_proto import encoding as encoding_mod
from edgeplane_proto import oip
from orchestrator.distill import capture as capture_mod
from orchestrator.distill import store as capture_store
from orchestrator.gateway import cascade_rules as rules
from orchestrator.gateway import correlation
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import failover
from orchestrator.gateway import routing
from orchestrator.gateway import scoping
from orchestrator.gateway.options import MAX_BODY
from orchestrator.gateway.upstream import OutOfDescriptors, UpstreamError, UpstreamPool, UpstreamTimeout

# content-encoding: the stages' replicas inflate a compressed body, as on the plain routes
FORWARD_HEADERS = ("content-type", "content-encoding", oip.BINARY_HEADER.lower(), "accept")


@dataclass
class CascadeMetrics:
    answered: Counter
    escalations: Counter
    not_escalated: Counter
    added: Histogram
    energy: Counter
    co2: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CascadeMetrics:
        return cls(
            answered=Counter("edgeplane_cascade_answered", "Cascade requests answered, by the stage that answered",
                             ["cascade", "stage"], registry=registry),
            escalations=Counter("edgeplane_cascade_escalations", "Requests a stage handed to the next one, by cause "
                                "(unsure, down, overloaded)", ["cascade", "stage", "cause"], registry=registry),
            not_escalated=Counter("edgeplane_cascade_not_escalated", "Answers returned although their stage wanted to "
                                  "escalate (no allowed replica of a later stage)", ["cascade", "stage"], registry=registry),
            added=Histogram("edgeplane_cascade_added_seconds", "Time earlier stages added to escalated requests",
                            ["cascade"], registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)),
            energy=Counter("edgeplane_cascade_energy_joules", "Estimated energy of cascade requests (power × PUE × busy time)",
                           ["cascade", "site"], registry=registry),
            co2=Counter("edgeplane_cascade_co2_grams", "Estimated gCO2 of cascade requests", ["cascade", "site"], registry=registry),
        )

    def labelled(self) -> list[MetricWrapperBase]:
        return [self.answered, self.escalations, self.not_escalated, self.added, self.energy, self.co2]


@dataclass
class Totals:
    requests: int = 0
    failed: int = 0
    answered: dict[str, int] = field(default_factory=dict)
    escalations: dict[str, int] = field(default_factory=dict)  # by cause: a request may escalate at each stage
    escalated: int = 0  # requests that escalated at least once
    not_escalated: int = 0
    added_s: float = 0.0  # over the requests a later stage answered
    added_n: int = 0
    latency_s: float = 0.0
    energy_j: float = 0.0
    co2_g: float = 0.0


@dataclass
class CascadeStats:
    """Totals per cascade since this gateway started, for ``edgeplane get cascades``."""

    _by_cascade: dict[str, Totals] = field(default_factory=dict)

    def totals(self, cascade: str) -> Totals:
        return self._by_cascade.setdefault(cascade, Totals())

    def snapshot(self, routes: Mapping[str, rules.CascadeRoute]) -> list[dict[str, Any]]:
        out = []
        unique = {route.deployment: route for route in routes.values()}  # a cascade is listed under its model and its name
        for name, route in sorted(unique.items()):
            t = self._by_cascade.get(name, Totals())
            n = t.requests or 0
            out.append({
                "name": route.deployment, "model": route.model, "stages": [s.variant for s in route.stages],
                "requests": n, "failed": t.failed,
                "answered": {s.variant: t.answered.get(s.variant, 0) for s in route.stages},
                "firstStageShare": round(t.answered.get(route.stages[0].variant, 0) / n, 4) if n else None,
                "escalationRate": round(t.escalated / n, 4) if n else None,
                "escalations": dict(sorted(t.escalations.items())), "notEscalated": t.not_escalated,
                "meanLatencyMs": round(t.latency_s / n * 1000, 3) if n else None,
                "meanAddedLatencyMs": round(t.added_s / t.added_n * 1000, 3) if t.added_n else None,
                "energyPerRequestJ": round(t.energy_j / n, 6) if n else None,
                "co2PerRequestG": round(t.co2_g / n, 9) if n else None,
            })
        return out


class LaterStages(Sequence[list[routing.Ranked] | routing.NoRoute]):
    """Each stage after ``stage``'s ranking, ranked when ``after_stage`` first reads it: a stage
    that answered sure reads none, an escalation reads up to the first stage with a replica
    (each ranking costs a stage's few best replicas); ``ranked`` holds those it read."""

    def __init__(self, rank: Callable[[int], list[routing.Ranked] | routing.NoRoute], stage: int, stages: int):
        self._rank = rank
        self._first = stage + 1
        self._len = max(stages - self._first, 0)
        self.ranked: list[list[routing.Ranked] | routing.NoRoute] = []

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> list[routing.Ranked] | routing.NoRoute: ...
    @overload
    def __getitem__(self, index: slice) -> list[list[routing.Ranked] | routing.NoRoute]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if not -self._len <= index < self._len:
            raise IndexError(index)
        index %= self._len
        while len(self.ranked) <= index:
            self.ranked.append(self._rank(self._first + len(self.ranked)))
        return self.ranked[index]


def skipped(route: rules.CascadeRoute, stage: int, next_stage: int,
            later: Sequence[list[routing.Ranked] | routing.NoRoute]) -> list[str]:
    """Why each stage between ``stage`` and ``next_stage`` was passed over (it had no allowed replica)."""
    return [f"{route.stages[s].variant}: {r.reason}" for s, r in enumerate(later, stage + 1)
            if s < next_stage and isinstance(r, routing.NoRoute)]


def fit_to_teach(mode: rules.Mode, escalation: str) -> bool:
    """Whether an answer may become a distillation label: the cascade's own (``on``) answer
    that a judge passed or the teacher gave. Not an answer returned ``not-escalated``
    (its stage wanted to escalate: the student's own unsure answer), nor one of a stage the
    caller forced, which no judge passed (``cascade tune`` replays every sample so)."""
    return mode == "on" and escalation != "not-escalated"


def header_value(text: str) -> str:
    # header values: one line of latin-1
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")[:500]


@dataclass
class Trip:
    """One request's way through the stages."""

    sites: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    joules: float = 0.0
    caller: routing.Caller | None = None
    mode: rules.Mode = "on"
    body: bytes = b""  # the request, kept for capture
    body_binary: int | None = None
    # the site that received the request: the first replica that answered (a replica that
    # refused the connection or failed never had it), and its country, which picks the capture zone
    first_site: str | None = None
    first_country: str | None = None
    first_allowed: frozenset[str] = frozenset()  # the deployment's residency, as its replica carries it (empty: any)
    first_confidence: float | None = None
    escalated: bool = False  # counted once in Totals.escalated, however many stages it passes
    # edgeplane_gateway_failovers_total, by the site moved on from, whether the next replica is this stage's or a later one's
    failovers: failover.Failovers = field(default_factory=lambda: failover.Failovers(None, ""))


@dataclass
class _Attempt:
    stage: int
    status: int
    body: bytes
    headers: Mapping[str, str]
    site: str
    tier: str


class CascadeHandler:
    def __init__(self, table: endpoints_mod.EndpointTable, http: UpstreamPool, metrics: CascadeMetrics,
                 stats: CascadeStats | None = None, *, position: tuple[float, float] | None = None,
                 max_attempts: int = 3, clock: Callable[[], float] = time.perf_counter,
                 capture: Callable[[capture_store.Record, int], bool] | None = None, sampler: capture_mod.Sampler | None = None,
                 wall: Callable[[], float] = time.time, max_body: int = MAX_BODY):
        self.table = table
        self.http = http
        self.metrics = metrics
        self.stats = stats if stats is not None else CascadeStats()
        self.position = position
        self.max_attempts = max_attempts
        self.clock = clock
        # distillation capture (spec.cascade.capture): ``capture`` only queues, it never waits; it
        # is given the record and its deployment's dailyCap, which it counts where a restart
        # and other replicas see it (CaptureWriter): ``sampler``'s count is this process's alone
        self.capture = capture
        self.sampler = sampler if sampler is not None else capture_mod.Sampler()
        self.wall = wall
        self.max_body = max_body  # of a compressed request inflated for capture

    def resolve(self, route: rules.CascadeRoute, name: str, caller: routing.Caller) -> rules.CascadeRoute | None:
        """The cascade a request to ``name`` runs for ``caller``, ``route`` being the table's
        under that name: a deployment's name means its own; a model's name, that of whichever
        of the model's deployments with a cascade plain routing would send the caller to
        (the table holds one under the model's name only), or None (plain routing by the
        model's name) when the caller may reach only deployments without one."""
        if name != route.model:
            return route
        mine = [route, *(r for r in self.table.cascades.values() if r.model == name and r.deployment != route.deployment)]
        return self.table.cascade_for(mine, caller, self.position)

    def ranking(self, route: rules.CascadeRoute, stage: int, caller: routing.Caller) -> list[routing.Ranked] | routing.NoRoute:
        """The replicas of ``stage`` a request may try for ``caller`` (``max_attempts``), best first."""
        return self.table.rank_stage(route, stage, caller, self.position, limit=self.max_attempts)

    def later(self, route: rules.CascadeRoute, stage: int, caller: routing.Caller) -> LaterStages:
        """The stages after ``stage``, each ranked for ``caller`` only if ``after_stage`` reads it."""
        return LaterStages(lambda s: self.ranking(route, s, caller), stage, len(route.stages))

    def retry_after(self, route: rules.CascadeRoute, status: int, unavailable: Sequence[int | None], failed: int) -> int | None:
        """When the caller of a cascade that ended unanswered with ``status`` may retry (seconds),
        on either API: the shortest Retry-After of the stage's replicas when each of the
        ``failed`` ones tried answered 503 or 404 (``unavailable``: :func:`failover.retry_after`); else, for a 503, the table's for
        the cascade's model (its deployment was just applied or its replicas start); else None."""
        if (retry := failover.retry_after(unavailable, failed)) is not None:
            return retry
        return self.table.retry_after(route.model) if status == 503 else None

    async def infer(self, route: rules.CascadeRoute, mode: rules.Mode, caller: routing.Caller, request: Request, body: bytes,
                    plain: Callable[[], Awaitable[Response]], *, failovers: failover.Failovers | None = None) -> Response:
        """``route``'s answer to ``request`` (``plain``'s with ``X-Edgeplane-Cascade: off``);
        ``failovers`` counts, for the gateway, each site a failed attempt moved on from."""
        if mode == "off":
            return await plain()
        kept: bytes | encoding_mod.Refused = body  # the request as a capture record keeps it: readable, so inflated
        if route.capture is not None and self.capture is not None:
            kept = await encoding_mod.inflate_off_loop(body, request.headers.get("content-encoding"), self.max_body)
            if isinstance(kept, encoding_mod.Refused):  # as every stage's replica would refuse it
                return Response(oip.error_body(kept.message), status_code=kept.status, media_type="application/json",
                                headers=encoding_mod.refusal_headers(kept.status))
        started = self.clock()
        totals = self.stats.totals(route.deployment)
        totals.requests += 1
        headers = {k: v for k in FORWARD_HEADERS if (v := request.headers.get(k)) is not None}
        headers.update(correlation.forwarded(request.scope))  # one id at every stage's replicas
        headers.update(scoping.passed_on(request.scope))  # for the replicas that check tokens alone
        stage = rules.first_stage(route, mode)
        ranked = self.ranking(route, stage, caller)
        trip = Trip(caller=caller, mode=mode, body=kept)
        if failovers is not None:
            trip.failovers = failovers
        if route.capture is not None:
            trip.body_binary = oip.header_length(request.headers.get(oip.BINARY_HEADER.lower()))
        answer: _Attempt | None = None
        verdict: rules.Verdict | None = None
        escalated_at: float | None = None
        escalated_why = ""
        answer_confidence: float | None = None
        while True:
            got: _Attempt | None = None
            busy: _Attempt | None = None  # this stage's last 429, when no replica of it answered otherwise
            verdict = None
            unavailable: list[int | None] = []  # the Retry-After of each of this stage's replicas that answered 503, None for a 404
            tried_from = len(trip.failures)
            if isinstance(ranked, routing.NoRoute):
                trip.failures.append(f"{route.stages[stage].variant}: {ranked.reason}")
                cause = "down"
            elif rules.overloaded(route, stage, ranked):
                verdict = rules.Verdict(True, None, f"stage {route.stages[stage].variant!r} is overloaded "
                                                    f"({ranked[0].endpoint.inflight} in flight at {ranked[0].endpoint.site})")
                cause = "overloaded"
            else:
                try:
                    got = await self._run_stage(route, stage, ranked, body, headers, trip, totals, unavailable)
                except OutOfDescriptors as exc:  # the gateway's own: no stage's replica failed, and none can be reached now
                    if answer is not None:  # an earlier stage answered: its answer stands
                        return self._not_escalated(route, answer, answer_confidence, trip, started, f"{escalated_why}, but {exc}", totals)
                    return self._unanswered(totals, started, 503, f"cascade {route.deployment!r}: {exc}",
                                            {"retry-after": str(exc.retry_after)})
                cause = "down" if got is None else "unsure"
                if got is not None and got.status == 429:  # at capacity: overloaded, so it hands over
                    busy, got, cause = got, None, "overloaded"
                    verdict = rules.Verdict(True, None, f"stage {route.stages[stage].variant!r} is at capacity ({busy.site}: HTTP 429)")
                    if mode != "on":  # the stage the caller chose: nothing to hand over to
                        return self._at_capacity(route, busy, trip, started, f"{verdict.reason} (X-Edgeplane-Cascade: {mode})", totals)
            if got is not None:
                if got.status >= 400 and answer is not None:
                    # a later stage refused what an earlier one answered: the earlier answer stands
                    return self._not_escalated(route, answer, answer_confidence, trip, started,
                                               f"{escalated_why}, but stage {route.stages[stage].variant!r} refused the request "
                                               f"(HTTP {got.status})", totals)
                if got.status >= 400 or mode != "on":  # a caller's error, or a stage the caller chose
                    confidence = self._confidence(route, got) if got.status < 400 else None
                    return self._respond(route, got, confidence, trip, started, escalated_at, "none", "", totals)
                answer = got
                rule = route.stages[stage].rule
                verdict = self._judge(rule, got) if rule is not None else None
                if stage == 0 and verdict is not None:
                    trip.first_confidence = verdict.confidence
            if got is None and mode == "force-first":  # the caller asked for this stage alone
                why = "; ".join(trip.failures) or (verdict.reason if verdict is not None else "no answer")
                return self._unanswered(totals, started, 503, f"cascade {route.deployment!r}: stage {route.stages[stage].variant!r} "
                                                              f"(X-Edgeplane-Cascade: force-first) gave no answer: {why}")
            later = self.later(route, stage, caller)
            unroutable = ranked if isinstance(ranked, routing.NoRoute) else None
            decision = rules.after_stage(route, stage, verdict, got is not None, later, unroutable=unroutable)
            match decision:
                case rules.Answer(not_escalated=why):
                    assert answer is not None  # after_stage answers only with this stage's answer in hand
                    confidence = verdict.confidence if verdict is not None else self._confidence(route, answer)
                    answer_confidence = confidence
                    if why:
                        return self._not_escalated(route, answer, confidence, trip, started, why, totals)
                    status = "escalated" if escalated_at is not None else "none"
                    return self._respond(route, answer, confidence, trip, started, escalated_at, status, escalated_why, totals)
                case rules.Fail(status=code, reason=reason):
                    if answer is not None:  # an earlier stage answered: its answer stands
                        return self._not_escalated(route, answer, answer_confidence, trip, started,
                                                   f"{escalated_why}, but {reason}", totals)
                    if busy is not None:  # the stage it ended on was at capacity: the caller may retry as that replica said
                        return self._at_capacity(route, busy, trip, started, reason, totals)
                    tried = f"cascade {route.deployment!r}: {reason}; tried: {'; '.join(trip.failures) or 'nothing'}"
                    if (retry := self.retry_after(route, code, unavailable, len(trip.failures) - tried_from)) is not None:
                        return self._unanswered(totals, started, 503, f"{tried}; retry", {"retry-after": str(retry)})
                    return self._unanswered(totals, started, code, tried)
                case rules.Escalate(stage=next_stage, candidates=candidates, reason=why):
                    self.escalation(route, stage, cause, totals, trip)
                    escalated_at = self.clock()  # the next stage begins: every stage before it added its time
                    if got is not None:
                        answer_confidence = verdict.confidence if verdict is not None else None
                    escalated_why = f"{route.stages[stage].variant}: {why}"
                    trip.failures.extend(skipped(route, stage, next_stage, later.ranked))
                    stage, ranked = next_stage, list(candidates)

    def _unanswered(self, totals: Totals, started: float, status: int, message: str,
                    headers: Mapping[str, str] | None = None) -> Response:
        """The gateway's own error for a request no stage answered, counted failed."""
        totals.failed += 1
        totals.latency_s += self.clock() - started
        return Response(oip.error_body(message), status_code=status, media_type="application/json", headers=headers)

    def _at_capacity(self, route: rules.CascadeRoute, busy: _Attempt, trip: Trip, started: float, reason: str,
                     totals: Totals) -> Response:
        """The 429 of a cascade that ends on a stage at capacity: the caller may retry when
        that replica said."""
        return self._unanswered(totals, started, 429,
                                f"cascade {route.deployment!r}: {reason}; tried: {'; '.join(trip.failures) or 'nothing'}",
                                failover.passed_on(busy.headers.get("retry-after")))

    def _not_escalated(self, route: rules.CascadeRoute, answer: _Attempt, confidence: float | None, trip: Trip,
                       started: float, why: str, totals: Totals) -> Response:
        self.not_escalated(route, answer.stage, totals)
        return self._respond(route, answer, confidence, trip, started, None, "not-escalated", why, totals)

    async def _run_stage(self, route: rules.CascadeRoute, stage: int, ranked: list[routing.Ranked], body: bytes,
                         headers: Mapping[str, str], trip: Trip, totals: Totals, unavailable: list[int | None]) -> _Attempt | None:
        """The answer of the first of ``ranked`` that answers (failover on a refused
        connection, a 5xx, a 404, and a 429: a replica at capacity); None when none did, or
        the last 429 when one was at capacity. Each replica's 503 adds its Retry-After to
        ``unavailable``, and each 404 None."""
        busy: _Attempt | None = None
        for choice in ranked[: self.max_attempts]:
            e = choice.endpoint
            trip.failovers.attempt(e.site)
            self.table.started(e.url)
            began = self.clock()
            try:
                upstream = await self.http.request("POST", f"{e.url}/v2/models/{e.model}/infer", body, scoping.to_replica(headers, e))
            except UpstreamError as exc:
                trip.failures.append(f"{e.site}: {exc}")
                self.table.failed(e.url, slow=isinstance(exc, UpstreamTimeout))  # slow at this request, or down
                continue
            finally:
                self.table.finished(e.url)
                self.charge(route, stage, e.site, self.clock() - began, trip, totals)
            self.table.answered(e.url, upstream.status, failover.ejection_s(upstream.headers))
            if (redirected := failover.redirect(upstream.status, upstream.headers)) is not None:
                trip.failures.append(f"{e.site}: {redirected}")
                continue
            if upstream.status >= 500:
                trip.failures.append(f"{e.site}: HTTP {upstream.status}")
                if upstream.status == 503:
                    unavailable.append(failover.retry_after_s(upstream.headers.get("retry-after")))
                continue
            if upstream.status == 404:  # the stage's model moved away a moment ago: the next replica may serve it
                unavailable.append(None)
                trip.failures.append(f"{e.site}: does not serve {e.model!r} now (HTTP 404)")
                continue
            if upstream.status == 429:  # full (the replica is fine): another replica, or the next stage, may not be
                trip.failures.append(f"{e.site}: at capacity (HTTP 429)")
                busy = _Attempt(stage, upstream.status, upstream.body, upstream.headers, e.site, e.tier)
                continue
            trip.failovers.answered()
            if trip.first_site is None:
                trip.first_site, trip.first_country, trip.first_allowed = e.site, e.country, e.allowed_countries
            return _Attempt(stage, upstream.status, upstream.body, upstream.headers, e.site, e.tier)
        return busy

    def charge(self, route: rules.CascadeRoute, stage: int, site: str, busy_s: float, trip: Trip, totals: Totals) -> None:
        """Count one call of ``stage`` at ``site``: its energy and gCO2, and the site in the trip."""
        joules = rules.energy_joules(route, stage, site, busy_s)
        grams = rules.grams_co2(route, site, joules)
        self.metrics.energy.labels(route.deployment, site).inc(joules)
        self.metrics.co2.labels(route.deployment, site).inc(grams)
        totals.energy_j += joules
        totals.co2_g += grams
        trip.joules += joules
        trip.sites.append(site)

    def escalation(self, route: rules.CascadeRoute, stage: int, cause: str, totals: Totals, trip: Trip) -> None:
        self.metrics.escalations.labels(route.deployment, route.stages[stage].variant, cause).inc()
        totals.escalations[cause] = totals.escalations.get(cause, 0) + 1
        if not trip.escalated:
            trip.escalated = True
            totals.escalated += 1

    def not_escalated(self, route: rules.CascadeRoute, stage: int, totals: Totals) -> None:
        self.metrics.not_escalated.labels(route.deployment, route.stages[stage].variant).inc()
        totals.not_escalated += 1

    def answered(self, route: rules.CascadeRoute, stage: int, started: float, escalated_at: float | None, totals: Totals) -> None:
        """Count an answer of ``stage``: per stage, the request's latency, and what earlier stages added."""
        variant = route.stages[stage].variant
        self.metrics.answered.labels(route.deployment, variant).inc()
        totals.answered[variant] = totals.answered.get(variant, 0) + 1
        totals.latency_s += self.clock() - started
        if escalated_at is not None:
            # what the earlier stages cost this request before the one that answered began
            added = escalated_at - started
            self.metrics.added.labels(route.deployment).observe(added)
            totals.added_s += added
            totals.added_n += 1

    def _outputs(self, attempt: _Attempt) -> dict[str, Any] | None:
        length = attempt.headers.get(oip.BINARY_HEADER.lower())
        try:
            decoded = oip.decode_response(attempt.body, int(length) if length is not None else None)
        except (oip.ProtocolError, ValueError):
            return None
        return {t.name: t.array for t in decoded.outputs}

    def _judge(self, rule: rules.Rule, attempt: _Attempt) -> rules.Verdict:
        if isinstance(rule, rules.GenerativeRule):
            # generative stages answer on the OpenAI routes, which judge with judge_generative
            return rules.Verdict(False, None, "")
        outputs = self._outputs(attempt)
        if outputs is None:
            return rules.Verdict(True, None, "the answer is not a valid v2 inference response")
        return rules.judge_tensor(rule, outputs)

    def _confidence(self, route: rules.CascadeRoute, attempt: _Attempt) -> float | None:
        rule = next((s.rule for s in route.stages if isinstance(s.rule, rules.TensorRule)), None)
        if rule is None:
            return None
        outputs = self._outputs(attempt)
        return rules.judge_tensor(rule, outputs).confidence if outputs is not None else None

    def _respond(self, route: rules.CascadeRoute, answer: _Attempt, confidence: float | None, trip: Trip, started: float,
                 escalated_at: float | None, escalation: str, reason: str, totals: Totals) -> Response:
        variant = route.stages[answer.stage].variant
        self.answered(route, answer.stage, started, escalated_at, totals)
        if trip.caller is not None:
            trip.failovers.explain_by(functools.partial(self.table.skipped_stage, route, answer.stage, trip.caller, self.position))
        out = {"x-edgeplane-site": answer.site, "x-edgeplane-tier": answer.tier, "x-edgeplane-cascade-stage": variant,
               "x-edgeplane-cascade-sites": ",".join(trip.sites), "x-edgeplane-cascade-escalation": escalation,
               "x-edgeplane-cascade-energy-j": f"{trip.joules:.6g}", **trip.failovers.header()}
        if confidence is not None:
            out["x-edgeplane-cascade-confidence"] = f"{confidence:.4f}"
        if reason:
            out["x-edgeplane-cascade-reason"] = header_value(reason)
        binary = answer.headers.get(oip.BINARY_HEADER.lower())
        if binary is not None:
            out[oip.BINARY_HEADER] = binary
        if route.capture is not None and self.capture is not None and answer.status < 400 and fit_to_teach(trip.mode, escalation):
            self._capture(route, route.capture, answer, trip)
        return Response(answer.body, status_code=answer.status, media_type=answer.headers.get("content-type", "application/json"),
                        headers=out)

    def _capture(self, route: rules.CascadeRoute, policy: capture_mod.CapturePolicy, answer: _Attempt, trip: Trip) -> None:
        residency = trip.caller.residency if trip.caller is not None else frozenset()
        zone = capture_mod.zone_for(policy.zones, residency, trip.first_country, trip.first_allowed)
        now = self.wall()
        if zone is None or self.capture is None or not self.sampler.take(route.deployment, zone, policy, now):
            return
        binary = answer.headers.get(oip.BINARY_HEADER.lower())
        self.capture(capture_store.Record(
            capture_store.Record.new_id(), route.deployment, route.model, zone, now, now + policy.retention_s,
            trip.first_site or answer.site, route.stages[answer.stage].variant, trip.first_confidence,
            trip.body, trip.body_binary, answer.body, oip.header_length(binary), policy.deployment), policy.daily_cap)
