"""A standalone gateway's link to the control plane: the table watch, token checks, wakes.

:class:`TableFollower` keeps one ``GET /v1/endpoints?watch=1`` stream open to one of the
control-plane URLs it was given and applies every snapshot and delta to the gateway's
:class:`~orchestrator.gateway.endpoints.EndpointTable`. When the stream fails (refused,
cut, a 4xx/5xx, or silent for :attr:`TableFollower.silence_s`, three missed heartbeats)
it moves to the next URL after a pause that doubles from ``backoff_min_s`` up to
``backoff_max_s`` and resets after a snapshot. The table is never cleared on a failure:
the gateway keeps routing with the last one it had while the control plane is away, and
while the control plane has no table of its own yet (it sends heartbeats then, no snapshot).

:class:`TokenChecker` answers "is this API token valid" from ``GET /v1/whoami`` with a
small cache, so that ``--gateway-auth token`` costs one control-plane call per token per
:attr:`TokenChecker.ttl_s`, not one per request. A token already known valid stays valid
while no control plane answers, asked about again every :attr:`TokenChecker.retry_s` then.
Its verdicts are bounded as the control plane's are (:class:`~orchestrator.security.tokencache.VerdictTable`):
made-up tokens push out other refusals only, never the valid tokens in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import orjson

from orchestrator import proxyenv
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import wire
from orchestrator.security import admission, tokencache

log = logging.getLogger("edgeplane.gateway")


def describe(exc: BaseException) -> str:
    """One line for an HTTP failure: what happened, without a traceback."""
    if isinstance(exc, httpx.ConnectError):
        return f"unreachable ({exc or 'connection refused'})"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class WatchFailed(Exception):
    """The control plane answered the watch with something other than a stream of events."""


def decode_snapshot(line: str) -> tuple[str, int | None, wire.TableContents | None]:
    """(epoch, version, contents) of one watch event; contents None for an event that is no snapshot."""
    event = orjson.loads(line)
    if not isinstance(event, dict):
        raise WatchFailed("an event is not a JSON object")
    if event.get("type") != "snapshot":
        return "", None, None
    table = event.get("table")
    if not isinstance(table, dict):
        raise wire.WireError("a snapshot without a table")
    version = event.get("version")
    return str(event.get("epoch")), version if isinstance(version, int) else None, wire.contents_from_json(table)


def decode_event(line: str, current: tuple[str | None, int | None, wire.TableContents]) -> tuple[str, int | None, wire.TableContents] | None:
    """The table after one watch event, given the current (epoch, version, contents): a
    snapshot's own, or the current one with a delta applied; None for a heartbeat.

    A delta that does not follow the current version of the same epoch cannot be applied
    (an event lost, or a control plane restarted): :class:`WatchFailed`, and the watch
    starts over with a snapshot."""
    if line.startswith('{"type":"delta"'):
        event = orjson.loads(line)
        epoch, version = current[0], current[1]
        if event.get("epoch") != epoch or version is None or event.get("base") != version or not isinstance(event.get("version"), int):
            raise WatchFailed(f"a delta from version {event.get('base')} of {event.get('epoch')} "
                              f"does not follow this gateway's version {version} of {epoch}")
        return epoch, event["version"], wire.apply_delta(current[2], event)
    epoch_s, snapshot_version, contents = decode_snapshot(line)
    return None if contents is None else (epoch_s, snapshot_version, contents)


def next_pause(last_s: float | None, synced: bool, low_s: float, high_s: float) -> float:
    """How long to wait before watching again after a watch failed: ``low_s`` after the
    first failure or a watch that got a table (``synced``), else twice the last pause
    (``last_s``), up to ``high_s``."""
    return low_s if last_s is None or synced else min(high_s, last_s * 2)


class TableFollower:
    def __init__(self, urls: Sequence[str], table: endpoints_mod.EndpointTable, *, token: str | None = None,
                 silence_s: float = 15.0, connect_timeout_s: float = 3.0, backoff_min_s: float = 0.2, backoff_max_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("at least one control-plane URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.table = table
        self.silence_s = silence_s
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.clock = clock
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = proxyenv.async_client(timeout=httpx.Timeout(silence_s, connect=connect_timeout_s), headers=self._headers)
        self._index = 0
        #: The URL of the control plane the last snapshot came from (None before the first).
        self.source: str | None = None
        self.epoch: str | None = None
        self.version: int | None = None
        self.snapshots = 0  # whole tables applied since start
        self.deltas = 0  # changes applied since start
        self.contents = wire.contents_of(table)  # what the last event left (a delta applies to it)
        self.last_snapshot_at: float | None = None  # when the last snapshot or delta was applied
        self.last_error: str | None = None
        self.connected = False
        self._snapshot = asyncio.Condition()
        self._wakes: dict[str, asyncio.Task[None]] = {}  # by model: one call in flight per model

    @property
    def ready(self) -> bool:
        """A table has been received: the gateway can route (it stays so while the control plane is away)."""
        return self.snapshots > 0

    @property
    def current(self) -> str:
        return self.urls[self._index]

    async def close(self) -> None:
        for task in list(self._wakes.values()):
            task.cancel()
        await asyncio.gather(*self._wakes.values(), return_exceptions=True)
        await self._http.aclose()

    async def run(self) -> None:
        """Follow the control planes until cancelled."""
        pause: float | None = None
        while True:
            url = self.current
            before = self.snapshots
            try:
                await self._watch(url)
                problem = "closed the watch"
            except (httpx.HTTPError, WatchFailed, wire.WireError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
                problem = describe(exc)
            except Exception as exc:  # a bug of ours must not stop the gateway following: log it, back off, go on
                log.exception("control plane %s: following the endpoint table failed", url)
                problem = f"{type(exc).__name__}: {exc}"
            self.connected = False
            pause = next_pause(pause, self.snapshots > before, self.backoff_min_s, self.backoff_max_s)
            message = f"control plane {url}: {problem}"
            if message != self.last_error:
                log.warning("%s; %s in %.1fs", message,
                            "serving the last endpoint table, retrying" if self.ready else "no endpoint table yet, retrying", pause)
            self.last_error = message
            if len(self.urls) > 1:
                self._index = (self._index + 1) % len(self.urls)
            await asyncio.sleep(pause)

    async def _watch(self, url: str) -> None:
        async with self._http.stream("GET", f"{url}/v1/endpoints", params={"watch": "1"}) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                try:
                    reason = json.loads(body).get("error", body)
                except (ValueError, AttributeError):  # not JSON, or not an object: the body as it is
                    reason = body
                hint = " (no endpoint-table watch at this URL: is it an edgeplane control plane, of this version?)" \
                    if resp.status_code in (404, 405) else ""
                raise WatchFailed(f"HTTP {resp.status_code}: {str(reason)[:200]}{hint}")
            self.connected = True
            synced = False
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                if line.startswith('{"type":"heartbeat"'):
                    if not synced:  # a control plane sends no table before it has its first: the gateway keeps its own
                        self._note(f"control plane {url}: no endpoint table yet (its first pass has not ended); "
                                   + ("serving the last endpoint table meanwhile" if self.table.published else "waiting for it"))
                    continue  # it only had to arrive (the read timeout measures the silence)
                # A big table takes tens of milliseconds to decode: off the event loop, so
                # requests are not held behind it; only the swap into the table runs on it.
                # A delta follows a snapshot of the same connection.
                current = (self.epoch, self.version, self.contents) if synced else (None, None, self.contents)
                got = await asyncio.to_thread(decode_event, line, current)
                if got is not None:
                    await self._apply(url, *got, delta=line.startswith('{"type":"delta"'))
                    synced = True

    def _note(self, message: str) -> None:
        """Say why the table is not this control plane's yet: in the log once, and in :meth:`status`."""
        if message != self.last_error:
            log.warning("%s", message)
        self.last_error = message

    @property
    def updates(self) -> int:
        """Snapshots and deltas applied since start."""
        return self.snapshots + self.deltas

    async def _apply(self, url: str, epoch: str, version: int | None, contents: wire.TableContents, delta: bool = False) -> None:
        wire.apply(self.table, contents)
        first = not self.ready
        self.source, self.epoch, self.version, self.contents = url, epoch, version, contents
        if delta:
            self.deltas += 1
        else:
            self.snapshots += 1
        self.last_snapshot_at = self.clock()
        if self.last_error is not None or first:
            log.info("control plane %s: endpoint table version %s (%d endpoints)", url, self.version, len(self.table.all_endpoints()))
        self.last_error = None
        async with self._snapshot:
            self._snapshot.notify_all()

    async def wait_snapshot(self, after: int, timeout: float) -> bool:
        """Wait until more than ``after`` snapshots were applied; False if ``timeout`` passed first."""
        return await self._wait(lambda: self.snapshots > after, timeout)

    async def wait_update(self, after: int, timeout: float) -> bool:
        """Wait until more than ``after`` updates (snapshots and deltas) were applied."""
        return await self._wait(lambda: self.updates > after, timeout)

    async def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        async with self._snapshot:
            try:
                async with asyncio.timeout(timeout):
                    await self._snapshot.wait_for(done)
                return True
            except TimeoutError:
                return False

    def wake(self, model: str) -> None:
        """A request found ``model`` scaled to zero: tell the control plane (in the background),
        unless a call for it is on its way: one wake starts a replica, and a burst of
        requests for a cold model must not become a burst of calls."""
        if model in self._wakes:
            return
        task = asyncio.get_running_loop().create_task(self._wake(model))
        self._wakes[model] = task
        task.add_done_callback(lambda _: self._wakes.pop(model, None))

    async def _wake(self, model: str) -> None:
        for url in [self.current] + [u for u in self.urls if u != self.current]:
            with contextlib.suppress(httpx.HTTPError):
                resp = await self._http.post(f"{url}/v1/wake/{urllib.parse.quote(model, safe='')}", timeout=5.0)
                if resp.status_code < 500:
                    return
        log.warning("could not ask a control plane to wake %s", model)

    def status(self) -> dict[str, object]:
        age = None if self.last_snapshot_at is None else round(self.clock() - self.last_snapshot_at, 3)
        return {"ready": self.ready, "controlPlane": self.current, "connected": self.connected, "source": self.source,
                "epoch": self.epoch, "version": self.version, "snapshots": self.snapshots, "deltas": self.deltas, "secondsSinceSnapshot": age,
                "lastError": self.last_error, "endpoints": len(self.table.all_endpoints())}


@dataclass(frozen=True)
class Token:
    """A valid API token, as the rate limiter keys it, and its scope as ``GET /v1/whoami``
    says it (:mod:`orchestrator.gateway.scoping`; an earlier control plane's answer names
    none: it made no scoped token)."""

    id: str
    models: tuple[str, ...] = ()
    residency: tuple[str, ...] = ()


class Unverifiable(admission.TokenCheckUnavailable):
    """No control plane could say whether a token is valid (the gateway answers 503)."""


def is_token_shaped(secret: str) -> bool:
    """Whether ``secret`` is printable ASCII without spaces, as every token is (RFC 6750's
    token68 is narrower still)."""
    return bool(secret) and all("!" <= c <= "~" for c in secret)


def expiry(answer: object) -> float | None:
    """The Unix time ``GET /v1/whoami`` says the token expires at (``expiresAt``, RFC 3339);
    None when it never does. ValueError for an answer that is not one."""
    text = answer.get("expiresAt") if isinstance(answer, dict) else None
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"expiresAt {text!r} is not a time")
    return datetime.datetime.fromisoformat(text).timestamp()


def life_left(answer: object, wall: float) -> float | None:
    """How many seconds the token ``GET /v1/whoami`` answered for has left; None when it never
    expires. The control plane says it (``expiresInSeconds``), counted on its store's time, so
    this machine's clock, which may be hours from it, is compared with nothing; an earlier
    release's control plane says only ``expiresAt``, which is compared with ``wall``, this
    machine's Unix time. ValueError for an answer that is not one."""
    if expiry(answer) is None:
        return None
    left = answer.get("expiresInSeconds") if isinstance(answer, dict) else None
    if left is None:
        return expiry(answer) - wall  # type: ignore[operator]  # not None: checked above
    if isinstance(left, bool) or not isinstance(left, (int, float)) or not math.isfinite(left):
        raise ValueError(f"expiresInSeconds {left!r} is not a number of seconds")
    return float(left)


@dataclass(frozen=True)
class Verdict:
    """What the gateway knows of one token, on its own monotonic clock: ``token`` (None: not
    valid), used without asking until ``fresh_until``; a valid one is held while no control
    plane answers until ``valid_until``, its expiry (inf: none)."""

    token: Token | None
    fresh_until: float
    valid_until: float = math.inf

    def at(self, now: float) -> Token | None:
        """The token at ``now``: None once it has expired."""
        return self.token if self.valid_until > now else None


def judge(status: int, answer: object, *, now: float, wall: float, ttl_s: float, negative_ttl_s: float) -> Verdict | None:
    """What one control plane's answer to ``GET /v1/whoami`` (``status``, and its parsed JSON
    ``answer``; None when it is none) says of a token, at ``now`` on the gateway's clock and
    ``wall`` its Unix time (read only for an earlier release's answer: :func:`life_left`): a
    valid one is used ``ttl_s`` at most (a revoked token passes that long), never past its own
    expiry, by which it is refused; an invalid one ``negative_ttl_s``. None when the answer
    says nothing (a 5xx, a body not understood): the next control plane is asked."""
    if status in (401, 403):
        return Verdict(None, now + negative_ttl_s)
    if status != 200 or not isinstance(answer, dict):
        return None
    try:
        left = life_left(answer, wall)
    except ValueError:
        return None
    # a span of this clock from here, so a step of the wall clock later moves nothing
    valid_until = math.inf if left is None else now + left
    token_id = answer.get("id")
    if not token_id or valid_until <= now:  # expired: refused
        return Verdict(None, now + negative_ttl_s, valid_until)
    models, residency = answer.get("models") or [], answer.get("residency") or []
    if not all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in (models, residency)):
        return None  # a scope not understood is never read as none
    return Verdict(Token(str(token_id), tuple(models), tuple(residency)), min(now + ttl_s, valid_until), valid_until)


def held(known: Verdict | None, now: float, retry_s: float) -> Verdict:
    """The verdict on a token when no control plane answered, from what was known of it
    (``known``): one known valid stays valid until it expires, and is asked about again
    after ``retry_s``, not at each request (each would wait out every control plane's
    timeout, or add to the load of one whose store is down); :class:`Unverifiable` for one
    known invalid or never seen."""
    if known is None or known.token is None:
        raise Unverifiable("no control plane answered to check the token")
    return dataclasses.replace(known, fresh_until=min(now + retry_s, known.valid_until))


class TokenChecker:
    """Asks the control planes whether an API token is valid, and keeps the verdict: a valid
    one ``ttl_s`` (a revoked token passes that long at most), an invalid one
    ``negative_ttl_s``, and a valid one past that while no control plane answers (asking
    again every ``retry_s``); never past the token's own expiry, counted from the life the
    control plane says it has left (``wall``, this machine's Unix time, is compared with an
    earlier release's ``expiresAt`` only)."""

    def __init__(self, follower: TableFollower, *, ttl_s: float = 30.0, negative_ttl_s: float = 5.0, retry_s: float = 5.0,
                 max_entries: int = tokencache.MAX_ENTRIES, max_refused: int = tokencache.MAX_REFUSED,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.follower = follower
        self.ttl_s, self.negative_ttl_s, self.retry_s = ttl_s, negative_ttl_s, retry_s
        self.clock, self.wall = clock, wall
        self._cache: tokencache.VerdictTable[Verdict] = tokencache.VerdictTable(max_entries, max_refused)  # by key
        self._asking: dict[str, asyncio.Future[Token | None]] = {}  # one control-plane call per token at a time
        self._http = proxyenv.async_client(timeout=httpx.Timeout(5.0, connect=2.0))

    async def close(self) -> None:
        for asking in list(self._asking.values()):
            asking.cancel()
        await asyncio.gather(*self._asking.values(), return_exceptions=True)
        await self._http.aclose()

    @staticmethod
    def _key(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    def known(self, secret: str) -> Token | None:
        """The token when a kept verdict says it is valid, fresh or not, and it has not expired;
        None for one refused or never seen. Asks nothing (the admission tells a token in use
        from a guess with it before a control plane is asked)."""
        hit = self._cache.get(self._key(secret)) if is_token_shaped(secret) else None
        return hit.at(self.clock()) if hit is not None else None

    async def check(self, secret: str) -> Token | None:
        """Valid (a :class:`Token`) or not (None); :class:`Unverifiable` when nobody can tell."""
        if not is_token_shaped(secret):  # no token holds such a character, and it cannot go into a header to ask
            return None
        key = self._key(secret)
        hit = self._cache.get(key)
        if hit is not None and hit.fresh_until > self.clock():
            return hit.token  # fresh: not past its expiry
        asking = self._asking.get(key)
        if asking is None:  # callers with the same new token wait for one call, which a caller leaving does not cancel
            asking = asyncio.ensure_future(self._ask(secret, key, hit))
            self._asking[key] = asking
            asking.add_done_callback(lambda done: (self._asking.pop(key, None), done.cancelled() or done.exception()))
        return await asyncio.shield(asking)

    async def _ask(self, secret: str, key: str, hit: Verdict | None) -> Token | None:
        urls = [self.follower.current] + [u for u in self.follower.urls if u != self.follower.current]
        for url in urls:
            try:
                resp = await self._http.get(f"{url}/v1/whoami", headers={"authorization": f"Bearer {secret}"})
            except httpx.HTTPError:
                continue
            try:
                answer = resp.json() if resp.status_code == 200 else None
            except ValueError:
                answer = None
            verdict = judge(resp.status_code, answer, now=self.clock(), wall=self.wall(), ttl_s=self.ttl_s,
                            negative_ttl_s=self.negative_ttl_s)
            if verdict is not None:
                return self._keep(key, verdict)
        return self._keep(key, held(hit, self.clock(), self.retry_s))

    def _keep(self, key: str, verdict: Verdict) -> Token | None:
        self._cache.put(key, verdict, valid=verdict.token is not None)
        return verdict.at(self.clock())
