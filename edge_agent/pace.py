"""How fast a download goes and when it will be done, from the byte counts it reports.

Why: over a thin uplink (a satellite or 4G backup link, a few Mbit/s) a model of a few
hundred MB takes tens of minutes, and "40% of 812.3 MB" alone does not tell an operator
whether that is ten minutes away or a day, nor whether bytes still come at all. The rate is
taken over the last :data:`WINDOW_S` seconds (a link's rate changes; an average since the
start would hide a stall or a recovery for long), counting only what this attempt received
(bytes resumed from a partial file came over the link before, not now). Pure: the caller
hands in the time.
"""

from __future__ import annotations

import collections

#: The rate is what came over about this many seconds, the last sample's included.
WINDOW_S = 30.0
#: Shorter than this, a rate says more about buffers than about the link: none is given.
SHORTEST_S = 1.0


class Pace:
    """Samples ``(time, bytes held)`` of one attempt, from its first bytes (those of its
    first report came before any time there is to divide by)."""

    def __init__(self, now: float, have: int) -> None:
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(now, have)])

    def add(self, now: float, have: int) -> None:
        self._samples.append((now, have))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Bytes a second over the window; None until it spans :data:`SHORTEST_S`."""
        (start, first), (end, last) = self._samples[0], self._samples[-1]
        if end - start < SHORTEST_S:
            return None
        return max(0, last - first) / (end - start)


class Floor:
    """curl's ``--speed-limit``/``--speed-time``: an attempt whose bytes came at under
    ``rate`` bytes a second on average over ``window`` seconds or more is too slow (a link
    or a middlebox that sends a byte now and then never reaches a socket timeout, and the
    download would crawl on forever). Counted from the last time the bytes of a whole
    window came: a stall shorter than the window, bytes before and after, does not trip it.
    ``rate`` 0: never too slow."""

    def __init__(self, rate: float, window: float, *, now: float, have: int) -> None:
        self.rate, self.window = rate, window
        self.since, self.had = now, have  # when the floor was last met, and the bytes held then

    def too_slow(self, now: float, have: int) -> bool:
        if have - self.had >= self.rate * self.window:
            self.since, self.had = now, have
            return False
        return self.rate > 0 and now - self.since >= self.window


def describe(have: int, total: int | None, rate: float | None) -> str:
    """``40% of 812.3 MB at 2.0 Mbit/s, about 32 min left`` (what is known of it)."""
    done = f"{have / total:.0%} of {total / 1e6:.1f} MB" if total else f"{have / 1e6:.1f} MB"
    if rate is None:
        return done
    done += f" at {rate * 8 / 1e6:.1f} Mbit/s"
    if total and total > have and rate > 0:
        done += f", about {duration((total - have) / rate)} left"
    return done


def duration(seconds: float) -> str:
    """``40 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``: as precise as an estimate is worth."""
    s = round(seconds)
    if s < 90:
        return f"{max(s, 1)} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
