"""When the uplink asks to renew its client certificate again after a renewal failed, and
what a failing identity tool (the child process that makes keys and reads dates) does to a
session. The tool is replaced through the agent's TLS object; the clock is the renewal's own."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from edge_agent import errors, renewal

NOW = 1_000_000.0
DAY = 86400.0


class Tool:
    """The agent's TLS material with a stand-in identity tool: dates as given, or failing
    as a loaded machine's tool times out; making a CSR fails the same way."""

    def __init__(self, dates: tuple[float, float] | None = None) -> None:
        self.dates = dates  # (renew at, expires); None: reading them fails
        self.runs = 0

    async def renewal_time(self) -> tuple[float, float]:
        self.runs += 1
        if self.dates is None:
            raise errors.ControlPlaneError("the identity tool (validity) did not finish in 60s")
        return self.dates

    async def new_request(self, site: str) -> tuple[bytes, bytes]:
        raise errors.ControlPlaneError("the identity tool (csr) did not finish in 60s")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def make_renewal(tool: Tool, clock: Clock) -> renewal.Renewal:
    """The renewal clock an uplink keeps for site edge-a: a join asks it for a renewal, and a
    session ends when it says one is due; these tests take the two steps alone."""
    return renewal.Renewal(tool, "edge-a", clock)  # type: ignore[arg-type]


async def renewal_request(up: renewal.Renewal) -> tuple[bytes, bytes] | None:
    """The key and CSR the uplink's next join would send for a renewal, or None."""
    return await up.request()


async def renewal_due(up: renewal.Renewal) -> None:
    """Raises RenewalDue when a session would end for its certificate's renewal."""
    await up.due()


@pytest.mark.parametrize(("left", "retry"), [
    (20 * DAY, 3600.0),  # most of a month-long certificate left: an hour
    (4 * 3600.0, 3600.0),
    (600.0, 150.0),  # ten minutes left: a quarter of it
    (20.0, 10.0),
    (-30.0, 10.0),  # expired (or the clock is off): not at once
    (None, 300.0),  # dates unknown: soon, in case the certificate is short-lived
])
def test_a_failed_renewal_is_asked_again_within_what_is_left(left: float | None, retry: float) -> None:
    assert renewal.renewal_retry(left) == retry


async def test_a_renewal_that_fails_with_ten_minutes_left_is_asked_again_before_expiry(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.renewal")
    tool, clock = Tool((NOW - 1200.0, NOW + 600.0)), Clock()  # due, ten minutes left
    up = make_renewal(tool, clock)
    assert await renewal_request(up) is None  # the join goes on without renewing
    asked = [float(m.group(1)) for r in caplog.records if (m := re.search(r"asking again in ([0-9.]+)s", r.getMessage()))]
    assert asked and NOW + asked[0] < NOW + 600.0
    clock.now += asked[0]
    with pytest.raises(errors.RenewalDue):  # the session ends then, for a join that renews
        await asyncio.wait_for(renewal_due(up), 1)


@pytest.mark.parametrize("when", ["at the join", "at the retry time"])
async def test_dates_that_cannot_be_read_do_not_end_the_session(when: str) -> None:
    tool, clock = Tool(), Clock()
    up = make_renewal(tool, clock)
    assert await renewal_request(up) is None  # logged; the join goes on
    runs = tool.runs
    if when == "at the retry time":
        clock.now += 300.0
        runs += 1  # the dates are read again, and the tool fails again
    watcher = asyncio.create_task(renewal_due(up))  # runs beside the session's streams
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(watcher), 0.2)
    watcher.cancel()
    assert tool.runs == runs


@pytest.mark.parametrize("refused", [False, True])
async def test_an_expired_certificate_is_said_once_per_reminder_while_the_uplink_stays_down(
        caplog: pytest.LogCaptureFixture, refused: bool) -> None:
    """A certificate that expired while the uplink was down is replaced at the first join
    that gets through, which may be days away: each attempt until then enrols again (or,
    with the token refused, tries the saved certificate), and says so once, then again
    every outage.REMIND_S, as the failed attempts themselves are said."""
    caplog.set_level(logging.DEBUG, logger="edge_agent.renewal")
    tool, clock = Tool((NOW - 2 * DAY, NOW - DAY)), Clock()  # expired a day ago
    up = make_renewal(tool, clock)
    await up.schedule()
    if refused:
        up.token_refused()
    said = []
    for _ in range(60):  # half an hour of attempts at the reconnect's 30 s cap
        assert up.lapsed("bootstrap-secret") is not refused  # each attempt decides alike
        said += [r for r in caplog.records if r.levelno >= logging.WARNING]
        caplog.clear()
        clock.now += 30.0
    assert len(said) == 3  # at 0, 10 and 20 minutes
    assert all("expired at" in r.getMessage() and "bootstrap-secret" not in r.getMessage() for r in said)
