"""How an outage of the uplink is told in the agent's log.

An edge site's uplink may be down for days while the agent serves on and tries again every
30 s at most (:mod:`edge_agent.retry`): one warning and one "reconnecting" line per attempt
would be forty thousand alike in a week, none saying since when. An :class:`Outage` says a
failure when the outage begins and when its reason changes, then again every ``REMIND_S``
with since when and how many attempts, and when the link is back how long it was gone. It
decides only; the uplink logs. Times are given by the caller (its injected clocks).
"""

from __future__ import annotations

import time

REMIND_S = 600.0  # a failure already said is said again after this long, with the outage's length


def duration(seconds: float) -> str:
    """``45s``, ``12m 5s``, ``2h 0m``, ``5d 3h``."""
    whole = int(max(seconds, 0.0))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


class Reminder:
    """One condition's line (a model that keeps failing, a certificate that expired), said
    when it is new or changed, then again only every ``REMIND_S`` while it stays the same."""

    def __init__(self) -> None:
        self._said: tuple[str, float] | None = None  # the line last said, and when

    def due(self, line: str, now: float, *, anew: bool = False) -> bool:
        """Whether to say ``line`` now (``now``: the caller's clock); ``anew``: said whatever
        was said before (a new run of failures). A line due is taken as said."""
        if not anew and self._said is not None and self._said[0] == line and 0 <= now - self._said[1] < REMIND_S:
            return False
        self._said = (line, now)
        return True


def _utc(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


class Outage:
    """The failed attempts since the control plane was last reached."""

    def __init__(self) -> None:
        self._since_wall: float | None = None  # None: no outage
        self._since = 0.0  # its start on the monotonic clock
        self.attempts = 0
        self._window = 0.0  # when the failures said in this window began to be said
        self._said: set[str] = set()

    def failed(self, message: str, wall: float, now: float) -> str | None:
        """The line to log for a failed attempt saying ``message`` (``wall``: this machine's
        time of day, ``now``: the monotonic clock), or None to keep it out of the log: a
        failure already said within ``REMIND_S`` is not said again."""
        if self._since_wall is None:
            self._since_wall, self._since, self.attempts = wall, now, 0
            self._window, self._said = now, set()
        self.attempts += 1
        if now - self._window >= REMIND_S:
            self._window, self._said = now, set()
        if message in self._said:
            return None
        first = self.attempts == 1
        self._said.add(message)
        if first:
            return message
        return (f"{message}; unreachable since {_utc(self._since_wall)} ({duration(now - self._since)}, "
                f"{self.attempts} attempts; said again every {REMIND_S / 60:g} minutes while it lasts)")

    def ended(self, now: float) -> str:
        """The control plane was reached: how long it was not (" after 2h 0m unreachable
        (240 failed attempts since ...)"), or "" where no attempt had failed."""
        if self._since_wall is None:
            return ""
        said = (f" after {duration(now - self._since)} unreachable ({self.attempts} failed attempts since "
                f"{_utc(self._since_wall)})")
        self._since_wall = None
        return said
