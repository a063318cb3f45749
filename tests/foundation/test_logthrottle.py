"""What :class:`orchestrator.logthrottle.Throttle` lets through: the token store's failures
(``orchestrator.api.auth``) and a gateway out of file descriptors
(``orchestrator.gateway.upstream``) are logged by it, at once, then once an interval."""

from __future__ import annotations

from orchestrator.logthrottle import Throttle


def test_a_condition_is_logged_at_once_then_once_an_interval_with_what_was_held_back() -> None:
    now = [100.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.due() == 0
    assert [throttle.due() for _ in range(3)] == [None, None, None]
    now[0] += 9.999
    assert throttle.due() is None
    now[0] += 0.001
    assert throttle.due() == 4  # the four held back since the first line
    assert throttle.due() is None


def test_a_condition_said_otherwise_is_logged_at_once() -> None:
    now = [0.0]
    throttle = Throttle(60.0, clock=lambda: now[0])
    assert throttle.due("database is locked") == 0
    assert throttle.due("database is locked") is None
    assert throttle.due("disk I/O error") == 1
    assert throttle.due("disk I/O error") is None
    assert throttle.due("database is locked") == 1
