"""Routes for captured cascade traffic: reading and deleting it needs the ``admin`` role.

Captured requests are personal data, so unlike the rest of the API even reading them is
an admin action, and every read and delete is written to the event log (``action``
``capture-read`` / ``capture-delete``, actor, zone, how many records read or whether the
one to erase was found) — the audit trail an operator shows a data protection officer.

- ``GET /v1/captures/{zone}?deployment=NAME&limit=N`` — the newest N (1 to 10,000; 100 when not given) record
  summaries, oldest first (no payloads);
  ``&payload=true`` adds the base64 request and answer bodies. The zone's expired records
  are purged first (each deployment's current retention).
- ``DELETE /v1/captures/{zone}/{id}`` — erase one record (a data subject's request). Its
  audit event is written first: an erasure the event log cannot take now is not made
  (503 with Retry-After, as every route answers a store that does not answer; asking again
  erases it), so the log never misses one. Being written first, it says whether the record
  was there (``found``), not that it was erased: a purge may erase it first, and the caller
  is then answered 404.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from orchestrator import catalog, reasons
from orchestrator.api import auth, paging, problems
from orchestrator.distill import store as capture_store
from orchestrator.store import sqlite as store_mod

#: The most record summaries one read answers (``limit``; 100 when not given).
MAX_RECORDS = 10_000


def routes(authenticator: auth.Authenticator, store: store_mod.Store, captures: capture_store.ZoneStores,
           clock: Callable[[], float] = time.time) -> list[BaseRoute]:
    def admin_only(handler: Callable[[Request, auth.Caller], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            caller = await authenticator.admit(request, write=True, needs="captured data needs 'admin'")
            if isinstance(caller, Response):
                return caller
            zone = request.path_params["zone"].upper()
            if zone not in captures.zones():
                return problems.answer(404, f"no captured data in zone {zone!r} (zones: {', '.join(captures.zones()) or 'none'})")
            try:
                return await handler(request, caller)
            except problems.BadParameter as exc:
                return problems.refusal(exc)
            except store_mod.StoreError as exc:
                return auth.store_refusal(exc, caller, request)
        return endpoint

    async def read(request: Request, caller: auth.Caller) -> Response:
        zone = request.path_params["zone"].upper()
        q = request.query_params
        paging.refuse_unknown(q, ["limit", "payload", "deployment"])
        # past the most, refused as the lists do: cut silently, the newest 10,000 looked like all of them
        limit = paging.whole_number(q["limit"], "limit", 1, MAX_RECORDS) if "limit" in q else 100
        payload = q.get("payload", "false").lower() in ("1", "true", "yes")
        deployment = q.get("deployment")
        retention = await store.run(catalog.capture_retention, store)

        def read_zone() -> tuple[int, bytes]:
            # in a thread, as the API's other heavy work: a purge, a read and the encoding of up to
            # 10,000 payloads would otherwise stall the event loop the gateway serves on
            zs = captures.zone(zone)
            zs.purge(clock(), retention)
            items = []
            for r in zs.records(deployment, now=clock(), limit=limit, newest=True):
                item = r.summary()
                item["capturedAt"], item["expiresAt"] = catalog.rfc3339(r.captured_at), catalog.rfc3339(r.expires_at)
                if payload:
                    item["input"] = base64.b64encode(r.input).decode()
                    item["output"] = base64.b64encode(r.output).decode()
                items.append(item)
            return len(items), json.dumps({"zone": zone, "items": items}).encode()
        count, body = await asyncio.to_thread(read_zone)
        await store.run(store.record, store_mod.Event(caller.identity, "capture-read", "ModelDeployment", deployment or "*",
                                                      reasons.from_header(request.headers.get(reasons.HEADER), "read captured records"),
                                                      {"zone": zone, "records": count, "payload": payload}))
        return Response(body, media_type="application/json")

    async def delete(request: Request, caller: auth.Caller) -> Response:
        zone, record_id = request.path_params["zone"].upper(), request.path_params["id"]
        paging.refuse_unknown(request.query_params, [], "this route")
        records = captures.zone(zone)
        held = await asyncio.to_thread(records.holds, record_id)
        # the audit first (two databases: no transaction holds both): a failed write of it leaves the record, to erase again
        await store.run(store.record, store_mod.Event(caller.identity, "capture-delete", "CapturedRecord", record_id,
                                                      reasons.from_header(request.headers.get(reasons.HEADER), "erasure request"),
                                                      {"zone": zone, "found": held}))
        if not (held and await asyncio.to_thread(records.delete, record_id)):  # (or erased meanwhile, by a purge)
            return problems.answer(404, f"no record {record_id!r} in zone {zone}")
        return JSONResponse({"zone": zone, "id": record_id, "action": "deleted"})

    return [
        Route("/v1/captures/{zone}", admin_only(read), methods=["GET"]),
        Route("/v1/captures/{zone}/{id}", admin_only(delete), methods=["DELETE"]),
    ]
