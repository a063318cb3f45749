"""The state store, on both backends (an SQLite file and a real PostgreSQL server): versions,
optimistic concurrency, atomicity, the event log, tokens, and consistency after a kill -9
in the middle of writing. Every test runs against both; they must behave identically."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from orchestrator.store import StateStore, open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.store.sqlite import Conflict, Event, NotFound, ObjectWrite, PlacementRow

Store = StateStore


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """Where a test's store lives: an SQLite file, or a fresh database on the session's server."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def reopen(location: str) -> Iterator[Callable[..., Store]]:
    """Opens (again) the store at this test's location; closes all it opened at the end."""
    opened: list[Store] = []

    def make(clock: Callable[[], float] = time.time) -> Store:
        opened.append(open_store(location, clock=clock))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(reopen: Callable[..., Store], clock: FakeClock) -> Store:
    return reopen(clock)


def stored_bytes(location: str) -> bytes:
    """Everything the backend keeps on disk or in its tables, as bytes."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            return b"".join(str(conn.execute(f"SELECT * FROM {t}").fetchall()).encode() for t in tables)
    folder = pathlib.Path(location).parent
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.name.startswith(pathlib.Path(location).name))


def write(name: str, spec: dict, labels: dict | None = None, expected: int | None = None, kind: str = "Site") -> ObjectWrite:
    return ObjectWrite(kind, name, labels or {}, spec, expected)


WHO = Event("alice", "apply", "", "", "rollout ticket 42")


def test_generation_counts_spec_changes_and_resource_version_counts_every_write(store: Store, clock: FakeClock) -> None:
    [created] = store.apply([write("a", {"x": 1})], WHO)
    assert (created.action, created.generation, created.resource_version) == ("created", 1, 1)

    [same] = store.apply([write("a", {"x": 1})], WHO)
    assert (same.action, same.generation, same.resource_version) == ("unchanged", 1, 1)
    assert store.resource_version() == 1  # a no-op write does not bump anything

    clock.now += 10
    [labels] = store.apply([write("a", {"x": 1}, {"team": "care"})], WHO)
    assert (labels.action, labels.generation, labels.resource_version) == ("configured", 1, 2)  # labels: not a spec change

    [spec] = store.apply([write("a", {"x": 2}, {"team": "care"})], WHO)
    assert (spec.action, spec.generation, spec.resource_version) == ("configured", 2, 3)

    [other] = store.apply([write("b", {"y": 1})], WHO)
    assert other.resource_version == 4  # the version is store-wide

    obj = store.get("Site", "a")
    assert obj is not None
    assert (obj.generation, obj.resource_version, dict(obj.spec), dict(obj.labels)) == (2, 3, {"x": 2}, {"team": "care"})
    assert obj.created_at == 1_000_000.0 and obj.updated_at == 1_000_010.0


def test_key_order_in_a_spec_is_not_a_change(store: Store) -> None:
    store.apply([write("a", {"x": 1, "y": {"b": 2, "a": 1}})])
    [again] = store.apply([write("a", {"y": {"a": 1, "b": 2}, "x": 1})])
    assert again.action == "unchanged"


def test_status_updates_do_not_touch_generation(store: Store) -> None:
    store.apply([write("a", {"x": 1})])
    assert store.set_status("Site", "a", {"health": "Healthy"}) is True
    obj = store.get("Site", "a")
    assert obj is not None and obj.generation == 1 and dict(obj.status) == {"health": "Healthy"}
    assert store.set_status("Site", "missing", {"health": "Healthy"}) is False


def test_statuses_of_a_pass_are_written_together_skipping_the_gone(store: Store) -> None:
    store.apply([write("a", {"x": 1}), write("b", {"x": 2})])
    store.set_status("Site", "b", {"health": "Healthy"})
    version = store.resource_version()
    existing = store.set_statuses([
        ("Site", "a", {"health": "Healthy"}),
        ("Site", "b", {"health": "Unhealthy", "reason": "no heartbeat"}),
        ("Site", "gone", {"health": "Healthy"}),
        ("ModelDeployment", "a", {"phase": "Running"}),  # same name, another kind: not there
    ])
    assert existing == 2
    a, b = store.get("Site", "a"), store.get("Site", "b")
    assert a is not None and dict(a.status) == {"health": "Healthy"} and a.generation == 1
    assert b is not None and dict(b.status) == {"health": "Unhealthy", "reason": "no heartbeat"}
    assert store.get("Site", "gone") is None and store.get("ModelDeployment", "a") is None
    assert store.resource_version() == version  # status is not spec


def test_a_status_of_an_object_deleted_and_created_again_since_it_was_read_is_not_written(store: Store, clock: FakeClock) -> None:
    store.apply([write("a", {"x": 1}), write("b", {"x": 1})])
    read = {("Site", o.name): o.created_at for o in store.list("Site")}
    clock.now += 1
    store.delete("Site", "a", WHO)
    store.apply([write("a", {"x": 2})])
    existing = store.set_statuses([("Site", "a", {"health": "Healthy"}), ("Site", "b", {"health": "Healthy"})], created=read)
    assert existing == 1  # the "a" that was read is gone
    a, b = store.get("Site", "a"), store.get("Site", "b")
    assert a is not None and dict(a.status) == {} and b is not None and dict(b.status) == {"health": "Healthy"}


def test_statuses_of_more_objects_than_one_read_takes_are_written_only_where_they_changed(store: Store) -> None:
    names = [f"s{i}" for i in range(1234)]  # more than one statement reads
    store.apply([write(n, {"x": 1}) for n in names])
    assert store.set_statuses([("Site", n, {"health": "Healthy"}) for n in names]) == 1234
    changed = {"s0", "s499", "s500", "s1233"}  # each side of a batch's edge
    assert store.set_statuses([("Site", n, {"health": "Lost" if n in changed else "Healthy"}) for n in [*names, "gone"]]) == 1234
    assert {o.name for o in store.list("Site") if o.status["health"] == "Lost"} == changed


def test_set_statuses_reads_the_current_statuses_a_batch_at_a_time_not_one_object_each(tmp_path: pathlib.Path) -> None:
    def selects(n: int) -> int:
        store = store_mod.Store(tmp_path / f"state-{n}.db")
        try:
            store.apply([write(f"s{i}", {"x": 1}) for i in range(n)])
            statuses = [("Site", f"s{i}", {"health": "Healthy"}) for i in range(n)]
            store.set_statuses(statuses)
            seen: list[str] = []
            store._db.set_trace_callback(seen.append)
            store.set_statuses(statuses)  # a usual pass: nothing changed
            store._db.set_trace_callback(None)
            return sum(1 for statement in seen if statement.lstrip().upper().startswith("SELECT"))
        finally:
            store.close()

    assert selects(400) == selects(10)


def test_a_dry_run_says_what_apply_would_do_and_leaves_no_trace(store: Store) -> None:
    store.apply([write("a", {"x": 1}), write("b", {"x": 2})])
    version, before = store.resource_version(), [(o.name, dict(o.spec), o.generation) for o in store.list("Site")]
    writes = [write("a", {"x": 1}), write("b", {"x": 3}), write("c", {"x": 4})]
    dry = store.apply(writes, dry_run=True)
    assert [o.action for o in dry] == ["unchanged", "configured", "created"]
    assert [(o.name, dict(o.spec), o.generation) for o in store.list("Site")] == before
    assert store.resource_version() == version
    real = store.apply(writes)
    assert [(o.action, o.generation) for o in real] == [(o.action, o.generation) for o in dry]
    with pytest.raises(Conflict):
        store.apply([write("a", {"x": 9}, expected=99)], dry_run=True)


def test_stale_update_is_refused_not_lost(store: Store) -> None:
    [v1] = store.apply([write("a", {"replicas": 1})])
    # two writers read version v1; the first wins
    [won] = store.apply([write("a", {"replicas": 2}, expected=v1.resource_version)])
    assert won.action == "configured"
    with pytest.raises(Conflict, match="resourceVersion is 2, the request expected 1"):
        store.apply([write("a", {"replicas": 3}, expected=v1.resource_version)])
    obj = store.get("Site", "a")
    assert obj is not None and dict(obj.spec) == {"replicas": 2} and obj.resource_version == won.resource_version
    # re-read and retry succeeds
    [retry] = store.apply([write("a", {"replicas": 3}, expected=won.resource_version)])
    assert retry.action == "configured" and store.get("Site", "a").spec == {"replicas": 3}  # type: ignore[union-attr]


def test_expected_version_zero_means_create_only(store: Store) -> None:
    store.apply([write("a", {"x": 1}, expected=0)])
    with pytest.raises(Conflict):
        store.apply([write("a", {"x": 2}, expected=0)])


def test_annotations_are_kept_and_a_change_is_a_new_version_not_a_new_generation(store: Store) -> None:
    [a] = store.apply([ObjectWrite("Site", "a", {}, {"x": 1}, annotations={"owner": "team-x"})])
    assert store.get("Site", "a").annotations == {"owner": "team-x"}  # type: ignore[union-attr]
    [same] = store.apply([ObjectWrite("Site", "a", {}, {"x": 1}, annotations={"owner": "team-x"})])
    assert same.action == "unchanged"
    [changed] = store.apply([ObjectWrite("Site", "a", {}, {"x": 1}, annotations={"owner": "team-y", "ticket": "OPS-12"})])
    assert changed.action == "configured" and changed.generation == a.generation and changed.resource_version > a.resource_version
    assert store.get("Site", "a").annotations == {"owner": "team-y", "ticket": "OPS-12"}  # type: ignore[union-attr]


def test_a_store_made_before_annotations_gains_them(reopen: Callable[..., Store], location: str) -> None:
    reopen().apply([write("old", {"x": 1})])
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            conn.execute("ALTER TABLE objects DROP COLUMN annotations")
    else:
        with contextlib.closing(sqlite3.connect(location)) as db:
            db.execute("ALTER TABLE objects DROP COLUMN annotations")
            db.commit()
    again = reopen()
    assert again.get("Site", "old").annotations == {} and again.get("Site", "old").spec == {"x": 1}  # type: ignore[union-attr]
    again.apply([ObjectWrite("Site", "old", {}, {"x": 1}, annotations={"note": "kept"})])
    assert again.get("Site", "old").annotations == {"note": "kept"}  # type: ignore[union-attr]


def capturing(on: bool, retention_days: int = 30) -> ObjectWrite:
    capture = {"capture": {"retentionDays": retention_days, "zones": ["EU"]}} if on else {}
    return ObjectWrite("ModelDeployment", "d", {}, {"model": "m", "cascade": {"stages": [{"variant": "v"}], **capture}})


def test_capture_turned_on_again_is_another_capture_also_on_a_store_made_before_it_was_told_apart(
        reopen: Callable[..., Store], location: str, clock: FakeClock) -> None:
    """Which capture of a deployment is in force (what its records are stamped with) is its
    creation until its capture is turned off and on again; a change while on keeps it."""
    reopen(clock).apply([capturing(True)])
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            conn.execute("ALTER TABLE objects DROP COLUMN capture_since")
    else:
        with contextlib.closing(sqlite3.connect(location)) as db:
            db.execute("ALTER TABLE objects DROP COLUMN capture_since")
            db.commit()
    store = reopen(clock)

    def in_force() -> float:
        obj = store.get("ModelDeployment", "d")
        assert obj is not None
        return store_mod.capture_since(obj)

    assert in_force() == 1_000_000.0  # since it was created
    for now, on, retention, since in ((1_000_010.0, True, 20, 1_000_000.0), (1_000_020.0, False, 20, 1_000_000.0),
                                      (1_000_030.0, True, 20, 1_000_030.0), (1_000_040.0, True, 10, 1_000_030.0)):
        clock.now = now
        store.apply([capturing(on, retention)])
        assert in_force() == since, (now, on)


def test_a_version_expected_of_an_object_that_is_gone_says_so(store: Store) -> None:
    [v1] = store.apply([write("a", {"x": 1})])
    store.delete("Site", "a", WHO)
    with pytest.raises(Conflict, match=r"Site 'a' does not exist .* expects resourceVersion \d+; remove metadata.resourceVersion"):
        store.apply([write("a", {"x": 2}, expected=v1.resource_version)])
    assert store.get("Site", "a") is None


def test_one_bad_write_applies_none(store: Store) -> None:
    store.apply([write("a", {"x": 1})])
    version, events = store.resource_version(), store.events(limit=1000)
    with pytest.raises(Conflict):
        store.apply([write("b", {"y": 1}), write("c", {"z": 1}), write("a", {"x": 2}, expected=999)], WHO)
    assert store.get("Site", "b") is None and store.get("Site", "c") is None
    assert store.get("Site", "a").spec == {"x": 1}  # type: ignore[union-attr]
    assert store.resource_version() == version
    assert store.events(limit=1000) == events


def test_a_non_serialisable_spec_applies_nothing(store: Store) -> None:
    with pytest.raises(TypeError):
        store.apply([write("b", {"y": 1}), write("c", {"z": object()})], WHO)
    assert store.list() == [] and store.resource_version() == 0 and store.events() == []


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


def test_delete(store: Store) -> None:
    [v] = store.apply([write("a", {"x": 1})])
    with pytest.raises(NotFound):
        store.delete("Site", "nope", WHO)
    with pytest.raises(Conflict):
        store.delete("Site", "a", WHO, expected_version=v.resource_version + 5)
    assert store.get("Site", "a") is not None
    out = store.delete("Site", "a", WHO, expected_version=v.resource_version)
    assert out.action == "deleted" and out.resource_version == v.resource_version + 1 == store.resource_version()
    assert store.get("Site", "a") is None and store.list("Site") == []


def test_a_sqlite_url_opens_the_file_it_names(tmp_path: pathlib.Path) -> None:
    store = open_store(f"sqlite://{tmp_path}/state.db")
    try:
        store.apply([write("a", {})])
    finally:
        store.close()
    assert (tmp_path / "state.db").is_file()


def test_delete_many_is_all_or_nothing(store: Store) -> None:
    store.apply([write("a", {}), write("b", {}), write("d1", {}, kind="ModelDeployment")])
    store.replace_placements([store_mod.PlacementRow("d1", "a", "v", 1)])
    version, events = store.resource_version(), len(store.events())
    with pytest.raises(NotFound, match="'nope'"):
        store.delete_many([("Site", "a"), ("Site", "nope"), ("Site", "b")], WHO)
    assert [o.name for o in store.list("Site")] == ["a", "b"] and store.resource_version() == version
    assert len(store.events()) == events  # a refused bundle logs nothing either
    out = store.delete_many([("ModelDeployment", "d1"), ("Site", "nope"), ("Site", "a")], WHO, missing_ok=True)
    assert [(o.kind, o.name, o.action) for o in out] == [("ModelDeployment", "d1", "deleted"), ("Site", "a", "deleted")]
    assert [o.name for o in store.list()] == ["b"] and store.placements() == []
    assert [e.action for e in store.events()[-2:]] == ["deleted", "deleted"]


def test_deleting_a_deployment_removes_its_placements(store: Store) -> None:
    store.apply([write("d1", {}, kind="ModelDeployment"), write("d2", {}, kind="ModelDeployment")])
    store.replace_placements([store_mod.PlacementRow("d1", "s", "v", 2), store_mod.PlacementRow("d2", "s", "v", 1),
                              store_mod.PlacementRow("d2", "t", "v", 0)])
    assert [(p.deployment, p.site) for p in store.placements()] == [("d1", "s"), ("d2", "s")]  # zero rows are not intent
    store.delete("ModelDeployment", "d1", WHO)
    assert [p.deployment for p in store.placements()] == ["d2"]


def test_placements_are_read_a_page_at_a_time_after_a_key_in_byte_order(store: Store) -> None:
    deployments = ["d1", "d2", "é", "Z"]
    store.apply([write(d, {}, kind="ModelDeployment") for d in deployments])
    rows = [store_mod.PlacementRow(d, s, v, 1) for d in deployments for s in ("s1", "s2") for v in ("a", "b")]
    store.replace_placements(rows)
    whole = store.placements()
    assert [(p.deployment, p.site, p.variant) for p in whole] == sorted((p.deployment, p.site, p.variant) for p in rows)
    pages, after = [], None
    for _ in range(len(rows)):
        page = store.placements(after, 3)
        if not page:
            break
        pages.append(page)
        after = (page[-1].deployment, page[-1].site, page[-1].variant)
    assert [len(p) for p in pages] == [3, 3, 3, 3, 3, 1] and [r for p in pages for r in p] == whole
    keys = [(p.deployment, p.site, p.variant) for p in whole]
    at = keys.index(("d2", "s1", "a"))
    assert store.placements(("d2", "s1", "a"), 2) == whole[at + 1:at + 3]  # after a key, whichever of its parts differs first
    assert store.placements(("d2", "s1", "zz")) == whole[keys.index(("d2", "s2", "a")):]


def test_a_page_of_a_list_is_read_by_index_in_byte_order_on_postgresql(store: Store, location: str) -> None:
    """Pages are asked for in byte order (``COLLATE "C"``, as SQLite sorts), which an index in
    the database's own collation cannot give: each page would read and sort the whole table."""
    if not location.startswith("postgresql"):
        return  # SQLite's keys are byte-ordered already
    import psycopg
    with psycopg.connect(location, autocommit=True) as db:
        for plan_kind in ("seqscan", "bitmapscan", "sort"):  # what an index can give, not what an empty table's costs pick
            db.execute(f"SET enable_{plan_kind} = off")
        for query in ('SELECT * FROM placements WHERE (deployment COLLATE "C", site COLLATE "C", variant COLLATE "C") > (%s, %s, %s)'
                      ' ORDER BY deployment COLLATE "C", site COLLATE "C", variant COLLATE "C" LIMIT 500',
                      'SELECT * FROM objects WHERE kind = %s AND name COLLATE "C" > %s ORDER BY name COLLATE "C" LIMIT 500'):
            args = ("d", "s", "v") if "placements" in query else ("Site", "edge")
            plan = "\n".join(row[0] for row in db.execute("EXPLAIN " + query, args).fetchall())
            assert "Index" in plan and "Sort" not in plan, plan


def test_a_deleted_datacentre_site_is_kept_until_its_applications_are_removed(reopen: Callable[..., Store]) -> None:
    """Whichever replica leads next finds where its Serve applications run, until the
    leader that removed them forgets it; declaring the Site again takes them over."""
    a, b = reopen(), reopen()
    dc = {"tier": "datacenter", "kubernetes": {"context": "c", "namespace": "ns"}}
    a.apply([write("dc", dc), write("edge", {"tier": "edge"})])
    a.delete_many([("Site", "dc"), ("Site", "edge")], WHO)
    [first] = b.deleted_sites()
    assert (first.name, dict(first.spec)) == ("dc", dc)
    a.apply([write("dc", dc)])
    assert b.deleted_sites() == []  # declared again: its apply replaces the applications
    a.delete("Site", "dc", WHO)
    [second] = b.deleted_sites()
    b.forget_deleted_site(first)  # removed for the first delete: the second still has to be
    assert b.deleted_sites() == [second]
    lease = a.acquire_lease("leader", "a", 30.0)
    assert lease is not None
    a.release_lease(lease)
    assert b.acquire_lease("leader", "b", 30.0) is not None
    with pytest.raises(store_mod.Fenced):  # a deposed leader's removal does not count
        a.forget_deleted_site(second, lease=lease)
    b.forget_deleted_site(second)
    assert a.deleted_sites() == []


def test_a_datacentre_site_moved_off_its_target_keeps_the_old_one_until_its_applications_are_removed(
        reopen: Callable[..., Store]) -> None:
    """In the transaction of the change, for whichever replica leads next: each target left
    (another cluster, the edge tier) is a record of its own; moving back takes one over;
    and a change that keeps the target (a token file, the capacity) leaves none."""
    a, b = reopen(), reopen()
    ns = {"tier": "datacenter", "kubernetes": {"context": "c", "namespace": "ns"}, "capacity": {"cpu": 1}}
    other = {"tier": "datacenter", "kubernetes": {"context": "c", "namespace": "other"}}
    ray = {"tier": "datacenter", "ray": {"address": "http://ray:8265"}}
    a.apply([write("dc", ns)])
    a.apply([write("dc", {**ns, "capacity": {"cpu": 2}})])
    assert b.deleted_sites() == []
    a.apply([write("dc", other)])
    a.apply([write("dc", ray)])
    assert [(d.name, d.spec, d.target) for d in b.deleted_sites()] == [
        ("dc", {**ns, "capacity": {"cpu": 2}}, "kubernetes c ns"), ("dc", other, "kubernetes c other")]
    a.apply([write("dc", other)])  # back: its apply takes the applications there over
    a.apply([write("dc", {"tier": "edge"})])
    assert [d.target for d in b.deleted_sites()] == ["kubernetes c ns", "ray http://ray:8265", "kubernetes c other"]
    assert a.abandon_deleted_site("dc", Event("alice", "applications-abandoned", "Site", "dc", "gone")) == (False, True)
    assert b.deleted_sites() == []


def test_a_datacentre_site_declared_again_elsewhere_keeps_the_deleted_ones_target(reopen: Callable[..., Store]) -> None:
    """Its applications still run on the target the deleted Site left: declared again on
    another one, the removal there stays due; on that target again, its apply takes them over."""
    a, b = reopen(), reopen()
    ns = {"tier": "datacenter", "kubernetes": {"context": "c", "namespace": "ns"}}
    a.apply([write("dc", ns)])
    a.delete("Site", "dc", WHO)
    a.apply([write("dc", {"tier": "datacenter", "ray": {"address": "http://ray:8265/"}})])
    assert [(d.name, d.target) for d in b.deleted_sites()] == [("dc", "kubernetes c ns")]
    a.delete("Site", "dc", WHO)  # deleted again: the first delete's target is still due
    assert [(d.name, d.target) for d in b.deleted_sites()] == [("dc", "kubernetes c ns"), ("dc", "ray http://ray:8265")]
    a.apply([write("dc", ns)])
    assert [(d.name, d.target) for d in b.deleted_sites()] == [("dc", "ray http://ray:8265")]


def test_a_store_made_before_deleted_sites_were_kept_gains_them(reopen: Callable[..., Store], location: str) -> None:
    reopen().apply([write("dc", {"tier": "datacenter"})])
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            conn.execute("DROP TABLE deleted_sites")
    else:
        with contextlib.closing(sqlite3.connect(location)) as db:
            db.execute("DROP TABLE deleted_sites")
            db.commit()
    again = reopen()
    again.delete("Site", "dc", WHO)
    assert [d.name for d in again.deleted_sites()] == ["dc"]


def test_a_store_that_kept_one_deleted_site_record_a_name_keeps_one_a_target(reopen: Callable[..., Store], location: str) -> None:
    """A store made when a Site left one record at most: its records are kept, and a Site
    moved off another target leaves one more."""
    ns = {"tier": "datacenter", "kubernetes": {"context": "c", "namespace": "ns"}}
    reopen().apply([write("dc", ns)])
    old_table = ["DROP TABLE deleted_sites", "CREATE TABLE deleted_sites (name TEXT PRIMARY KEY, spec TEXT NOT NULL, version BIGINT NOT NULL)",
                 """INSERT INTO deleted_sites VALUES ('gone', '{"tier":"datacenter","ray":{"address":"local"}}', 1)"""]
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            for statement in old_table:
                conn.execute(statement)
    else:
        with contextlib.closing(sqlite3.connect(location)) as db:
            for statement in old_table:
                db.execute(statement)
            db.commit()
    again = reopen()
    again.apply([write("dc", {**ns, "kubernetes": {"context": "c", "namespace": "other"}})])
    again.delete("Site", "dc", WHO)
    assert [(d.name, d.target) for d in again.deleted_sites()] == [
        ("dc", "kubernetes c ns"), ("dc", "kubernetes c other"), ("gone", "ray local")]


@contextlib.contextmanager
def raw_sql(location: str) -> Iterator[Callable[..., list[tuple]]]:
    """Statements (written with ``?``) run on the store's database as another program would, committed at the end."""
    if location.startswith("postgresql://"):
        import psycopg

        conn: Any = psycopg.connect(location)
    else:
        conn = sqlite3.connect(location)

    def run(sql: str, args: tuple = ()) -> list[tuple]:
        cursor = conn.execute(sql if isinstance(conn, sqlite3.Connection) else sql.replace("?", "%s"), args)
        return [tuple(r) for r in cursor.fetchall()] if cursor.description else []

    with contextlib.closing(conn):
        yield run
        conn.commit()


#: How the previous release deletes a data-centre Site, and reads what is left to remove.
PREVIOUS_DELETE = ("INSERT INTO deleted_sites (name, spec, version) VALUES (?, ?, ?) ON CONFLICT (name)"
                   " DO UPDATE SET spec = excluded.spec, version = excluded.version")
PREVIOUS_READ = "SELECT name, version FROM deleted_sites ORDER BY name"


def test_a_replica_of_the_previous_release_deletes_datacentre_sites_on_a_store_this_one_opened(
        reopen: Callable[..., Store], location: str) -> None:
    """A rolling update or a downgrade: both versions write the one database. The previous
    release's delete, done twice, keeps one record as it always did; and it never sees
    the targets a Site still declared left."""
    ns = {"tier": "datacenter", "kubernetes": {"context": "c", "namespace": "ns"}}
    new = reopen()
    new.apply([write("dc", ns), write("moved", ns)])
    new.apply([write("moved", {**ns, "kubernetes": {"context": "c", "namespace": "other"}})])
    with raw_sql(location) as sql:
        sql("DELETE FROM objects WHERE kind = 'Site' AND name = 'dc'")
        for version in (100, 101):
            sql(PREVIOUS_DELETE, ("dc", json.dumps(ns), version))
        assert sql(PREVIOUS_READ) == [("dc", 101)]
    assert [(d.name, d.target, d.version) for d in reopen().deleted_sites()] == [
        ("dc", "kubernetes c ns", 101), ("moved", "kubernetes c ns", 3)]


def test_a_store_that_kept_a_deleted_site_record_a_target_gets_the_previous_releases_table_back(
        reopen: Callable[..., Store], location: str) -> None:
    """A store written while ``deleted_sites`` was keyed by name and version: each deleted
    Site's newest record stays there, for the previous release too; every other one is
    still removed, as a target left."""
    a, b = ({"tier": "datacenter", "kubernetes": {"context": "c", "namespace": ns}} for ns in ("a", "b"))
    reopen().apply([write("dc", {**a, "kubernetes": {"context": "c", "namespace": "c"}})])
    with raw_sql(location) as sql:
        sql("DROP TABLE deleted_sites")
        sql("CREATE TABLE deleted_sites (name TEXT NOT NULL, spec TEXT NOT NULL, version BIGINT NOT NULL, PRIMARY KEY (name, version))")
        for name, spec, version in (("gone", a, 1), ("gone", b, 2), ("dc", a, 3), ("dc", b, 4)):
            sql("INSERT INTO deleted_sites (name, spec, version) VALUES (?, ?, ?)", (name, json.dumps(spec), version))
    assert [(d.name, d.target, d.version) for d in reopen().deleted_sites()] == [
        ("dc", "kubernetes c a", 3), ("dc", "kubernetes c b", 4), ("gone", "kubernetes c a", 1), ("gone", "kubernetes c b", 2)]
    with raw_sql(location) as sql:
        assert sql(PREVIOUS_READ) == [("gone", 2)]
        sql(PREVIOUS_DELETE, ("gone", json.dumps(b), 5))
    assert [(d.name, d.version) for d in reopen().deleted_sites()] == [("dc", 3), ("dc", 4), ("gone", 1), ("gone", 5)]


def test_tokens_expire_by_the_injected_clock(store: Store, clock: FakeClock) -> None:
    secret, info = store.create_token("bootstrap", "agent", 60, "admin", "for lyon")
    assert info.expires_at == clock.now + 60
    assert store.verify_token(secret, "bootstrap") == info
    assert store.verify_token(secret, "api") is None  # a bootstrap token is not an API token
    clock.now += 59
    assert store.verify_token(secret, "bootstrap") is not None
    clock.now += 2
    assert store.verify_token(secret, "bootstrap") is None
    assert store.events()[-1].action == "token-created" and store.events()[-1].actor == "admin"


def test_tokens_revoke_and_only_digests_are_stored(store: Store, location: str, clock: FakeClock) -> None:
    secret, info = store.create_token("api", "read", None, "admin")
    assert info.expires_at is None and store.has_api_tokens()
    assert not store.has_admin_token()  # a read token administers nothing
    assert store.verify_token(secret + "x", "api") is None
    assert store.revoke_token(info.id, "admin") is True
    assert store.verify_token(secret, "api") is None
    assert store.revoke_token("nope", "admin") is False
    assert not store.has_api_tokens()
    assert [e.action for e in store.events()][-1] == "token-revoked"
    raw = stored_bytes(location)
    assert secret.encode() not in raw and store_mod.digest(secret).encode() in raw
    admin_secret, _ = store.create_token("api", "admin", 60, "admin")
    assert store.has_admin_token()
    clock.now += 61
    assert not store.has_admin_token() and store.verify_token(admin_secret, "api") is None  # expired: it works no more


def test_an_expired_api_token_no_longer_counts_as_one(store: Store, clock: FakeClock) -> None:
    """As an expired admin token does not count as one that works: a restored backup brings
    expired tokens back, and none of them lets anyone in."""
    store.create_token("api", "read", 60, "admin")
    assert store.has_api_tokens()
    clock.now += 61
    assert not store.has_api_tokens()
    store.create_token("api", "read", None, "admin")
    assert store.has_api_tokens()


def test_tokens_are_listed_with_their_state_and_never_their_secret(store: Store, clock: FakeClock) -> None:
    read_secret, read = store.create_token("api", "read", None, "admin", "dashboards")
    clock.now += 1
    _, boot = store.create_token("bootstrap", "agent", 60, "admin")
    clock.now += 1
    _, admin = store.create_token("api", "admin", None, "admin")
    assert store.revoke_token(admin.id, "alice", "left the team") is True
    assert store.revoke_token(admin.id, "bob") is True  # already revoked: still known, logged once
    clock.now += 61  # past the bootstrap token's 60 s
    listed = store.tokens()
    assert [(t.id, t.purpose, t.role, t.state) for t in listed] == [
        (read.id, "api", "read", "active"), (boot.id, "bootstrap", "agent", "expired"), (admin.id, "api", "admin", "revoked")]
    assert listed[0].description == "dashboards" and listed[1].expires_at == boot.expires_at
    assert read_secret not in repr(listed) and store_mod.digest(read_secret) not in repr(listed)
    revoked = [e for e in store.events() if e.action == "token-revoked"]
    assert [(e.actor, e.name, e.reason) for e in revoked] == [("alice", admin.id, "left the team")]


def test_agent_credentials(store: Store) -> None:
    store.save_agent("edge-lyon", "agent-1", "cred-1", "agent@edge-lyon")
    assert store.agent_credential_ok("edge-lyon", "cred-1")
    assert not store.agent_credential_ok("edge-lyon", "cred-2")
    assert not store.agent_credential_ok("edge-berlin", "cred-1")
    store.save_agent("edge-lyon", "agent-2", "cred-2", "agent@edge-lyon")  # a re-join replaces the credential
    assert not store.agent_credential_ok("edge-lyon", "cred-1") and store.agent_credential_ok("edge-lyon", "cred-2")
    assert store.revoke_agent("edge-lyon", "admin")
    assert not store.agent_credential_ok("edge-lyon", "cred-2")


def test_an_agent_identity_is_replaced_only_while_it_is_the_one_a_join_read(store: Store) -> None:
    """Replicas share the store: a join writes its credential only over the identity it read."""
    saved, replaced = store_mod.AgentSaved.SAVED, store_mod.AgentSaved.REPLACED
    assert store.agent_of("edge-lyon") == ""
    assert store.save_agent("edge-lyon", "agent-1", "cred-1", "agent@edge-lyon", replacing="") is saved
    assert store.save_agent("edge-lyon", "agent-2", "cred-2", "agent@edge-lyon", replacing="") is replaced  # read before agent-1
    assert store.agent_of("edge-lyon") == "agent-1"
    assert store.save_agent("edge-lyon", "agent-3", "cred-3", "agent@edge-lyon", replacing="agent-1") is saved
    assert store.save_agent("edge-lyon", "agent-4", "cred-4", "agent@edge-lyon", replacing="agent-1") is replaced
    assert store.agent_credential_ok("edge-lyon", "cred-3")
    assert not any(store.agent_credential_ok("edge-lyon", c) for c in ("cred-1", "cred-2", "cred-4"))


def test_free_text_with_a_nul_is_kept_the_same_way_by_both_backends(store: Store) -> None:
    """PostgreSQL refuses NUL in text (a 500 from the API, where the text was a record id,
    a token's description or an agent's message); both backends now write it as ``\\x00``."""
    store.record(Event("agent\x00x", "model-failed", "Site", "edge\x00lyon", "load failed: bad\x00byte", {"error": "a\x00b"}))
    _, token = store.create_token("api", "read", None, "admin", "ci\x00bot")
    store.save_agent("edge-lyon", "agent\x00id", "cred-1", "agent@edge-lyon")
    logged = store.events()[-2:]
    assert [(e.actor, e.name, e.reason) for e in logged] == [
        ("agent\\x00x", "edge\\x00lyon", "load failed: bad\\x00byte"), ("admin", token.id, "ci\\x00bot")]
    assert logged[0].details == {"error": "a\x00b"}  # JSON holds it escaped, and gives it back
    assert token.description == "ci\\x00bot" and [t.description for t in store.tokens()] == ["ci\\x00bot"]
    assert store.agent_credential_ok("edge-lyon", "cred-1")


def test_static_bootstrap_tokens_admit_joins_but_never_a_revoked_site(store: Store, clock: FakeClock) -> None:
    from orchestrator.agents import errors as agent_errors
    from orchestrator.agents.auth import StoreJoinAuthenticator

    auth = StoreJoinAuthenticator(store, ("static-secret",))
    static = auth.verify_bootstrap("static-secret")
    assert static is not None and auth.verify_bootstrap("other") is None and auth.verify_bootstrap("") is None
    assert auth.issue_credential("edge-lyon", "agent-1", static)
    assert store.revoke_agent("edge-lyon", "admin")
    clock.now += 60
    assert auth.verify_bootstrap("static-secret") == static
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):
        auth.issue_credential("edge-lyon", "agent-2", static)
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):  # nor one that came with a credential
        auth.issue_credential("edge-lyon", "agent-2", None)
    assert auth.issue_credential("edge-berlin", "agent-3", static)  # other sites still join on it
    secret, _ = store.create_token("bootstrap", "agent", 3600, "admin")
    fresh = auth.verify_bootstrap(secret)
    assert fresh is not None and auth.issue_credential("edge-lyon", "agent-4", fresh)  # a token made after the revocation


class RevokedJustBeforeSaving:
    """The store, with the site's identity revoked (as by another request) right before a
    join's credential is saved: after the join checked the site, before it wrote."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def save_agent(self, site: str, *args: object, **kwargs: object) -> object:
        assert self._store.revoke_agent(site, "admin")
        return self._store.save_agent(site, *args, **kwargs)  # type: ignore[arg-type]


def test_a_site_revoked_as_its_join_is_written_stays_revoked(store: Store, clock: FakeClock) -> None:
    """The join is refused, and the revocation is not written over: bootstrap tokens made
    before it, static ones included, still do not admit the site."""
    from orchestrator.agents import errors as agent_errors
    from orchestrator.agents.auth import StoreJoinAuthenticator

    auth = StoreJoinAuthenticator(store, ("static-secret",))
    static = auth.verify_bootstrap("static-secret")
    assert static is not None and auth.issue_credential("edge-lyon", "agent-1", static)
    clock.now += 60
    racing = StoreJoinAuthenticator(RevokedJustBeforeSaving(store), ("static-secret",))  # type: ignore[arg-type]
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):
        racing.issue_credential("edge-lyon", "agent-2", static, replacing="agent-1")
    assert store.agent_revoked_at("edge-lyon") == clock.now and store.agent_of("edge-lyon") == "agent-1"
    clock.now += 60
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):
        auth.issue_credential("edge-lyon", "agent-3", static)
    # the store's own rule: a revoked identity is replaced only for a join admitted after the revocation
    _, after = store.create_token("bootstrap", "agent", 3600, "admin")
    assert store.save_agent("edge-lyon", "agent-4", "cred-4", "agent@edge-lyon", "agent-1", after.created_seq - 1) \
        is store_mod.AgentSaved.REVOKED
    assert not store.agent_credential_ok("edge-lyon", "cred-4")
    assert store.save_agent("edge-lyon", "agent-5", "cred-5", "agent@edge-lyon", "agent-1", after.created_seq) is store_mod.AgentSaved.SAVED
    assert store.agent_credential_ok("edge-lyon", "cred-5") and store.agent_revoked_at("edge-lyon") is None


def test_a_bootstrap_token_made_before_a_revocation_stays_refused_whatever_the_clocks_said(store: Store, clock: FakeClock) -> None:
    """The cut-off is the store's order of events: a replica whose clock ran two minutes fast
    made the token, NTP (or a replica with a true clock) stamped the revocation ten seconds
    later, and the token's stamp reads after the revocation's."""
    from orchestrator.agents import errors as agent_errors
    from orchestrator.agents.auth import StoreJoinAuthenticator

    joins = StoreJoinAuthenticator(store)
    secret, _ = store.create_token("bootstrap", "agent", 3600, "admin")
    token = joins.verify_bootstrap(secret)
    assert token is not None and joins.issue_credential("edge-lyon", "agent-1", token)
    clock.now -= 110  # stepped back to the true time, 10 s after the token was made
    assert store.revoke_agent("edge-lyon", "admin", "device stolen")
    again = joins.verify_bootstrap(secret)  # not expired: whoever copied it still holds a valid token
    assert again is not None
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):
        joins.issue_credential("edge-lyon", "agent-2", again)
    clock.now -= 3600  # a token made after the revocation admits the site, however far back its clock
    fresh = joins.verify_bootstrap(store.create_token("bootstrap", "agent", 7200, "admin")[0])
    assert fresh is not None and joins.issue_credential("edge-lyon", "agent-3", fresh)


def test_tokens_made_before_the_store_ordered_them_keep_their_place_or_count_as_oldest(tmp_path: pathlib.Path) -> None:
    """A state file from before tokens kept their place in the store's sequence: a token whose
    creation event is still logged takes that event's place; one whose event retention deleted
    counts as made before any revocation (it rejoins no revoked site)."""
    path = tmp_path / "state.db"
    s = open_store(path)
    try:
        _, logged = s.create_token("bootstrap", "agent", None, "admin")
        _, pruned = s.create_token("bootstrap", "agent", None, "admin")
    finally:
        s.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("DELETE FROM events WHERE name = ?", (pruned.id,))
        db.execute("ALTER TABLE tokens DROP COLUMN created_seq")
    db.close()
    s = open_store(path)
    try:
        seqs = {t.id: t.created_seq for t in s.tokens()}
        assert seqs == {logged.id: logged.created_seq, pruned.id: 0}
    finally:
        s.close()


def insert_token_as_the_earlier_release(location: str, token_id: str, secret: str) -> None:
    """What a replica of the release before tokens kept ``created_seq`` writes for a new
    bootstrap token, on the same store: its creation event, then the row without it."""
    now = time.time()
    event = ("admin", "token-created", "Token", token_id, "bootstrap token", "{}", now)
    token = (token_id, store_mod.digest(secret), "bootstrap", "agent", now, "")
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            conn.execute("INSERT INTO events (actor, action, kind, name, reason, details, ts) VALUES (%s, %s, %s, %s, %s, %s, %s)", event)
            conn.execute("INSERT INTO tokens (id, digest, purpose, role, created_at, description) VALUES (%s, %s, %s, %s, %s, %s)", token)
        return
    db = sqlite3.connect(location)
    with db:
        db.execute("INSERT INTO events (actor, action, kind, name, reason, details, ts) VALUES (?, ?, ?, ?, ?, ?, ?)", event)
        db.execute("INSERT INTO tokens (id, digest, purpose, role, created_at, description) VALUES (?, ?, ?, ?, ?, ?)", token)
    db.close()


def test_a_bootstrap_token_made_by_an_earlier_release_after_a_revocation_rejoins_the_site(store: Store, location: str) -> None:
    """During a rolling update a replica of the earlier release makes the token, after this
    release's replicas started (so no backfill gives it its place): it is read at its
    creation event's place, after the revocation, and admits the site."""
    from orchestrator.agents.auth import StoreJoinAuthenticator

    joins = StoreJoinAuthenticator(store)
    first = joins.verify_bootstrap(store.create_token("bootstrap", "agent", 3600, "admin")[0])
    assert first is not None and joins.issue_credential("edge-lyon", "agent-1", first)
    assert store.revoke_agent("edge-lyon", "admin", "device stolen")
    insert_token_as_the_earlier_release(location, "0ld70ken", "epb_0ld70ken_secret")
    token = joins.verify_bootstrap("epb_0ld70ken_secret")
    assert token is not None and token.created_seq > first.created_seq
    assert joins.issue_credential("edge-lyon", "agent-2", token)
    assert store.agent_of("edge-lyon") == "agent-2" and store.agent_revoked_at("edge-lyon") is None
    assert {t.id: t.created_seq for t in store.tokens()}["0ld70ken"] == token.created_seq


def test_sequences_only_grow_and_survive_reopen(reopen: Callable[..., Store]) -> None:
    s = reopen()
    assert [s.next_sequence("a"), s.next_sequence("a"), s.next_sequence("b")] == [1, 2, 1]
    assert s.next_sequences("a", 3) == range(3, 6)  # a block, taken at once
    assert s.next_sequence("a") == 6
    s.close()
    assert reopen().next_sequence("a") == 7
    assert reopen().next_sequences("c", 2) == range(1, 3)


def test_a_sequence_block_taken_above_values_handed_out_moves_the_counter_past_them(reopen: Callable[..., Store]) -> None:
    """A restored store's counter is below values already handed out: the caller that knows
    them takes its block above them, and the counter stays past them."""
    s = reopen()
    assert s.next_sequences("a", 2) == range(1, 3)
    assert s.next_sequences("a", 2, above=20) == range(21, 23)
    assert s.next_sequences("a", 1, above=5) == range(23, 24)  # a counter already past: as without
    assert s.next_sequences("new", 2, above=4) == range(5, 7)
    s.close()
    assert reopen().next_sequence("a") == 24


def test_concurrent_writers_in_threads_lose_nothing(store: Store) -> None:
    """Many threads doing read-modify-write with expected versions: every increment lands once."""
    store.apply([write("counter", {"n": 0})])
    done = {"ok": 0, "conflicts": 0}
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            for _attempt in range(1000):
                obj = store.get("Site", "counter")
                assert obj is not None
                try:
                    store.apply([write("counter", {"n": obj.spec["n"] + 1}, expected=obj.resource_version)])
                except Conflict:
                    with lock:
                        done["conflicts"] += 1
                    continue
                with lock:
                    done["ok"] += 1
                break

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert done["ok"] == 100
    obj = store.get("Site", "counter")
    assert obj is not None and obj.spec["n"] == 100 and obj.generation == 101


# --- crash consistency -------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from orchestrator.store import open_store
    from orchestrator.store.sqlite import Event, ObjectWrite, PlacementRow

    store = open_store(sys.argv[1])
    current = store.get("Site", "s0")
    i = current.spec["round"] if current else 0  # resume after the previous kill
    if current and {p.replicas for p in store.placements()} != {i}:  # killed between the two writes of a round
        store.replace_placements([PlacementRow("d", f"s{k}", "v", i) for k in range(3)],
                                 [Event("writer", "place", "ModelDeployment", "d", f"round {i}")])
    print("ready", flush=True)
    while True:
        i += 1
        blob = "x" * (i % 7 * 1000)  # uneven sizes so pages split at different points
        writes = [ObjectWrite("Site", f"s{k}", {"round": str(i)}, {"round": i, "blob": blob, "k": k}) for k in range(3)]
        store.apply(writes, Event("writer", "apply", "", "", f"round {i}"))
        store.replace_placements([PlacementRow("d", f"s{k}", "v", i) for k in range(3)],
                                 [Event("writer", "place", "ModelDeployment", "d", f"round {i}")])
        print(i, flush=True)
    """
)


def run_writer_and_kill(path: str, after_rounds: int) -> int:
    """Start the writer, let it commit ``after_rounds`` more rounds, SIGKILL it while it writes."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[2])
    last = 0
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        seen = 0
        while seen < after_rounds and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last, seen = int(line), seen + 1
        assert seen >= after_rounds, f"the writer stopped after {seen} rounds"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return last


def check_consistent(path: str, committed: int) -> int:
    """The invariants every prefix of the writer's history satisfies; returns the last round."""
    if not path.startswith("postgresql://"):
        db = sqlite3.connect(path)  # the raw file first: SQLite itself must find it sound
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
    store = open_store(path)
    try:
        objs = store.list("Site")
        assert [o.name for o in objs] == ["s0", "s1", "s2"]
        rounds_seen = {o.spec["round"] for o in objs}
        assert len(rounds_seen) == 1, f"a transaction was torn: {rounds_seen}"  # all three come from one apply
        last = rounds_seen.pop()
        assert last >= committed  # every round reported as committed is there
        for o in objs:
            assert o.spec == {"round": last, "blob": "x" * (last % 7 * 1000), "k": int(o.name[1])}  # complete, not truncated
            assert dict(o.labels) == {"round": str(last)}
            assert o.generation == last  # one generation per round, none lost
        # counters agree with the objects and with the log
        assert store.resource_version() == max(o.resource_version for o in objs) == 3 * last
        events = store.events(limit=100_000)
        assert len([e for e in events if e.action in ("created", "configured")]) == 3 * last
        placed = [e for e in events if e.action == "place"]
        placements = store.placements()
        placed_rounds = {p.replicas for p in placements}
        assert len(placements) == 3 and len(placed_rounds) == 1
        assert placed_rounds.pop() == len(placed) and len(placed) in (last - 1, last)
        assert [e.id for e in events] == sorted({e.id for e in events})
        return last
    finally:
        store.close()


def test_kill_9_mid_write_leaves_the_store_consistent(location: str) -> None:
    path = location
    last = 0
    for after_rounds in (60, 1, 35):  # a long run, a kill right after start, another run
        committed = run_writer_and_kill(path, after_rounds)
        last = check_consistent(path, committed)
        assert last >= committed > 0
    store = open_store(path)  # and the store takes writes again
    try:
        store.apply([ObjectWrite("Site", "s0", {}, {"round": 0})], WHO)
        assert store.resource_version() == 3 * last + 1
    finally:
        store.close()


# --- the leader lease and fencing -------------------------------------------------------------


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


def test_a_write_sqlite_refuses_for_what_it_is_is_a_store_error_not_one_to_retry(tmp_path: pathlib.Path) -> None:
    """A constraint on the file (here a trigger that aborts the insert) refuses the same write
    every time: a plain StoreError, as PostgreSQL's store gives, not StoreUnavailable."""
    s = open_store(tmp_path / "state.db")
    try:
        with sqlite3.connect(tmp_path / "state.db") as db:
            db.execute("CREATE TRIGGER no_lab_sites BEFORE INSERT ON objects WHEN NEW.name LIKE 'lab-%' "
                       "BEGIN SELECT RAISE(ABORT, 'no lab sites here'); END")
        with pytest.raises(store_mod.StoreError, match="no lab sites here") as refused:
            s.apply([ObjectWrite("Site", "lab-1", {}, {"tier": "edge"})], Event("t", "created", "Site", "lab-1", "seed"))
        assert not isinstance(refused.value, store_mod.StoreUnavailable)
        assert s.get("Site", "lab-1") is None
    finally:
        s.close()


def test_a_write_a_full_sqlite_disk_refuses_is_a_store_error_and_changes_nothing(tmp_path: pathlib.Path) -> None:
    """SQLite's own page limit stands in for a full disk (SQLITE_FULL either way): the
    write is rolled back whole and raised as the store's error, one to retry (the API answers
    503), where sqlite3's own exception reached the API as a 500."""
    s = open_store(tmp_path / "state.db")
    try:
        s.apply([ObjectWrite("Site", "edge-1", {}, {"tier": "edge"})], Event("t", "created", "Site", "edge-1", "seed"))
        before, logged = s.list(), s.events()
        # no page beyond those it has (SQLite raises the limit to the file's current size)
        assert s._db.execute("PRAGMA max_page_count = 1").fetchone()[0] == s._db.execute("PRAGMA page_count").fetchone()[0]  # type: ignore[attr-defined]
        big = [ObjectWrite("Site", f"edge-{i}", {}, {"tier": "edge", "note": "x" * 4000}) for i in range(2, 40)]
        with pytest.raises(store_mod.StoreUnavailable, match=r"refused the operation: database or disk is full; nothing was changed"):
            s.apply(big, Event("t", "created", "Site", "many", "bulk"))
        assert s.list() == before and s.events() == logged
        s._db.execute("PRAGMA max_page_count = 1073741823")  # type: ignore[attr-defined]  # room again: writes go on
        s.apply(big, Event("t", "created", "Site", "many", "bulk"))
        assert len(s.list("Site")) == 39
    finally:
        s.close()


def test_a_writer_paused_inside_a_transaction_holds_the_write_lock_only_for_a_while(postgres) -> None:  # noqa: ANN001
    """A replica stopped mid-transaction (SIGSTOP, a frozen VM, a partition) kept the write
    lock, and so every other replica's writes and the next leader's election, for as long as
    its connection looked alive; the server now ends a session idle inside a transaction."""
    import psycopg

    from orchestrator.store.postgres import PostgresStore, StoreUnavailable

    url = postgres.create_database()
    paused_store, other = PostgresStore(url, idle_in_transaction_s=1.0), PostgresStore(url, idle_in_transaction_s=1.0)
    inside, resume, outcome = threading.Event(), threading.Event(), queue.Queue[str]()

    def paused() -> None:
        try:
            with paused_store._tx() as db:  # holds the write lock
                inside.set()
                resume.wait(30)  # sends nothing, as a stopped process
                db.execute("SELECT 1")
            outcome.put("committed")
        except (StoreUnavailable, psycopg.Error) as exc:
            outcome.put(f"ended by the server: {exc}")

    thread = threading.Thread(target=paused)
    thread.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        other.apply([ObjectWrite("Site", "edge-1", {}, {"tier": "edge"})], Event("t", "created", "Site", "edge-1", "while paused"))
        waited = time.monotonic() - started
    finally:
        resume.set()
        thread.join(30)
    assert other.get("Site", "edge-1") is not None
    assert waited < 15, waited  # not the 30 s the paused writer would have held it
    assert outcome.get(timeout=1).startswith("ended by the server"), "the paused transaction should not commit"
    paused_store.close()
    other.close()


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


async def test_a_closed_store_drops_the_calls_queued_behind_a_stalled_one(location: str) -> None:
    """The event loop's calls run on the store's own threads; closing the store (the server
    stopping) waits for none of them, drops those still queued, and refuses new ones."""
    store = open_store(location, threads=1)
    started, go = threading.Event(), threading.Event()

    def stalled() -> None:  # as a call on a stalled database waits
        started.set()
        assert go.wait(10)

    try:
        running = asyncio.ensure_future(store.run(stalled))
        queued = asyncio.ensure_future(store.run(store.list))
        assert await asyncio.to_thread(started.wait, 10)
        store.close()
        with pytest.raises(asyncio.CancelledError):
            await queued
        with pytest.raises(store_mod.StoreError, match="closed"):
            await store.run(store.list)
    finally:
        go.set()
    await running


async def test_a_sqlite_store_closed_while_another_process_holds_the_file_stops_waiting_at_once(tmp_path: pathlib.Path) -> None:
    """Another connection holds the file's write lock (an operator's ``sqlite3`` shell in a
    transaction): a write waits for it, but closing the store (the server stopping) ends that
    wait within a second or so, not at the end of SQLite's 30 s busy timeout."""
    path = tmp_path / "state.db"
    store = open_store(str(path), threads=1)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        store.apply([write("edge-1", {"tier": "edge"})], WHO)
        holder.execute("BEGIN IMMEDIATE")
        begun: list[str] = []
        waiting_turns = threading.Event()

        def traced(statement: str) -> None:  # each turn of the wait runs the write's BEGIN once more
            begun.append(statement)
            if begun.count("BEGIN IMMEDIATE") >= 2:
                waiting_turns.set()

        store._db.set_trace_callback(traced)
        waiting = asyncio.ensure_future(store.run(store.apply, [write("edge-2", {"tier": "edge"})], WHO))
        assert await asyncio.to_thread(waiting_turns.wait, 10), "the write never waited for the file's lock"
        started = time.monotonic()
        await asyncio.to_thread(store.close)
        took = time.monotonic() - started
        assert took < 5, f"closing the store took {took:.1f} s while another connection held the file"
        with pytest.raises(store_mod.StoreError, match="^the store is closed$"):
            await asyncio.wait_for(waiting, 5)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        store.close()
    reopened = open_store(str(path))
    try:
        assert [o.name for o in reopened.list("Site")] == ["edge-1"]  # the write that waited changed nothing
    finally:
        reopened.close()


def test_a_sqlite_write_waits_for_another_connection_holding_the_file(tmp_path: pathlib.Path) -> None:
    """SQLite's lock on the file is waited for (another connection's short transaction), not
    refused at once: the store waits in short turns only to be able to stop."""
    path = tmp_path / "state.db"
    store = open_store(str(path))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(0.5, holder.execute, ("COMMIT",)).start()
        store.apply([write("edge-1", {"tier": "edge"})], WHO)
        assert [o.name for o in store.list("Site")] == ["edge-1"]
    finally:
        holder.close()
        store.close()
