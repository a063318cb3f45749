"""What a data-centre Site leaves behind: the records of the targets (a Ray cluster, a
Kubernetes namespace) whose Serve applications are still to be removed, kept in the same
transaction as the apply or delete that left them, so whichever replica leads next removes
them (:meth:`~orchestrator.store.sql.SqlStore.deleted_sites`).

Why apart from :mod:`orchestrator.store.sql`: these two tables carry a contract with
earlier releases that nothing else in the store has. A deleted Site's record is kept in
``deleted_sites`` (one per name) exactly as earlier versions keep it, since replicas of
both run on one database during a rolling update or a downgrade and write it with their
own statements; the targets a Site left while still declared are in ``left_targets`` (one
per name and target), which they never see. Which record moves where as a Site is declared,
moved, deleted and declared again, and how a store whose ``deleted_sites`` was rekeyed for
a while gets its key back, reads as one story here rather than between the object writes.

Each function runs inside the caller's transaction (``db``) or opens its own, through the
hooks of ``store``, the backend (its placeholder, its transaction, its fence).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from orchestrator.store.values import DeletedSite, Event, Lease, datacentre_target

if TYPE_CHECKING:
    from orchestrator.store.sql import SqlStore


def record_declared(store: SqlStore, db: Any, name: str, target: str | None) -> None:
    """Site ``name`` is created (perhaps again, after a delete), driving ``target`` (None:
    the edge tier): its apply replaces the deleted one's applications, on ``target`` only;
    the deleted one's record of another target is kept as a target left."""
    _undelete(store, db, name, _take_over(store, db, name, target, _deleted(store, db, name)))


def record_moved(store: SqlStore, db: Any, name: str, left: str | None, target: str | None, spec: str, version: int) -> None:
    """Site ``name``, still declared, now drives ``target`` instead of ``left`` (None: the
    edge tier); ``spec`` is the one it had there. Nothing else drives ``left`` now."""
    _take_over(store, db, name, target, _deleted(store, db, name))
    if left is not None:
        _leave(store, db, name, left, spec, version)


def record_deleted(store: SqlStore, db: Any, name: str, target: str, spec: str, version: int) -> None:
    """Site ``name`` (on ``target``, as ``spec`` says) is deleted: its applications run on
    until removed. A record of another target, from a delete an earlier version kept, is
    kept as a target left."""
    _undelete(store, db, name, _take_over(store, db, name, target, _deleted(store, db, name)))
    db.execute(store._q("INSERT INTO deleted_sites (name, spec, version) VALUES (?, ?, ?)"), (name, spec, version))


def _leave(store: SqlStore, db: Any, name: str, target: str, spec: str, version: int) -> None:
    """Site ``name``, still declared, no longer drives ``target``: what runs there is
    recorded for removal, replacing an older record of the same target."""
    db.execute(store._q("DELETE FROM left_targets WHERE name = ? AND target = ?"), (name, target))
    db.execute(store._q("INSERT INTO left_targets (name, target, spec, version) VALUES (?, ?, ?, ?)"), (name, target, spec, version))


def _deleted(store: SqlStore, db: Any, name: str) -> Any | None:
    """The record a delete of Site ``name`` kept (its row: spec, version), or None."""
    return store._one(db, "SELECT spec, version FROM deleted_sites WHERE name = ?", (name,))


def _take_over(store: SqlStore, db: Any, name: str, target: str | None, deleted: Any | None) -> Any | None:
    """Site ``name`` drives ``target`` now: its apply replaces what a record of that target
    would remove. The records of its other targets stay: ``deleted`` (its delete's record,
    read in this transaction) is returned unless it was of ``target``."""
    if target is None:
        return deleted
    db.execute(store._q("DELETE FROM left_targets WHERE name = ? AND target = ?"), (name, target))
    if deleted is not None and datacentre_target(json.loads(deleted["spec"])) == target:
        db.execute(store._q("DELETE FROM deleted_sites WHERE name = ?"), (name,))
        return None
    return deleted


def _undelete(store: SqlStore, db: Any, name: str, deleted: Any | None) -> None:
    """Site ``name`` is declared (or deleted) again: the deleted one's record (``deleted``),
    if any is left, becomes a target it left, so the next delete keeps its own beside it."""
    if deleted is None:
        return
    if (target := datacentre_target(json.loads(deleted["spec"]))) is not None:
        _leave(store, db, name, target, deleted["spec"], int(deleted["version"]))
    db.execute(store._q("DELETE FROM deleted_sites WHERE name = ?"), (name,))


def key_by_name(store: SqlStore, db: Any, table: str) -> None:
    """A store whose ``deleted_sites`` was keyed by name and version (one record for each
    target a Site left) is given back the key by name, ``table`` being its statement: for
    each name, the record of its delete stays there (the newest, while no Site of the name
    is declared), the others become targets left."""
    rows = db.execute(store._q("SELECT name, spec, version FROM deleted_sites ORDER BY version")).fetchall()
    declared = {r["name"] for r in db.execute(store._q("SELECT name FROM objects WHERE kind = 'Site'")).fetchall()}
    newest = {r["name"]: int(r["version"]) for r in rows}
    db.execute("DROP TABLE deleted_sites")
    db.execute(table)
    for r in rows:
        if r["name"] not in declared and int(r["version"]) == newest[r["name"]]:
            db.execute(store._q("INSERT INTO deleted_sites (name, spec, version) VALUES (?, ?, ?)"), (r["name"], r["spec"], r["version"]))
        elif (target := datacentre_target(json.loads(r["spec"]))) is not None:
            _leave(store, db, r["name"], target, r["spec"], int(r["version"]))


def list_pending(store: SqlStore) -> list[DeletedSite]:
    """The data-centre targets whose Serve applications are still to be removed: those of
    deleted Sites, and those Sites were moved away from."""
    rows = store._fetch("SELECT * FROM (SELECT name, spec, version FROM deleted_sites UNION ALL"
                        f" SELECT name, spec, version FROM left_targets) AS records ORDER BY name{store.collate}, version")
    return [DeletedSite(r["name"], json.loads(r["spec"]), int(r["version"])) for r in rows]


def forget(store: SqlStore, site: DeletedSite, lease: Lease | None = None) -> None:
    """Its applications are removed: the record goes, unless the Site was deleted again since."""
    with store._tx() as db:
        if lease is not None:
            store._fence(db, lease)
        for table in ("deleted_sites", "left_targets"):  # versions are the store's: one record has it
            db.execute(store._q(f"DELETE FROM {table} WHERE name = ? AND version = ?"), (site.name, site.version))


def abandon(store: SqlStore, db: Any, name: str, event: Event, now: float) -> bool:
    """An operator gives up removing the applications Site ``name`` left behind (their
    cluster is gone for good): its records go, every target it left, with ``event``,
    and no replica tries again. False when there was none."""
    if not any(store._one(db, f"SELECT name FROM {table} WHERE name = ?", (name,)) for table in ("deleted_sites", "left_targets")):
        return False
    db.execute(store._q("DELETE FROM deleted_sites WHERE name = ?"), (name,))
    db.execute(store._q("DELETE FROM left_targets WHERE name = ?"), (name,))
    store._changed(db, "resources")
    store._log(db, event, now)
    return True


__all__ = ["abandon", "forget", "key_by_name", "list_pending", "record_declared", "record_deleted", "record_moved"]
