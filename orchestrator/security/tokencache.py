"""API-token verdicts looked up off the event loop and kept a few seconds.

Why: the control API, the watch and the gateway ask on every request whether a bearer token
is valid. On PostgreSQL that lookup is a network round trip with no bound; made on the event
loop it held up every request, health probe and agent stream of the process behind it (a
stalled database froze them all). So a lookup runs off the loop (on the store's threads),
callers with the same token share one lookup, and its verdict is kept
:attr:`TokenVerdicts.ttl_s` seconds, so the gateway's hot path costs a dictionary read, not a
thread hop and a query per request.

What that costs revocation: :meth:`TokenVerdicts.forget` drops every verdict at once, and the
process that revokes a token calls it, so there the token is refused at once; another replica
sharing the store refuses it within ``ttl_s``. A valid verdict never outlives the token's own
expiry. Nothing is kept when the lookup fails (the store does not answer): the error reaches
the caller, which answers 503.
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


class Expiring(Protocol):
    """A valid token as the store describes it: when it expires (wall-clock seconds), if ever."""

    @property
    def expires_at(self) -> float | None: ...


T = TypeVar("T", bound=Expiring)


class TokenVerdicts(Generic[T]):
    def __init__(self, lookup: Callable[[str], Awaitable[T | None]], *, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        """``lookup``: the check (the store's), which waits off the event loop; ``wall``: the
        clock the tokens' expiry is on (the store's)."""
        self._lookup = lookup
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._clock, self._wall = clock, wall
        self._kept: collections.OrderedDict[bytes, tuple[T | None, float]] = collections.OrderedDict()  # digest -> (verdict, until)
        self._asking: dict[bytes, asyncio.Future[T | None]] = {}
        self._generation = 0  # bumped by forget(): a lookup begun before it must not be kept

    async def verify(self, secret: str) -> T | None:
        """The token's description when it is valid, None when not; the lookup's error (the
        store's) when it must ask and cannot."""
        key = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
        kept = self._kept.get(key)
        if kept is not None and kept[1] > self._clock() and not self._expired(kept[0]):
            return kept[0]
        asking = self._asking.get(key)
        if asking is None:  # callers with the same token wait for one lookup, which a caller leaving does not cancel
            asking = asyncio.ensure_future(self._ask(secret, key))
            self._asking[key] = asking
            asking.add_done_callback(lambda done: self._asked(key, done))
        return await asyncio.shield(asking)

    def forget(self) -> None:
        """Drop every verdict (a token was revoked): the next check of each token asks again."""
        self._generation += 1
        self._kept.clear()
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
            self._kept[key] = (verdict, self._clock() + self.ttl_s)
            self._kept.move_to_end(key)
            while len(self._kept) > self.max_entries:
                self._kept.popitem(last=False)
        return verdict

    def _expired(self, verdict: T | None) -> bool:
        return verdict is not None and verdict.expires_at is not None and verdict.expires_at < self._wall()
