"""What ``edgeplane events -w`` asks next and says, after each answer or each failed ask:
:func:`orchestrator.cli.events.answered` and :func:`~orchestrator.cli.events.unanswered`,
table-tested. The follow itself, against a real control plane, is in test_cli_events_follow.py."""

from __future__ import annotations

import pytest

from orchestrator.cli import events
from orchestrator.cli.events import PAGE, Follow, Page, Step

AWAY = "warning: cannot reach http://cp:8080; asking again every 1s"
BACK = "the control plane answers again; following"


T3, T9, T10 = "2026-01-01T10:00:03Z", "2026-01-01T11:00:09Z", "2026-01-01T11:00:10Z"
WENT_BACK = ("warning: the control plane's store went back (restored from a backup?): its newest event is id 4, before id 9 "
             "already read; following its events logged since")


def ev(i: int, ts: str | None = None) -> dict[str, object]:
    return {"id": i, "actor": "cli", "action": "created", "kind": "Model", "name": f"m{i}", "reason": ""} | ({"ts": ts} if ts else {})


def pruned(through: int, since: int) -> str:
    return (f"warning: events before id {through + 1} were pruned past their retention, some after id {since} may be missing; "
            "going on from the oldest kept")


@pytest.mark.parametrize(("state", "page", "step"), [
    pytest.param(Follow(50), Page((ev(7), ev(9)), "s1"),
                 Step(Follow(50, 9, first=False, store="s1"), (), (ev(7), ev(9)), 1.0), id="first answer: after its last event"),
    pytest.param(Follow(50), Page((), "s1"),
                 Step(Follow(50, 0, first=False, store="s1"), (), (), 1.0), id="nothing logged yet: every event after none"),
    pytest.param(Follow(50), Page((), "s1", last_id=40),
                 Step(Follow(50, 40, first=False, store="s1"), (), (), 1.0),
                 id="none of the newest at the site (--site): after the store's newest id, not every event from 0"),
    pytest.param(Follow(50), Page((ev(7),), "s1", last_id=40),
                 Step(Follow(50, 40, first=False, store="s1"), (), (ev(7),), 1.0),
                 id="the newest at the site are older than the newest id: after that id"),
    pytest.param(Follow(50), Page((ev(1),), "s1", pruned_through=6),
                 Step(Follow(50, 1, first=False, store="s1", pruned_known=6), (), (ev(1),), 1.0),
                 id="newest events: what was pruned before them is known"),
    pytest.param(Follow(50, away=True), Page((), "s1", pruned_through=6),
                 Step(Follow(50, 0, first=False, store="s1", pruned_known=6), (BACK,), (), 1.0),
                 id="newest events after an outage: none of it said"),
    pytest.param(Follow(50, 1, first=False, store="s1", pruned_known=6, check_pruned=True, away=True),
                 Page((ev(7),), "s1", pruned_through=6),
                 Step(Follow(50, 7, first=False, store="s1", pruned_known=6), (BACK,), (ev(7),), 1.0),
                 id="back from an outage: pruning from before the first answer not said"),
    pytest.param(Follow(50, 9, first=False, store="s1"), Page((), "s1", pruned_through=12),
                 Step(Follow(50, 9, first=False, store="s1"), (), (), 1.0), id="an empty poll stays where it was, pruning not said"),
    pytest.param(Follow(50, 9, first=False), Page((ev(10),)),
                 Step(Follow(50, 10, first=False), (), (ev(10),), 1.0), id="a control plane that names no store"),
    pytest.param(Follow(50, 9, first=False, store="s1"), Page((ev(10),)),
                 Step(Follow(50, 10, first=False, store="s1"), (), (ev(10),), 1.0), id="one that stops naming it keeps the last"),
    pytest.param(Follow(50, 9, first=False), Page((ev(10),), "s2"),
                 Step(Follow(50, 10, first=False, store="s2"), (), (ev(10),), 1.0), id="the first store named is no change"),
    pytest.param(Follow(50, 9, first=False, store="s1", pruned_known=4), Page((ev(3), ev(4)), "s2"),
                 Step(Follow(50, store="s2"), ("the control plane now reads another store (s2, was s1); following its newest events",)),
                 id="another store: its page dropped, its newest asked at once"),
    pytest.param(Follow(50, 9, first=False, store="s1", away=True, check_pruned=True), Page((ev(3),), "s2", pruned_through=2),
                 Step(Follow(50, store="s2"), (BACK, "the control plane now reads another store (s2, was s1); following its newest events")),
                 id="back on another store: both said, no pruning"),
    pytest.param(Follow(50, 5, check_pruned=True), Page((ev(20),), "s1", pruned_through=19),
                 Step(Follow(50, 20, first=False, store="s1", pruned_known=19), (pruned(19, 5),), (ev(20),), 1.0),
                 id="--since before what retention deleted"),
    pytest.param(Follow(50, 25, check_pruned=True), Page((ev(26),), "s1", pruned_through=19),
                 Step(Follow(50, 26, first=False, store="s1"), (), (ev(26),), 1.0), id="--since after it"),
    pytest.param(Follow(50, 19, check_pruned=True), Page((), "s1", pruned_through=19),
                 Step(Follow(50, 19, first=False, store="s1"), (), (), 1.0), id="--since the last deleted: nothing after it lost"),
    pytest.param(Follow(50, 9, first=False, store="s1", pruned_known=19, check_pruned=True, away=True),
                 Page((ev(30),), "s1", pruned_through=19),
                 Step(Follow(50, 30, first=False, store="s1", pruned_known=19), (BACK,), (ev(30),), 1.0),
                 id="pruning already said is not said again"),
    pytest.param(Follow(50, 9, first=False, store="s1", pruned_known=19, check_pruned=True, away=True),
                 Page((ev(40),), "s1", pruned_through=35),
                 Step(Follow(50, 40, first=False, store="s1", pruned_known=35), (BACK, pruned(35, 9)), (ev(40),), 1.0),
                 id="back after retention deleted more"),
    pytest.param(Follow(50, 9, first=False, store="s1", last_ts=T9), Page((), "s1", last_id=4),
                 Step(Follow(50, store="s1", shown_after=T9), (WENT_BACK,)),
                 id="the store went back: said, its newest asked at once"),
    pytest.param(Follow(50, 9, first=False, store="s1", last_ts=T9, away=True, check_pruned=True), Page((), "s1", last_id=4),
                 Step(Follow(50, store="s1", shown_after=T9), (BACK, WENT_BACK)),
                 id="back on a store that went back: both said"),
    pytest.param(Follow(50, store="s1", shown_after=T9), Page((ev(3, T3), ev(4, T9), ev(5, T10)), "s1", last_id=5),
                 Step(Follow(50, 5, first=False, store="s1", last_ts=T10), (), (ev(4, T9), ev(5, T10)), 1.0),
                 id="after it went back: the backup's events not shown again, none since lost"),
    pytest.param(Follow(50, 9, first=False, store="s1", last_ts=T9), Page((), "s1", last_id=9),
                 Step(Follow(50, 9, first=False, store="s1", last_ts=T9), (), (), 1.0), id="an empty poll at the newest id"),
    pytest.param(Follow(50, 1000, check_pruned=True), Page((), "s1", last_id=4),
                 Step(Follow(50, 1000, first=False, store="s1"), (), (), 1.0),
                 id="--since past the newest, nothing read: waited for, not a store that went back"),
])
def test_an_answer_decides_what_is_shown_said_and_asked_next(state: Follow, page: Page, step: Step) -> None:
    assert events.answered(state, page, every_s=1.0) == step


@pytest.mark.parametrize(("state", "step"), [
    pytest.param(Follow(50), Step(Follow(50, away=True), (AWAY,), wait_s=1.0), id="away before the first answer"),
    pytest.param(Follow(50, 9, first=False, store="s1"),
                 Step(Follow(50, 9, first=False, store="s1", check_pruned=True, away=True), (AWAY,), wait_s=1.0),
                 id="away: pruning is asked of the answer after"),
    pytest.param(Follow(50, 9, first=False, store="s1", away=True, check_pruned=True),
                 Step(Follow(50, 9, first=False, store="s1", check_pruned=True, away=True), (), wait_s=1.0),
                 id="still away: said once"),
    pytest.param(Follow(50, store="s2"), Step(Follow(50, store="s2", away=True), (AWAY,), wait_s=1.0),
                 id="away while asking for a store's newest: no id to lose events after"),
])
def test_a_failed_ask_is_said_once_and_waited_out(state: Follow, step: Step) -> None:
    assert events.unanswered(state, "cannot reach http://cp:8080", 1.0) == step


@pytest.mark.parametrize(("state", "size"), [(Follow(50), 50), (Follow(50, 5), 50), (Follow(50, 5, first=False), PAGE),
                                             (Follow(7, store="s2"), 7), (Follow(7, store="s1", shown_after="t"), PAGE)])
def test_a_store_first_answer_is_limit_events_then_pages(state: Follow, size: int) -> None:
    assert state.page_size == size


def test_a_follow_ends_up_on_the_events_after_its_last_over_a_sequence_of_answers() -> None:
    state = Follow(2)
    shown: list[object] = []
    for page in [Page((ev(1), ev(2)), "s1"), Page((), "s1"), Page((ev(3),), "s1"), Page((ev(1),), "s2"), Page((ev(1), ev(2)), "s2")]:
        step = events.answered(state, page, every_s=0.5)
        shown += [e["id"] for e in step.shown]
        state = step.state
    assert shown == [1, 2, 3, 1, 2] and state == Follow(2, 2, first=False, store="s2")
