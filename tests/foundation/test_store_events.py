"""The state store's event log: who did what, when and why, append-only across deletes and
reopening, pruned by retention without losing a follower's place, and told apart from
another store's by the store's identity. A test that takes the ``store``, ``reopen`` or
``location`` fixture (conftest.py) runs against both backends, an SQLite file and a real
PostgreSQL server; they must behave identically."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

from orchestrator.store import StateStore as Store
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.store.sqlite import Event

from .support import WHO, FakeClock, write


def test_event_log_records_who_what_when_why(store: Store, clock: FakeClock) -> None:
    store.apply([write("a", {"x": 1}), write("m", {"v": 1}, kind="Model")], Event("alice", "apply", "", "", "ticket 42", {"via": "cli"}))
    clock.now += 5
    store.apply([write("a", {"x": 1})], Event("bob", "apply", "", "", "no-op"))  # unchanged: nothing to log
    store.apply([write("a", {"x": 2})], Event("bob", "apply", "", "", "resize"))
    clock.now += 5
    store.delete("Site", "a", Event("carol", "delete", "Site", "a", "decommissioned"))
    got = [(e.actor, e.action, e.kind, e.name, e.reason, e.ts) for e in store.events()]
    assert got == [
        ("alice", "created", "Site", "a", "ticket 42", 1_000_000.0),
        ("alice", "created", "Model", "m", "ticket 42", 1_000_000.0),
        ("bob", "configured", "Site", "a", "resize", 1_000_005.0),
        ("carol", "deleted", "Site", "a", "decommissioned", 1_000_010.0),
    ]
    first = store.events()[0]
    assert dict(first.details) == {"via": "cli", "generation": 1}
    ids = [e.id for e in store.events()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # paging and filtering
    assert [e.id for e in store.events(since=ids[1])] == ids[2:]
    assert [e.id for e in store.events(limit=2)] == ids[:2]
    assert [e.name for e in store.events(kind="Model")] == ["m"]
    assert [e.action for e in store.recent_events("Site", "a")] == ["created", "configured", "deleted"]


def test_event_log_is_append_only_across_deletes_and_reopen(reopen: Callable[..., Store]) -> None:
    s = reopen()
    s.apply([write("a", {"x": 1})], WHO)
    s.delete("Site", "a", Event("bob", "delete", "Site", "a", "gone"))
    s.apply([write("a", {"x": 1})], WHO)  # same name again: a new object, generation 1
    before = s.events()
    s.close()
    s = reopen()
    try:
        assert s.events() == before
        assert [e.action for e in before] == ["created", "deleted", "created"]
        assert s.get("Site", "a").generation == 1  # type: ignore[union-attr]
        s.record(Event("x", "note", "Site", "a", "later"))
        assert s.events()[: len(before)] == before and s.events()[-1].id > before[-1].id
    finally:
        s.close()


def test_retention_deletes_the_fleets_old_events_and_the_audit_trail_by_its_own_cutoff(store: Store, clock: FakeClock) -> None:
    start = clock.now
    store.record(*(Event("agent:a1", "agent-lost", "Site", "edge-a", f"missed heartbeats {i}") for i in range(3)))
    store.apply([write("a", {"x": 1})], WHO)
    store.save_agent("edge-a", "a1", "secret", "bootstrap")
    store.revoke_agent("edge-a", "alice", "stolen laptop")
    clock.now = start + 100
    store.record(Event("scheduler", "replica-placed", "ModelDeployment", "d", "fresh"))

    assert store.prune_events(start + 50, audit=False) == 3  # the fleet's own, older than its cutoff
    assert [e.action for e in store.events()] == ["created", "agent-revoked", "replica-placed"]
    assert store.prune_events(start + 50, audit=True) == 1  # the apply; a revocation is kept for good
    assert [e.action for e in store.events()] == ["agent-revoked", "replica-placed"]
    assert store.agent_revoked_at("edge-a") == start  # still the cut-off for the tokens a rejoin may use
    assert store.prune_events(start + 200, audit=True) == 0


def test_retention_deletes_the_oldest_first_a_bounded_batch_at_a_time(store: Store, clock: FakeClock) -> None:
    for i in range(5):
        store.record(Event("reconciler", "serve-applied", "Site", f"s{i}", "applied"))
        clock.now += 1
    assert store.prune_events(clock.now, audit=False, limit=2) == 2
    assert [e.name for e in store.events()] == ["s2", "s3", "s4"]
    assert store.prune_events(clock.now, audit=False, limit=2) == 2
    assert store.prune_events(clock.now, audit=False, limit=2) == 1
    assert store.events() == []


def test_readers_following_by_event_id_miss_nothing_when_older_events_are_pruned(store: Store, clock: FakeClock) -> None:
    store.record(*(Event("agent:a1", "agent-lost", "Site", f"s{i}", "lost") for i in range(4)))
    ids = [e.id for e in store.events()]
    behind, caught_up = ids[0], ids[-1]  # a reader that stopped early, one that read them all
    clock.now += 100
    store.record(Event("agent:a1", "agent-recovered", "Site", "s3", "back"))
    assert store.prune_events(clock.now - 50, audit=False) == 4
    # an id that is gone is still a place in the log: the reader gets what was kept after it
    assert [e.action for e in store.events(since=behind)] == ["agent-recovered"]
    assert [e.action for e in store.events(since=behind, kind="Site")] == ["agent-recovered"]
    assert [e.action for e in store.events(since=caught_up)] == ["agent-recovered"]
    # with the whole log pruned, the next event still numbers after every one a reader saw
    clock.now += 100
    assert store.prune_events(clock.now, audit=False) == 1
    assert store.events(since=caught_up) == [] and store.recent_events() == []
    store.record(Event("agent:a1", "agent-lost", "Site", "s3", "again"))
    [new] = store.events(since=caught_up)
    assert new.id > caught_up + 1 and [e.id for e in store.recent_events()] == [new.id]


def test_only_the_lease_holder_prunes_events(reopen: Callable[..., Store], clock: FakeClock) -> None:
    a, b = reopen(clock), reopen(clock)
    a.record(Event("agent:a1", "agent-lost", "Site", "s", "lost"))
    lease = a.acquire_lease("leader", "a", 30.0)
    assert lease is not None
    a.release_lease(lease)
    assert b.acquire_lease("leader", "b", 30.0) is not None
    with pytest.raises(store_mod.Fenced):
        a.prune_events(clock.now + 1, audit=False, lease=lease)
    assert len(a.events()) == 1


def test_a_store_keeps_its_identity_and_another_has_its_own(reopen: Callable[..., Store], location: str,
                                                            request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> None:
    """Each store numbers its events from its own start: a client that reads events from two
    stores (a control plane restarted on another) tells them apart by the store's identity."""
    first = reopen()
    made = first.store_id()
    first.close()
    assert reopen().store_id() == made
    other_location = str(tmp_path / "other.db") if location.endswith(".db") else request.getfixturevalue("postgres").create_database()
    other = open_store(other_location)
    try:
        assert other.store_id() != made
    finally:
        other.close()


def test_the_events_at_one_site_are_its_own_and_those_whose_replicas_came_or_went_there(store: Store) -> None:
    store.record(Event("reconciler", "agent-lost", "Site", "edge-lyon-1", "no heartbeat for 30s"),
                 Event("scheduler", "replica-moved", "ModelDeployment", "intent", "site edge-lyon-1 lost its agent",
                       {"from": "edge-lyon-1", "to": "edge-paris-2", "variant": "int8"}),
                 Event("scheduler", "replica-placed", "ModelDeployment", "chat", "new", {"site": "edge-lyon-1", "variant": "q4"}),
                 Event("scheduler", "replica-placed", "ModelDeployment", "chat", "new", {"site": "edge-lyon-10", "variant": "q4"}),
                 Event("reconciler", "agent-lost", "Site", "edge-lyon-10", "no heartbeat for 30s"),
                 Event("alice", "apply", "ModelDeployment", "edge-lyon-1", "a deployment named like the site", {}))
    at_lyon = [(e.action, e.name) for e in store.events(site="edge-lyon-1")]
    assert at_lyon == [("agent-lost", "edge-lyon-1"), ("replica-moved", "intent"), ("replica-placed", "chat")]
    assert [e.action for e in store.events(site="edge-paris-2")] == ["replica-moved"]
    assert [e.name for e in store.events(kind="ModelDeployment", name="chat", site="edge-lyon-1")] == ["chat"]
    assert [e.action for e in store.recent_events(site="edge-lyon-1", limit=2)] == ["replica-moved", "replica-placed"]
    assert store.events(site="edge-nowhere") == []


def test_the_events_of_a_time_window_are_those_logged_in_it(store: Store, clock: FakeClock) -> None:
    for minute in range(5):
        store.record(Event("scheduler", "replica-moved", "ModelDeployment", "intent", f"minute {minute}"))
        clock.now += 60
    start = clock.now - 5 * 60
    window = store.events(after=start + 60, before=start + 180)  # [after, before)
    assert [e.reason for e in window] == ["minute 1", "minute 2"]
    assert [e.reason for e in store.recent_events(after=start + 60, limit=2)] == ["minute 3", "minute 4"]
    assert [e.reason for e in store.events(before=start + 60)] == ["minute 0"]
