"""API-token verdicts looked up off the event loop and kept a few seconds.

Why: the control API, the watch and the gateway ask on every request whether a bearer token
is valid. On PostgreSQL that lookup is a network round trip with no bound; made on the event
loop it held up every request, health probe and agent stream of the process behind it (a
stalled database froze them all). So a lookup runs off the loop (on the store's threads),
callers with the same token share one lookup, and its verdict is kept
:attr:`TokenVerdicts.ttl_s` seconds, so the gateway's hot path costs a dictionary read, not a
thread hop and a query per request.

The kept verdicts are bounded, least recently used out first (:class:`VerdictTable`), and
refusals are kept apart from valid tokens: a client that sends made-up tokens, each a new
refusal, only ever pushes out other refusals, never the valid tokens in use, which would then
each cost a lookup again.

What that costs revocation: :meth:`TokenVerdicts.forget` makes every verdict stale at once, and
the process that revokes a token calls it, so there the token is refused at once; another replica
sharing the store refuses it within ``ttl_s``. A valid verdict never outlives the token's own
expiry. Nothing is kept when the lookup fails (the store does not answer): the error reaches
the caller, which answers 503. A stale verdict is not dropped: :meth:`TokenVerdicts.known`
still tells the tokens in use from guesses by it, so that one revocation does not send every
valid client behind a proxy to the proxy address's rate-limit bucket (its next check asks).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

TTL_S = 5.0
MAX_ENTRIES = 10_000
MAX_REFUSED = 1_000  # refusals kept (a client retrying a revoked token), apart from the valid ones


class Expiring(Protocol):
    """A valid token as the store describes it: when it expires (wall-clock seconds), if ever."""

    @property
    def expires_at(self) -> float | None: ...


T = TypeVar("T", bound=Expiring)
V = TypeVar("V")


class VerdictTable(Generic[V]):
    """Verdicts by key, in two bounded tables: valid tokens' (``max_valid``) and refusals'
    (``max_refused``), each dropping its least recently used entry when full; reading one
    makes it the most recently used."""

    def __init__(self, max_valid: int, max_refused: int) -> None:
        self.max_valid, self.max_refused = max_valid, max_refused
        self._valid: collections.OrderedDict[bytes | str, V] = collections.OrderedDict()
        self._refused: collections.OrderedDict[bytes | str, V] = collections.OrderedDict()

    def get(self, key: bytes | str) -> V | None:
        for table in (self._valid, self._refused):
            if (found := table.get(key)) is not None:
                table.move_to_end(key)
                return found
        return None

    def put(self, key: bytes | str, verdict: V, *, valid: bool) -> None:
        self._valid.pop(key, None)
        self._refused.pop(key, None)
        table, limit = (self._valid, self.max_valid) if valid else (self._refused, self.max_refused)
        table[key] = verdict
        while len(table) > limit:
            table.popitem(last=False)


class TokenVerdicts(Generic[T]):
    def __init__(self, lookup: Callable[[str], Awaitable[T | None]], *, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES,
                 max_refused: int = MAX_REFUSED, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        """``lookup``: the check (the store's), which waits off the event loop; ``wall``: the
        clock the tokens' expiry is on (the store's); ``max_entries`` valid tokens kept and
        ``max_refused`` refusals."""
        self._lookup = lookup
        self.ttl_s = ttl_s
        self._clock, self._wall = clock, wall
        # digest -> (verdict, until, the generation it was looked up in: one before forget() is stale)
        self._kept: VerdictTable[tuple[T | None, float, int]] = VerdictTable(max_entries, max_refused)
        self._asking: dict[bytes, asyncio.Future[T | None]] = {}
        self._generation = 0  # bumped by forget(): a lookup begun before it must not be kept

    async def verify(self, secret: str) -> T | None:
        """The token's description when it is valid, None when not; the lookup's error (the
        store's) when it must ask and cannot."""
        key = _digest(secret)
        kept = self._kept.get(key)
        if kept is not None and kept[1] > self._clock() and kept[2] == self._generation and not self._expired(kept[0]):
            return kept[0]
        asking = self._asking.get(key)
        if asking is None:  # callers with the same token wait for one lookup, which a caller leaving does not cancel
            asking = asyncio.ensure_future(self._ask(secret, key))
            self._asking[key] = asking
            asking.add_done_callback(lambda done: self._asked(key, done))
        return await asyncio.shield(asking)

    def known(self, secret: str) -> T | None:
        """The token when a kept verdict says it is valid, fresh or not (stale after a
        revocation too), and it has not expired since; None for a token refused or never seen. Asks nothing: the gateway tells a token
        in use from a guess with it before any lookup (:mod:`orchestrator.security.admission`)."""
        kept = self._kept.get(_digest(secret))
        return kept[0] if kept is not None and kept[0] is not None and not self._expired(kept[0]) else None

    def forget(self) -> None:
        """Every kept verdict goes stale (a token was revoked): the next check of each token
        asks again. They are kept for :meth:`known`: the revoked token's own check refuses it."""
        self._generation += 1
        self._asking.clear()  # lookups under way may have read the store before the revocation

    def _asked(self, key: bytes, done: asyncio.Future[T | None]) -> None:
        if self._asking.get(key) is done:  # not a lookup begun after a forget()
            del self._asking[key]
        if not done.cancelled():
            done.exception()  # retrieved: an error no caller waited for is not "never retrieved"

    async def _ask(self, secret: str, key: bytes) -> T | None:
        generation = self._generation
        verdict = await self._lookup(secret)
        if generation == self._generation:
            self._kept.put(key, (verdict, self._clock() + self.ttl_s, generation), valid=verdict is not None)
        return verdict

    def _expired(self, verdict: T | None) -> bool:
        return verdict is not None and verdict.expires_at is not None and verdict.expires_at < self._wall()


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
