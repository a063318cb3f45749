"""``edgeplane gateway``: the gateway alone, following the control plane's endpoint table.

The same routes as the control plane's in-process gateway (``/v2`` inference,
``/openai/v1``, cascades) built from the same parts (:class:`~orchestrator.gateway.proxy.Gateway`,
:class:`~orchestrator.gateway.openai_routes.OpenAIGateway`), over a table that
:class:`~orchestrator.gatewayd.follow.TableFollower` fills from ``GET /v1/endpoints?watch=1``.
No store, no scheduler, no agent gRPC: gateways are added and removed freely, and the data
path scales apart from the control plane.

Besides inference it answers ``GET /v1/endpoints/{model}`` (what :mod:`orchestrator.client`
reads; through admission), ``/readyz`` (503 until the first table, then 200 with the
follower's state, also while the control plane is away), ``/healthz`` and ``/metrics``.
Until the first table arrives every model route answers 503.

Distillation capture (``spec.cascade.capture``) needs the control plane's capture stores:
cascades run on a standalone gateway, but their requests are not captured there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from edgeplane_proto import hostport, logformat, oip
from orchestrator.api import methods, problems
from orchestrator.gatewayd import follow
from orchestrator import runloop, urlpath
from orchestrator.gateway import cascade as cascade_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import correlation, openai_routes, options, proxy, routing, scoping, series, upstream, wire
from orchestrator.security import admission, ratelimit

log = logging.getLogger("edgeplane.gateway")

class ConfigError(Exception):
    """The gateway was asked to start with flags that cannot work."""


@dataclass(frozen=True)
class GatewayConfig:
    control_planes: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8088
    token: str | None = None  # to read the control plane's watch (any API role)
    position: tuple[float, float] | None = None
    gateway_auth: str = "none"
    gateway_rate: float = 0.0
    gateway_burst: float = 0.0
    gateway_max_body: int = options.MAX_BODY
    cold_start_timeout_s: float = options.COLD_START_S
    first_token_timeout_s: float = options.FIRST_TOKEN_S
    access_log: bool = False  # one line per request answered, on edgeplane.access
    silence_s: float = 15.0  # no event (heartbeats come every 5 s) for this long: the connection is dead
    backoff_max_s: float = 5.0


def parse_control_plane(url: str) -> str:
    shown = urlpath.redacted(url)  # a password in it must not reach a log or /readyz
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. "http://[::1": an unclosed IPv6 host
        raise ConfigError(f"--control-plane {shown!r} is not a URL ({exc})") from None
    if parsed.username is not None or parsed.password is not None:
        raise ConfigError(f"--control-plane {shown!r}: no user name or password in the URL (give the gateway's API token "
                          "with --token or EDGEPLANE_TOKEN)")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--control-plane {shown!r} is not an http(s) URL such as http://10.0.0.5:8080")
    try:
        parsed.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise ConfigError(f"--control-plane {url!r} has an invalid port") from None
    if parsed.query or parsed.fragment or parsed.path not in ("", "/"):
        raise ConfigError(f"--control-plane {url!r}: give the control plane's base URL, without a path")
    return url.rstrip("/")


@dataclass
class StandaloneGateway:
    config: GatewayConfig
    http_url: str = ""
    table: endpoints_mod.EndpointTable = field(init=False)
    follower: follow.TableFollower = field(init=False)
    _serving: asyncio.Task[Any] | None = None
    _following: asyncio.Task[Any] | None = None

    async def start(self) -> StandaloneGateway:
        cfg = self.config
        if not cfg.control_planes:
            raise ConfigError("give at least one --control-plane URL")
        urls = [parse_control_plane(u) for u in cfg.control_planes]
        wrong = options.problem(cfg.gateway_auth, cfg.gateway_rate, cfg.gateway_burst, cfg.gateway_max_body, cfg.cold_start_timeout_s,
                                cfg.first_token_timeout_s)
        if wrong:
            raise ConfigError(wrong)
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the control plane's: no Nagle delay on answers
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {hostport.address(cfg.host, cfg.port)} (--host/--port): {exc.strerror or exc}") from exc
        port = sock.getsockname()[1]
        self.http_url = f"http://{hostport.address(cfg.host, port)}"

        self.table = endpoints_mod.EndpointTable()
        self.follower = follow.TableFollower(urls, self.table, token=cfg.token, silence_s=cfg.silence_s, backoff_max_s=cfg.backoff_max_s)
        self.table.on_wake = self.follower.wake
        self.checker = follow.TokenChecker(self.follower)
        self.registry = CollectorRegistry()
        self._http = upstream.UpstreamPool(connect_timeout=2.0, timeout=30.0)
        self.admission = admission.GatewayAdmission(ratelimit.RateLimiter(ratelimit.RateLimit(cfg.gateway_rate, cfg.gateway_burst)),
                                                    self.checker.check if cfg.gateway_auth == "token" else None,
                                                    self.checker.known)
        self._limited = cfg.gateway_auth == "token" or cfg.gateway_rate > 0
        cascades = cascade_mod.CascadeHandler(self.table, self._http, cascade_mod.CascadeMetrics.create(self.registry), position=cfg.position)
        self.gateway = proxy.Gateway(self.table, self._http, proxy.GatewayMetrics.create(self.registry), position=cfg.position,
                                     ready=lambda: self.follower.ready, admit=self._admit,
                                     max_body=cfg.gateway_max_body, cold_start_s=cfg.cold_start_timeout_s, cascade=cascades)
        self.openai_gateway = openai_routes.OpenAIGateway(self.gateway, registry=self.registry, first_token_timeout=cfg.first_token_timeout_s)
        # every answer carries its request's id, which each replica tried was sent (gateway/correlation.py)
        app: ASGIApp = Starlette(routes=self.gateway.routes() + self.openai_gateway.routes(sdk_models=True) + [
            Route("/v1/endpoints/{model}", self._endpoints, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
        ], exception_handlers=methods.EXCEPTION_HANDLERS)
        self._uvicorn = runloop.http_server(correlation.Correlated(app, logformat.access_log(cfg.access_log, self.table.knows)))
        self._serving = asyncio.create_task(self._uvicorn.serve(sockets=[sock]), name="gateway-http")
        self._following = asyncio.create_task(self.follower.run(), name="gateway-follow")
        for _ in range(500):
            if self._uvicorn.started:
                break
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._following is not None:
            self._following.cancel()  # it runs until cancelled; uvicorn ends on should_exit
        for t in (self._following, self._serving):
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                    async with asyncio.timeout(10):
                        await t
        await self.follower.close()
        await self.checker.close()
        await self._http.close()

    async def _admit(self, request: Request) -> Response | None:
        """Every model route: 503 until the first table, then auth and rate limits when set."""
        if not self.follower.ready:
            why = f" ({self.follower.last_error})" if self.follower.last_error else ""
            return Response(oip.error_body(f"the gateway has no endpoint table from the control plane yet{why}; retry"),
                            status_code=503, media_type="application/json", headers={"retry-after": "2"})
        return await self.admission.check(request) if self._limited else None

    async def _endpoints(self, request: Request) -> Response:
        refused = await self._admit(request)
        if refused is not None:  # the control API's shape, as the control plane's own list answers
            return problems.reshaped(refused)
        caller = self.table.query_caller(request.query_params)
        model = request.path_params["model"]
        if not isinstance(caller, routing.NoRoute):
            caller = scoping.bound_query(scoping.token_of(request.scope), (model, self.table.target(model)[0]), caller)
        if isinstance(caller, routing.NoRoute):
            return problems.no_route(caller)
        return JSONResponse(wire.endpoint_list(self.table.rank(model, caller, self.config.position, api=None), model))

    async def _readyz(self, request: Request) -> Response:
        status = self.follower.status()
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _metrics(self, request: Request) -> Response:
        series.prune(self.table, self.openai_gateway.labelled())
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def _gateway_position(text: str | None) -> tuple[float, float] | None:
    try:
        return options.position(text)
    except options.OptionError as exc:
        raise ConfigError(str(exc)) from None


def config_from_args(args: argparse.Namespace, token: str | None) -> GatewayConfig:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port number")
    return GatewayConfig(
        control_planes=tuple(parse_control_plane(u) for u in args.control_plane), host=args.host, port=args.port, token=token,
        position=_gateway_position(args.location), gateway_auth=args.gateway_auth, gateway_rate=args.gateway_rate,
        gateway_burst=args.gateway_burst, gateway_max_body=args.gateway_max_body, cold_start_timeout_s=args.cold_start_timeout,
        first_token_timeout_s=args.first_token_timeout, access_log=args.access_log,
    )


def banner(gw: StandaloneGateway) -> list[str]:
    return [f"edgeplane gateway following {', '.join(gw.config.control_planes)}: serving {gw.http_url}"]


def main(args: argparse.Namespace, token: str | None) -> int:
    return runloop.main(args.log_level, lambda: StandaloneGateway(config_from_args(args, token)).start(), banner, (ConfigError,),
                        log_format=args.log_format)
