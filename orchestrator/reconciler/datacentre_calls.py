"""Calls to data centres that run beside the reconcile passes, not inside them.

A data centre's API may take a call and answer only at its timeout: a Ray dashboard that
answers at the client's 15 s, a Kubernetes API at 30 s, an embedded Ray head that takes
seconds to start. Awaited inside the pass, one such call held every other site with it: the
edge agents' new sets, a deploy's statuses, a drain's next step, each waited on an unrelated
cluster, at every try. Here each call is a task of its own, keyed by the site (or the target
it left) that it reaches, one at a time per key. A pass waits for the calls it started at
most ``WAIT_S``, takes the outcome of every call that has ended by then, and leaves the
others running: a later pass takes theirs (one is asked for, ``answered``, as soon as such a
call ends), and meanwhile the site is planned as last observed. A call whose site is deleted
or moved, or whose leader stops or steps down, is cancelled.

This is the one place that waits on a data centre; what an outcome means, its events and
backoffs, is :mod:`orchestrator.reconciler.datacentre_sync`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

#: How long a pass waits for the data-centre calls it started before it goes on without
#: the answers of those still running (a cluster that answers in milliseconds, as one
#: does, is taken in the same pass): a slow data centre costs the pass at most this.
WAIT_S = 1.0

K = TypeVar("K", bound=Hashable)
N = TypeVar("N")


@dataclass(frozen=True)
class Ended(Generic[K, N]):
    """A call that ended: what it was (``note``), and what it returned or raised."""

    key: K
    note: N
    result: Any = None
    error: Exception | None = None


class Calls(Generic[K, N]):
    """The calls in flight, one per key, each with a ``note`` saying what it does.

    ``answered``: called when a call that outlived its pass's wait ends (not when it is
    cancelled), for a pass to take its outcome then rather than at the next resync."""

    def __init__(self, wait_s: float = WAIT_S, answered: Callable[[], None] = lambda: None) -> None:
        self.wait_s = wait_s
        self._answered = answered
        self._calls: dict[K, tuple[N, asyncio.Task[Any]]] = {}
        self._fresh: set[asyncio.Task[Any]] = set()  # started since the last settle: the next one waits for them
        self._late: set[asyncio.Task[Any]] = set()  # outlived their pass's wait: their end asks for a pass
        self._ending: set[asyncio.Task[Any]] = set()  # cancelled and not ended yet, held until they are

    def busy(self, key: K) -> bool:
        """Whether a call to ``key`` is in flight (or ended and not taken yet)."""
        return key in self._calls

    def start(self, key: K, call: Coroutine[Any, Any, Any], note: N) -> None:
        if key in self._calls:
            call.close()
            raise RuntimeError(f"a call to {key!r} is already in flight")
        task = asyncio.get_running_loop().create_task(call, name=f"datacentre-call {key}")
        self._calls[key] = (note, task)
        self._fresh.add(task)

    async def settle(self) -> list[Ended[K, N]]:
        """Wait at most ``wait_s`` for the calls started since the last settle, then take
        every call that has ended; those still running stay for a later settle."""
        fresh, self._fresh = self._fresh, set()
        if pending := [t for t in fresh if not t.done()]:
            await asyncio.wait(pending, timeout=self.wait_s)
        ended: list[Ended[K, N]] = []
        for key, (note, task) in list(self._calls.items()):
            if not task.done():
                if task not in self._late:
                    log.info("data-centre call %s is still running after %.1fs: the pass goes on without it", key, self.wait_s)
                    self._late.add(task)
                    task.add_done_callback(self._late_ended)
                continue
            del self._calls[key]
            if task.cancelled():  # its loop ended (a test's asyncio.run): nothing to take
                continue
            error = task.exception()
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit: not a data centre's answer
            ended.append(Ended(key, note, None if error is not None else task.result(), error))
        return ended

    def cancel(self, keep: Callable[[K, N], bool]) -> list[K]:
        """Cancel the calls ``keep`` does not keep (their outcomes are never taken); their keys."""
        gone = [key for key, (note, _) in self._calls.items() if not keep(key, note)]
        for key in gone:
            _, task = self._calls.pop(key)
            self._fresh.discard(task)
            if not task.done():
                task.cancel()
                self._ending.add(task)
                task.add_done_callback(self._cancelled)
        return gone

    async def close(self) -> None:
        """Cancel every call, and wait at most ``wait_s`` for them to end."""
        self.cancel(lambda key, note: False)
        if self._ending:
            await asyncio.wait(list(self._ending), timeout=self.wait_s)

    def _late_ended(self, task: asyncio.Task[Any]) -> None:
        self._late.discard(task)
        if not task.cancelled():
            self._answered()

    def _cancelled(self, task: asyncio.Task[Any]) -> None:
        self._ending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: one that ended before its cancel landed is not logged as never retrieved
