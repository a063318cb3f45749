"""The store's own worker threads: what the event loop asks of the store runs on them.

Why its own pool: a store call may wait as long as the database stalls (a frozen host, a lock
held by another replica). On asyncio's default pool (``asyncio.to_thread``) a fleet of agents
rejoining during a stall, or a burst of API reads, would take every thread, and the work that
never touches the database (a request body inflated, an artifact hashed, a TLS chain fetched)
would queue behind them. Here the store's calls queue among themselves, in the order they
came, on a few threads: the store has one connection, which one call at a time uses, so
more threads would only wait on its lock. A caller that goes (a cancelled request, a join
that timed out) takes its call out of the queue if it has not started.

Why a lane apart for the lease: the leader renews its lease every third of its time to live.
Behind the queue a stall leaves (a fleet rejoining, API reads), a renewal would wait for all of
it to drain once the database answers, and the leader lose its lease, and the fleet its leader,
for its own backlog rather than the database. The lease's calls (:meth:`StoreThreads.run_first`)
take a thread of their own, one at a time as the election makes them, and the connection's lock
(:class:`ConnectionLock`) lets them in before every other call waiting for it: a renewal waits
for the one call that has the connection, never for the queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from orchestrator.store.values import StoreUnavailable

P = ParamSpec("P")
T = TypeVar("T")

#: Threads a store lends its callers by default (``edgeplane serve --store-threads``).
DEFAULT_THREADS = 4
THREADS = (1, 256)  # the range a setting may take

_lane = threading.local()  # ``first`` is set on the lease's thread


def _on_the_lane() -> None:
    _lane.first = True


class StoreThreads:
    """A bounded pool that runs the store's calls off the event loop, and a lane for the lease's."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        if not THREADS[0] <= threads <= THREADS[1]:
            raise ValueError(f"a store's threads must be from {THREADS[0]} to {THREADS[1]}, not {threads}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="store")
        self._first = ThreadPoolExecutor(1, thread_name_prefix="store-lease", initializer=_on_the_lane)

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on one of these threads, with the caller's context (as
        ``asyncio.to_thread`` runs it on the default pool). StoreUnavailable once closed."""
        return await self._submit(self._pool, fn, *args, **kwargs)

    async def run_first(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """As :meth:`run`, for the lease's calls (gain, renew, release): ahead of every call
        queued, and first to the connection once the call that has it ends."""
        return await self._submit(self._first, fn, *args, **kwargs)

    async def _submit(self, pool: ThreadPoolExecutor, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        try:
            answer = asyncio.get_running_loop().run_in_executor(pool, call)
        except RuntimeError:  # shut down: the server is stopping
            raise StoreUnavailable("the store is closed") from None
        return await answer

    def close(self) -> None:
        """Refuse new calls and drop the queued ones (their callers see them cancelled); a call
        running goes on to its end without being waited for (it may wait on a stalled database)."""
        for pool in (self._first, self._pool):
            pool.shutdown(wait=False, cancel_futures=True)


class ConnectionLock:
    """The store's one connection, held by one call at a time (reentrant: a call may nest
    others); a call on the lease's lane (:meth:`StoreThreads.run_first`) takes it before the
    calls already waiting. ``threading.RLock`` hands it to whichever waiter wakes first, which
    may be each of the store's threads in turn, each taking the next call from the queue."""

    def __init__(self) -> None:
        self._state = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._first_waiting = 0

    def acquire(self, timeout: float = -1) -> bool:
        """True once held; False if ``timeout`` (seconds, -1: none) passed first."""
        me, first = threading.get_ident(), getattr(_lane, "first", False)
        with self._state:
            if self._owner != me:
                self._first_waiting += first
                try:
                    if not self._state.wait_for(lambda: self._owner is None and (first or not self._first_waiting),
                                                None if timeout < 0 else timeout):
                        self._state.notify_all()  # a lease call that gave up no longer keeps the others waiting
                        return False
                finally:
                    self._first_waiting -= first
                self._owner = me
            self._depth += 1
            return True

    def release(self) -> None:
        with self._state:
            if self._owner != threading.get_ident():
                raise RuntimeError("the store's connection lock released by a thread that does not hold it")
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._state.notify_all()

    def __enter__(self) -> ConnectionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["DEFAULT_THREADS", "THREADS", "ConnectionLock", "StoreThreads"]
