"""OpenAI-compatible routes of the gateway, under ``/openai/v1`` (SDK ``base_url``).

``/v1/models`` already is the control API's list of Model objects, so the OpenAI routes
live under their own prefix, as KServe serves them: an application points the official
SDK at ``{gateway}/openai/v1``. A chat or text completion is routed by the body's
``model`` with the v2 rules (residency, health, nearest, load, fallback, the
``X-Edgeplane-*`` headers in and ``X-Edgeplane-Site``/``-Tier`` out) among the endpoints
that speak OpenAI (``Endpoint.api``); whichever engine answers behind ``{url}/v1`` (the
agent, the data-centre Serve app, later another engine) is the same to the gateway.
It is sent on to its replicas, best first, by :mod:`orchestrator.gateway.openai_relay`,
which commits a stream to the caller only once its first token is in hand.

A ``model`` naming a cascade (``spec.cascade``, by its deployment's or its model's name)
goes to :mod:`orchestrator.gateway.openai_cascade`, which judges each stage's whole answer
and uses the relay (with its ``RelayHooks``) for the stream of the stage that answers.
The model list and the model cards (LoRA adapters' included) are
:mod:`orchestrator.gateway.openai_models`, over this gateway's admission and ranking.

Every answer of these routes is OpenAI's error object when it is an error, the routing
ones included: a method a route does not take (405, with ``Allow``) and a path under
:data:`PREFIX` that no route has (404) are answered here, not by the app's handler of
Starlette's errors, whose ``{"error": "..."}`` the other routes keep.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics import MetricWrapperBase
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from edgeplane_proto import encoding as encoding_mod
from orchestrator.api import bodies, methods
from orchestrator.gateway import adapter_names, caller_watch, cascade_rules, correlation, openai_cascade, openai_models, openai_relay, routing, scoping
from orchestrator.gateway.proxy import Gateway, Timed
from orchestrator.gateway.upstream import Stream, UpstreamTimeout

PREFIX = "/openai/v1"
#: The OpenAI SDK's own layout (``base_url=.../v1``). A standalone gateway serves all of it;
#: the control plane only the two POST routes, its ``GET /v1/models`` being the Model list.
SDK_PREFIX = "/v1"
SDK_PATHS = (f"{SDK_PREFIX}/models", f"{SDK_PREFIX}/chat/completions", f"{SDK_PREFIX}/completions")
FORWARD_HEADERS = ("content-type", "accept")


def error(status: int, message: str, *, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> Response:
    return Response(openai_relay.error_body(message, status, param=param, code=code), status_code=status,
                    media_type="application/json", headers=headers)


def caller_error(caller: routing.NoRoute) -> Response:
    """Why the caller's ``X-Edgeplane-*`` headers cannot be routed: 400, or 403 for a residency
    outside its token's (:mod:`orchestrator.gateway.scoping`)."""
    return error(caller.status, caller.reason, code=scoping.RESIDENCY_NOT_ALLOWED if caller.status == 403 else None)


def scope_error(why: str) -> Response:
    """The 403 of a model the request's token may not call."""
    return error(403, why, param="model", code=scoping.MODEL_NOT_ALLOWED)


class _Route(Route):
    """A route of this API: a method it does not take is answered with OpenAI's error object."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            allowed = methods.allowed_methods(scope) or sorted(self.methods)
            answer = error(405, f"{scope['method']} is not allowed on {scope['path']}; it takes {', '.join(allowed)}",
                           code="method_not_allowed", headers={"allow": ", ".join(allowed)})
            await answer(scope, receive, send)
            return
        await super().handle(scope, receive, send)


class _NoSuchEndpoint:
    """The ASGI answer to a path of the API that no route has."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error(404, f"no such endpoint: {scope['method']} {scope['path']}", code="not_found")(scope, receive, send)


def _unknown_paths(prefix: str) -> Route:
    """Every path under ``prefix`` that no other route of the app has, whatever its method."""
    return methods.CatchAll(f"{prefix}/{{path:path}}", _NoSuchEndpoint(), methods=None)


class OpenAIGateway:
    def __init__(self, gateway: Gateway, *, registry: CollectorRegistry | None = None,
                 first_token_timeout: float = 60.0, idle_timeout: float = 60.0) -> None:
        self.gw = gateway  # its ``http`` pool (connect timeout included) carries the upstream calls
        self.first_token_timeout = first_token_timeout  # a stream silent this long before its first token is skipped
        self.idle_timeout = idle_timeout  # the longest pause between two chunks after that
        self.ttft = Histogram("edgeplane_gateway_time_to_first_token_seconds", "Time from a generation request's arrival to the first token sent to its caller",
                              ["model"], registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def labelled(self) -> list[MetricWrapperBase]:  # every gateway metric by model or site, for series.prune
        return self.gw.labelled() + [self.ttft]

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, stream: bool) -> Stream:
        """POST to a replica; returns once the answer's head arrived. A stream's head comes
        before its first token, within the first-token timeout. A whole answer's comes once
        it is all generated, which takes as long as it takes: only the caller, by leaving,
        ends that wait (a replica slower than a timeout would be ejected, and the answer
        generated again elsewhere, for a request that is merely long)."""
        if not stream:
            return await self.gw.http.stream("POST", url, body, headers)
        try:
            async with asyncio.timeout(self.first_token_timeout):
                return await self.gw.http.stream("POST", url, body, headers)
        except TimeoutError:  # the connect timeout is far shorter: the replica has the request
            raise UpstreamTimeout(f"no answer within {self.first_token_timeout:g}s") from None

    # admission ---------------------------------------------------------------------------

    async def admit(self, request: Request, model: str | None = None, *, inference: bool) -> Response | None:
        """Token auth and rate limits of the v2 routes, answered as OpenAI error objects, and
        counted for ``inference`` requests (``Gateway.admit``).
        With auth off the ``Authorization`` header is not looked at: the SDK always sends one."""
        refused = await self.gw.admit(request, model, inference=inference)
        if refused is None:
            return None
        try:
            message = json.loads(bytes(refused.body)).get("error", "refused")
        except ValueError:
            message = "refused"
        headers = {k: v for k in ("retry-after", "www-authenticate") if (v := refused.headers.get(k)) is not None}
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(refused.status_code)  # 503: a gateway without a table yet
        return error(refused.status_code, str(message), headers=headers, code=code)

    def openai_candidates(self, model: str, request: Request, caller: routing.Caller | None = None,
                          limit: int | None = None, deployment: str | None = None, *, lora: bool = False) -> list[routing.Ranked] | Response:
        ranked = self.rank(model, request, caller, limit, deployment, lora=lora)
        if isinstance(ranked, routing.NoRoute):
            code = {404: "model_not_found", 403: scoping.RESIDENCY_NOT_ALLOWED}.get(ranked.status)
            return error(ranked.status, ranked.reason, param="model" if ranked.status == 404 else None, code=code,
                         headers={"retry-after": str(ranked.retry_after)} if ranked.retry_after is not None else None)
        ours = [r for r in ranked if r.endpoint.api == routing.API_OPENAI]
        if not ours:
            return error(400, f"model {model!r} is not a generative model; call it with the v2 inference API (/v2/models/{model}/infer)",
                         param="model", code="model_not_generative")
        return ours

    def rank(self, model: str, request: Request, caller: routing.Caller | None, limit: int | None,
             deployment: str | None = None, *, lora: bool = False) -> list[routing.Ranked] | routing.NoRoute:
        """The model's generative replicas (``lora``: those serving LoRA adapters), best
        first; a model with none is ranked whole (over v2 too), so that why it has no replica
        for the caller is said before that it is not generative."""
        api = routing.API_OPENAI if self.gw.table.serves(model, routing.API_OPENAI) else None
        return self.gw.candidates(model, request, api=api, caller=caller, limit=limit, deployment=deployment, lora=lora)

    def _refuse(self, model: str | None, answer: Response) -> Response:
        """``answer``, an error the gateway made itself, counted (``Gateway.refused``)."""
        self.gw.refused(model, answer.status_code)
        return answer

    # routes ------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "/chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "/completions")

    async def _generate(self, request: Request, suffix: str) -> Response:
        arrived = time.perf_counter()  # the caller's clock: its first token and its answer are timed from here (Timed)
        refused = await self.admit(request, inference=True)
        if refused is not None:
            return refused
        try:
            raw = await bodies.read_body(request, self.gw.max_body)
        except bodies.BodyTooLarge as exc:
            self.gw.refused(None, 413)
            return error(413, str(exc))
        except ClientDisconnect:  # nobody is left to read the answer
            self.gw.refused(None, 400)
            return error(400, "the client went away before the whole body arrived")
        # inflated here: the body is read, changed and sent on plain
        plain = await encoding_mod.inflate_off_loop(raw, request.headers.get("content-encoding"), self.gw.max_body)
        if isinstance(plain, encoding_mod.Refused):
            self.gw.refused(None, plain.status)
            return error(plain.status, plain.message, code=plain.code, headers=encoding_mod.refusal_headers(plain.status))
        raw = plain
        try:
            body = json.loads(raw)
        except ValueError as exc:  # not UTF-8 either
            return self._refuse(None, error(400, f"the body is not valid JSON: {exc}"))
        except RecursionError:
            return self._refuse(None, error(400, "the body is not valid JSON: it is nested too deeply"))
        if not isinstance(body, dict):
            return self._refuse(None, error(400, "the body must be a JSON object"))
        asked = body.get("model")
        if not isinstance(asked, str) or not asked:
            return self._refuse(None, error(400, "'model' is required and must be a non-empty string", param="model"))
        named = adapter_names.parse(asked)  # <model>:<adapter>, a LoRA adapter of the model's
        if isinstance(named, str):
            return self._refuse(None, error(400, named, param="model", code="invalid_model"))
        model = named.name
        if (why := self.gw.out_of_scope(request, model)) is not None:
            return self._refuse(model, scope_error(why))
        stream = body.get("stream")
        if stream is None:  # null is OpenAI's default, false
            stream = False
        if not isinstance(stream, bool):
            return self._refuse(model, error(400, "'stream' must be true or false", param="stream"))
        caller = self.gw.caller(request)
        if isinstance(caller, routing.NoRoute):  # before a cascade runs or a cold model is woken for nothing
            return self._refuse(model, caller_error(caller))
        route = self.gw.table.cascades.get(model) if self.gw.cascade is not None else None
        deployment: str | None = None  # a cascade's deployment's name: plain routing among its replicas only
        if route is not None and named.adapter is not None:  # only the stage with the adapter can answer: plain routing
            model, deployment = self.gw.table.target(model)
            raw = json.dumps({**body, "model": named.asked(model)}).encode()
        elif route is not None and self.gw.cascade is not None:
            deployment = self.gw.table.target(model)[1]
            mode = cascade_rules.parse_mode(request.headers.get("x-edgeplane-cascade"))
            if mode is None:
                return self._refuse(model, error(400, f"X-Edgeplane-Cascade must be one of {', '.join(cascade_rules.MODES)}"))
            chosen = self.gw.cascade.resolve(route, model, caller)
            if chosen is not None and mode != "off" and not self.gw.table.is_cold(chosen.model):
                decided = caller_watch.Decided(lambda: openai_cascade.generate(self, chosen, mode, request, body, suffix, stream, arrived))
                return Timed(self.gw.metrics.latency, chosen.model, arrived, decided)
            # off, scaled to zero (woken below), or the caller may reach only the model's deployments without a
            # cascade: plain routing over every stage's replicas, by the model's name (those of the named
            # deployment only, when it is a deployment's name)
            model, raw = route.model, json.dumps({**body, "model": route.model}).encode()
        if named.adapter is not None:  # routed as an adapter of ``model``, under which requests_total counts its answer
            self.gw.metrics.adapter_requests.labels(model).inc()
        if self.gw.table.is_cold(model):
            self.gw.table.wake(model)
            self.gw.metrics.cold_starts.labels(model).inc()
            if not await self.gw.table.wait_for_endpoints(model, self.gw.cold_start_s):
                return self._refuse(model, error(503, f"model {model!r} was scaled to zero and no replica was ready within "
                                                      f"{self.gw.cold_start_s:g}s; retry", headers={"retry-after": "5"}))
        ranked = self.openai_candidates(model, request, caller, self.gw.max_attempts, deployment, lora=named.adapter is not None)
        if isinstance(ranked, Response):
            return self._refuse(model, ranked)
        headers = {k: v for k in FORWARD_HEADERS if (v := request.headers.get(k)) is not None}
        headers.update({**correlation.forwarded(request.scope), **scoping.passed_on(request.scope)})  # the id; the token, to_replica's
        relayed = openai_relay.Relay(self, model, ranked[: self.gw.max_attempts], suffix, raw, headers, stream,
                                     chat=suffix == "/chat/completions", arrived=arrived, adapter=named.adapter)
        relayed.failovers.explain_by(functools.partial(self.gw.table.skipped, model, caller, self.gw.position, api=routing.API_OPENAI,
                                                       deployment=deployment, lora=named.adapter is not None))
        return Timed(self.gw.metrics.latency, model, arrived, relayed)

    def routes(self, *, sdk_models: bool = False) -> list[BaseRoute]:
        """The API at :data:`PREFIX`, and its completions at :data:`SDK_PREFIX` as well (with
        ``sdk_models``, its model list too, and the 404 of any other path there that no
        route of the app has: the gateway's ``/v1`` is then the SDK's)."""
        cards = openai_models.ModelCards(self)
        at_sdk: list[BaseRoute] = [_Route(f"{SDK_PREFIX}/chat/completions", self.chat, methods=["POST"]),
                                   _Route(f"{SDK_PREFIX}/completions", self.completions, methods=["POST"])]
        if sdk_models:
            at_sdk += [_Route(f"{SDK_PREFIX}/models", cards.list_models, methods=["GET"]),
                       _Route(f"{SDK_PREFIX}/models/{{model:path}}", cards.get_model, methods=["GET"]),
                       _unknown_paths(SDK_PREFIX)]
        return [
            _Route(f"{PREFIX}/models", cards.list_models, methods=["GET"]),
            _Route(f"{PREFIX}/models/{{model:path}}", cards.get_model, methods=["GET"]),
            _Route(f"{PREFIX}/chat/completions", self.chat, methods=["POST"]),
            _Route(f"{PREFIX}/completions", self.completions, methods=["POST"]),
            _unknown_paths(PREFIX),
            *at_sdk,
        ]
