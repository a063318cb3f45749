"""Handing the heap memory a load or an unload freed back to the system."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


def release_freed() -> None:
    """Hand the heap memory freed since the last call back to the system (glibc only).

    Loading a model parses it and builds its graph in temporary buffers; once freed,
    glibc keeps most of them mapped for reuse, in the middle of the heap and in the
    arenas of the threads that loaded. For a daemon that then idles for weeks that is
    about 1 MB of resident memory for nothing. ``malloc_trim`` returns whole free pages.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (AttributeError, OSError):  # not glibc
        return None
