"""Open Inference Protocol routes of the gateway: forward, fail over, report where.

Upstream calls go through ``upstream.UpstreamPool``, keep-alive connections per replica
(see there for why not a general HTTP client).

The body is forwarded as bytes (JSON or binary-extension tensors alike) and never
decoded here: the serving replica validates it, and its 4xx answers are returned as they
are. A connection failure or a 5xx is retried on the next-ranked endpoint within the
same request (inference is idempotent) and ejects the endpoint that failed, unless it
answered 500 or took the request and did not answer in time, an error of that one request,
and not yet several in a row (``EndpointTable.answered``, ``EndpointTable.timed_out``).
A gateway out of file descriptors (``upstream.OutOfDescriptors``) answers 503 with a
Retry-After at once, on every route, and no replica is held to blame.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from edgeplane_proto import oip
from orchestrator import urlpath
from orchestrator.api import bodies
from orchestrator.gateway import cascade as cascade_mod
from orchestrator.gateway import cascade_rules
from orchestrator.gateway import correlation
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import failover
from orchestrator.gateway import routing
from orchestrator.gateway import scoping
from orchestrator.gateway import series
from orchestrator.gateway.options import COLD_START_S, MAX_BODY
from orchestrator.gateway.upstream import OutOfDescriptors, UpstreamError, UpstreamPool, UpstreamTimeout

UNKNOWN_MODEL = series.UNKNOWN_MODEL  # the name a caller gave, when the table does not know it

# content-encoding: a compressed body (gzip, deflate) is inflated by the replica, as the body is never decoded here
FORWARD_HEADERS = ("content-type", "content-encoding", oip.BINARY_HEADER.lower(), "accept")


@dataclass
class GatewayMetrics:
    requests: Counter
    failovers: Counter
    streams_cut: Counter
    latency: Histogram
    cold_starts: Counter
    adapter_requests: Counter
    skipped: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        return cls(
            requests=Counter("edgeplane_gateway_requests", "Inference requests answered by the gateway", ["model", "site", "code"], registry=registry),
            failovers=Counter("edgeplane_gateway_failovers", "Attempts that failed and moved to the next endpoint", ["model", "site"], registry=registry),
            streams_cut=Counter("edgeplane_gateway_streams_cut", "Streamed answers their replica broke off after the first token reached the caller",
                                ["model", "site"], registry=registry),
            # to minutes: a generation is timed to its last token, and above the last bucket
            # every answer reads alike (+Inf)
            latency=Histogram("edgeplane_gateway_request_seconds", "Time from a request's arrival to the end of a replica's answer to it", ["model"], registry=registry,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30, 60, 120, 300)),
            cold_starts=Counter("edgeplane_gateway_cold_starts", "Requests that found their model scaled to zero and waited for a replica",
                                ["model"], registry=registry),
            # by base model only: a caller names any adapter it likes, and each would be a series
            adapter_requests=Counter("edgeplane_gateway_adapter_requests", "OpenAI requests routed to a LoRA adapter of the model (<model>:<adapter>)",
                                     ["model"], registry=registry),
            # by the nearest replica's reason only: by site, a fleet's every site would be a series
            skipped=Counter("edgeplane_gateway_skipped", "Answers from a replica farther than one the caller could use that was not tried "
                            "(X-Edgeplane-Skipped), by the reason of the nearest one passed over", ["model", "reason"], registry=registry),
        )

    def labelled(self) -> list[MetricWrapperBase]:
        return [self.requests, self.failovers, self.streams_cut, self.latency, self.cold_starts, self.adapter_requests, self.skipped]


class Timed(Response):
    """``answer`` sent to the caller and, when a replica gave it, timed in
    ``edgeplane_gateway_request_seconds`` from the request's arrival (``arrived``,
    ``time.perf_counter``: admission, the body, a cold start's wait and every cascade stage
    included) to the end of the answer (a stream's last event): the caller's wait. A
    replica's answer names its site (``X-Edgeplane-Site``); the gateway's own answers
    (refusals, no replica in time, every replica failed) name none and are counted
    (``Gateway.refused``), not timed: quick refusals, which come in floods (a rate limit, a
    misconfigured client), would pull every quantile of the answers down."""

    def __init__(self, latency: Histogram, model: str, arrived: float, answer: Response) -> None:
        self.latency, self.model, self.arrived, self.answer = latency, model, arrived, answer
        self.status_code = answer.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relayed = False

        async def sending(message: Message) -> None:
            nonlocal relayed
            if message["type"] == "http.response.start":
                relayed = any(k.lower() == b"x-edgeplane-site" and v for k, v in message.get("headers", ()))
            await send(message)

        try:
            await self.answer(scope, receive, sending)
        finally:
            if relayed:  # a caller who left mid-answer waited until then
                self.latency.labels(self.model).observe(time.perf_counter() - self.arrived)


def _error(status: int, message: str, retry_after: int | None = None) -> Response:
    """The gateway's own error: no ``X-Edgeplane-Site``, which only a replica's answer carries
    (``Timed`` counts the latency of those alone)."""
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return Response(oip.error_body(message), status_code=status, media_type="application/json", headers=headers)


class Gateway:
    def __init__(
        self,
        table: endpoints_mod.EndpointTable,
        http: UpstreamPool,
        metrics: GatewayMetrics,
        *,
        position: tuple[float, float] | None = None,
        max_attempts: int = 3,
        ready: Any = lambda: True,
        admit: Callable[[Request], Awaitable[Response | None]] | None = None,
        max_body: int = MAX_BODY,
        cold_start_s: float = COLD_START_S,
        cascade: cascade_mod.CascadeHandler | None = None,
    ):
        self.table = table
        self.http = http
        self.metrics = metrics
        self.position = position
        self.max_attempts = max_attempts
        self._ready = ready
        self._admit = admit  # auth and rate limits (orchestrator.security.admission)
        self.max_body = max_body
        self.cold_start_s = cold_start_s  # how long a request for a model scaled to zero waits
        self.cascade = cascade  # runs requests to models whose deployment has spec.cascade

    def labelled(self) -> list[MetricWrapperBase]:
        """Its metrics (its cascades' too) for ``series.prune``."""
        return self.metrics.labelled() + (self.cascade.metrics.labelled() if self.cascade is not None else [])

    def model_label(self, model: str) -> str:
        """``model`` as the metrics' label: itself when the table knows it, else :data:`UNKNOWN_MODEL`."""
        return model if self.table.knows(model) else UNKNOWN_MODEL

    def refused(self, model: str | None, status: int) -> None:
        """Count an answer the gateway made itself, not a replica's (the body too large or
        unreadable, the caller gone, admission, bad ``X-Edgeplane-*`` headers, no replica,
        a cold start with none in time, every replica failed): every such answer of every
        route is counted here, with ``site`` empty. ``model`` None: its name is not read yet
        (an OpenAI request names it in the body)."""
        self.metrics.requests.labels(UNKNOWN_MODEL if model is None else self.model_label(self._model_of(model)), "", str(status)).inc()

    async def admit(self, request: Request, model: str | None, *, inference: bool) -> Response | None:
        """Auth and rate limits (``admit``): None to go on, else the refusal to answer, counted
        when the request is an ``inference`` one (a metadata read is not)."""
        if self._admit is None:
            return None
        refused = await self._admit(request)
        if refused is not None and inference:
            self.refused(model, refused.status_code)
        return refused

    def caller(self, request: Request) -> routing.Caller | routing.NoRoute:
        """Who asks, from the ``X-Edgeplane-*`` headers, or why they cannot be read (400)."""
        caller = routing.parse_caller(
            request.headers.get("x-edgeplane-location"),
            request.headers.get("x-edgeplane-region"),
            request.headers.get("x-edgeplane-residency"),
        )
        if isinstance(caller, routing.NoRoute):
            return caller
        held = scoping.held_residency(scoping.token_of(request.scope), caller.residency)
        if isinstance(held, str):
            return routing.NoRoute(held, 403)
        caller = dataclasses.replace(caller, residency=held, anonymous=scoping.anonymous(request.scope))
        if caller.region is None:
            return caller
        return self.table.unknown_region(caller.region) or caller

    def out_of_scope(self, request: Request, name: str) -> str | None:
        """Why the request's token may not call model ``name`` (a cascade by its deployment's
        name, or a LoRA adapter's base model), or None (:mod:`orchestrator.gateway.scoping`)."""
        token = scoping.token_of(request.scope)
        return None if token is None else scoping.refused_model(token, (name, self._model_of(name)))

    def candidates(self, model: str, request: Request, api: str | None = routing.API_V2,
                   caller: routing.Caller | None = None, limit: int | None = None,
                   deployment: str | None = None, version: str | None = None, *, lora: bool = False) -> list[routing.Ranked] | routing.NoRoute:
        """``model``'s replicas for the caller (read from ``request`` unless given), best first;
        the ``limit`` best only, when given (what a request tries: ranking all of a model on
        thousands of sites cost each request milliseconds); with ``deployment``, that
        deployment's only (``EndpointTable.target``); with ``version``, those that may answer
        for it (``routing.holding``); with ``lora``, those serving LoRA adapters only."""
        if caller is None:
            found = self.caller(request)
            if isinstance(found, routing.NoRoute):
                return found
            caller = found
        if not self.table.endpoints(model):
            reason = self.table.unavailable_reason(model)
            if reason is not None:
                return routing.NoRoute(f"model {model!r} has no replica to answer: {reason}", 503,
                                       retry_after=self.table.retry_after(model))
            if not self.table.published:
                return routing.NoRoute(f"model {model!r} is not known yet: the gateway has no endpoint table until the control plane's "
                                       "first pass ends (it may be starting a data centre); retry in a few seconds", 503, retry_after=2)
            known = self.table.models()
            return routing.NoRoute(f"model {model!r} is not deployed" + (f" (deployed models: {', '.join(known)})" if known else ""), 404)
        return self.table.rank(model, caller, self.position, api, limit, deployment, version, lora=lora)

    async def _forward(self, model: str, request: Request, method: str, suffix: str, body: bytes | None,
                       version: str | None = None, deployment: str | None = None, *, inference: bool = True) -> Response:
        """``suffix`` follows ``/v2/models/{model}`` at the replica; with ``version`` it starts
        with ``/versions/{version}``, and the replica says whether it has that version;
        ``deployment``: that deployment's replicas only. Its answer is counted in
        ``edgeplane_gateway_requests`` when the request is an ``inference`` one: a metadata
        read (which KServe clients make before their calls) is not, nor its failovers and cold
        starts, which would then outnumber the requests."""
        label = self.model_label(model)
        refused = self.refused if inference else _not_counted
        caller = self.caller(request)
        if isinstance(caller, routing.NoRoute):  # before a cold model is woken for nothing
            refused(model, caller.status)
            return _error(caller.status, caller.reason)
        if (cold := await self._woken(model, inference=inference)) is not None:
            return cold
        ranked = self.candidates(model, request, caller=caller, limit=self.max_attempts, deployment=deployment, version=version)
        if isinstance(ranked, routing.NoRoute):
            refused(model, ranked.status)
            return _error(ranked.status, ranked.reason, retry_after=ranked.retry_after)
        headers = {k: v for k in FORWARD_HEADERS if (v := request.headers.get(k)) is not None}
        headers.update(correlation.forwarded(request.scope))  # one id at every replica tried
        headers.update(scoping.passed_on(request.scope))  # for the replicas that check tokens alone
        failures = []
        missing = 0  # replicas that answered 404
        # The Retry-After of each replica that answered 503 (not down: not ready, or draining), None for each 404
        unavailable: list[int | None] = []
        moves = failover.Failovers(self.metrics.failovers if inference else None, label, self.metrics.skipped if inference else None)
        moves.explain_by(functools.partial(self.table.skipped, model, caller, self.position, api=routing.API_V2, deployment=deployment,
                                           version=version))
        for choice in ranked[: self.max_attempts]:
            e = choice.endpoint
            moves.attempt(e.site)
            url = f"{e.url}/v2/models/{e.model}{suffix}"
            self.table.started(e.url)
            try:
                upstream = await self.http.request(method, url, body, scoping.to_replica(headers, e))
            except UpstreamError as exc:
                failures.append(f"{e.site}: {exc}")
                self.table.failed(e.url, slow=isinstance(exc, UpstreamTimeout))  # slow at this request (a huge batch), or down
                continue
            except OutOfDescriptors as exc:  # the gateway's own: no replica failed, and the next would need a descriptor too
                refused(model, 503)
                return _error(503, str(exc), retry_after=exc.retry_after)
            finally:
                self.table.finished(e.url)
            status, content, upstream_headers = upstream.status, upstream.body, upstream.headers
            self.table.answered(e.url, status, failover.ejection_s(upstream_headers))
            if (redirected := failover.redirect(status, upstream_headers)) is not None:
                failures.append(f"{e.site}: {redirected}")
                continue
            if status == 503:
                failures.append(f"{e.site}: {_reason(content)} (HTTP 503)")
                unavailable.append(failover.retry_after_s(upstream_headers.get("retry-after")))
                continue
            if status >= 500:
                failures.append(f"{e.site}: HTTP {status}")
                continue
            if status == 404:
                # The replica no longer serves the model (it was just moved away; the table
                # follows a moment later), or not that version: the next replica may. The
                # agent itself is fine.
                missing += 1
                unavailable.append(None)
                failures.append(f"{e.site}: {_reason(content)} (HTTP 404)" if version is not None
                                else f"{e.site}: does not serve {model!r} now (HTTP 404)")
                continue
            if inference:
                self.metrics.requests.labels(label, e.site, str(status)).inc()
            out_headers = {"x-edgeplane-site": e.site, "x-edgeplane-tier": e.tier, **moves.header()}
            binary = upstream_headers.get(oip.BINARY_HEADER.lower())
            if binary is not None:
                out_headers[oip.BINARY_HEADER] = binary
            if status == 415 and (accepted := upstream_headers.get("accept-encoding")) is not None:
                out_headers["accept-encoding"] = accepted  # the codings the replica reads (RFC 9110)
            return Response(content, status_code=status, media_type=upstream_headers.get("content-type", "application/json"), headers=out_headers)
        if version is not None and missing == len(failures):
            refused(model, 404)
            return _error(404, f"model {model!r} has no version {version!r} at the replicas tried: {'; '.join(failures)}")
        if (retry := failover.retry_after(unavailable, len(failures))) is not None:
            refused(model, 503)
            return _error(503, f"no replica tried can answer now: {'; '.join(failures)}; retry", retry_after=retry)
        refused(model, 502)
        return _error(502, f"every replica tried failed: {'; '.join(failures)}")

    async def _woken(self, model: str, *, inference: bool = True) -> Response | None:
        """None once ``model`` has a replica; when it was scaled to zero, this request asks
        for one and waits for it (cold start), and the 503 to answer when none came in time;
        counted for an ``inference`` request only (a metadata read wakes the model all the same:
        the client's call follows it)."""
        if not self.table.is_cold(model):
            return None
        self.table.wake(model)
        if inference:
            self.metrics.cold_starts.labels(self.model_label(model)).inc()
        if await self.table.wait_for_endpoints(model, self.cold_start_s):
            return None
        if inference:
            self.refused(model, 503)
        why = self.table.unavailable_reason(model) or "no replica yet"
        return _error(503, f"model {model!r} was scaled to zero and no replica was ready within "
                           f"{self.cold_start_s:g}s ({why}); retry", retry_after=5)

    async def infer(self, request: Request) -> Response:
        arrived = time.perf_counter()  # the caller's clock: admission and the body are part of its wait
        model = request.path_params["model"]
        answer = await self._infer(request, model, request.path_params.get("version"))
        return Timed(self.metrics.latency, self.model_label(self._model_of(model)), arrived, answer)

    async def _infer(self, request: Request, model: str, version: str | None) -> Response:
        refused = await self.admit(request, model, inference=True)
        if refused is not None:
            return refused
        if (why := self.out_of_scope(request, model)) is not None:
            self.refused(model, 403)
            return _error(403, why)
        try:
            body = await bodies.read_body(request, self.max_body)
        except bodies.BodyTooLarge:
            self.refused(model, 413)
            return _error(413, f"request body is larger than {self.max_body} bytes")
        except ClientDisconnect:  # the caller's doing, not the gateway's: nobody is left to read the answer
            self.refused(model, 400)
            return _error(400, "the client went away before the whole body arrived")
        if version is not None:  # one model file, named by its version: no cascade of variants
            served, deployment = self.table.target(model)
            return await self._forward(served, request, "POST", _versioned(version, "/infer"), body, version, deployment)
        # a cascade is called by its model's name or its deployment's
        route = self.table.cascades.get(model) if self.cascade is not None else None
        if route is not None and self.cascade is not None:
            return await self._cascade(self.cascade, route, model, request, body)
        return await self._forward(model, request, "POST", "/infer", body)

    async def _cascade(self, handler: cascade_mod.CascadeHandler, route: cascade_rules.CascadeRoute, name: str, request: Request,
                       body: bytes) -> Response:
        mode = cascade_rules.parse_mode(request.headers.get("x-edgeplane-cascade"))
        if mode is None:
            self.refused(name, 400)
            return _error(400, f"X-Edgeplane-Cascade must be one of {', '.join(cascade_rules.MODES)}")
        caller = self.caller(request)
        if isinstance(caller, routing.NoRoute):  # before a cold model is woken for nothing
            self.refused(name, caller.status)
            return _error(caller.status, caller.reason)
        chosen = handler.resolve(route, name, caller)
        if chosen is None:  # the caller may reach only the model's deployments without a cascade
            return await self._forward(name, request, "POST", "/infer", body)
        route = chosen
        if (cold := await self._woken(route.model)) is not None:
            return cold
        deployment = self.table.target(name)[1]  # off, by a deployment's name: still its replicas only
        response = await handler.infer(route, mode, caller, request, body,
                                       lambda: self._forward(route.model, request, "POST", "/infer", body, deployment=deployment),
                                       failovers=failover.Failovers(self.metrics.failovers, route.model, self.metrics.skipped))
        if mode != "off":  # plain routing counted itself
            self.metrics.requests.labels(route.model, response.headers.get("x-edgeplane-site", ""), str(response.status_code)).inc()
        return response

    def _model_of(self, name: str) -> str:
        """The model a v2 name means: a cascade is called by its deployment's name too."""
        return self.table.target(name)[0]

    async def model_metadata(self, request: Request) -> Response:
        version = request.path_params.get("version")
        model, deployment = self.table.target(request.path_params["model"])
        return await self._forward(model, request, "GET", _versioned(version, ""), None, version, deployment, inference=False)

    async def model_ready(self, request: Request) -> Response:
        version = request.path_params.get("version")
        model, deployment = self.table.target(request.path_params["model"])
        if version is not None:  # only a replica knows its versions
            return await self._forward(model, request, "GET", _versioned(version, "/ready"), None, version, deployment, inference=False)
        ranked = self.candidates(model, request, limit=1, deployment=deployment)
        if isinstance(ranked, routing.NoRoute):
            return _error(ranked.status, ranked.reason, retry_after=ranked.retry_after)
        return JSONResponse({"name": request.path_params["model"], "ready": True, "site": ranked[0].endpoint.site},
                            headers={"x-edgeplane-site": ranked[0].endpoint.site})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ok = bool(self._ready())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(self, request: Request) -> Response:
        return Response(json.dumps({"name": "edgeplane-gateway", "version": "1", "extensions": ["binary_tensor_data"]}), media_type="application/json")

    def _admitted(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        if self._admit is None:
            return handler

        async def endpoint(request: Request) -> Response:
            refused = await self.admit(request, request.path_params["model"], inference=False)
            if refused is not None:
                return refused
            if (why := self.out_of_scope(request, request.path_params["model"])) is not None:
                return _error(403, why)
            return await handler(request)

        return endpoint

    def routes(self) -> list[BaseRoute]:
        # Health and server metadata stay open (probes); model routes pass admission (inference
        # itself, on the request's clock: Timed).
        guarded = self._admitted
        return [
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2/models/{model}", guarded(self.model_metadata), methods=["GET"]),
            Route("/v2/models/{model}/ready", guarded(self.model_ready), methods=["GET"]),
            Route("/v2/models/{model}/infer", self.infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}", guarded(self.model_metadata), methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}/ready", guarded(self.model_ready), methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}/infer", self.infer, methods=["POST"]),
        ]


def _not_counted(model: str | None, status: int) -> None:
    """What a metadata read's refusal adds to the counts: nothing (``Gateway._forward``)."""


def _versioned(version: str | None, action: str) -> str:
    """The path after ``/v2/models/{model}`` at a replica for ``action`` of ``version`` (any, when None)."""
    return action if version is None else f"/versions/{urlpath.path_segment(version)}{action}"


def _reason(content: bytes) -> str:
    """What a replica's error answer says: its ``error``, or the start of its body."""
    try:
        doc = json.loads(content)
    except ValueError:  # not JSON, or not UTF-8
        doc = None
    return str(doc["error"]) if isinstance(doc, dict) and "error" in doc else content[:200].decode(errors="replace")
