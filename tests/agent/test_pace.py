"""The rate and the time left a download's progress shows (``edge_agent.pace``)."""

from __future__ import annotations

import pytest

from edge_agent import pace


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.2, "1 s"), (40, "40 s"), (89, "89 s"), (91, "2 min"), (32 * 60, "32 min"), (89 * 60, "89 min"),
    (3 * 3600 + 5 * 60, "3 h 5 min"), (5 * 3600, "5 h"), (50 * 3600, "2 d 2 h"), (72 * 3600, "3 d"),
])
def test_durations(seconds: float, shown: str) -> None:
    assert pace.duration(seconds) == shown


@pytest.mark.parametrize(("have", "total", "rate", "shown"), [
    (0, None, None, "0.0 MB"),
    (5_000_000, None, 250_000, "5.0 MB at 2.0 Mbit/s"),
    (324_920_000, 812_300_000, None, "40% of 812.3 MB"),
    (324_920_000, 812_300_000, 250_000, "40% of 812.3 MB at 2.0 Mbit/s, about 32 min left"),
    (324_920_000, 812_300_000, 0, "40% of 812.3 MB at 0.0 Mbit/s"),  # nothing came over the window: no end in sight
    (812_300_000, 812_300_000, 250_000, "100% of 812.3 MB at 2.0 Mbit/s"),
])
def test_descriptions(have: int, total: int | None, rate: float | None, shown: str) -> None:
    assert pace.describe(have, total, rate) == shown


def test_the_rate_is_that_of_the_last_half_minute() -> None:
    p = pace.Pace(0.0, 1000)
    assert p.rate() is None  # one sample: no time to divide by
    p.add(0.5, 2000)
    assert p.rate() is None  # too short to say
    for t in range(1, 61):  # 1 MB/s for a minute...
        p.add(float(t), 1000 + t * 1_000_000)
    assert p.rate() == pytest.approx(1_000_000)
    for t in range(61, 81):  # ...then nothing for 20 s: half the window's bytes
        p.add(float(t), 1000 + 60 * 1_000_000)
    assert p.rate() == pytest.approx(10 * 1_000_000 / 30, rel=0.05)


def test_a_floor_trips_only_under_its_rate_for_its_whole_time() -> None:
    floor = pace.Floor(1000, 60.0, now=0.0, have=0)
    assert not floor.too_slow(20.0, 1)  # a byte every 20 s: not yet the whole time
    assert not floor.too_slow(40.0, 2)
    assert floor.too_slow(60.0, 3)  # 3 bytes in 60 s


def test_a_floor_is_reset_by_enough_bytes_and_left_alone_by_a_short_stall() -> None:
    floor = pace.Floor(1000, 60.0, now=0.0, have=0)
    assert not floor.too_slow(1.0, 250_000)  # 2 Mbit/s: enough for the whole window at once
    assert not floor.too_slow(41.0, 250_001)  # a stall of 40 s, then bytes again
    assert not floor.too_slow(42.0, 500_000)
    assert floor.too_slow(102.0, 500_100)  # then a trickle for 60 s


def test_a_floor_of_zero_never_trips() -> None:
    floor = pace.Floor(0, 60.0, now=0.0, have=0)
    assert not floor.too_slow(3600.0, 0)
