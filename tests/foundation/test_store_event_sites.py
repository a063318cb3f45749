"""The event log read by site (``GET /v1/events?site=``, ``describe site``): the sites an event
names are kept in ``event_sites``, read by its index rather than by a scan of every event's
details, on both backends (``location``: an SQLite file and a real PostgreSQL server); events
a store kept before the index, or that a replica of an earlier release logs beside this one,
are found too: indexed in the background after the store opened, and found exactly meanwhile."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from orchestrator.store import StateStore as Store
from orchestrator.store import event_sites, eventquery
from orchestrator.store.postgres import PostgresStore
from orchestrator.store.sql import SqlStore
from orchestrator.store.sqlite import Event
from orchestrator.store.sqlite import Store as SqliteStore


@contextmanager
def raw(location: str) -> Iterator[Any]:
    """A connection of its own to the store at ``location``, as an earlier release's or an operator's."""
    if location.startswith("postgresql"):
        with psycopg.connect(location, autocommit=True) as conn:
            yield conn
    else:
        conn = sqlite3.connect(location, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()


def earlier_insert(location: str, kind: str, name: str, details: str) -> None:
    """An event as a replica of the release before ``event_sites`` logs it: the events row alone."""
    mark = "%s" if location.startswith("postgresql") else "?"
    with raw(location) as conn:
        conn.execute(f"INSERT INTO events (ts, actor, action, kind, name, reason, details) VALUES (1.7e9, 'scheduler', "
                     f"'replica-placed', {mark}, {mark}, 'placed', {mark})", (kind, name, details))


def test_a_site_is_matched_whole_wherever_an_event_names_it(store: Store) -> None:
    store.record(Event("scheduler", "replica-placed", "ModelDeployment", "chat", "", {"site": "edge-lyon", "variant": "q4"}),
                 Event("scheduler", "replica-placed", "ModelDeployment", "chat", "", {"site": "edge-lyon-2", "variant": "q4"}),
                 Event("reconciler", "agent-lost", "Site", "edge-lyon-2", "no heartbeat"),
                 Event("admin", "site-drained", "Site", "edge-paris", "",
                       {"moves": [{"deployment": "chat", "to": "edge-lyon", "variant": "q4"}]}),
                 Event("scheduler", "replica-moved", "ModelDeployment", "intent", "", {"from": "edge-lyon", "to": "edge-lyon"}),
                 Event("alice", "apply", "ModelDeployment", "edge-lyon", "a deployment named like the site", {"note": "edge-lyon"}))
    assert [(e.action, e.name) for e in store.events(site="edge-lyon")] == [
        ("replica-placed", "chat"), ("site-drained", "edge-paris"), ("replica-moved", "intent")]
    assert [(e.action, e.name) for e in store.events(site="edge-lyon-2")] == [("replica-placed", "chat"), ("agent-lost", "edge-lyon-2")]
    assert [e.action for e in store.recent_events(site="edge-lyon", limit=1)] == ["replica-moved"]
    first = store.events(site="edge-lyon")[0].id
    assert [e.action for e in store.events(since=first, limit=1, site="edge-lyon")] == ["site-drained"]


def plan(store: Store, **where: Any) -> str:
    """How the backend reads ``store.events(**where)`` (EXPLAIN): a site's events one range of ``event_sites``' key."""
    sql, args = eventquery.select(since=0, limit=100, contains=store.contains, **where)  # type: ignore[attr-defined]
    if postgres(store):
        rows = store._fetch("EXPLAIN " + store._q(sql), args)  # type: ignore[attr-defined]
        return "\n".join(str(r["QUERY PLAN"]) for r in rows)
    return "\n".join(str(r["detail"]) for r in store._fetch("EXPLAIN QUERY PLAN " + sql, args))  # type: ignore[attr-defined]


def postgres(store: Store) -> bool:
    return store.placeholder == "%s"  # type: ignore[attr-defined]


def test_the_events_at_a_site_are_read_by_the_index_not_by_a_scan_of_the_log(store: Store, location: str) -> None:
    # a long log, as an earlier release left it: 20,000 events over 100 sites and a quiet one, edge-lyon (4), then indexed
    series = ("SELECT 1.7e9 + g, 'scheduler', 'replica-placed', 'ModelDeployment', 'd' || g, '', "
              "'{\"site\":\"' || (CASE WHEN g % 5000 = 0 THEN 'edge-lyon' ELSE 'edge-' || (g % 100) END) || '\"}' FROM generate_series(1, 20000) AS g" if postgres(store) else
              "WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n WHERE g < 20000) SELECT 1.7e9 + g, 'scheduler', "
              "'replica-placed', 'ModelDeployment', 'd' || g, '', '{\"site\":\"' || (CASE WHEN g % 5000 = 0 THEN 'edge-lyon' ELSE 'edge-' || (g % 100) END) || '\"}' FROM n")
    with raw(location) as conn:
        conn.execute("INSERT INTO events (ts, actor, action, kind, name, reason, details) " + series)
    while store.index_event_sites():
        pass
    assert event_sites.behind(store) == 0  # type: ignore[arg-type]  # every event indexed: a read by site reads the index alone
    with raw(location) as conn:
        conn.execute("ANALYZE")
    shown = plan(store, site="edge-lyon")
    print(shown)  # the plan, for the record
    if postgres(store):
        assert "event_sites_pkey" in shown and "Index Cond: (id = s.event_id)" in shown, shown
        assert "Seq Scan on events" not in shown and "Seq Scan on event_sites" not in shown, shown  # meta's few rows aside
        assert "Index Scan using events_pkey on events  " in shown, shown  # those not indexed yet, by id: none here
    else:
        assert "SEARCH s USING COVERING INDEX sqlite_autoindex_event_sites_1 (site=? AND event_id>? AND event_id<?)" in shown, shown
        assert "SEARCH e USING INTEGER PRIMARY KEY (rowid=?)" in shown, shown
        assert "SEARCH events USING INTEGER PRIMARY KEY (rowid>?)" in shown, shown  # those not indexed yet: none here
        assert "SCAN s" not in shown and "SCAN e" not in shown and "SCAN events" not in shown, shown
    assert [e.name for e in store.events(site="edge-lyon")] == ["d5000", "d10000", "d15000", "d20000"]
    assert [e.name for e in store.events(site="edge-lyon", since=10_000)] == ["d15000", "d20000"]
    assert [e.name for e in store.recent_events(site="edge-3", limit=2)] == ["d19903", "d19803"][::-1]


def test_events_a_store_kept_before_the_index_are_found_once_it_is_opened_again(reopen: Callable[..., Store], location: str) -> None:
    s = reopen()
    s.record(Event("scheduler", "replica-placed", "ModelDeployment", "chat", "", {"site": "edge-lyon"}),
             Event("reconciler", "agent-lost", "Site", "edge-lyon", "no heartbeat"))
    s.close()
    with raw(location) as conn:  # the store as the release before event_sites left it
        conn.execute("DROP TABLE event_sites")
        conn.execute("DELETE FROM meta WHERE key = 'event_sites_through'")
    earlier_insert(location, "ModelDeployment", "intent", '{"from":"edge-lyon","to":"edge-paris"}')
    s = reopen()
    assert [(e.action, e.name) for e in s.events(site="edge-lyon")] == [
        ("replica-placed", "chat"), ("agent-lost", "edge-lyon"), ("replica-placed", "intent")]
    assert [e.name for e in s.events(site="edge-paris")] == ["intent"]


def test_an_earlier_replica_still_logs_events_and_they_are_found_after_the_next_indexing_pass(store: Store, location: str) -> None:
    assert store.event_sites.wait(30)  # type: ignore[attr-defined]  # the start's backfill: nothing to index
    store.record(Event("scheduler", "replica-placed", "ModelDeployment", "chat", "", {"site": "edge-lyon"}))
    earlier_insert(location, "ModelDeployment", "intent", '{"site":"edge-lyon"}')  # the earlier replica's write succeeds
    earlier_insert(location, "ModelDeployment", "odd", 'NaN')  # details no JSON reads: named no site, indexed none
    store.record(Event("scheduler", "replica-placed", "ModelDeployment", "late", "", {"site": "edge-lyon"}))
    assert [e.name for e in store.events(site="edge-lyon")] == ["chat", "intent", "late"]  # found before they are indexed
    assert store.index_event_sites() == 4
    assert [e.name for e in store.events(site="edge-lyon")] == ["chat", "intent", "late"]
    assert store.index_event_sites() == 0  # caught up: nothing read again


def test_pruned_events_take_the_sites_they_named_with_them(store: Store, clock: Any, location: str) -> None:
    store.record(Event("scheduler", "replica-placed", "ModelDeployment", "chat", "", {"site": "edge-lyon"}))
    clock.now += 10
    store.record(Event("scheduler", "replica-placed", "ModelDeployment", "kept", "", {"site": "edge-lyon"}))
    assert store.prune_events(clock.now - 5, audit=False) == 1
    assert [e.name for e in store.events(site="edge-lyon")] == ["kept"]
    with raw(location) as conn:
        assert conn.execute("SELECT COUNT(*) FROM event_sites").fetchone()[0] == 1


class Gate:
    """What indexes a batch of the background backfill (``index_sites``): the first ``let``
    batches go through, each after that is held until ``go`` is set (``held``: one is)."""

    def __init__(self, let: int) -> None:
        self.let, self.calls = let, 0
        self.held, self.go = threading.Event(), threading.Event()

    def __call__(self, store: SqlStore, batch: int) -> int:
        self.calls += 1
        if self.calls > self.let:
            self.held.set()
            assert self.go.wait(30), "held past the test"
        return event_sites.index(store, batch)


def gated(location: str, gate: Gate) -> SqlStore:
    """The store at ``location``, its backfill of earlier events going through ``gate``."""
    if location.startswith("postgresql"):
        return PostgresStore(location, index_sites=gate)
    return SqliteStore(location, index_sites=gate)


def kept_from_before(reopen: Callable[..., Store], location: str, events: int) -> list[int]:
    """A store as the release before event_sites left it: ``events`` events over the sites
    edge-0 … edge-9 and edge-lyon (every 700th), a few that name sites in each way, and events
    this release logged before it was stopped (indexed). Their ids, in order."""
    s = reopen()
    s.record(Event("scheduler", "replica-placed", "ModelDeployment", "first", "", {"site": "edge-lyon"}))
    s.close()
    with raw(location) as conn:
        conn.execute("DROP TABLE event_sites")
        conn.execute("DELETE FROM meta WHERE key = 'event_sites_through'")
        series = "generate_series(1, %d) AS g" % events if location.startswith("postgresql") else \
            "(WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n WHERE g < %d) SELECT g FROM n)" % events
        conn.execute("INSERT INTO events (ts, actor, action, kind, name, reason, details) SELECT 1.7e9 + g, 'scheduler', "
                     "'replica-placed', 'ModelDeployment', 'd' || g, '', '{\"site\":\"' || (CASE WHEN g % 700 = 0 THEN "
                     "'edge-lyon' ELSE 'edge-' || (g % 10) END) || '\"}' FROM " + series)
    for kind, name, details in (("Site", "edge-lyon", "{}"), ("Site", "edge-lyon-2", "{}"),
                                ("Site", "edge-paris", '{"moves":[{"deployment":"chat","to":"edge-lyon","variant":"q4"}]}'),
                                ("ModelDeployment", "intent", '{"from":"edge-lyon","to":"edge-lyon-2"}'),
                                ("ModelDeployment", "edge-lyon", '{"note":"edge-lyon","site":"EDGE-LYON"}'),
                                ("ModelDeployment", "odd", "NaN")):
        earlier_insert(location, kind, name, details)
    with raw(location) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM events ORDER BY id").fetchall()]


SITES = ("edge-lyon", "edge-lyon-2", "edge-paris", "edge-3", "edge-nowhere")


def reads(s: SqlStore, ids: list[int]) -> list[list[tuple[int, str]]]:
    """Every way of reading the log by site, from the start, from the middle, the newest, with a kind."""
    found = []
    for site in SITES:
        for read in (s.events(site=site, limit=10_000), s.events(site=site, since=ids[len(ids) // 2], limit=3),
                     s.events(site=site, since=ids[len(ids) // 3], limit=10_000), s.recent_events(site=site, limit=5),
                     s.recent_events(site=site, limit=10_000), s.events(site=site, kind="Site")):
            found.append([(e.id, e.name) for e in read])
    return found


def test_the_store_answers_at_once_and_a_read_by_site_is_exact_while_earlier_events_are_indexed(
        reopen: Callable[..., Store], location: str) -> None:
    ids = kept_from_before(reopen, location, 3000)
    gate = Gate(let=1)
    s = gated(location, gate)
    try:
        assert gate.held.wait(30)  # the backfill holds at its second batch: the store is open, and answers
        s.record(Event("scheduler", "replica-placed", "ModelDeployment", "late", "", {"site": "edge-lyon"}))
        through = event_sites.behind(s)
        assert 0 < through < len(ids), through  # part of the log indexed, part not
        assert s.event_sites.remaining() == len(ids) - event_sites.BATCH  # what the gauge edgeplane_event_sites_backfill_remaining says
        during = reads(s, [*ids, ids[-1] + 1])
        gate.go.set()
        assert s.event_sites.wait(30)
        assert event_sites.behind(s) == 0 and s.event_sites.remaining() == 0
        after = reads(s, [*ids, ids[-1] + 1])
    finally:
        gate.go.set()
        s.close()
    assert during == after
    lyon = [name for _, name in after[0]]
    assert lyon == ["first", *[f"d{g}" for g in range(700, 3001, 700)], "edge-lyon", "edge-paris", "intent", "late"]
    assert [name for _, name in after[SITES.index("edge-lyon-2") * 6]] == ["edge-lyon-2", "intent"]
    assert after[SITES.index("edge-nowhere") * 6] == []


def test_a_backfill_stops_when_the_store_closes_and_the_next_start_goes_on_from_where_it_stopped(
        reopen: Callable[..., Store], location: str) -> None:
    ids = kept_from_before(reopen, location, 2500)
    gate = Gate(let=1)
    s = gated(location, gate)
    assert gate.held.wait(30)
    s.event_sites.close(timeout_s=0)  # as the store's close does first
    gate.go.set()
    assert s.event_sites.wait(30)
    assert gate.calls == 2  # the batch under way ends; no other starts
    s.close()
    left = len(ids) - 2 * event_sites.BATCH
    again = Gate(let=1_000)
    s = gated(location, again)
    try:
        assert s.event_sites.wait(30)
        assert (s.event_sites.left, s.event_sites.read) == (left, left)  # from where it stopped, not from the first event
        assert [name for _, name in reads(s, ids)[0]][:4] == ["first", "d700", "d1400", "d2100"]
    finally:
        s.close()


def test_replicas_started_together_index_earlier_events_one_at_a_time(reopen: Callable[..., Store], location: str) -> None:
    if not location.startswith("postgresql"):
        return  # one process holds an SQLite file
    ids = kept_from_before(reopen, location, 2500)
    first_gate, second_gate = Gate(let=1), Gate(let=1_000)
    first = gated(location, first_gate)
    second = None
    try:
        assert first_gate.held.wait(30)  # the first replica has the turn, and waits between two batches
        second = gated(location, second_gate)
        with raw(location) as conn:
            turns = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND granted",
                                 (0x6564_6773 & 0xFFFF_FFFF,)).fetchone()[0]
            for _ in range(300):  # the second replica asks for the turn (and is refused) at least once: bounded
                trying = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND query LIKE 'SELECT pg_try_advisory_lock%%'").fetchone()[0]
                if trying == 2:
                    break
                time.sleep(0.1)
        assert (turns, trying) == (1, 2)
        first_gate.go.set()
        assert first.event_sites.wait(30) and second.event_sites.wait(30)
        assert first.event_sites.read == len(ids)
        assert (second.event_sites.left, second.event_sites.read, second_gate.calls) == (0, 0, 1)  # it found the work done
    finally:
        first_gate.go.set()
        first.close()
        if second is not None:
            second.close()
