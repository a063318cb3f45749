"""The standalone gateway's decisions about its control planes, table-tested: how long it
waits before watching the table again (:func:`orchestrator.gatewayd.follow.next_pause`),
and what it makes of a token check's answer, or of none
(:func:`~orchestrator.gatewayd.follow.judge`, :func:`~orchestrator.gatewayd.follow.held`).
The gateway following a real control plane is test_standalone_gateway.py."""

from __future__ import annotations

import datetime

import pytest

from orchestrator.gatewayd import follow
from orchestrator.gatewayd.follow import Token, Verdict

WALL = 1_800_000_000.0  # the gateway's Unix time when it asks
NOW = 500.0  # its monotonic clock then


def at(seconds_from_wall: float) -> str:
    """An RFC 3339 ``expiresAt`` that many seconds after WALL."""
    return datetime.datetime.fromtimestamp(WALL + seconds_from_wall, datetime.UTC).isoformat()


@pytest.mark.parametrize(("last", "synced", "pause"), [
    (None, False, 0.2),  # the first failure
    (0.2, False, 0.4),
    (1.6, False, 3.2),
    (3.2, False, 5.0),  # up to the most
    (5.0, False, 5.0),
    (5.0, True, 0.2),  # a watch that got a table starts over
    (None, True, 0.2),
])
def test_the_pause_before_watching_again_doubles_up_to_the_most_and_starts_over_after_a_table(
        last: float | None, synced: bool, pause: float) -> None:
    assert follow.next_pause(last, synced, 0.2, 5.0) == pytest.approx(pause)


@pytest.mark.parametrize(("status", "answer", "verdict"), [
    pytest.param(200, {"id": "t1"}, Verdict(Token("t1"), NOW + 30), id="valid, never expires: kept ttl"),
    pytest.param(200, {"id": "t1", "expiresAt": None}, Verdict(Token("t1"), NOW + 30), id="expiresAt null: never"),
    pytest.param(200, {"id": "t1", "expiresAt": at(3600)}, Verdict(Token("t1"), NOW + 30, NOW + 3600), id="expires later: kept ttl"),
    pytest.param(200, {"id": "t1", "expiresAt": at(10)}, Verdict(Token("t1"), NOW + 10, NOW + 10), id="expires within ttl: kept till then"),
    pytest.param(200, {"id": "t1", "expiresAt": at(0)}, Verdict(None, NOW + 5, NOW), id="expires now: refused"),
    pytest.param(200, {"id": "t1", "expiresAt": at(-60)}, Verdict(None, NOW + 5, NOW - 60), id="an earlier release's, expired by this clock"),
    pytest.param(200, {"id": "t1", "expiresAt": at(-7200), "expiresInSeconds": 3600}, Verdict(Token("t1"), NOW + 30, NOW + 3600),
                 id="the life left wins over this clock: kept ttl"),
    pytest.param(200, {"id": "t1", "expiresAt": at(7200), "expiresInSeconds": 10.5}, Verdict(Token("t1"), NOW + 10.5, NOW + 10.5),
                 id="the life left within ttl: kept till then"),
    pytest.param(200, {"id": "t1", "expiresAt": at(3600), "expiresInSeconds": -1}, Verdict(None, NOW + 5, NOW - 1),
                 id="no life left: refused"),
    pytest.param(200, {"id": "t1", "expiresAt": None, "expiresInSeconds": None}, Verdict(Token("t1"), NOW + 30), id="life left null: never"),
    pytest.param(200, {"id": "t1", "expiresAt": at(3600), "expiresInSeconds": "soon"}, None, id="life left not a number"),
    pytest.param(200, {"id": "t1", "expiresAt": at(3600), "expiresInSeconds": True}, None, id="life left a boolean"),
    pytest.param(200, {"id": "t1", "models": ["chat"], "residency": ["FR"]}, Verdict(Token("t1", ("chat",), ("FR",)), NOW + 30),
                 id="a scoped token: its scope kept"),
    pytest.param(200, {"id": "t1", "models": [], "residency": []}, Verdict(Token("t1"), NOW + 30), id="empty scope: unscoped"),
    pytest.param(200, {"id": "t1", "models": "chat"}, None, id="models not a list: never read as no scope"),
    pytest.param(200, {"id": "t1", "residency": [3]}, None, id="residency not names"),
    pytest.param(200, {"id": ""}, Verdict(None, NOW + 5), id="no id: not valid"),
    pytest.param(200, {}, Verdict(None, NOW + 5), id="no id at all"),
    pytest.param(401, None, Verdict(None, NOW + 5), id="401: invalid, kept negative ttl"),
    pytest.param(403, None, Verdict(None, NOW + 5), id="403"),
    pytest.param(200, None, None, id="not JSON: ask the next"),
    pytest.param(200, ["t1"], None, id="not an object"),
    pytest.param(200, {"id": "t1", "expiresAt": 1800000000}, None, id="expiresAt not a string"),
    pytest.param(200, {"id": "t1", "expiresAt": "tomorrow"}, None, id="expiresAt not a time"),
    pytest.param(500, None, None, id="5xx"),
    pytest.param(503, {"error": "store down"}, None, id="503"),
    pytest.param(404, None, None, id="no whoami there"),
])
def test_a_control_planes_answer_gives_a_verdict_bounded_by_the_tokens_expiry(status: int, answer: object,
                                                                             verdict: Verdict | None) -> None:
    assert follow.judge(status, answer, now=NOW, wall=WALL, ttl_s=30.0, negative_ttl_s=5.0) == verdict


def test_the_expiry_is_a_span_of_the_monotonic_clock_so_a_wall_clock_step_later_moves_nothing() -> None:
    verdict = follow.judge(200, {"id": "t1", "expiresAt": at(100)}, now=7.0, wall=WALL, ttl_s=30.0, negative_ttl_s=5.0)
    assert verdict is not None and verdict.valid_until == 107.0


@pytest.mark.parametrize(("known", "now", "kept", "token"), [
    pytest.param(Verdict(Token("t1"), 30.0), 10_000.0, Verdict(Token("t1"), 10_005.0), Token("t1"),
                 id="valid, never expires: held, asked about again after the pause"),
    pytest.param(Verdict(Token("t1"), 30.0, 3600.0), 3000.0, Verdict(Token("t1"), 3005.0, 3600.0), Token("t1"),
                 id="valid until its expiry"),
    pytest.param(Verdict(Token("t1"), 30.0, 3600.0), 3598.0, Verdict(Token("t1"), 3600.0, 3600.0), Token("t1"),
                 id="the pause ends at its expiry"),
    pytest.param(Verdict(Token("t1"), 30.0, 3600.0), 3600.0, Verdict(Token("t1"), 3600.0, 3600.0), None, id="expired: refused"),
])
def test_with_no_control_plane_answering_a_token_known_valid_holds_until_it_expires(known: Verdict, now: float, kept: Verdict,
                                                                                   token: Token | None) -> None:
    held = follow.held(known, now, retry_s=5.0)
    assert (held, held.at(now)) == (kept, token)


@pytest.mark.parametrize("known", [None, Verdict(None, 5.0)], ids=["never seen", "known invalid"])
def test_with_no_control_plane_answering_any_other_token_is_unverifiable(known: Verdict | None) -> None:
    with pytest.raises(follow.Unverifiable):
        follow.held(known, 0.0, retry_s=5.0)
