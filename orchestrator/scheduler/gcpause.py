"""Pausing Python's cyclic garbage collector around allocation-heavy pure work.

The collector runs after every few hundred container allocations and, as the number of
surviving objects grows, walks the older generations too: in a control plane with a large
heap, one 20,000-replica plan would pay for several full walks. The planner creates no
reference cycles, so pausing collection while it runs loses nothing; reference counting
still frees everything at once. Nested and concurrent pauses (plans on several threads)
are counted, and collection resumes, if it was on, when the last one ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_resume = False


@contextmanager
def paused() -> Iterator[None]:
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
