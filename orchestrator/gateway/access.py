"""The gateway's access line (``--access-log``, off by default; docs/security.md): one a
request, written once its answer is, on ``edgeplane.access`` (``edgeplane_proto.logformat``,
the agent's format too).

It names the request, never the person: its id (``X-Request-Id``, as answered), method,
the template of the route it took (``/v2/models/{model}/infer``; None for a path no route
has, which may hold anything), the model its path names when the endpoint table knows it
(until then the name is the caller's text), the site that answered (the
``X-Edgeplane-Site`` every replica's answer carries: a route that fails over says which
replica answered in the end) and the sites it moved on from before (its
``X-Edgeplane-Failover``: why the site is not the caller's nearest, when a failover is), the
nearer replicas passed over untried with why (its ``X-Edgeplane-Skipped``), status, body
bytes in and out and the time from its head to the end of its answer. No client address, token, query string or body.

:class:`correlation.Correlated` calls :func:`answer` for each request when the log is on;
when it is off, its one check of that is all a request pays."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeplane_proto import logformat

_SITE = b"x-edgeplane-site"
_FAILOVER = b"x-edgeplane-failover"
_SKIPPED = b"x-edgeplane-skipped"


def route_of(routes: Iterable[BaseRoute], endpoint: Any, names: frozenset[str], prefix: str = "") -> str | None:
    """The template of the route among ``routes`` (a starlette router's, mounts followed) that
    took a request to ``endpoint`` (``scope["endpoint"]``) reading parameters ``names``; one
    endpoint may serve several routes (``/v2/models/{model}/infer`` and its ``/versions/{version}``
    form), which their parameters tell apart. None when none is found."""
    for route in routes:
        if isinstance(route, Mount):
            if route.app == endpoint:
                return prefix + route.path + "/{path}"
            found = route_of(route.routes, endpoint, names, prefix + route.path)
            if found is not None:
                return found
        elif isinstance(route, Route) and route.endpoint == endpoint and frozenset(route.param_convertors) == names:
            return prefix + route.path
    return None


class Templates:
    """Route templates by endpoint and parameter names, found once each (:func:`route_of`)."""

    def __init__(self) -> None:
        self._known: dict[tuple[Any, frozenset[str]], str | None] = {}

    def of(self, scope: Scope) -> str | None:
        """The template of the route that took the request of ``scope``, once it has been routed."""
        endpoint, router = scope.get("endpoint"), scope.get("router")
        if endpoint is None or router is None:
            return None
        key = (endpoint, frozenset(scope.get("path_params") or ()))
        if key not in self._known:
            self._known[key] = route_of(router.routes, endpoint, key[1])
        return self._known[key]


async def answer(app: ASGIApp, scope: Scope, receive: Receive, send: Send, log: logformat.AccessLog, request_id: str,
                 templates: Templates) -> None:
    """``app``'s answer to the request of ``scope``, and its access line in ``log``."""
    started = time.perf_counter()
    status: int | None = None
    site: str | None = None
    failover: str | None = None
    skipped: str | None = None
    bytes_in = bytes_out = 0

    async def receiving() -> Message:
        nonlocal bytes_in
        message = await receive()
        bytes_in += len(message.get("body", b""))
        return message

    async def sending(message: Message) -> None:
        nonlocal status, site, failover, skipped, bytes_out
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", ()):
                if name.lower() == _SITE:
                    site = value.decode("latin-1")
                elif name.lower() == _FAILOVER:
                    failover = value.decode("latin-1")
                elif name.lower() == _SKIPPED:
                    skipped = value.decode("latin-1")
        else:
            bytes_out += len(message.get("body", b""))
        await send(message)

    try:
        await app(scope, receiving, sending)
    finally:
        params = scope.get("path_params")
        model = params.get("model") if params else None
        route = templates.of(scope)
        log.write(request_id, scope["method"], route, model and str(model), site, status, bytes_in,
                  0 if scope["method"] == "HEAD" else bytes_out, (time.perf_counter() - started) * 1000, failover=failover, skipped=skipped)
