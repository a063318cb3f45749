"""What standalone gateways (``edgeplane gateway``) ask the control plane.

- ``GET /v1/endpoints``: the endpoint table (:mod:`orchestrator.gateway.wire`) once;
  with ``?watch=1`` a stream of newline-delimited JSON events that stays open: a
  ``snapshot`` at once, a ``delta`` per version after every change of the table (what
  changed only; a watcher that fell more than :data:`DELTAS_KEPT` versions behind gets a
  ``snapshot`` again), a ``heartbeat`` every
  :data:`HEARTBEAT_S` seconds in between, so a gateway notices a dead connection by the
  silence. Each event carries the control plane's ``epoch`` (new at every start) and the
  table's ``version`` (counted from 0 in that epoch). Until the control plane has its
  first table (:attr:`EndpointTable.published`: a replica on a shared database before it
  read the leader's, a control plane before its first pass) the stream holds the snapshot
  back and sends heartbeats: that empty table is no fleet's, and a gateway that took it
  would answer "not deployed" for models its replicas serve. A gateway of any version
  keeps routing with the table it has meanwhile; the one-shot answer is a 503 then. The token is checked again before
  each event after the first (the heartbeats while the snapshot is held back, and the
  snapshot, included): once it is revoked or expires, the stream ends (and a reconnect
  gets 401).
- ``GET /v1/whoami``: who the bearer token is (200) or 401: a gateway with
  ``--gateway-auth token`` checks its callers' tokens with it.
- ``POST /v1/wake/{model}``: a request for a model scaled to zero reached a standalone
  gateway; the autoscaler starts a replica as for a request at the control plane.

All three pass the same authentication as the other read APIs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from orchestrator import catalog
from orchestrator.api import auth, paging, problems
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import wire
from orchestrator.store import sqlite as store_mod

HEARTBEAT_S = 5.0
DELTAS_KEPT = 32  # a watcher further behind than this many versions gets a snapshot


class TablePublisher:
    """The table's current contents and version; watchers wait on :meth:`wait_change`.

    A change is found by comparing the table's contents as values (cheap next to encoding
    them), and the snapshot is encoded once per version, when a watcher first asks for it:
    with no gateway watching, publishing costs one comparison per reconcile pass."""

    def __init__(self, table: endpoints_mod.EndpointTable) -> None:
        self.table = table
        self.epoch = f"{int(time.time())}-{secrets.token_hex(4)}"
        self.version = 0
        self.contents = wire.contents_of(table)
        self.published = table.published
        self.closed = False
        self._changed = asyncio.Event()
        self._encoded: tuple[int, bytes] | None = None  # the current snapshot event, encoded once for every watcher
        # the contents of the last versions, for deltas to watchers a few versions behind
        self._history: collections.deque[tuple[int, wire.TableContents]] = collections.deque([(0, self.contents)], maxlen=DELTAS_KEPT + 1)
        self._deltas: dict[int, bytes] = {}  # version -> its delta event, encoded once for every watcher

    def publish(self) -> None:
        """Called after each change of the table: a new version when its contents differ."""
        contents = wire.contents_of(self.table)
        if contents == self.contents and self.table.published == self.published:
            return  # (a first table equal to the empty one is a new version all the same: watchers wait for it)
        self.contents, self.published = contents, self.table.published
        self.version += 1
        self._history.append((self.version, contents))
        for old in [v for v in self._deltas if v <= self.version - DELTAS_KEPT]:
            del self._deltas[old]
        self._wake()

    def close(self) -> None:
        """End every watch (the control plane is stopping)."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_change(self, seen: int, timeout: float) -> None:
        """Return when the version is no longer ``seen``, the publisher closed, or ``timeout`` passed."""
        if self.version != seen or self.closed:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    def heartbeat(self) -> bytes:
        return orjson.dumps({"type": "heartbeat", "epoch": self.epoch, "version": self.version}) + b"\n"

    async def snapshot(self) -> bytes:
        """The current snapshot event, encoded off the event loop once per version (a big
        table takes tens of milliseconds to encode, which requests must not wait behind)."""
        version, contents = self.version, self.contents
        if self._encoded is not None and self._encoded[0] == version:
            return self._encoded[1]
        line = await asyncio.to_thread(self._encode, version, contents)
        if self._encoded is None or self._encoded[0] < version:
            self._encoded = (version, line)
        return line

    async def since(self, seen: int) -> tuple[int, bytes]:
        """(version, events) that take a watcher at version ``seen`` to the current version:
        the deltas in order while the publisher keeps every version in between, else a snapshot."""
        version = self.version
        kept = dict(self._history)
        if seen >= version or any(v not in kept for v in range(seen, version + 1)):
            return version, await self.snapshot()
        lines = {v: self._deltas[v] for v in range(seen + 1, version + 1) if v in self._deltas}
        todo = [(v, kept[v - 1], kept[v]) for v in range(seen + 1, version + 1) if v not in lines]
        if todo:  # encoded off the event loop, once for every watcher
            encoded = await asyncio.to_thread(lambda: {v: self._encode_delta(v, old, new) for v, old, new in todo})
            lines.update(encoded)
            self._deltas.update((v, line) for v, line in encoded.items() if v > self.version - DELTAS_KEPT)
        return version, b"".join(lines[v] for v in range(seen + 1, version + 1))

    def _encode_delta(self, version: int, old: wire.TableContents, new: wire.TableContents) -> bytes:
        body = {"type": "delta", "epoch": self.epoch, "version": version, "base": version - 1, **wire.delta_to_json(old, new)}
        return orjson.dumps(body) + b"\n"

    def _encode(self, version: int, contents: wire.TableContents) -> bytes:
        body = {"type": "snapshot", "epoch": self.epoch, "version": version, "table": wire.contents_to_json(contents)}
        return orjson.dumps(body) + b"\n"


def routes(authenticator: auth.Authenticator, store: store_mod.Store, publisher: TablePublisher,
           heartbeat_s: float = HEARTBEAT_S) -> list[BaseRoute]:
    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            refused = await authenticator.admit(request)
            if isinstance(refused, Response):
                return refused
            return await handler(request)

        return endpoint

    async def stream(authorization: str | None) -> AsyncIterator[bytes]:
        # admitted just now: the first event needs no second look at the token, every later one does
        while not publisher.published and not publisher.closed:  # no table of the fleet yet: nothing to send but liveness
            yield publisher.heartbeat()
            await publisher.wait_change(publisher.version, heartbeat_s)
            if not await authenticator.still_valid(authorization):  # revoked while it waited: not the table it waited for
                return
        if publisher.closed:
            return
        seen = publisher.version
        yield await publisher.snapshot()
        while not publisher.closed:
            await publisher.wait_change(seen, heartbeat_s)
            if publisher.closed or not await authenticator.still_valid(authorization):  # revoked or expired meanwhile
                return
            if publisher.version != seen:
                seen, events = await publisher.since(seen)
                yield events
            else:
                yield publisher.heartbeat()

    async def endpoints(request: Request) -> Response:
        try:
            paging.refuse_unknown(request.query_params, ["watch"], "this route")
        except problems.BadParameter as exc:
            return problems.refusal(exc)
        watch = request.query_params.get("watch", "")
        if watch not in ("", "0", "1", "true", "false"):
            return problems.answer(400, "watch must be 1 or 0", problems.Reason.INVALID_PARAMETER, parameter="watch")
        if watch in ("1", "true"):
            return StreamingResponse(stream(request.headers.get("authorization")), media_type="application/x-ndjson",
                                     headers={"cache-control": "no-cache"})
        if not publisher.published:
            return problems.answer(503, "no endpoint table yet: the control plane's first pass has not ended; retry in a few seconds",
                                   headers={"retry-after": "2"})
        return Response(await publisher.snapshot(), media_type="application/json")

    async def whoami(request: Request) -> Response:
        if (refused := _refuse_unknown(request)) is not None:
            return refused
        secret = auth.bearer_secret(request.headers.get("authorization"))
        if secret is None:
            if authenticator.required:
                return auth.unauthorized(auth.TOKEN_NEEDED, token_given=False)
            return JSONResponse({"id": None, "identity": "anonymous", "role": "admin"})
        try:
            info = await authenticator.verify(secret)
        except store_mod.StoreError as exc:  # the store that holds the tokens does not answer (logged by verify)
            return auth.store_refusal(exc, None)
        if info is None:
            return auth.unauthorized(auth.TOKEN_REFUSED, token_given=True)
        # a standalone gateway keeps the verdict no longer than this: the life left on the store's
        # time, which the tokens' expiry is on, so that the gateway's own clock is compared with nothing
        left = None if info.expires_at is None else round(info.expires_at - authenticator.store.now(), 3)
        return JSONResponse({"id": info.id, "identity": f"token:{info.id}", "role": info.role, "expiresAt": catalog.rfc3339(info.expires_at),
                             "expiresInSeconds": left, "models": list(info.models), "residency": list(info.residency)})

    async def wake(request: Request) -> Response:
        if (refused := _refuse_unknown(request)) is not None:
            return refused
        model = request.path_params["model"]
        cold = publisher.table.is_cold(model)
        if cold:
            publisher.table.wake(model)
        return JSONResponse({"model": model, "woken": cold}, status_code=202 if cold else 200)

    return [
        Route("/v1/endpoints", guarded(endpoints), methods=["GET"]),
        Route("/v1/whoami", whoami, methods=["GET"]),
        Route("/v1/wake/{model}", guarded(wake), methods=["POST"]),
    ]


def _refuse_unknown(request: Request) -> Response | None:
    """The 400 of a route that takes no query parameter, given one (read as nothing, a
    parameter meant elsewhere did something other than what was asked)."""
    try:
        paging.refuse_unknown(request.query_params, [], "this route")
    except problems.BadParameter as exc:
        return problems.refusal(exc)
    return None
