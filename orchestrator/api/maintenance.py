"""Routes that take a Site out for maintenance and bring it back: cordon, drain, uncordon.

``POST /v1/sites/NAME/cordon``, ``/drain`` (``?dryRun=true``: where its replicas would go,
changing nothing; ``?force=true``: remove even those with nowhere allowed to go) and
``/uncordon``; the caller's reason in ``X-Edgeplane-Reason``. Each writes the shared store
(any replica answers: the leader's pass reads it) and logs who and why; doing it twice
changes nothing the second time. What the pass makes of it shows in the Site's status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from orchestrator import maintenance, reasons
from orchestrator.api import auth, paging, problems
from orchestrator.store import sqlite as store_mod

#: ``app.build_routes``'s ``guarded``: a handler behind authentication and the error translation.
Guard = Callable[..., Callable[[Request], Awaitable[Response]]]
log = logging.getLogger(__name__)
FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class Services(Protocol):
    store: store_mod.Store

    def changed(self, reason: str) -> None: ...
    async def drain_preview(self, site: str) -> dict[str, Any]: ...
    async def hold_reason(self) -> str | None: ...


class BadQuery(problems.BadParameter):
    """A query parameter these routes do not take, or a flag that is not true or false (the guard answers 400)."""


def _flags(request: Request, allowed: tuple[str, ...]) -> dict[str, bool]:
    paging.refuse_repeated(request.query_params)  # BadPage: the guard answers 400 too
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        raise paging.unknown_parameters(unknown, f"this route takes {' and '.join(allowed) if allowed else 'none'}")
    out = {}
    for name in allowed:
        value = request.query_params.get(name, "false")
        if value.lower() not in FLAGS:
            raise BadQuery(f"{name} must be true or false, not {value[:40]!r}", name)
        out[name] = FLAGS[value.lower()]
    return out


def _reason(request: Request, default: str) -> str:
    return reasons.from_header(request.headers.get(reasons.HEADER), default)


def _view(change: maintenance.Change, action: str) -> dict[str, Any]:
    now = change.now
    return {"kind": "Site", "name": change.site, "action": action if change.changed else "unchanged",
            "schedulable": now is None,
            **({"maintenance": {"mode": now.mode.value, "reason": now.reason, "by": now.actor, "force": now.force}} if now else {})}


def routes(services: Services, guarded: Guard) -> list[BaseRoute]:
    store = services.store

    async def answer(change: maintenance.Change, action: str, caller: auth.Caller) -> Response:
        body = _view(change, action)
        if change.changed:
            services.changed(f"site {change.site} {action} by {caller.identity}")
            try:  # after the commit: a failed read must not answer 503 for a change that was made
                held = await services.hold_reason()
            except store_mod.StoreError as exc:
                log.warning("site %s %s, but whether changes are on hold could not be read: %s", change.site, action, exc)
                held = None
            if held is not None:
                body["note"] = f"stored; it takes effect when the hold ends ({held})"
        return JSONResponse(body)

    async def take_out(request: Request, caller: auth.Caller, mode: maintenance.Mode, force: bool) -> Response:
        name = request.path_params["name"]
        change = await store.run(maintenance.take_out, store, name, mode, actor=caller.identity,
                                 reason=_reason(request, mode.value), now=time.time(), force=force)
        return await answer(change, "cordoned" if mode is maintenance.Mode.CORDON else "draining", caller)

    async def cordon(request: Request, caller: auth.Caller) -> Response:
        _flags(request, ())
        return await take_out(request, caller, maintenance.Mode.CORDON, False)

    async def drain(request: Request, caller: auth.Caller) -> Response:
        flags = _flags(request, ("dryRun", "force"))
        name = request.path_params["name"]
        if flags["dryRun"]:
            if flags["force"]:  # the preview is of a drain as stored, never forced: a forced one's would mislead
                raise BadQuery("dryRun changes nothing: it does not take force", "force", problems.Reason.BAD_REQUEST)
            if await store.run(store.get, "Site", name) is None:
                raise store_mod.NotFound(f"Site {name!r} does not exist")
            return JSONResponse({"dryRun": True, "plan": await services.drain_preview(name)})
        return await take_out(request, caller, maintenance.Mode.DRAIN, flags["force"])

    async def uncordon(request: Request, caller: auth.Caller) -> Response:
        _flags(request, ())
        name = request.path_params["name"]
        change = await store.run(maintenance.bring_back, store, name, actor=caller.identity, reason=_reason(request, "uncordon"))
        return await answer(change, "uncordoned", caller)

    return [
        Route("/v1/sites/{name}/cordon", guarded(cordon, write=True), methods=["POST"]),
        Route("/v1/sites/{name}/drain", guarded(drain, write=True), methods=["POST"]),
        Route("/v1/sites/{name}/uncordon", guarded(uncordon, write=True), methods=["POST"]),
    ]
