"""The event log read by site (``GET /v1/events?site=``, ``describe site``): the sites an event
names are kept in ``event_sites``, read by its index rather than by a scan of every event's
details, on both backends (``location``: an SQLite file and a real PostgreSQL server); events
a store kept before the index, or that a replica of an earlier release logs beside this one,
are found too."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from orchestrator.store import StateStore as Store
from orchestrator.store import eventquery
from orchestrator.store.sqlite import Event


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
    sql, args = eventquery.select(since=0, limit=100, **where)
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
    with raw(location) as conn:
        conn.execute("ANALYZE")
    shown = plan(store, site="edge-lyon")
    print(shown)  # the plan, for the record
    if postgres(store):
        assert "event_sites_pkey" in shown and "Seq Scan" not in shown and "Index Cond: (id = s.event_id)" in shown, shown
    else:
        assert "SEARCH s USING COVERING INDEX sqlite_autoindex_event_sites_1 (site=? AND event_id>?)" in shown, shown
        assert "SEARCH e USING INTEGER PRIMARY KEY (rowid=?)" in shown and "SCAN" not in shown, shown
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
    store.record(Event("scheduler", "replica-placed", "ModelDeployment", "chat", "", {"site": "edge-lyon"}))
    earlier_insert(location, "ModelDeployment", "intent", '{"site":"edge-lyon"}')  # the earlier replica's write succeeds
    earlier_insert(location, "ModelDeployment", "odd", 'NaN')  # details no JSON reads: named no site, indexed none
    store.record(Event("scheduler", "replica-placed", "ModelDeployment", "late", "", {"site": "edge-lyon"}))
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
