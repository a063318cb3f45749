"""What control-plane replicas share through the state store: the leader's lease and the
fencing of a deposed holder's writes, published bodies, other processes' commits told as
they commit, and one time whatever the replicas' clocks say. A test that takes the ``store``, ``reopen`` or ``location`` fixture
(conftest.py) runs against both backends, an SQLite file and a real PostgreSQL server; they
must behave identically."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import pytest

from orchestrator.store import StateStore as Store
from orchestrator.store import sqlite as store_mod
from orchestrator.store.sqlite import Event, ObjectWrite, PlacementRow
from orchestrator.testing.postgres import PostgresServer

HOUR_S = 3600.0


def wait_for_lease(store: Store, holder: str, ttl_s: float, within_s: float) -> store_mod.Lease:
    """Polls for the lease until it is granted (bounded in time)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        lease = store.acquire_lease("leader", holder, ttl_s)
        if lease is not None:
            return lease
        time.sleep(0.02)
    raise AssertionError(f"{holder} did not get the lease within {within_s}s")


def test_one_lease_holder_renewal_keeps_the_token_take_over_increments_it(reopen: Callable[..., Store]) -> None:
    a, b = reopen(), reopen()  # two replicas on one store
    assert a.current_lease("leader") is None
    lease_a = a.acquire_lease("leader", "a", 30.0)
    assert lease_a is not None and lease_a.token == 1 and lease_a.remaining_s == 30.0
    assert b.acquire_lease("leader", "b", 30.0) is None  # held: exactly one leader
    renewed = a.acquire_lease("leader", "a", 30.0)
    assert renewed is not None and renewed.token == 1
    seen = b.current_lease("leader")
    assert seen is not None and (seen.holder, seen.token) == ("a", 1) and 0 < seen.remaining_s <= 30.0
    a.release_lease(renewed)  # a clean shutdown: the lease is free at once
    assert b.current_lease("leader") is None
    lease_b = b.acquire_lease("leader", "b", 30.0)
    assert lease_b is not None and lease_b.token == 2
    a.release_lease(renewed)  # a stale release changes nothing
    assert a.acquire_lease("leader", "a", 30.0) is None


def test_a_lease_that_ran_out_is_taken_over_and_the_old_holders_writes_are_fenced(reopen: Callable[..., Store]) -> None:
    a, b = reopen(), reopen()
    lease_a = a.acquire_lease("leader", "a", 0.5)
    assert lease_a is not None
    a.replace_placements([PlacementRow("d", "s", "v", 1)], [Event("a", "place", "ModelDeployment", "d", "as leader")], lease=lease_a)
    a.apply([ObjectWrite("ModelDeployment", "d", {}, {"model": "m"})])
    assert a.set_statuses([("ModelDeployment", "d", {"phase": "Ready"})], lease=lease_a) == 1
    # a stops renewing (partitioned, paused); b takes over once the lease ran out, with a larger token
    started = time.monotonic()
    lease_b = wait_for_lease(b, "b", 30.0, within_s=10.0)
    assert time.monotonic() - started > 0.2  # not before a's lease ended
    assert lease_b.token == lease_a.token + 1
    with pytest.raises(store_mod.Fenced, match="no longer held"):
        a.replace_placements([PlacementRow("d", "s", "v", 9)], [Event("a", "place", "ModelDeployment", "d", "late")], lease=lease_a)
    with pytest.raises(store_mod.Fenced):
        a.set_statuses([("ModelDeployment", "d", {"phase": "Late"})], lease=lease_a)
    assert b.next_sequence("assignments", lease=lease_b) == 1
    with pytest.raises(store_mod.Fenced):  # no assignment version for a deposed leader
        a.next_sequence("assignments", lease=lease_a)
    with pytest.raises(store_mod.Fenced):  # nor a block of them
        a.next_sequences("assignments", 5, lease=lease_a)
    assert b.next_sequence("assignments", lease=lease_b) == 2
    with pytest.raises(store_mod.Fenced):  # nor its events
        a.record(Event("a", "serve-applied", "Site", "s", "late"), lease=lease_a)
    b.record(Event("b", "serve-applied", "Site", "s", "as leader"), lease=lease_b)
    assert [e.reason for e in a.events() if e.action == "serve-applied"] == ["as leader"]
    assert a.acquire_lease("leader", "a", 0.5) is None
    assert [p.replicas for p in b.placements()] == [1]  # the deposed leader's late writes did not land
    assert [e.reason for e in b.events() if e.action == "place"] == ["as leader"]
    assert b.get("ModelDeployment", "d").status == {"phase": "Ready"}  # type: ignore[union-attr]
    b.replace_placements([PlacementRow("d", "s", "v", 2)], lease=lease_b)
    assert [p.replicas for p in a.placements()] == [2]


def test_published_bodies_are_versioned_by_change_and_fenced(reopen: Callable[..., Store]) -> None:
    a, b = reopen(), reopen()
    assert b.published("table") is None
    lease = a.acquire_lease("leader", "a", 30.0)
    assert lease is not None
    assert a.publish("table", '{"x":1}', lease=lease) == 1
    assert a.publish("table", '{"x":1}', lease=lease) == 1  # unchanged: the same version
    assert a.publish("table", '{"x":2}', lease=lease) == 2
    assert b.published("table") == (2, '{"x":2}') and b.published("table", newer_than=2) is None
    a.release_lease(lease)
    assert b.acquire_lease("leader", "b", 30.0) is not None
    with pytest.raises(store_mod.Fenced):
        a.publish("table", '{"x":3}', lease=lease)  # a deposed leader's table does not land
    assert b.published("table") == (2, '{"x":2}')


def test_other_processes_commits_are_told_as_they_commit(reopen: Callable[..., Store], location: str) -> None:
    """Replicas hear of each other's writes at the commit (PostgreSQL's NOTIFY): what
    changed, once per transaction, never for a dry run, an unchanged body or their own."""
    writer, reader = reopen(), reopen()
    told: queue.Queue[str] = queue.Queue()
    feed = reader.follow_changes(told.put)
    if not location.startswith("postgresql"):
        assert feed is None  # one process owns an SQLite file: nobody else writes it
        return
    import psycopg
    try:
        assert told.get(timeout=10) == "*"  # listening: anything may have changed before
        site = ObjectWrite("Site", "edge-a", {}, {"tier": "edge"})
        writer.apply([site], Event("alice", "apply", "", "", "dry run"), dry_run=True)
        reader.apply([ObjectWrite("Model", "own", {}, {})])
        writer.publish("table", '{"x":1}')
        writer.publish("table", '{"x":1}')  # unchanged
        writer.apply([site, ObjectWrite("Site", "edge-b", {}, {"tier": "edge"})], Event("alice", "apply", "", "", "two sites"))
        writer.record(Event("replica-2", "wake-requested", "Model", "lazy", "scaled to zero"))
        writer.publish("end", "x")
        heard = []
        while not heard or heard[-1] != "published:end":
            heard.append(told.get(timeout=10))
        assert heard == ["published:table", "events:Site", "resources", "events:Model", "published:end"]

        # a lost connection is listened on again, and said as "anything may have changed"
        with psycopg.connect(location, autocommit=True) as admin:
            cut = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = current_database() AND query LIKE 'LISTEN%'").fetchall()
        assert len(cut) == 1
        assert told.get(timeout=10) == "*"
        writer.publish("table", '{"x":2}')
        assert told.get(timeout=10) == "published:table"
    finally:
        feed.close()


def test_replicas_hours_apart_take_each_others_tokens_for_their_whole_life(postgres: PostgresServer) -> None:
    """A token's creation and expiry are stamped, and checked, on the store's time (the
    database server's clock), not on the clock of the replica that makes or checks it: a
    replica two hours behind made one-hour tokens (bootstrap and API) that every other replica
    refused at once, and one two hours ahead refused those a true one made. A replica's clock
    that steps (NTP) moves nothing once its next lease call has measured it again."""
    from orchestrator.store.postgres import PostgresStore

    url = postgres.create_database()
    step = [0.0]
    behind = PostgresStore(url, wall=lambda: time.time() - 2 * HOUR_S + step[0])
    true, ahead = PostgresStore(url), PostgresStore(url, wall=lambda: time.time() + 2 * HOUR_S)
    try:
        boot_secret, boot = behind.create_token("bootstrap", "agent", HOUR_S, "admin", "for lyon")
        api_secret, api = behind.create_token("api", "admin", HOUR_S, "admin")
        for replica in (true, ahead, behind):
            assert replica.verify_token(boot_secret, "bootstrap") == boot
            assert replica.verify_token(api_secret, "api") == api
            assert replica.has_admin_token()
            assert [t.state for t in replica.tokens()] == ["active", "active"]
        assert boot.expires_at is not None and abs(boot.expires_at - (true.now() + HOUR_S)) < 60  # the database's clock
        made_secret, made = true.create_token("api", "read", HOUR_S, "admin")
        assert ahead.verify_token(made_secret, "api") == made and behind.verify_token(made_secret, "api") == made

        step[0] = 2 * HOUR_S  # the replica behind is set right (NTP steps its clock)
        assert behind.acquire_lease("leader", "behind", 30.0) is not None  # every replica asks every third of the lease
        stepped_secret, stepped = behind.create_token("api", "read", HOUR_S, "admin")
        assert ahead.verify_token(stepped_secret, "api") == stepped
        assert stepped.expires_at is not None and abs(stepped.expires_at - (true.now() + HOUR_S)) < 60
    finally:
        for replica in (behind, true, ahead):
            replica.close()
