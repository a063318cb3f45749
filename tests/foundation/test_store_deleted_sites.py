"""Deleted data-centre Sites the store keeps until their applications are removed, per target,
and stores written by earlier releases (or shared with the previous one during a rolling
update) that gain or give back that table. A test that takes the ``store``, ``reopen`` or
``location`` fixture (conftest.py) runs against both backends, an SQLite file and a real
PostgreSQL server; they must behave identically."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from orchestrator.store import StateStore as Store
from orchestrator.store import sqlite as store_mod
from orchestrator.store.sqlite import Event

from .support import WHO, write


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
