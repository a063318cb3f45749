"""The state store's objects: generations and resource versions, statuses written a pass at a
time, dry runs, optimistic concurrency, annotations, all-or-nothing applies and deletes, and
placements read a page at a time. A test that takes the ``store``, ``reopen`` or
``location`` fixture (conftest.py) runs against both backends, an SQLite file and a real
PostgreSQL server; they must behave identically."""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
from collections.abc import Callable

import pytest

from orchestrator.store import StateStore as Store
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.store.sqlite import Conflict, NotFound, ObjectWrite

from .support import WHO, FakeClock, sqlite_connection, write


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
            sqlite_connection(store).set_trace_callback(seen.append)
            store.set_statuses(statuses)  # a usual pass: nothing changed
            sqlite_connection(store).set_trace_callback(None)
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


def test_a_list_of_what_changed_names_only_what_the_reader_holds_as_of_its_current_write(store: Store, clock: FakeClock) -> None:
    """What a reconcile pass reads: the objects of the kinds it names, but those it holds as of
    their current write named only, not decoded again. A status is no write; a write is, and
    so is an object deleted and created again with the same spec."""
    store.apply([write("a", {"x": 1}), write("b", {"y": 1}), write("m", {"z": 1}, kind="Model")], WHO)
    first = store.list_changed(["Site"], {})
    assert [(o.name, dict(o.spec)) for o in first if isinstance(o, store_mod.StoredObject)] == [("a", {"x": 1}), ("b", {"y": 1})]
    held = {(o.kind, o.name): o.written for o in first if isinstance(o, store_mod.StoredObject)}
    assert store.set_status("Site", "a", {"health": "Healthy"})
    assert store.list_changed(["Site"], held) == [store_mod.Unchanged("Site", "a"), store_mod.Unchanged("Site", "b")]

    clock.now += 1
    store.apply([write("a", {"x": 2})], WHO)
    store.delete("Site", "b", WHO)
    store.apply([write("b", {"y": 1})], WHO)
    again = store.list_changed(["Model", "Site"], held)
    assert [(o.kind, o.name, dict(o.spec)) for o in again if isinstance(o, store_mod.StoredObject)] == [
        ("Model", "m", {"z": 1}), ("Site", "a", {"x": 2}), ("Site", "b", {"y": 1})]


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
