"""How long a ``Retry-After`` asks to wait, as every part of edgeplane reads it (the gateway
from a replica, the Python client and the CLI from a gateway or the API). The web console
reads it in JavaScript by the same rules (``retryAfterSeconds`` in
``orchestrator/console/static/api.js``; ``tests/console`` holds the two to the same answers).

Whatever a server sends is read here, never raised: a header is read as latin-1, where
``str.isdigit`` takes "²" (which ``float`` and ``int`` refuse), and an HTTP date with the
zone ``+99999999999999999`` or the year ``99999999999999999999`` makes
:func:`email.utils.parsedate_to_datetime` raise ``OverflowError``. A value that cannot be
read is None: the caller waits as it would with no header.
"""

from __future__ import annotations

import datetime
import email.utils
import re

#: The delay-seconds form: ASCII digits only, few enough that reading them costs nothing.
_SECONDS = re.compile(r"[0-9]{1,18}")
#: The HTTP date's obsolete asctime form (RFC 9110 5.6.7), which names no zone: "Sun Nov  6 08:49:37 1994".
_ASCTIME = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}")


def _delay_seconds(value: str | None) -> int | None:
    """The seconds of a Retry-After given as a number of seconds; None for none, a date, or
    anything else."""
    if value is None or not _SECONDS.fullmatch(seconds := value.strip()):
        return None
    return int(seconds)


def seconds(value: str | None, now: datetime.datetime | None = None) -> float | None:
    """The seconds a Retry-After asks to wait, given in seconds or as an HTTP date in any of
    its three forms (0 for a date past, measured from ``now``, the current time when None);
    None for none, or one that cannot be read."""
    if (delay := _delay_seconds(value)) is not None:
        return float(delay)
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # no zone: HTTP's asctime form, which is in UTC; else "-0000", which HTTP's never is
        if not _ASCTIME.fullmatch(value.strip()):
            return None
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - (now or datetime.datetime.now(datetime.timezone.utc))).total_seconds())
