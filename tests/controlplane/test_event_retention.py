"""Retention of the event log: the leader deletes the fleet's own events and the audit
trail past their retentions, a bounded batch at a time, counted on /metrics; a follower
deletes nothing; ``serve`` refuses a retention it cannot mean; and ``events -w`` follows on
over ids that vanished. On an SQLite file and a real PostgreSQL database; the events' time
comes from an injected clock, never from waiting."""

from __future__ import annotations

import json
import pathlib
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from orchestrator import event_retention, leadership
from orchestrator.store import StateStore, open_store
from orchestrator.store import sqlite as store_mod
from tests.foundation import support

DAY_S = 86400.0
LOST = store_mod.Event("agent:a1", "agent-lost", "Site", "edge-a", "missed 3 heartbeats")


class Clock:
    def __init__(self, now: float = 1_000_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def reopen(request: pytest.FixtureRequest, tmp_path: pathlib.Path, clock: Clock) -> Iterator[Callable[[], StateStore]]:
    """Opens (again) one store, an SQLite file or a fresh PostgreSQL database, on ``clock``."""
    location = str(tmp_path / "state.db") if request.param == "sqlite" else request.getfixturevalue("postgres").create_database()
    opened: list[StateStore] = []

    def make() -> StateStore:
        opened.append(open_store(location, clock=clock))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


def pruner(store: StateStore, clock: Clock, elector: leadership.Elector | None = None, **how: float) -> event_retention.EventPruner:
    retention = event_retention.Retention(how.pop("events_s", 30 * DAY_S), how.pop("audit_s", 365 * DAY_S))
    return event_retention.EventPruner(store, retention, elector, CollectorRegistry(), clock=clock, **how)  # type: ignore[arg-type]


def pruned(p: event_retention.EventPruner, log: str) -> float:
    return p.registry.get_sample_value("edgeplane_events_pruned_total", {"log": log}) or 0.0


async def test_the_leader_deletes_events_past_their_retention_a_bounded_number_a_pass(reopen: Callable[[], StateStore],
                                                                                      clock: Clock) -> None:
    store = reopen()
    store.record(*[LOST] * 5)
    store.apply([store_mod.ObjectWrite("Model", "m", {}, {"x": 1})], store_mod.Event("token:ab12", "apply", "", "", "CHG-1"))
    clock.now += 40 * DAY_S
    store.record(store_mod.Event("scheduler", "replica-placed", "ModelDeployment", "d", "fresh"))
    p = pruner(store, clock, batch=2, max_batches=2)

    assert await p.prune() == 4  # two batches of two: the rest waits for the next pass
    assert await p.prune() == 1
    assert [e.action for e in store.events()] == ["created", "replica-placed"]  # the audit trail is kept a year
    assert (pruned(p, "events"), pruned(p, "audit")) == (5, 0)
    clock.now += 365 * DAY_S
    assert await p.prune() == 2 and store.events() == []
    assert (pruned(p, "events"), pruned(p, "audit")) == (6, 1)


async def test_tokens_that_no_longer_work_go_with_the_audit_trail_of_them(reopen: Callable[[], StateStore], clock: Clock) -> None:
    """Every enrolment makes a bootstrap token: kept for good, the list of them (``GET
    /v1/tokens``) grows with the fleet's age. One expired, or revoked, before the audit
    retention goes with its events; a token that works, or expired within it, stays."""
    store = reopen()
    _, expired = store.create_token("bootstrap", "agent", 3600, "admin")
    _, revoked = store.create_token("api", "read", None, "admin")
    assert store.revoke_token(revoked.id, "admin")
    _, working = store.create_token("api", "admin", None, "admin")
    clock.now += 30 * DAY_S
    _, lately = store.create_token("bootstrap", "agent", 3600, "admin")
    clock.now += 355 * DAY_S  # the first three are 385 days old, the last 355: within the year
    p = pruner(store, clock)
    await p.prune()
    assert [t.id for t in store.tokens()] == [working.id, lately.id]
    assert pruned(p, "tokens") == 2


async def test_the_store_says_up_to_which_event_id_retention_deleted(reopen: Callable[[], StateStore], clock: Clock) -> None:
    """A reader following by id learns that events after the one it stopped at are gone."""
    store = reopen()
    assert store.events_pruned_through() == 0
    store.record(*[LOST] * 3)
    store.apply([store_mod.ObjectWrite("Model", "m", {}, {"x": 1})], store_mod.Event("token:ab12", "apply", "", "", "CHG-1"))
    lost = [e.id for e in store.events() if e.action == "agent-lost"]
    clock.now += 40 * DAY_S
    assert store.prune_events(clock.now - 30 * DAY_S, audit=False, limit=2) == 2
    assert store.events_pruned_through() == lost[1]
    assert store.prune_events(clock.now - 30 * DAY_S, audit=False) == 1
    assert store.prune_events(clock.now - 30 * DAY_S, audit=False) == 0
    assert reopen().events_pruned_through() == lost[2]  # kept with the store; not lowered by a pass with nothing to delete


async def test_a_retention_of_zero_keeps_that_log_whole(reopen: Callable[[], StateStore], clock: Clock) -> None:
    store = reopen()
    store.record(LOST)
    store.revoke_agent("edge-a", "token:ab12")  # no agent joined: nothing revoked, nothing logged
    store.apply([store_mod.ObjectWrite("Model", "m", {}, {"x": 1})], store_mod.Event("token:ab12", "apply", "", "", ""))
    clock.now += 10 * 365 * DAY_S
    assert await pruner(store, clock, events_s=0.0).prune() == 1  # the audit event, past its year
    assert [e.action for e in store.events()] == ["agent-lost"]
    assert await pruner(store, clock, events_s=0.0, audit_s=0.0).prune() == 0


async def test_the_leaders_pass_indexes_the_sites_of_events_an_earlier_replica_logged(reopen: Callable[[], StateStore],
                                                                                       clock: Clock) -> None:
    store = reopen()
    assert store.event_sites.wait(30)  # type: ignore[attr-defined]  # the start's backfill, which found nothing to index
    with store._tx() as db:  # type: ignore[attr-defined]  # as a replica of the release before event_sites logs one: the row alone
        db.execute(store._q("INSERT INTO events (ts, actor, action, kind, name, reason, details) "  # type: ignore[attr-defined]
                            "VALUES (?, 'scheduler', 'replica-placed', 'ModelDeployment', 'chat', 'placed', ?)"),
                   (clock.now, '{"site":"edge-lyon","variant":"q4"}'))
    assert [e.name for e in store.events(site="edge-lyon")] == ["chat"]  # found by its details while not indexed
    p = pruner(store, clock)
    await p.prune()
    assert store.index_event_sites() == 0  # the pass indexed it
    assert p.registry.get_sample_value("edgeplane_event_sites_backfill_remaining") == 0  # the start's backfill: done
    assert [e.name for e in store.events(site="edge-lyon")] == ["chat"]


async def test_only_the_lease_holder_prunes(reopen: Callable[[], StateStore], clock: Clock) -> None:
    store, other = reopen(), reopen()
    store.record(LOST, LOST)
    clock.now += 40 * DAY_S
    elector = leadership.Elector(store, "a", 30.0, lambda lease: None, lambda reason: None)
    p = pruner(store, clock, elector, batch=1, max_batches=1)
    assert await p.prune() == 0  # following: another replica may lead
    elector.lease = store.acquire_lease(leadership.LEASE, "a", 30.0)
    assert await p.prune() == 1
    assert elector.lease is not None
    store.release_lease(elector.lease)
    assert other.acquire_lease(leadership.LEASE, "b", 30.0) is not None  # "a" has not learnt it yet
    with pytest.raises(store_mod.Fenced):
        await p.prune()
    assert len(store.events()) == 1


@pytest.mark.parametrize(("flag", "value", "said"), [
    ("--events-retention", "5x", "'5x' is not a duration: give e.g. 30d, 12h, 90m or 3600 (seconds); 0 or off keeps all"),
    ("--events-retention", "-1d", "'-1d' is not a duration: give e.g. 30d, 12h, 90m or 3600 (seconds); 0 or off keeps all"),
    ("--audit-retention", "10m", "'10m' is less than 1h: give 1h or more, or 0 or off to keep all"),
])
def test_serve_refuses_a_retention_it_cannot_mean_in_one_line(flag: str, value: str, said: str, tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([str(support.EDGEPLANE), "serve", f"{flag}={value}", "--port", str(support.free_port())], capture_output=True,
                          text=True, timeout=60, env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"edgeplane serve: error: argument {flag}: {said}"], proc
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("value", "seconds"), [("30d", 30 * DAY_S), ("12h", 12 * 3600.0), ("90m", 5400.0), ("7200", 7200.0),
                                                ("0", 0.0), ("off", 0.0)])
def test_a_retention_is_a_duration_with_or_without_a_unit(value: str, seconds: float) -> None:
    from orchestrator.cli import main as cli_main

    args = cli_main.build_parser().parse_args(["serve", "--events-retention", value, "--audit-retention", value])
    assert args.events_retention == args.audit_retention == seconds


@pytest.mark.parametrize(("events_s", "audit_s", "said"), [
    (30 * DAY_S, 365 * DAY_S, None), (0.0, 0.0, None), (3600.0, 3600.0, None),
    (60.0, 0.0, "--events-retention must be 0 (keep all) or at least 3600 seconds (1h), not 60"),
    (0.0, -1.0, "--audit-retention must be 0 (keep all) or at least 3600 seconds (1h), not -1"),
    (float("nan"), 0.0, "--events-retention must be 0 (keep all) or at least 3600 seconds (1h), not nan"),
    (0.0, float("inf"), "--audit-retention must be 0 (keep all) or at least 3600 seconds (1h), not inf"),
])
def test_a_retention_given_in_code_is_checked_as_the_flags_are(events_s: float, audit_s: float, said: str | None) -> None:
    assert event_retention.Retention(events_s, audit_s).problem() == said


def until_pruned(serve: support.ServeProcess, events: int) -> None:
    """Waits (30 s at most) for ``serve``'s leader to have pruned ``events`` events from the log."""
    deadline = time.monotonic() + 30
    while f'edgeplane_events_pruned_total{{log="events"}} {float(events)}' not in httpx.get(f"{serve.url}/metrics").text:
        assert time.monotonic() < deadline, f"the leader did not prune the old events:\n{serve.log()}"
        time.sleep(0.05)


def test_events_follow_goes_on_over_events_the_leader_pruned(tmp_path: pathlib.Path) -> None:
    """A script that stopped at an event since deleted (``events -w --since ID``) is told once
    on stderr that events after it were pruned, then given what was kept after it and each
    new event; the pruned ones are counted on /metrics."""
    data = tmp_path / "cp"
    old = open_store(data / "state.db", clock=lambda: time.time() - 2 * DAY_S)  # a log two days old
    old.record(*[LOST] * 5)
    mark, newest = old.events()[1].id, old.events()[-1].id  # where the script stopped, and the last event to go
    old.close()
    serve = support.ServeProcess(data, "--events-retention", "1d").wait_ready()
    follower: subprocess.Popen[str] | None = None
    try:
        until_pruned(serve, 5)
        follower = support.follow_events(serve.url, "--since", str(mark), "--kind", "models")
        for name in ("after-pruning", "and-after"):
            done = support.cli("apply", "-f", "-", server_url=serve.url, stdin=support.doc("Model", name, support.model_spec()))
            assert done.returncode == 0, done.stderr
            seen = json.loads(follower.stdout.readline())  # type: ignore[union-attr]
            assert (seen["name"], seen["action"]) == (name, "created") and seen["id"] > mark, seen
        logged = httpx.get(f"{serve.url}/v1/events", params={"since": "0", "limit": "100"}).json()["items"]
        assert not [e for e in logged if e["action"] == "agent-lost"], logged
    finally:
        if follower is not None:
            err = support.interrupt(follower)
            assert follower.returncode == 130 and "Traceback" not in err, err
            assert [line for line in err.splitlines() if "pruned" in line] == [
                f"warning: events before id {newest + 1} were pruned past their retention, some after id {mark} may be missing; "
                "going on from the oldest kept"], err
        serve.stop()


def test_events_follow_of_one_kind_is_not_warned_of_other_events_pruned_after_its_own(tmp_path: pathlib.Path) -> None:
    """``events -w --kind models`` asks after the newest Model event, which the fleet's own
    events logged since outnumber: retention deleting those loses nothing it follows, and
    is not said."""
    data = tmp_path / "cp"
    old = open_store(data / "state.db", clock=lambda: time.time() - 2 * DAY_S)
    old.record(store_mod.Event("user:ops", "created", "Model", "kept-model", "apply"))  # the audit trail, kept a year
    old.record(*[LOST] * 5)  # the fleet's own, newer ids, deleted past a day
    old.close()
    serve = support.ServeProcess(data, "--events-retention", "1d").wait_ready()
    follower: subprocess.Popen[str] | None = None
    try:
        until_pruned(serve, 5)
        follower = support.follow_events(serve.url, "--kind", "models")
        assert json.loads(follower.stdout.readline())["name"] == "kept-model"  # type: ignore[union-attr]
        done = support.cli("apply", "-f", "-", server_url=serve.url, stdin=support.doc("Model", "after-pruning", support.model_spec()))
        assert done.returncode == 0, done.stderr
        assert json.loads(follower.stdout.readline())["name"] == "after-pruning"  # type: ignore[union-attr]
    finally:
        if follower is not None:
            err = support.interrupt(follower)
            assert follower.returncode == 130 and "Traceback" not in err, err
            assert "pruned" not in err, err
        serve.stop()
