"""Routes of the control API; each handler is a thin translation to the catalog.

Errors are translated here, at the boundary, into the API's one error shape
(:mod:`orchestrator.api.problems`: ``error``, ``reason``, the parameter or field at fault)
plus ``issues`` for manifest problems. Nothing a client sends can raise past this layer
as a 500 except a genuine bug.

The event loop is shared with the gateway and the agents' streams: what takes CPU in
proportion to a request (reading up to 4 MiB of manifests, judging and writing them, a
dry run's schedule, a list's manifests and JSON) runs in a worker thread, so one large apply does not hold up every
inference request and health probe behind it; so does every store call, which on
PostgreSQL may wait on a stalled database or another replica's lock.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from edgeplane_proto import site_name
from orchestrator import catalog, reasons
from orchestrator.api import auth, bodies, mediatype, methods, paging, problems
from orchestrator.api import maintenance as maintenance_api
from orchestrator.api import simulate as simulate_api
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import routing, scoping
from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestError
from orchestrator.simulation.scenario import ScenarioError
from orchestrator.store import sqlite as store_mod

MAX_BODY = 4 * 1024 * 1024


class Services(Protocol):
    """What the API needs from the running control plane."""

    store: store_mod.Store
    table: endpoints_mod.EndpointTable  # the gateway's: which regions a caller may name
    authenticator: auth.Authenticator
    agent_ca_sha256: str | None  # None: agents join over plaintext (--insecure-agents)
    gateway_checks_tokens: bool  # --gateway-auth token: a token's scope binds this gateway
    replica_id: str  # a new one each start

    async def preview(self, docs: list[loader.LoadedDocument]) -> dict[str, Any]: ...
    def changed(self, reason: str) -> None: ...
    async def placements_view(self, page: paging.Page) -> dict[str, Any]: ...
    def endpoints_view(self, model: str, caller: routing.Caller) -> dict[str, Any]: ...
    async def describe_extra(self, kind: str, name: str) -> dict[str, Any]: ...
    def cascades_view(self) -> dict[str, Any]: ...
    async def cascades_with_capture(self) -> dict[str, Any]: ...
    def ready(self) -> bool: ...
    def agent_revoked(self, site: str) -> None: ...
    async def leadership_view(self) -> dict[str, Any]: ...
    async def simulate(self, body: bytes, each: str | None, top: int | None) -> dict[str, Any]: ...
    async def metrics(self) -> bytes: ...
    async def drain_preview(self, site: str) -> dict[str, Any]: ...
    async def hold_reason(self) -> str | None: ...


#: The longest a token may live (a longer or non-finite ``ttlSeconds`` is refused: no date
#: could show when it expires).
MAX_TOKEN_TTL_S = 10 * 365 * 86400
EVENT_ID_MAX = (1 << 63) - 1  # event ids are 64-bit integers in both stores


def manifest_errors(exc: ManifestError, undone: str) -> JSONResponse:
    """The 422 of manifests with errors: how many, that nothing was ``undone`` (applied,
    deleted), and each issue with its file, document, field and line; ``field`` too when
    they are all of one field."""
    fields = {i.field for i in exc.issues}
    return problems.answer(422, f"{len(exc.issues)} problem(s) in the manifests; nothing was {undone}", problems.Reason.INVALID,
                           field=fields.pop() if len(fields) == 1 else None, issues=[i.to_dict() for i in exc.issues])


Handler = Callable[[Request, auth.Caller], Awaitable[Response]]


def build_routes(services: Services) -> list[BaseRoute]:
    store = services.store
    started = time.monotonic()  # before the gateway answers: its counters start here

    def guarded(handler: Handler, write: bool = False, scoped: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """``scoped``: the route takes a scoped token and binds its scope itself (auth.Authenticator.admit)."""
        async def endpoint(request: Request) -> Response:
            caller = await services.authenticator.admit(request, write=write, scoped=scoped)
            if isinstance(caller, Response):
                return caller
            try:
                return await handler(request, caller)
            except bodies.BodyTooLarge as exc:
                return problems.answer(413, str(exc))
            except mediatype.Unsupported as exc:  # nothing read, nothing applied
                return problems.answer(415, str(exc), accepted=list(mediatype.ACCEPTED),
                                       headers={"accept-post": ", ".join(mediatype.ACCEPTED), "accept-encoding": "identity"})
            except problems.BadParameter as exc:
                return problems.refusal(exc)
            except ManifestError as exc:
                return manifest_errors(exc, "applied")
            except (catalog.UnknownKind, store_mod.NotFound) as exc:
                return problems.answer(404, str(exc))
            except store_mod.Conflict as exc:
                return problems.answer(409, str(exc), problems.Reason.CONFLICT)
            except catalog.InUse as exc:
                return problems.answer(409, str(exc), problems.Reason.IN_USE)
            except store_mod.StoreError as exc:
                return auth.store_refusal(exc, caller, request)

        return endpoint

    async def apply(request: Request, caller: auth.Caller) -> Response:
        reading = await _read(request)
        if not reading.documents and not reading.issues:
            return problems.answer(422, _holds_nothing(reading), problems.Reason.INVALID)
        dry_run = _flag(request, "dryRun")
        result = await store.run(catalog.apply_reading, store, reading, actor=caller.identity,
                                 reason=_reason(request, "apply"), dry_run=dry_run)
        payload: dict[str, Any] = {
            "dryRun": dry_run,
            "results": [
                {"kind": o.kind, "name": o.name, "action": o.action, "generation": o.generation, "resourceVersion": str(o.resource_version)}
                for o in result.outcomes
            ],
        }
        if dry_run:
            payload["plan"] = await services.preview(reading.documents)
        elif any(o.action != "unchanged" for o in result.outcomes):
            services.changed(f"apply by {caller.identity}")
        return JSONResponse(payload)

    async def delete_bundle(request: Request, caller: auth.Caller) -> Response:
        """``POST /v1/delete``: every object the manifests in the body name, all or none."""
        reading = await _read(request, names_only=True)
        try:
            docs = reading.valid()
            if not docs:
                return problems.answer(422, _holds_nothing(reading), problems.Reason.INVALID)
            outcomes = await store.run(catalog.delete_documents, store, docs, actor=caller.identity,
                                       reason=_reason(request, "delete"), missing_ok=_flag(request, "ignoreNotFound"))
        except ManifestError as exc:
            return manifest_errors(exc, "deleted")
        if outcomes:
            services.changed(f"delete by {caller.identity}")
        return JSONResponse({"results": [{"kind": o.kind, "name": o.name, "action": o.action} for o in outcomes]})

    async def list_kind(request: Request, caller: auth.Caller) -> Response:
        kind = catalog.resolve_kind(request.path_params["kind"])
        page = paging.parse(request.query_params, kind)
        if page.after is not None and len(page.after) != 1:
            raise paging.BadPage("continue is not a token a page of this list gave (metadata.continue)", "continue")
        found = await store.run(store.list, kind, page.after[0] if page.after else None,
                                None if page.limit is None else page.limit + 1)  # one more: whether a next page has any
        more = page.limit is not None and len(found) > page.limit
        found = found[:page.limit]

        def answer() -> Response:  # every object's manifest, then the JSON: megabytes at fleet size
            doc: dict[str, Any] = {"kind": kind, "items": [catalog.to_manifest(o) for o in found]}
            if (meta := paging.metadata(page, kind, more, [found[-1].name] if found else None)) is not None:
                doc["metadata"] = meta
            return JSONResponse(doc)

        return await run_in_threadpool(answer)

    async def get_one(request: Request, caller: auth.Caller) -> Response:
        kind = catalog.resolve_kind(request.path_params["kind"])
        paging.refuse_unknown(request.query_params, ["describe"], "this route")
        obj = await store.run(store.get, kind, request.path_params["name"])
        if obj is None:
            return problems.answer(404, f"{kind} {request.path_params['name']!r} does not exist")
        body = catalog.to_manifest(obj)
        if request.query_params.get("describe") in ("1", "true"):
            # a Site's are those at it: its own, and its replicas' placements, moves and removals
            recent = (store.run(store.recent_events, None, None, 20, obj.name) if kind == "Site"
                      else store.run(store.recent_events, kind, obj.name))
            body["events"] = [_event(e) for e in await recent]
            body.update(await services.describe_extra(kind, obj.name))
        return JSONResponse(body)

    async def delete_one(request: Request, caller: auth.Caller) -> Response:
        kind = catalog.resolve_kind(request.path_params["kind"])
        # Every parameter is read (anything else refused) before deleting anything: a misspelt
        # flag that was ignored would delete what the caller meant otherwise. A DELETE never
        # keeps the Site: keeping it is its own route, which an earlier release refuses rather
        # than deleting the Site as it would with a flag it does not read.
        if "keepSite" in request.query_params:
            raise BadQuery(f"a DELETE deletes the Site: to keep it and give up only the applications it left elsewhere, "
                           f"POST /v1/sites/{request.path_params['name']}/abandon-applications", "keepSite", problems.Reason.UNKNOWN_PARAMETER)
        abandon = _flag(request, "abandonApplications", also=("resourceVersion",))  # unknown and repeated ones refused first
        expected = _version(request)  # deleted only if unchanged since the caller read it
        if abandon:  # a cluster gone for good
            if kind != "Site":
                raise BadQuery("abandonApplications is for a Site only", "abandonApplications", problems.Reason.BAD_REQUEST)
            if expected is not None:
                raise BadQuery("abandonApplications deletes the Site whatever its version: it takes no resourceVersion",
                               "resourceVersion", problems.Reason.BAD_REQUEST)
            name = request.path_params["name"]
            deleted = await store.run(catalog.delete_site_abandoning, store, name, actor=caller.identity,
                                      reason=_reason(request, "delete"))
            services.changed(f"delete by {caller.identity}")
            return JSONResponse({"kind": kind, "name": name, "action": "deleted" if deleted else "applications-abandoned"})
        outcome = await store.run(catalog.delete_object, store, kind, request.path_params["name"], actor=caller.identity,
                                  reason=_reason(request, "delete"), expected_version=expected)
        services.changed(f"delete by {caller.identity}")
        return JSONResponse({"kind": kind, "name": outcome.name, "action": "deleted"})

    async def abandon_applications(request: Request, caller: auth.Caller) -> Response:
        """``POST /v1/sites/NAME/abandon-applications``: give up removing the Serve applications
        the Site left on targets it was moved off (a cluster gone for good); the Site stays."""
        if request.query_params:
            raise paging.unknown_parameters(sorted(request.query_params), "this route takes none")
        if catalog.resolve_kind(request.path_params["kind"]) != "Site":
            raise BadQuery("abandon-applications is for a Site only", reason=problems.Reason.BAD_REQUEST)
        name = request.path_params["name"]
        await store.run(catalog.delete_site_abandoning, store, name, actor=caller.identity,
                        reason=_reason(request, "abandon-applications"), keep_site=True)
        services.changed(f"abandon-applications by {caller.identity}")
        return JSONResponse({"kind": "Site", "name": name, "action": "applications-abandoned"})

    async def events(request: Request, caller: auth.Caller) -> Response:
        q = request.query_params
        paging.refuse_unknown(q, ["since", "limit", "last", "kind", "name", "site", "after", "before"])
        # at most MAX_LIMIT: the store reads no more at a time (fewer, said nowhere, looked like the end)
        limit = paging.whole_number(q["limit"], "limit", 1, paging.MAX_LIMIT) if "limit" in q else 100
        last = paging.whole_number(q["last"], "last", 0, paging.MAX_LIMIT) if "last" in q else 0
        digits = q.get("since", "0").removeprefix("-")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 40):  # ASCII, as limit: int() reads '٣' as 3
            raise BadQuery(f"since must be an event id (a whole number), not {q['since'][:40]!r}", "since")
        since = min(max(int(q.get("since", "0")), 0), EVENT_ID_MAX)  # an event id is a 64-bit integer: past the last one there is nothing
        if last and ("since" in q or "limit" in q):
            raise BadQuery("last (the newest events) cannot be combined with since and limit (a page forward from an event)",
                           reason=problems.Reason.BAD_REQUEST)
        kind = catalog.resolve_event_kind(q["kind"]) if q.get("kind") else None
        site = q.get("site") or None
        if site is not None and not site_name.PATTERN.fullmatch(site):
            raise BadQuery(f"site must be a site's name (lowercase letters, digits and '-'), not {site[:70]!r}", "site")
        after, before = (_event_time(q, bound) for bound in ("after", "before"))
        def read() -> tuple[list[Any], str, int, int]:
            # Event ids count from each store's own start: which store answered tells a client that
            # follows them (the console) when ids it read before are another store's; up to which
            # id retention deleted events, when one it asks after may have missed some; and the
            # newest id, when one it read is past it (the store restored from an older backup). The
            # newest id is read first: every event up to it was there for the read of the page, so
            # a follow of a filter (?site=) may ask after it next, not after the page's last.
            newest = store.events_last_id()
            found = (store.recent_events(kind, q.get("name"), last, site, after, before) if last
                     else store.events(since, limit, kind, q.get("name"), site, after, before))
            pruned = store.events_pruned_through()
            return found, store.store_id(), pruned, max(newest, pruned)

        found, ident, pruned, newest = await store.run(read)  # one turn on the store's threads
        return JSONResponse({"items": [_event(e) for e in found], "store": ident, "prunedThrough": pruned, "lastId": newest})

    async def cascades(request: Request, caller: auth.Caller) -> Response:
        paging.refuse_unknown(request.query_params, [], "this route")  # a few per fleet: the list is not paged
        name = request.path_params.get("name")
        items = (await services.cascades_with_capture())["items"]
        if name is None:
            return JSONResponse({"kind": "Cascade", "items": items})
        found = next((c for c in items if name in (c["name"], c["model"])), None)
        return JSONResponse(found) if found is not None else problems.answer(404, f"no cascade {name!r} (deployments with spec.cascade: "
                                                                      f"{', '.join(c['name'] for c in items) or 'none'})")

    async def placements(request: Request, caller: auth.Caller) -> Response:
        return await run_in_threadpool(JSONResponse, await services.placements_view(paging.parse(request.query_params, "placements")))

    async def endpoints(request: Request, caller: auth.Caller) -> Response:
        asking = services.table.query_caller(request.query_params)
        if not isinstance(asking, routing.NoRoute):
            model = request.path_params["model"]
            asking = scoping.bound_query(caller, (model, services.table.target(model)[0]), asking)
        if isinstance(asking, routing.NoRoute):
            return problems.no_route(asking)
        return JSONResponse(services.endpoints_view(request.path_params["model"], asking))

    async def create_token(request: Request, caller: auth.Caller) -> Response:
        paging.refuse_unknown(request.query_params, [], "this route (its settings are the JSON body's)")
        try:
            doc = json.loads(await bodies.read_body(request, 64 * 1024) or b"{}")
        except (ValueError, RecursionError):  # not JSON or UTF-8, an integer past int()'s digits, nested too deep
            return problems.answer(400, "body must be JSON: {\"purpose\": \"bootstrap\"|\"api\", \"role\": ..., \"ttlSeconds\": ...}")
        if not isinstance(doc, dict):
            return problems.answer(400, "body must be a JSON object")
        purpose = doc.get("purpose", "bootstrap")
        role = doc.get("role", "agent" if purpose == "bootstrap" else "read")
        ttl = doc.get("ttlSeconds", 3600 if purpose == "bootstrap" else None)
        if purpose not in ("bootstrap", "api"):
            return problems.answer(400, "purpose must be 'bootstrap' or 'api'", field="purpose")
        if purpose == "api" and role not in auth.ROLES:
            return problems.answer(400, f"role must be one of {', '.join(auth.ROLES)}", field="role")
        if purpose == "bootstrap" and role != "agent":  # an agent's join token: any other role was stored as given
            return problems.answer(400, "a bootstrap token's role is 'agent'", field="role")
        if ttl is None and purpose == "bootstrap":  # only static bootstrap tokens (edgeplane serve --bootstrap-token) never expire
            return problems.answer(400, "a bootstrap token expires: give ttlSeconds, or leave it out for an hour", field="ttlSeconds")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TOKEN_TTL_S):
            return problems.answer(400, f"ttlSeconds must be a positive number of seconds, at most {MAX_TOKEN_TTL_S} (10 years)",
                                   field="ttlSeconds")
        models, residency = doc.get("models", []), doc.get("residency", [])
        if (why := scoping.invalid_models(models)) is not None:
            return problems.answer(400, why, field="models")
        if (why := scoping.invalid_residency(residency)) is not None:
            return problems.answer(400, why, field="residency")
        if (models or residency) and purpose != "api":
            return problems.answer(400, "only an API token of role 'read' is scoped (models, residency): purpose 'api', role 'read' "
                                          "(edgeplane token create --role read); a bootstrap token admits an agent", field="models")
        if (models or residency) and role != "read":  # an admin could make itself an unscoped token: the scope would bind nothing
            return problems.answer(400, "a scoped token (models, residency) has role 'read'", field="role")
        models, residency = [m.strip() for m in models], scoping.normalised(residency)
        secret, info = await store.run(store.create_token, purpose, role, ttl, caller.identity, str(doc.get("description", ""))[:200],
                                       None, models, residency)
        made = {"token": secret, "id": info.id, "purpose": purpose, "role": role, "expiresAt": catalog.rfc3339(info.expires_at),
                "models": models, "residency": residency}
        if purpose == "bootstrap" and services.agent_ca_sha256:
            made["caSha256"] = services.agent_ca_sha256  # what the agent pins for its first join
        if (models or residency) and not services.gateway_checks_tokens:
            made["warning"] = ("this control plane's gateway checks no token (edgeplane serve --gateway-auth none), so the "
                               "scope binds nothing there; it binds gateways run with --gateway-auth token and agents run with --serve-auth token")
        return JSONResponse(made, status_code=201)

    async def list_tokens(request: Request, caller: auth.Caller) -> Response:
        """Every token's id, purpose, role, description, times and state; never a secret. Not
        paged: expired and revoked tokens are pruned with the events that name them."""
        paging.refuse_unknown(request.query_params, [], "this list")
        return JSONResponse({"kind": "Token", "items": [
            {"id": t.id, "purpose": t.purpose, "role": t.role, "description": t.description,
             "createdAt": catalog.rfc3339(t.created_at), "expiresAt": catalog.rfc3339(t.expires_at), "state": t.state,
             "models": list(t.models), "residency": list(t.residency)}
            for t in await store.run(store.tokens)]})

    async def revoke(request: Request, caller: auth.Caller) -> Response:
        what, name = request.path_params["what"], request.path_params["name"]
        paging.refuse_unknown(request.query_params, [], "this route (the reason goes in X-Edgeplane-Reason)")
        if what == "tokens":
            ok = await store.run(store.revoke_token, name, caller.identity, _reason(request, "revoked"))
            services.authenticator.forget_tokens()  # refused here at once; other replicas within the verdicts' few seconds
        elif what == "agents":
            ok = await store.run(store.revoke_agent, name, caller.identity, _reason(request, "agent identity revoked"))
            if ok:
                services.agent_revoked(name)  # its open streams end now, not at their next join
            services.changed(f"agent {name} revoked by {caller.identity}")
        else:
            return problems.answer(404, "revoke tokens/ID or agents/SITE", problems.Reason.NO_ROUTE)  # a path, not an object
        if not ok:
            unknown = f"no token with id {name!r} (edgeplane token list)" if what == "tokens" else f"no agent has joined as site {name!r}"
            return problems.answer(404, unknown, revoked=False)
        return JSONResponse({"revoked": True})

    async def simulate(request: Request, caller: auth.Caller) -> Response:
        """A what-if changes nothing, so read tokens may ask it."""
        q = request.query_params
        paging.refuse_unknown(q, ["each", "top"], "this route")
        _check_media_type(request)
        body = await bodies.read_body(request, MAX_BODY)
        try:
            top = int(q["top"]) if "top" in q else None
        except ValueError:
            raise BadQuery("top must be an integer", "top") from None
        try:
            return JSONResponse(await services.simulate(body, q.get("each"), top))
        except ScenarioError as exc:  # a budget refusal too: the scenario asks too much, say how to narrow it
            return problems.answer(422, str(exc))
        except simulate_api.Busy as exc:  # refused, not queued: the caller retries
            return problems.answer(429, str(exc), headers={"retry-after": str(exc.retry_after_s)})

    async def controlplane(request: Request, caller: auth.Caller) -> Response:
        paging.refuse_unknown(request.query_params, [], "this route")
        return JSONResponse(await services.leadership_view())

    async def healthz(request: Request) -> Response:
        if services.ready():
            return JSONResponse({"status": "ok"})
        # ``status`` as before there was a reason: probes and scripts read it
        return JSONResponse({**problems.body(503, "the control plane is not ready: it is starting, or stopping"), "status": "starting"},
                            status_code=503, headers={"retry-after": "1"})

    async def metrics(request: Request) -> Response:
        # Each replica counts what its own gateway answered, and behind one Service any of them
        # answers: the console keeps a baseline per replica, and needs to know which one and
        # whether it started since the page opened (its uptime, so no two clocks are compared).
        # Never OpenMetrics, even when Accept asks for it (ControlPlane.metrics says why).
        return Response(await services.metrics(), media_type=CONTENT_TYPE_LATEST, headers={
            "X-Edgeplane-Replica": services.replica_id, "X-Edgeplane-Uptime": f"{time.monotonic() - started:.3f}"})

    return [
        Route("/v1/apply", guarded(apply, write=True), methods=["POST"]),
        Route("/v1/delete", guarded(delete_bundle, write=True), methods=["POST"]),
        Route("/v1/placements", guarded(placements), methods=["GET"]),
        Route("/v1/cascades", guarded(cascades), methods=["GET"]),
        Route("/v1/cascades/{name}", guarded(cascades), methods=["GET"]),
        Route("/v1/events", guarded(events), methods=["GET"]),
        Route("/v1/endpoints/{model}", guarded(endpoints, scoped=True), methods=["GET"]),
        Route("/v1/tokens", guarded(create_token, write=True), methods=["POST"]),
        Route("/v1/tokens", guarded(list_tokens, write=True), methods=["GET"]),  # admin only, though a read
        Route("/v1/simulate", guarded(simulate), methods=["POST"]),
        Route("/v1/revoke/{what}/{name}", guarded(revoke, write=True), methods=["POST"]),
        Route("/v1/controlplane", guarded(controlplane), methods=["GET"]),
        Route("/v1/{kind}/{name}/abandon-applications", guarded(abandon_applications, write=True), methods=["POST"]),
        *maintenance_api.routes(services, guarded),
        methods.CatchAll("/v1/{kind}", guarded(list_kind), methods=["GET"]),
        methods.CatchAll("/v1/{kind}/{name}", guarded(get_one), methods=["GET"]),
        methods.CatchAll("/v1/{kind}/{name}", guarded(delete_one, write=True), methods=["DELETE"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


async def _read(request: Request, names_only: bool = False) -> loader.Reading:
    """The manifests in the body (``?file=`` names them in errors), those with errors included;
    ``names_only`` (a delete): documents without a ``spec`` need only their kind and name."""
    _check_media_type(request)
    body = await bodies.read_body(request, MAX_BODY)
    return await run_in_threadpool(loader.read_text, body, (request.query_params.get("file") or REQUEST)[:256], names_only=names_only)


def _check_media_type(request: Request) -> None:
    """:class:`mediatype.Unsupported` for a body declared as neither YAML nor JSON text in UTF-8."""
    mediatype.check(request.headers.get("content-type"), request.headers.get("content-encoding"))


#: The name errors give a body (its text before a bundle's first file) that ``?file=`` does not name.
REQUEST = "<request>"


def _holds_nothing(reading: loader.Reading) -> str:
    """Why a body that holds no documents is refused, naming its files (those of a bundle
    the CLI sends, or ``?file=``): a file of comments, or an empty one, given by mistake."""
    files = [f for f in reading.files if f != REQUEST]
    if not files:
        return "the request holds no documents"
    if len(files) == 1:
        return f"{files[0]} holds no documents"
    named = f"{', '.join(files[:3])} and {len(files) - 3} more files" if len(files) > 3 else f"{', '.join(files[:-1])} and {files[-1]}"
    return f"{named} hold no documents"


class BadQuery(problems.BadParameter):
    """A query parameter the route does not take, or a value it cannot read (answered 400)."""


FLAG_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _flag(request: Request, name: str, also: tuple[str, ...] = ("file",)) -> bool:
    """The one boolean query parameter of a route (``apply``, ``delete``; besides ``also``:
    ``file``, the name errors give a body, or a DELETE's ``resourceVersion``): ``1``,
    ``true``, ``yes`` or ``0``, ``false``, ``no`` (any case); absent is false. Any other
    value or parameter is refused, so that a misspelt ``dryRun`` never applies for real."""
    paging.refuse_repeated(request.query_params)
    unknown = sorted(set(request.query_params) - {name, *also})
    if unknown:
        raise paging.unknown_parameters(unknown, f"this route takes {' and '.join((name, *also))}")
    value = request.query_params.get(name, "false")
    if value.lower() not in FLAG_VALUES:
        raise BadQuery(f"{name} must be true or false, not {value[:40]!r}", name)
    return FLAG_VALUES[value.lower()]


def _version(request: Request) -> int | None:
    """A DELETE's ``?resourceVersion=``: the version the caller read (what get returns), which
    the object must still have to be deleted; None when not given."""
    given = request.query_params.get("resourceVersion")
    if given is None:
        return None
    if not catalog.VERSION_PATTERN.fullmatch(given):
        raise BadQuery(f"resourceVersion must be a number as returned by get, not {given[:40]!r}", "resourceVersion")
    return int(given)


def _reason(request: Request, default: str) -> str:
    """The caller's stated reason (``X-Edgeplane-Reason``), kept short for the event log."""
    return reasons.from_header(request.headers.get(reasons.HEADER), default)


def _event_time(query: Any, name: str) -> float | None:
    """The time of the events' query parameter ``name`` (``after``, ``before``) in epoch
    seconds: RFC 3339 with its offset (``2026-12-07T03:12:00Z``, ``…+01:00``), as events
    show theirs; a time without one is refused, not read in some zone the caller did not mean."""
    text = query.get(name)
    if text is None:
        return None
    try:  # RFC 3339 lets T and Z be written t and z, which fromisoformat refuses
        when = datetime.datetime.fromisoformat(text.upper())
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise BadQuery(f"{name} must be a time in RFC 3339 with its offset, e.g. 2026-12-07T03:12:00Z "
                       f"or 2026-12-07T04:12:00+01:00, not {text[:40]!r}"
                       + ("; a '+' in a URL's query is read as a space: write it %2B" if " " in text else ""), name)
    return when.timestamp()


def _event(e: store_mod.LoggedEvent) -> dict[str, Any]:
    details = dict(e.details)
    if isinstance(details.get("expiresAt"), (int, float)):
        details["expiresAt"] = catalog.rfc3339(details["expiresAt"])
    return {"id": e.id, "ts": catalog.rfc3339(e.ts), "actor": e.actor, "action": e.action, "kind": e.kind, "name": e.name,
            "reason": e.reason, "details": details}


def build_app(services: Services, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    # Specific routes (artifacts, the gateway) go before the generic /v1/{kind}/{name}.
    return Starlette(routes=[*(extra_routes or []), *build_routes(services)], exception_handlers=methods.EXCEPTION_HANDLERS)
