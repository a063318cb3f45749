"""Each request's id at the gateway: kept or made once, sent to every replica tried, returned.

:class:`Correlated` wraps the whole app (the control plane's and the standalone gateway's),
so that every answer carries ``X-Request-Id``, the routes' and the gateway's own alike (a
refusal, a 404 of a path no route has, a 503, a 500); it reads the request's
``X-Request-Id``, ``traceparent`` and ``tracestate`` once (``edgeplane_proto.correlation``
says which are kept) and leaves what to send on in the request's scope, where every route
that calls a replica (the v2 routes, the OpenAI relay, both cascades) takes it with
:func:`forwarded`: one request tried at several replicas, or through several cascade
stages, shows the same id at each.

A caller's id that cannot be kept is replaced, not refused: the answer's header says which
id the request went by. Nothing here stores it; with ``--access-log`` (off by default,
docs/security.md) each request's access line names it (``orchestrator.gateway.access``). Per request this costs one pass over the header list and, where the
caller gave no id, 16 random bytes (bench/gateway.py measures the gateway's overhead).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeplane_proto import correlation, logformat
from orchestrator.gateway import access as access_line

#: Where the scope of a request holds what to send on to replicas (a ``dict[str, str]``).
SCOPE_KEY = "edgeplane.forwarded"
_ID = correlation.HEADER.encode()
_TRACEPARENT = correlation.TRACEPARENT.encode()
_TRACESTATE = correlation.TRACESTATE.encode()
_READ = frozenset((_ID, _TRACEPARENT, _TRACESTATE))
_NONE: Mapping[str, str] = {}


def read(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """What to send to replicas for a request with ``headers`` (an ASGI scope's): its id (the
    caller's when it is one to keep, a new one else; two given are replaced alike) and its
    trace context when it is valid, under their header names."""
    found: dict[bytes, list[str]] | None = None
    for name, value in headers:
        if name in _READ:  # one set lookup a header: most requests carry none of these
            if found is None:
                found = {}
            found.setdefault(name, []).append(value.decode("latin-1"))
    if found is None:
        return {correlation.HEADER: correlation.new_request_id()}
    given = found.get(_ID, ())
    kept = correlation.request_id(given[0]) if len(given) == 1 else None
    out = {correlation.HEADER: kept or correlation.new_request_id()}
    parents = found.get(_TRACEPARENT, ())
    if len(parents) == 1 and (parent := correlation.traceparent(parents[0])) is not None:
        out[correlation.TRACEPARENT] = parent
        if (state := correlation.tracestate(found.get(_TRACESTATE, []))) is not None:
            out[correlation.TRACESTATE] = state
    return out


def forwarded(scope: Mapping[str, Any]) -> Mapping[str, str]:
    """The headers to add to a replica's request for the request of ``scope``; none in an app
    that :class:`Correlated` does not wrap."""
    return scope.get(SCOPE_KEY, _NONE)


def request_id(scope: Mapping[str, Any]) -> str | None:
    """The id the request of ``scope`` goes by (None outside :class:`Correlated`)."""
    return forwarded(scope).get(correlation.HEADER)


class Correlated:
    """ASGI middleware: each HTTP request's id and trace context read (:func:`read`) into its
    scope, and its id added to its answer's head."""

    def __init__(self, app: ASGIApp, access: logformat.AccessLog | None = None) -> None:
        """``access``: where each request's access line goes (``--access-log``); None: nowhere."""
        self.app = app
        self.access = access
        self._templates = access_line.Templates()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        forward = scope[SCOPE_KEY] = read(scope["headers"])
        header = (_ID, forward[correlation.HEADER].encode("latin-1"))
        app = self.app if self.access is None else functools.partial(access_line.answer, self.app, log=self.access,
                                                                       request_id=forward[correlation.HEADER], templates=self._templates)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                # a copy: a response's own list may be sent again (a constant answer)
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await app(scope, receive, sending)
