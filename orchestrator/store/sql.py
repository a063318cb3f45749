"""What both state-store backends share: every operation whose SQL reads the same on
SQLite and PostgreSQL. The records it stores and returns, and the errors it raises, are
:mod:`orchestrator.store.values` (re-exported by :mod:`orchestrator.store.sqlite`, the
module the control plane names them from). What a data-centre Site's apply or delete
leaves behind for removal (records kept as earlier releases read them) is
:mod:`orchestrator.store.datacentre_records`, called inside these operations' transactions.

Why one base class: the SQLite file and the PostgreSQL database must honour one
contract to the letter (one test suite runs against both), so the logic that decides
(optimistic concurrency, generations, what counts as unchanged, which events are
logged) is written once here, and how tokens and agent credentials are checked in
:mod:`orchestrator.store.credentials`, a part of this class kept apart. A backend
supplies only what truly differs: its schema, how a write transaction starts and what
serialises writers (``_tx``), how a read runs (``_fetch``), how a counter is bumped
(``_next_version``, ``next_sequences``), how a batch is sent (``_many``), its
placeholder (statements here are written with ``?``) and the collation that makes
``ORDER BY`` byte-wise on both. Booleans are written ``TRUE``/``NOT revoked``, which
SQLite (3.23 and later) reads as 1/0 on its integer columns.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from orchestrator.store import datacentre_records, event_sites, eventquery
from orchestrator.store.credentials import Credentials
from orchestrator.store.threads import StoreThreads
from orchestrator.store.values import canonical as _canonical
from orchestrator.store.values import (
    FLEET_ACTIONS,
    KEPT_ACTIONS,
    Conflict,
    DeletedSite,
    Event,
    Fenced,
    Lease,
    LoggedEvent,
    NotFound,
    ObjectWrite,
    PlacementRow,
    StoredObject,
    Unchanged,
    WriteOutcome,
    captures,
    datacentre_target,
    storable,
)


P = ParamSpec("P")
T = TypeVar("T")

#: How many objects' statuses one statement of :meth:`SqlStore.set_statuses` reads: well
#: under the parameters a statement may carry (SQLite before 3.32 allows 999).
_STATUS_BATCH = 500


class SqlStore(Credentials):
    """The shared operations; a subclass sets the dialect and the hooks below."""

    placeholder = "?"  # how the driver marks a parameter
    collate = ""  # appended to each ORDER BY column so text sorts byte-wise
    contains = "instr(details, ?) > 0"  # an event's details hold a text, as it is (no wildcards, case kept)

    path: str  # where the store is, as messages name it (never a password)
    _clock: Callable[[], float]  # the store's time (:meth:`now`)
    _id: str | None = None  # store_id(), once read
    threads: StoreThreads  # what the event loop's calls run on (:meth:`run`); closed with the store

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` (a call to this store, or a few in a row) on the store's own
        threads, off the event loop: see :mod:`orchestrator.store.threads`."""
        return await self.threads.run(fn, *args, **kwargs)

    async def run_first(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """As :meth:`run`, for the lease's calls: ahead of the calls queued, and first to the connection."""
        return await self.threads.run_first(fn, *args, **kwargs)

    def now(self) -> float:
        """The store's time, in epoch seconds: what every time it keeps is stamped with (tokens'
        creation and expiry, events, objects' creation) and what its checks compare them with.
        Several replicas sharing one PostgreSQL store agree on it whatever their own clocks say:
        there it is the database server's clock, known without a query (:mod:`.postgres`); on
        SQLite, one process's file, it is that process's clock. A test's injected clock is it."""
        return self._clock()

    # --- what a backend supplies ------------------------------------------------------

    def _tx(self, commit: bool = True) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def _next_version(self, db: Any) -> int:
        raise NotImplementedError

    def _many(self, db: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def next_sequences(self, key: str, count: int, lease: Lease | None = None, above: int = 0) -> range:
        """The next ``count`` values (at least one) of a durable counter that only grows (e.g.
        assignment versions agents compare), taken in one transaction: a pass that sends N
        sites their sets takes one block, not N round trips and commits. With ``lease``, only
        while it is held (:class:`Fenced`): a block is taken under the lease, so every value
        in it is below any the next leader takes. Values a failed pass leaves unused are
        skipped (readers compare versions, they never count them). With ``above``, the block
        starts above it too, and the counter is moved past it: a store restored from a backup
        has a counter below values already handed out, and the caller that knows them says so."""
        raise NotImplementedError

    def next_sequence(self, key: str, lease: Lease | None = None) -> int:
        """The counter's next value: :meth:`next_sequences` of one."""
        return self.next_sequences(key, 1, lease=lease)[0]

    def _q(self, sql: str) -> str:
        """``sql`` (written with ``?``) in this driver's placeholder."""
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _lease_now(self, db: Any) -> float:
        """Inside a transaction: the time leases are measured against, in epoch seconds."""
        raise NotImplementedError

    def _one(self, db: Any, sql: str, args: Sequence[Any] = ()) -> Any:
        return db.execute(self._q(sql), args).fetchone()

    def _read_lock(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _changed(self, db: Any, what: str) -> None:
        """Inside a write transaction: other replicas are told ``what`` changed once it
        commits (``resources``, ``published:<key>``, ``events:<kind>``). One process owns a
        SQLite file, so there it tells nobody; see :meth:`follow_changes`."""

    def follow_changes(self, on_change: Callable[[str], None]) -> Any:
        """Call ``on_change(what)`` from a thread of the store's own as other processes'
        writes commit (``*``: anything may have changed, e.g. after a reconnect); returns
        the follower (``close()``), or None where no other process writes (SQLite)."""
        return None

    def take_daily(self, key: str, day: int, count: int, limit: int) -> int:
        """Take up to ``count`` of the ``limit`` that ``key`` may use on ``day`` (a day number);
        how many were granted (0 once it is used up). Counted here, in one write transaction,
        so a restart keeps the count and replicas sharing the store share it. One row a key,
        its latest day's: a call for an earlier day (a replica whose clock is behind, at
        midnight) counts in the later one, never in a count started over."""
        with self._tx() as db:
            row = self._one(db, "SELECT day, taken FROM daily_counts WHERE key = ?", (key,))
            taken = 0
            if row is not None and int(row["day"]) >= day:
                day, taken = int(row["day"]), int(row["taken"])
            granted = max(0, min(count, limit - taken))
            if granted:
                db.execute(self._q("INSERT INTO daily_counts (key, day, taken) VALUES (?, ?, ?) "
                                   "ON CONFLICT (key) DO UPDATE SET day = excluded.day, taken = excluded.taken"),
                           (key, day, taken + granted))
        return granted

    def taken_daily(self, keys: Collection[str], day: int) -> dict[str, int]:
        """How much of each of ``keys``' limits :meth:`take_daily` has granted on ``day``; a
        key whose row is of a later day (this clock behind a replica's) counts that day's,
        as :meth:`take_daily` would."""
        keys = sorted(set(keys))
        if not keys:
            return {}
        rows = self._fetch(self._q(f"SELECT key, day, taken FROM daily_counts WHERE key IN ({', '.join('?' * len(keys))})"), tuple(keys))
        taken = {str(r["key"]): int(r["taken"]) for r in rows if int(r["day"]) >= day}
        return {k: taken.get(k, 0) for k in keys}

    def resource_version(self) -> int:
        return int(self._fetch("SELECT value FROM meta WHERE key = 'resource_version'")[0]["value"])

    def store_id(self) -> str:
        """Which store this is: a random number drawn when it was made (or first opened by a
        version that keeps one) and kept with it. Another store, fresh or not, has its own, so
        a client can tell that event ids, which each store numbers from its own start, are
        not comparable with those it read before. A copy (a restored backup) keeps its
        original's."""
        if self._id is None:  # never changes: read once
            self._id = format(int(self._fetch("SELECT value FROM meta WHERE key = 'store_id'")[0]["value"]), "016x")
        return self._id

    @staticmethod
    def _row(row: Mapping[str, Any]) -> StoredObject:
        return StoredObject(
            kind=row["kind"],
            name=row["name"],
            labels=json.loads(row["labels"]),
            spec=json.loads(row["spec"]),
            status=json.loads(row["status"]),
            generation=row["generation"],
            resource_version=row["resource_version"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            annotations=json.loads(row["annotations"]),
            capture_since=row["capture_since"],
        )

    # --- objects --------------------------------------------------------------------

    def get(self, kind: str, name: str) -> StoredObject | None:
        rows = self._fetch(self._q("SELECT * FROM objects WHERE kind = ? AND name = ?"), (kind, name))
        return self._row(rows[0]) if rows else None

    def list(self, kind: str | None = None, after: str | None = None, limit: int | None = None) -> list[StoredObject]:
        """Objects by kind and name (byte-wise); of one ``kind``, those named after ``after``
        only and the first ``limit`` only, when given (a page of the API's lists)."""
        c = self.collate
        if kind is None:
            rows = self._fetch(f"SELECT * FROM objects ORDER BY kind{c}, name{c}")
        else:
            where, args = ("", [kind]) if after is None else (f" AND name{c} > ?", [kind, after])
            page = "" if limit is None else " LIMIT ?"
            rows = self._fetch(self._q(f"SELECT * FROM objects WHERE kind = ?{where} ORDER BY name{c}{page}"),
                               tuple(args + ([limit] if limit is not None else [])))
        return [self._row(r) for r in rows]

    def list_changed(self, kinds: Collection[str], held: Mapping[tuple[str, str], tuple[int, float]]) -> list[StoredObject | Unchanged]:
        """The objects of ``kinds`` by kind and name, in one read, as :meth:`list` returns
        them, but for those the caller ``held`` already as of their current write (by kind
        and name, :attr:`StoredObject.written`): named only, their JSON not decoded. A
        reconcile pass reads every Site, Model and deployment, and decoding each, though few
        changed since the pass before, was most of its read."""
        c = self.collate
        rows = self._fetch(self._q(f"SELECT * FROM objects WHERE kind IN ({', '.join('?' * len(kinds))}) ORDER BY kind{c}, name{c}"),
                           tuple(kinds))
        return [Unchanged(r["kind"], r["name"]) if held.get((r["kind"], r["name"])) == (r["resource_version"], r["updated_at"])
                else self._row(r) for r in rows]

    def apply(self, writes: Sequence[ObjectWrite] | Callable[[], Sequence[ObjectWrite]], event: Event | None = None,
              dry_run: bool = False, also: Sequence[Event] = ()) -> list[WriteOutcome]:
        """Create or update all objects in one transaction: all of them or none. A dry run
        decides the same way and rolls back: what it says is what the write would do.
        ``writes`` may be a function that decides them (it may read this store, and raise to
        write nothing): it runs in the transaction, under the lock every writer of the store
        takes, another replica's included, so what it read is what they are written over.
        ``also``: events logged as they are, in the same transaction, when it changes anything
        (an audit entry that is part of the change: both land, or neither)."""
        now = self._clock()
        outcomes: list[WriteOutcome] = []
        with self._tx(commit=not dry_run) as db:
            for w in writes() if callable(writes) else writes:
                row = self._one(db, "SELECT * FROM objects WHERE kind = ? AND name = ?", (w.kind, w.name))
                current = self._row(row) if row else None
                if w.expected_version is not None:
                    have = current.resource_version if current else 0
                    if current is None and w.expected_version:
                        raise Conflict(f"{w.kind} {w.name!r} does not exist (deleted since it was read?), yet the manifest expects "
                                       f"resourceVersion {w.expected_version}; remove metadata.resourceVersion to create it")
                    if have != w.expected_version:
                        raise Conflict(
                            f"{w.kind} {w.name!r} was changed by someone else "
                            f"(resourceVersion is {have}, the request expected {w.expected_version}); re-read and retry"
                        )
                spec, labels, annotations = _canonical(w.spec), _canonical(w.labels), _canonical(w.annotations)
                if current is None:
                    rv = self._next_version(db)
                    if w.kind == "Site":  # declared again: its apply replaces the deleted one's applications, on its target only
                        datacentre_records.record_declared(self, db, w.name, datacentre_target(w.spec))
                    db.execute(
                        self._q("INSERT INTO objects (kind, name, labels, annotations, spec, generation, resource_version, created_at,"
                                " updated_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)"),
                        (w.kind, w.name, labels, annotations, spec, rv, now, now),
                    )
                    outcomes.append(WriteOutcome(w.kind, w.name, "created", 1, rv))
                elif (_canonical(current.spec), _canonical(current.labels), _canonical(current.annotations)) == (spec, labels, annotations):
                    outcomes.append(WriteOutcome(w.kind, w.name, "unchanged", current.generation, current.resource_version))
                else:
                    rv = self._next_version(db)
                    generation = current.generation + (1 if _canonical(current.spec) != spec else 0)
                    # capture turned on again is another consent: what was captured before it was off is not covered
                    since = now if w.kind == "ModelDeployment" and captures(w.spec) and not captures(current.spec) else current.capture_since
                    if w.kind == "Site" and (left := datacentre_target(current.spec)) != (target := datacentre_target(w.spec)):
                        datacentre_records.record_moved(self, db, w.name, left, target, _canonical(current.spec), rv)
                    db.execute(
                        self._q("UPDATE objects SET labels = ?, annotations = ?, spec = ?, generation = ?, resource_version = ?,"
                                " updated_at = ?, capture_since = ? WHERE kind = ? AND name = ?"),
                        (labels, annotations, spec, generation, rv, now, since, w.kind, w.name),
                    )
                    outcomes.append(WriteOutcome(w.kind, w.name, "configured", generation, rv))
            if any(o.action != "unchanged" for o in outcomes):
                self._changed(db, "resources")
                for e in also:
                    self._log(db, e, now)
            if event is not None:
                for o in (o for o in outcomes if o.action != "unchanged"):
                    self._log(db, Event(event.actor, o.action, o.kind, o.name, event.reason, {**event.details, "generation": o.generation}), now)
        return outcomes

    def delete(self, kind: str, name: str, event: Event, expected_version: int | None = None,
               check: Callable[[], object] | None = None) -> WriteOutcome:
        """``check``: run first in the transaction, as a function of :meth:`apply`'s writes."""
        now = self._clock()
        with self._tx() as db:
            if check is not None:
                check()
            outcome = self._delete(db, kind, name, event, now, expected_version)
            self._changed(db, "resources")
        assert outcome is not None  # a missing object raised
        return outcome

    def delete_many(self, targets: Sequence[tuple[str, str]], event: Event | None, missing_ok: bool = False,
                    check: Callable[[], object] | None = None, also: Sequence[Event] = (),
                    expected: Mapping[tuple[str, str], int] | None = None) -> list[WriteOutcome]:
        """Delete every ``(kind, name)`` in one transaction: all of them or none. An object
        that does not exist refuses the whole set (:class:`NotFound`), or with
        ``missing_ok`` is left out of the result. ``check``, ``also``: as :meth:`delete`'s
        and :meth:`apply`'s (logged when anything is deleted); ``event`` None: each deletion
        is not logged on its own (``also`` says what happened). ``expected``: the
        resourceVersion a target must still have, else :class:`Conflict` and none is deleted."""
        now = self._clock()
        outcomes: list[WriteOutcome] = []
        with self._tx() as db:
            if check is not None:
                check()
            for kind, name in targets:
                version = (expected or {}).get((kind, name))
                if (outcome := self._delete(db, kind, name, event, now, version, missing_ok=missing_ok)) is not None:
                    outcomes.append(outcome)
            if outcomes:
                self._changed(db, "resources")
                for e in also:
                    self._log(db, e, now)
        return outcomes

    def _delete(self, db: Any, kind: str, name: str, event: Event | None, now: float, expected_version: int | None = None,
                missing_ok: bool = False) -> WriteOutcome | None:
        row = self._one(db, "SELECT * FROM objects WHERE kind = ? AND name = ?", (kind, name))
        if row is None:
            if missing_ok:
                return None
            raise NotFound(f"{kind} {name!r} does not exist")
        current = self._row(row)
        if expected_version is not None and current.resource_version != expected_version:
            raise Conflict(f"{kind} {name!r} changed since resourceVersion {expected_version}; re-read and retry")
        db.execute(self._q("DELETE FROM objects WHERE kind = ? AND name = ?"), (kind, name))
        if kind == "ModelDeployment":
            db.execute(self._q("DELETE FROM placements WHERE deployment = ?"), (name,))
        rv = self._next_version(db)
        if kind == "Site" and (target := datacentre_target(current.spec)) is not None:  # its applications run on until removed
            datacentre_records.record_deleted(self, db, name, target, _canonical(current.spec), rv)
        if event is not None:
            self._log(db, Event(event.actor, "deleted", kind, name, event.reason, event.details), now)
        return WriteOutcome(kind, name, "deleted", current.generation, rv)

    def set_status(self, kind: str, name: str, status: Mapping[str, Any]) -> bool:
        """Record observed status; returns False when the object is gone. Does not bump generation."""
        return self.set_statuses([(kind, name, status)]) == 1

    def set_statuses(self, statuses: Sequence[tuple[str, str, Mapping[str, Any]]], lease: Lease | None = None,
                     created: Mapping[tuple[str, str], float] | None = None) -> int:
        """Record many observed statuses in one transaction, writing only those that
        changed; objects that are gone are skipped, and so is one whose ``created`` time
        (``StoredObject.created_at``, by kind and name) is not the stored one's: deleted and
        applied again since, it is another object, which a status of the one read must not
        describe. Returns how many objects exist.
        (A reconcile pass over 11,000 objects took 0.14-0.27 s one transaction each.) The
        current statuses are read a batch of names per statement, not one object each: the
        write lock is held meanwhile, and on PostgreSQL each statement is a round trip.
        With ``lease``, nothing is written unless it is still held (:class:`Fenced`)."""
        encoded = {(kind, name): _canonical(status) for kind, name, status in statuses}
        names: dict[str, list[str]] = {}
        for kind, name in encoded:
            names.setdefault(kind, []).append(name)
        with self._tx() as db:
            if lease is not None:
                self._fence(db, lease)
            current = {}
            for kind, of_kind in names.items():
                for start in range(0, len(of_kind), _STATUS_BATCH):
                    batch = of_kind[start:start + _STATUS_BATCH]
                    marks = ", ".join("?" * len(batch))
                    for row in db.execute(self._q(f"SELECT name, status, created_at FROM objects WHERE kind = ? AND name IN ({marks})"),
                                          (kind, *batch)).fetchall():
                        if created is None or created.get((kind, row["name"]), row["created_at"]) == row["created_at"]:
                            current[kind, row["name"]] = row["status"]
            changed = [(value, kind, name) for (kind, name), value in encoded.items()
                       if (kind, name) in current and current[kind, name] != value]
            if changed:
                self._many(db, self._q("UPDATE objects SET status = ? WHERE kind = ? AND name = ?"), changed)
        return sum(key in current for key in encoded)

    # --- what data-centre Sites left behind (see :mod:`orchestrator.store.datacentre_records`)

    def deleted_sites(self) -> list[DeletedSite]:
        """The data-centre targets whose Serve applications are still to be removed: those of
        deleted Sites, and those Sites were moved away from."""
        return datacentre_records.list_pending(self)

    def forget_deleted_site(self, site: DeletedSite, lease: Lease | None = None) -> None:
        """Its applications are removed: the record goes, unless the Site was deleted again since."""
        datacentre_records.forget(self, site, lease)

    def abandon_deleted_site(self, name: str, event: Event, deleting: Event | None = None) -> tuple[bool, bool]:
        """An operator gives up removing the applications Site ``name`` left behind: its
        records go, every target it left, with ``event``. With ``deleting``, the Site is
        deleted first if it is still stored (and its targets given up with the rest), in the
        same transaction: both or neither. (Whether it was deleted, whether any was left.)"""
        now = self._clock()
        with self._tx() as db:
            deleted = deleting is not None and self._delete(db, "Site", name, deleting, now, missing_ok=True) is not None
            if deleted:
                self._changed(db, "resources")
            return deleted, datacentre_records.abandon(self, db, name, event, now)

    # --- placement intent ------------------------------------------------------------

    def placements(self, after: tuple[str, str, str] | None = None, limit: int | None = None) -> list[PlacementRow]:
        """The placement by deployment, site and variant (byte-wise); those after ``after``
        only and the first ``limit`` only, when given (a page of ``GET /v1/placements``)."""
        c = self.collate
        where = "" if after is None else f" WHERE (deployment{c}, site{c}, variant{c}) > (?, ?, ?)"
        rows = self._fetch(self._q(f"SELECT * FROM placements{where} ORDER BY deployment{c}, site{c}, variant{c}"
                                   + ("" if limit is None else " LIMIT ?")),
                           (*(after or ()), *(() if limit is None else (limit,))))
        return [PlacementRow(r["deployment"], r["site"], r["variant"], r["replicas"]) for r in rows]

    def replace_placements(self, rows: Sequence[PlacementRow], events: Sequence[Event] = (), lease: Lease | None = None) -> None:
        """Persist the whole new placement (the intent) and its events atomically. With
        ``lease``, only while it is held: the check and the write are one transaction, so
        a deposed leader's late write never lands (:class:`Fenced`)."""
        now = self._clock()
        with self._tx() as db:
            if lease is not None:
                self._fence(db, lease)
            self._write_placements(db, rows, events, now)

    def _write_placements(self, db: Any, rows: Sequence[PlacementRow], events: Sequence[Event], now: float) -> None:
        """Inside a write transaction: the placement table becomes ``rows``; ``events`` are logged."""
        db.execute("DELETE FROM placements")
        keep = [(r.deployment, r.site, r.variant, r.replicas) for r in rows if r.replicas > 0]
        if keep:
            self._many(db, self._q("INSERT INTO placements (deployment, site, variant, replicas) VALUES (?, ?, ?, ?)"), keep)
        for e in events:
            self._log(db, e, now)

    # --- events ----------------------------------------------------------------------

    def _log(self, db: Any, e: Event, now: float) -> None:
        name = storable(e.name)
        logged = self._one(db, "INSERT INTO events (ts, actor, action, kind, name, reason, details) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                           (now, storable(e.actor), e.action, e.kind, name, storable(e.reason), _canonical(e.details)))
        event_sites.record(self, db, int(logged["id"]), e.kind, name, e.details)
        self._changed(db, f"events:{e.kind}")

    def record(self, *events: Event, lease: Lease | None = None) -> None:
        """Log ``events``; with ``lease``, only while it is held (:class:`Fenced`)."""
        now = self._clock()
        with self._tx() as db:
            if lease is not None:
                self._fence(db, lease)
            for e in events:
                self._log(db, e, now)

    def events(self, since: int = 0, limit: int = 100, kind: str | None = None, name: str | None = None,
               site: str | None = None, after: float | None = None, before: float | None = None) -> list[LoggedEvent]:
        """Up to ``limit`` events after event ``since``, oldest first (of ``kind``, named
        ``name``, at ``site``, logged at ``after`` or later and before ``before`` (epoch
        seconds), when given: :func:`orchestrator.store.eventquery.select`)."""
        sql, args = eventquery.select(since, max(1, min(limit, 10_000)), kind, name, site, after, before, self.contains)
        return [_event(r) for r in self._fetch(self._q(sql), tuple(args))]

    def recent_events(self, kind: str | None = None, name: str | None = None, limit: int = 20,
                      site: str | None = None, after: float | None = None, before: float | None = None) -> list[LoggedEvent]:
        """The newest ``limit`` events (of ``kind``, named ``name``, at ``site``, in [``after``,
        ``before``), when given), oldest first."""
        sql, args = eventquery.select(None, max(1, min(limit, 10_000)), kind, name, site, after, before, self.contains)
        return [_event(r) for r in reversed(self._fetch(self._q(sql), tuple(args)))]

    def index_event_sites(self, batch: int = event_sites.BATCH) -> int:
        """Index the sites of the next ``batch`` events this release did not log itself (an
        earlier release's: :mod:`orchestrator.store.event_sites`); how many were read, 0 once
        caught up."""
        return event_sites.index(self, batch)

    def prune_events(self, before: float, audit: bool, limit: int = 1000, lease: Lease | None = None) -> int:
        """Delete up to ``limit`` of the oldest events logged before ``before`` (epoch
        seconds): those the fleet logs of itself (:data:`FLEET_ACTIONS`), or with ``audit``
        the rest, what callers did; never :data:`KEPT_ACTIONS`. Returns how many went. One
        short transaction per call, so writers wait for one batch at most; with ``lease``,
        only while it is held (:class:`Fenced`). Ids are never reused (both backends count
        them apart from the rows), so a reader following by id misses nothing logged later;
        one that stopped before the newest id deleted is told (:meth:`events_pruned_through`)."""
        fleet = sorted(FLEET_ACTIONS)
        if audit:
            which, actions = "NOT IN", [*fleet, *sorted(KEPT_ACTIONS)]
        else:
            which, actions = "IN", fleet
        marks = ", ".join("?" * len(actions))
        batch = f"SELECT id FROM events WHERE ts < ? AND action {which} ({marks}) ORDER BY ts, id LIMIT ?"
        args = (before, *actions, max(1, limit))
        with self._tx() as db:
            if lease is not None:
                self._fence(db, lease)
            newest = self._one(db, f"SELECT MAX(id) AS id FROM ({batch}) AS batch", args)["id"]
            if newest is None:
                return 0
            db.execute(self._q("UPDATE meta SET value = ? WHERE key = 'events_pruned_through' AND value < ?"), (newest, newest))
            event_sites.forget(self, db, batch, args)
            return int(db.execute(self._q(f"DELETE FROM events WHERE id IN ({batch})"), args).rowcount)

    def events_pruned_through(self) -> int:
        """The newest event id retention deleted (:meth:`prune_events`), 0 while none was: a
        reader that stopped before it may have missed events (not all of them: the audit trail
        is kept longer, revocations for good)."""
        return int(self._fetch("SELECT value FROM meta WHERE key = 'events_pruned_through'")[0]["value"])

    def events_last_id(self) -> int:
        """The newest event id logged and not pruned, 0 while none is: below an id a reader
        read from this store, the store went back (restored from a backup: a copy keeps its
        :meth:`store_id`, and numbers new events from the copy's last)."""
        return int(self._fetch("SELECT COALESCE(MAX(id), 0) AS id FROM events")[0]["id"])

    # --- leadership ------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take or renew the lease ``name`` for ``ttl_s`` seconds; None while another holder
        has it and it has not run out. A renewal keeps the fencing token; a change of
        holder increments it. On PostgreSQL the time is the database's own clock, so the
        replicas' clocks do not matter; on SQLite it is the store's clock (one machine)."""
        with self._tx() as db:
            now = self._lease_now(db)
            row = self._one(db, "SELECT holder, token, expires_at FROM leases WHERE name = ?", (name,))
            if row is None:
                token = 1
                db.execute(self._q("INSERT INTO leases (name, holder, token, expires_at) VALUES (?, ?, ?, ?)"),
                           (name, holder, token, now + ttl_s))
            elif row["holder"] == holder or row["expires_at"] <= now:
                token = int(row["token"]) + (0 if row["holder"] == holder else 1)
                db.execute(self._q("UPDATE leases SET holder = ?, token = ?, expires_at = ? WHERE name = ?"),
                           (holder, token, now + ttl_s, name))
            else:
                return None
        return Lease(name, holder, token, ttl_s)

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up at once (a clean shutdown), if it is still this holder's."""
        with self._tx() as db:
            db.execute(self._q("UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ? AND token = ?"),
                       (self._lease_now(db), lease.name, lease.holder, lease.token))

    def current_lease(self, name: str) -> Lease | None:
        """Who holds ``name`` now (``remaining_s`` > 0), or None when nobody does."""
        with self._tx(commit=False) as db:
            now = self._lease_now(db)
            row = self._one(db, "SELECT holder, token, expires_at FROM leases WHERE name = ?", (name,))
        if row is None or row["expires_at"] <= now:
            return None
        return Lease(name, row["holder"], int(row["token"]), float(row["expires_at"]) - now)

    def publish(self, key: str, body: str, lease: Lease | None = None) -> int:
        """Keep ``body`` under ``key`` for other replicas to read (the leader's endpoint
        table); returns its version, which grows only when the body changes."""
        with self._tx() as db:
            if lease is not None:
                self._fence(db, lease)
            row = self._one(db, "SELECT version, body FROM published WHERE key = ?", (key,))
            if row is None or row["body"] != body:
                self._changed(db, f"published:{key}")
            if row is None:
                db.execute(self._q("INSERT INTO published (key, version, body) VALUES (?, 1, ?)"), (key, body))
                return 1
            if row["body"] == body:
                return int(row["version"])
            db.execute(self._q("UPDATE published SET version = ?, body = ? WHERE key = ?"), (int(row["version"]) + 1, body, key))
            return int(row["version"]) + 1

    def published(self, key: str, newer_than: int = 0) -> tuple[int, str] | None:
        """``(version, body)`` under ``key`` when its version is above ``newer_than``, else None."""
        rows = self._fetch(self._q("SELECT version, body FROM published WHERE key = ? AND version > ?"), (key, newer_than))
        return (int(rows[0]["version"]), rows[0]["body"]) if rows else None

    def _fence(self, db: Any, lease: Lease) -> None:
        """Inside a write transaction: refuse unless ``lease`` is still held and current."""
        row = self._one(db, "SELECT 1 AS held FROM leases WHERE name = ? AND holder = ? AND token = ? AND expires_at > ?",
                        (lease.name, lease.holder, lease.token, self._lease_now(db)))
        if row is None:
            raise Fenced(f"lease {lease.name!r} (token {lease.token}) is no longer held by {lease.holder}; not writing")


def _event(row: Mapping[str, Any]) -> LoggedEvent:
    return LoggedEvent(row["id"], row["ts"], row["actor"], row["action"], row["kind"], row["name"], row["reason"], json.loads(row["details"]))


__all__ = ["SqlStore"]
