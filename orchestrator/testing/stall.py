"""A PostgreSQL store's server process stalled under a live replica, and the replica probed meanwhile.

Why: a database that stalls (a frozen VM, a lock held elsewhere) must hold up only the
requests that wait on it, never the replica's event loop, which also serves the health
probes, the API, the gateway and the agents' streams. Tests show it by stopping the server
process behind the store's connection (``Store.backend_pid``) and asking the replica from
another thread, which resumes the database itself: a loop held by a blocking store call
never would. A stalled database is resumed in every case, a failing test's too, or the
session's server would hang every test after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import httpx


class Stall:
    """Server processes ``pids`` stopped by :meth:`stop` and resumed by :meth:`resume` (from
    any thread, as often as need be); as a context manager, resumed on the way out."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids

    def stop(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):  # resumed before, and it has ended since
                os.kill(pid, signal.SIGCONT)

    def __enter__(self) -> Stall:
        return self

    def __exit__(self, *exc: object) -> None:
        self.resume()


@contextlib.contextmanager
def stalled(*pids: int) -> Iterator[Stall]:
    """Server processes ``pids`` stopped from now until the block ends."""
    with Stall(*pids) as stall:
        stall.stop()
        yield stall


def probe(urls: Sequence[str], *, within: float, settle: float = 0.3, once: threading.Event | None = None,
          then: Callable[[], object] | None = None) -> asyncio.Future[list[int | None]]:
    """GET each of ``urls`` in turn from a thread of its own, which starts at once (never one of
    a pool the stalled replica's calls may have taken); the future's result is their status
    codes, None for one with no answer within ``within`` seconds. The thread first waits for
    ``once`` (at most 10 s) when given, then ``settle`` seconds (what the test set off
    meanwhile now waits on the database), and afterwards calls ``then`` (resuming the
    database), whatever happened."""

    def run() -> list[int | None]:
        answers: list[int | None] = []
        try:
            if once is not None:
                once.wait(10)
            time.sleep(settle)
            for url in urls:
                try:
                    answers.append(httpx.get(url, timeout=within).status_code)
                except httpx.TimeoutException:
                    answers.append(None)
        finally:
            if then is not None:
                then()
        return answers

    answered: concurrent.futures.Future[list[int | None]] = concurrent.futures.Future()

    def answer() -> None:
        try:
            answered.set_result(run())
        except BaseException as exc:  # handed to the awaiting test
            answered.set_exception(exc)

    threading.Thread(target=answer, name="stall-probe", daemon=True).start()
    return asyncio.wrap_future(answered)
