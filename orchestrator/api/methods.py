"""What a request that no route takes is told, by the control plane and the gateway alike.

A path that exists, asked with a method it does not take, is a 405 whose ``Allow`` lists
every method some route takes there (Starlette's own lists those of the first route
only); any other path is a 404. Both come as the JSON error object the routes answer with
(:mod:`orchestrator.api.problems`: ``{"error": ..., "reason": ...}``), not Starlette's plain text.

The control API's catch-all routes (``/v1/{kind}``, ``/v1/{kind}/{name}``) would take
every path of their shape whatever its method: ``GET /v1/apply`` was read as the list of a
kind named "apply" (404), where apply exists and takes POST. A :class:`CatchAll` leaves a
path that another route has to that route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ExceptionHandler, Scope

from orchestrator.api import problems


class CatchAll(Route):
    """A route whose path names objects, that yields every path another route of the app has."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE and any(_has_path(r, scope) for r in _routes(scope) if not isinstance(r, CatchAll)):
            return Match.NONE, {}
        return match, child


def _routes(scope: Scope) -> list[BaseRoute]:
    router = scope.get("router")  # the app's router, set before it matches any route
    return list(router.routes) if router is not None else []


def _has_path(route: BaseRoute, scope: Scope) -> bool:
    return route.matches(scope)[0] is not Match.NONE


def allowed_methods(scope: Scope) -> list[str]:
    """Every method the app's routes take at the request's path, sorted."""
    methods: set[str] = set()
    for route in _routes(scope):
        if isinstance(route, Route) and route.methods and _has_path(route, scope):
            methods |= route.methods
    return sorted(methods)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's HTTP errors (no route, wrong method) as the API's JSON errors."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = allowed_methods(request.scope) or [m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
        headers["Allow"] = ", ".join(allowed)
        message, reason = f"{request.method} is not allowed on {request.url.path}; it takes {', '.join(allowed)}", None
    elif exc.status_code == 404:
        message, reason = f"no route for {request.method} {request.url.path}", problems.Reason.NO_ROUTE
    else:
        message, reason = exc.detail, None
    return problems.answer(exc.status_code, message, reason, headers=headers)


#: ``Starlette(exception_handlers=...)`` of the control plane's and the gateway's apps.
EXCEPTION_HANDLERS: Mapping[Any, ExceptionHandler] = {HTTPException: http_error}
