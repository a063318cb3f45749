"""The store's own worker threads: what the event loop asks of the store runs on them.

Why its own pool: a store call may wait as long as the database stalls (a frozen host, a lock
held by another replica). On asyncio's default pool (``asyncio.to_thread``) a fleet of agents
rejoining during a stall, or a burst of API reads, would take every thread, and the work that
never touches the database (a request body inflated, an artifact hashed, a TLS chain fetched)
would queue behind them. Here the store's calls queue among themselves, in the order they
came, on a few threads: the store has one connection, which one call at a time uses, so
more threads would only wait on its lock. A caller that goes (a cancelled request, a join
that timed out) takes its call out of the queue if it has not started.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from orchestrator.store.values import StoreError

P = ParamSpec("P")
T = TypeVar("T")

#: Threads a store lends its callers by default (``edgeplane serve --store-threads``).
DEFAULT_THREADS = 4
THREADS = (1, 256)  # the range a setting may take


class StoreThreads:
    """A bounded pool that runs the store's calls off the event loop."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        if not THREADS[0] <= threads <= THREADS[1]:
            raise ValueError(f"a store's threads must be from {THREADS[0]} to {THREADS[1]}, not {threads}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="store")

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on one of these threads, with the caller's context (as
        ``asyncio.to_thread`` runs it on the default pool). StoreError once closed."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        try:
            answer = asyncio.get_running_loop().run_in_executor(self._pool, call)
        except RuntimeError:  # shut down: the server is stopping
            raise StoreError("the store is closed") from None
        return await answer

    def close(self) -> None:
        """Refuse new calls and drop the queued ones (their callers see them cancelled); a call
        running goes on to its end without being waited for (it may wait on a stalled database)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
