"""The state store on PostgreSQL: the same contract as the SQLite store, for several
control-plane replicas sharing one database.

Why these choices: every public mutation is one transaction that first takes one
transaction-scoped advisory lock, so writers are serialised across every replica
exactly as ``BEGIN IMMEDIATE`` serialises them on one SQLite file; the store-wide
``resourceVersion``, generations, conflicts, the event log and dry runs therefore
behave identically (one test suite runs against both). Specs, labels and statuses are
kept as canonical JSON text, not ``jsonb``, so "unchanged" means byte-equal canonical
JSON on both backends. The driver is psycopg 3; a connection that broke (the server
restarted, the network dropped) is replaced on the next call, and the call that saw
the break raises :class:`StoreUnavailable` without pretending to know whether a write
in flight committed.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from orchestrator.store.sqlite import (
    Conflict,
    Event,
    LoggedEvent,
    NotFound,
    ObjectWrite,
    PlacementRow,
    StoredObject,
    StoreError,
    TokenInfo,
    WriteOutcome,
    _canonical,
    digest,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL,
    labels TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL DEFAULT '{}',
    generation BIGINT NOT NULL, resource_version BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS placements (
    deployment TEXT NOT NULL, site TEXT NOT NULL, variant TEXT NOT NULL,
    replicas BIGINT NOT NULL CHECK (replicas > 0),
    PRIMARY KEY (deployment, site, variant)
);
CREATE TABLE IF NOT EXISTS events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    reason TEXT NOT NULL, details TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_object ON events (kind, name, id);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, purpose TEXT NOT NULL,
    role TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION,
    revoked BOOLEAN NOT NULL DEFAULT FALSE, description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS agents (
    site TEXT PRIMARY KEY, agent_id TEXT NOT NULL, credential_digest TEXT NOT NULL,
    joined_at DOUBLE PRECISION NOT NULL, revoked BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, token BIGINT NOT NULL, expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO meta (key, value) VALUES ('resource_version', 0) ON CONFLICT (key) DO NOTHING
"""

WRITE_LOCK = 0x6564_6765  # the advisory lock every write transaction holds ("edge")


class StoreUnavailable(StoreError):
    """The database could not be reached; the call may or may not have taken effect."""


class Fenced(StoreError):
    """A write of intent named a lease that is no longer held: another replica leads."""


@dataclass(frozen=True)
class Lease:
    """A held lease: ``token`` (the fencing token) grows each time the lease changes hands;
    ``remaining_s`` is how long it is held from the moment the database granted it."""

    name: str
    holder: str
    token: int
    remaining_s: float


class PostgresStore:
    def __init__(self, url: str, clock: Callable[[], float] = time.time, connect_timeout_s: float = 5.0):
        self.url = url
        self.path = _redacted(url)  # what logs and `serve` print: never the password
        self._clock = clock
        self._timeout = connect_timeout_s
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        with self._tx() as db:  # under the write lock: two replicas starting at once
            db.execute(SCHEMA)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                             connect_timeout=max(1, int(self._timeout)))
            except psycopg.OperationalError as e:
                raise StoreUnavailable(f"cannot reach the PostgreSQL store at {self.path}: {_one_line(e)}") from e
        return self._conn

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """One read. A read changes nothing, so a connection found broken (the server
        restarted since the last call) is replaced and the read made once more."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]
                except psycopg.OperationalError as e:
                    if attempt == 2 or not conn.broken:
                        raise StoreUnavailable(f"the PostgreSQL store at {self.path} failed: {_one_line(e)}") from e
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _tx(self, commit: bool = True) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """One write transaction, serialised with every other writer on the database;
        ``commit=False`` rolls it back at the end (a dry run). A connection found broken
        when the transaction begins (nothing sent yet) is replaced once; a failure after
        that raises :class:`StoreUnavailable`: the write may or may not have committed."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    conn.execute("BEGIN")
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    break
                except psycopg.OperationalError as e:
                    if attempt == 2 or not conn.broken:
                        raise StoreUnavailable(f"the PostgreSQL store at {self.path} failed: {_one_line(e)}") from e
            try:
                yield conn
            except BaseException as e:
                with contextlib.suppress(psycopg.OperationalError):
                    conn.execute("ROLLBACK")
                if isinstance(e, psycopg.OperationalError):
                    raise StoreUnavailable(f"the PostgreSQL store at {self.path} failed: {_one_line(e)}") from e
                raise
            try:
                conn.execute("COMMIT" if commit else "ROLLBACK")
            except psycopg.OperationalError as e:
                raise StoreUnavailable(f"the PostgreSQL store at {self.path} failed: {_one_line(e)}") from e

    def _next_version(self, db: psycopg.Connection[dict[str, Any]]) -> int:
        row = db.execute("UPDATE meta SET value = value + 1 WHERE key = 'resource_version' RETURNING value").fetchone()
        return int(row["value"])  # type: ignore[index]

    def next_sequence(self, key: str) -> int:
        """A durable counter that only grows (e.g. assignment versions agents compare)."""
        with self._tx() as db:
            row = db.execute(
                "INSERT INTO meta (key, value) VALUES (%s, 1) ON CONFLICT (key) DO UPDATE SET value = meta.value + 1 RETURNING value",
                (f"seq:{key}",),
            ).fetchone()
            return int(row["value"])  # type: ignore[index]

    def resource_version(self) -> int:
        return int(self._fetch("SELECT value FROM meta WHERE key = 'resource_version'")[0]["value"])

    @staticmethod
    def _row(row: Mapping[str, Any]) -> StoredObject:
        return StoredObject(
            kind=row["kind"], name=row["name"], labels=json.loads(row["labels"]), spec=json.loads(row["spec"]),
            status=json.loads(row["status"]), generation=row["generation"], resource_version=row["resource_version"],
            created_at=row["created_at"], updated_at=row["updated_at"],
        )

    # --- objects --------------------------------------------------------------------

    def get(self, kind: str, name: str) -> StoredObject | None:
        rows = self._fetch("SELECT * FROM objects WHERE kind = %s AND name = %s", (kind, name))
        return self._row(rows[0]) if rows else None

    def list(self, kind: str | None = None) -> list[StoredObject]:
        if kind is None:
            rows = self._fetch('SELECT * FROM objects ORDER BY kind COLLATE "C", name COLLATE "C"')
        else:
            rows = self._fetch('SELECT * FROM objects WHERE kind = %s ORDER BY name COLLATE "C"', (kind,))
        return [self._row(r) for r in rows]

    def apply(self, writes: Sequence[ObjectWrite], event: Event | None = None, dry_run: bool = False) -> list[WriteOutcome]:
        """Create or update all objects in one transaction: all of them or none. A dry run
        decides the same way and rolls back: what it says is what the write would do."""
        now = self._clock()
        outcomes: list[WriteOutcome] = []
        with self._tx(commit=not dry_run) as db:
            for w in writes:
                row = db.execute("SELECT * FROM objects WHERE kind = %s AND name = %s", (w.kind, w.name)).fetchone()
                current = self._row(row) if row else None
                if w.expected_version is not None:
                    have = current.resource_version if current else 0
                    if have != w.expected_version:
                        raise Conflict(
                            f"{w.kind} {w.name!r} was changed by someone else "
                            f"(resourceVersion is {have}, the request expected {w.expected_version}); re-read and retry"
                        )
                spec, labels = _canonical(w.spec), _canonical(w.labels)
                if current is None:
                    rv = self._next_version(db)
                    db.execute(
                        "INSERT INTO objects (kind, name, labels, spec, generation, resource_version, created_at, updated_at)"
                        " VALUES (%s, %s, %s, %s, 1, %s, %s, %s)",
                        (w.kind, w.name, labels, spec, rv, now, now),
                    )
                    outcomes.append(WriteOutcome(w.kind, w.name, "created", 1, rv))
                elif _canonical(current.spec) == spec and _canonical(current.labels) == labels:
                    outcomes.append(WriteOutcome(w.kind, w.name, "unchanged", current.generation, current.resource_version))
                else:
                    rv = self._next_version(db)
                    generation = current.generation + (1 if _canonical(current.spec) != spec else 0)
                    db.execute(
                        "UPDATE objects SET labels = %s, spec = %s, generation = %s, resource_version = %s, updated_at = %s"
                        " WHERE kind = %s AND name = %s",
                        (labels, spec, generation, rv, now, w.kind, w.name),
                    )
                    outcomes.append(WriteOutcome(w.kind, w.name, "configured", generation, rv))
            if event is not None:
                for o in (o for o in outcomes if o.action != "unchanged"):
                    self._log(db, Event(event.actor, o.action, o.kind, o.name, event.reason, {**event.details, "generation": o.generation}), now)
        return outcomes

    def delete(self, kind: str, name: str, event: Event, expected_version: int | None = None) -> WriteOutcome:
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT * FROM objects WHERE kind = %s AND name = %s", (kind, name)).fetchone()
            if row is None:
                raise NotFound(f"{kind} {name!r} does not exist")
            current = self._row(row)
            if expected_version is not None and current.resource_version != expected_version:
                raise Conflict(f"{kind} {name!r} changed since resourceVersion {expected_version}; re-read and retry")
            db.execute("DELETE FROM objects WHERE kind = %s AND name = %s", (kind, name))
            if kind == "ModelDeployment":
                db.execute("DELETE FROM placements WHERE deployment = %s", (name,))
            rv = self._next_version(db)
            self._log(db, Event(event.actor, "deleted", kind, name, event.reason, event.details), now)
        return WriteOutcome(kind, name, "deleted", current.generation, rv)

    def set_status(self, kind: str, name: str, status: Mapping[str, Any]) -> bool:
        """Record observed status; returns False when the object is gone. Does not bump generation."""
        return self.set_statuses([(kind, name, status)]) == 1

    def set_statuses(self, statuses: Sequence[tuple[str, str, Mapping[str, Any]]]) -> int:
        """Record many observed statuses in one transaction, writing only those that
        changed; objects that are gone are skipped. Returns how many objects exist."""
        encoded = {(kind, name): _canonical(status) for kind, name, status in statuses}
        with self._tx() as db:
            current = {}
            for key in encoded:
                row = db.execute("SELECT status FROM objects WHERE kind = %s AND name = %s", key).fetchone()
                if row is not None:
                    current[key] = row["status"]
            changed = [(value, kind, name) for (kind, name), value in encoded.items()
                       if (kind, name) in current and current[kind, name] != value]
            if changed:
                with db.cursor() as cur:
                    cur.executemany("UPDATE objects SET status = %s WHERE kind = %s AND name = %s", changed)
        return sum(key in current for key in encoded)

    # --- placement intent ------------------------------------------------------------

    def placements(self) -> list[PlacementRow]:
        rows = self._fetch('SELECT * FROM placements ORDER BY deployment COLLATE "C", site COLLATE "C", variant COLLATE "C"')
        return [PlacementRow(r["deployment"], r["site"], r["variant"], r["replicas"]) for r in rows]

    def replace_placements(self, rows: Sequence[PlacementRow], events: Sequence[Event] = ()) -> None:
        """Persist the whole new placement (the intent) and its events atomically."""
        now = self._clock()
        with self._tx() as db:
            db.execute("DELETE FROM placements")
            keep = [(r.deployment, r.site, r.variant, r.replicas) for r in rows if r.replicas > 0]
            if keep:
                with db.cursor() as cur:
                    cur.executemany("INSERT INTO placements (deployment, site, variant, replicas) VALUES (%s, %s, %s, %s)", keep)
            for e in events:
                self._log(db, e, now)

    # --- leadership ------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take or renew the lease; None when another holder has it and it has not run
        out. Time is the database's own clock, so replicas' clocks do not matter. A
        renewal keeps the token; a take-over increments it (the fencing token)."""
        with self._tx() as db:
            row = db.execute(
                "INSERT INTO leases (name, holder, token, expires_at) VALUES (%s, %s, 1, now() + make_interval(secs => %s))"
                " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                " token = leases.token + (CASE WHEN leases.holder = excluded.holder THEN 0 ELSE 1 END),"
                " expires_at = excluded.expires_at"
                " WHERE leases.holder = excluded.holder OR leases.expires_at <= now()"
                " RETURNING token, EXTRACT(EPOCH FROM expires_at - now())::float8 AS remaining",
                (name, holder, ttl_s),
            ).fetchone()
        return Lease(name, holder, int(row["token"]), float(row["remaining"])) if row else None

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up at once (a clean shutdown), if it is still this holder's."""
        with self._tx() as db:
            db.execute("UPDATE leases SET expires_at = now() WHERE name = %s AND holder = %s AND token = %s",
                       (lease.name, lease.holder, lease.token))

    def _fence(self, db: psycopg.Connection[dict[str, Any]], lease: Lease) -> None:
        """Inside a write transaction: refuse unless ``lease`` is still held and current."""
        row = db.execute("SELECT 1 FROM leases WHERE name = %s AND holder = %s AND token = %s AND expires_at > now()",
                         (lease.name, lease.holder, lease.token)).fetchone()
        if row is None:
            raise Fenced(f"lease {lease.name!r} (token {lease.token}) is no longer held by {lease.holder}; not writing")

    def replace_placements_fenced(self, lease: Lease, rows: Sequence[PlacementRow], events: Sequence[Event] = ()) -> None:
        """:meth:`replace_placements`, only while ``lease`` is held: the check and the
        write are one transaction, so a deposed leader's late write never lands."""
        now = self._clock()
        with self._tx() as db:
            self._fence(db, lease)
            db.execute("DELETE FROM placements")
            keep = [(r.deployment, r.site, r.variant, r.replicas) for r in rows if r.replicas > 0]
            if keep:
                with db.cursor() as cur:
                    cur.executemany("INSERT INTO placements (deployment, site, variant, replicas) VALUES (%s, %s, %s, %s)", keep)
            for e in events:
                self._log(db, e, now)

    # --- events ----------------------------------------------------------------------

    def _log(self, db: psycopg.Connection[dict[str, Any]], e: Event, now: float) -> None:
        db.execute(
            "INSERT INTO events (ts, actor, action, kind, name, reason, details) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (now, e.actor, e.action, e.kind, e.name, e.reason, _canonical(e.details)),
        )

    def record(self, *events: Event) -> None:
        now = self._clock()
        with self._tx() as db:
            for e in events:
                self._log(db, e, now)

    def events(self, since: int = 0, limit: int = 100, kind: str | None = None, name: str | None = None) -> list[LoggedEvent]:
        sql, args = "SELECT * FROM events WHERE id > %s", [since]
        if kind:
            sql, args = sql + " AND kind = %s", [*args, kind]
        if name:
            sql, args = sql + " AND name = %s", [*args, name]
        sql += " ORDER BY id LIMIT %s"
        rows = self._fetch(sql, (*args, max(1, min(limit, 10_000))))
        return [_event(r) for r in rows]

    def recent_events(self, kind: str, name: str, limit: int = 20) -> list[LoggedEvent]:
        rows = self._fetch("SELECT * FROM events WHERE kind = %s AND name = %s ORDER BY id DESC LIMIT %s", (kind, name, limit))
        return [_event(r) for r in reversed(rows)]

    # --- tokens and agent identities ---------------------------------------------------

    def create_token(self, purpose: str, role: str, ttl_s: float | None, actor: str, description: str = "") -> tuple[str, TokenInfo]:
        """Returns ``(secret, info)``; only a digest of the secret is stored."""
        token_id = secrets.token_hex(4)
        secret = f"ep{purpose[0]}_{token_id}_{secrets.token_urlsafe(24)}"
        now = self._clock()
        expires = now + ttl_s if ttl_s else None
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (id, digest, purpose, role, created_at, expires_at, description) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (token_id, digest(secret), purpose, role, now, expires, description),
            )
            self._log(db, Event(actor, "token-created", "Token", token_id, description or f"{purpose} token", {"role": role, "expiresAt": expires}), now)
        return secret, TokenInfo(token_id, purpose, role, expires, description, now)

    def verify_token(self, secret: str, purpose: str) -> TokenInfo | None:
        rows = self._fetch("SELECT * FROM tokens WHERE digest = %s AND purpose = %s AND NOT revoked", (digest(secret), purpose))
        row = rows[0] if rows else None
        if row is None or (row["expires_at"] is not None and row["expires_at"] < self._clock()):
            return None
        return TokenInfo(row["id"], row["purpose"], row["role"], row["expires_at"], row["description"], row["created_at"])

    def revoke_token(self, token_id: str, actor: str) -> bool:
        with self._tx() as db:
            n = db.execute("UPDATE tokens SET revoked = TRUE WHERE id = %s", (token_id,)).rowcount
            if n:
                self._log(db, Event(actor, "token-revoked", "Token", token_id, "revoked"), self._clock())
        return bool(n)

    def has_api_tokens(self) -> bool:
        return bool(self._fetch("SELECT 1 FROM tokens WHERE purpose = 'api' AND NOT revoked LIMIT 1"))

    def save_agent(self, site: str, agent_id: str, credential: str, actor: str) -> None:
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO agents (site, agent_id, credential_digest, joined_at, revoked) VALUES (%s, %s, %s, %s, FALSE)"
                " ON CONFLICT (site) DO UPDATE SET agent_id = excluded.agent_id,"
                " credential_digest = excluded.credential_digest, joined_at = excluded.joined_at, revoked = FALSE",
                (site, agent_id, digest(credential), now),
            )
            self._log(db, Event(actor, "agent-joined", "Site", site, "agent joined with a bootstrap token", {"agentId": agent_id}), now)

    def agent_credential_ok(self, site: str, credential: str) -> bool:
        rows = self._fetch("SELECT credential_digest, revoked FROM agents WHERE site = %s", (site,))
        row = rows[0] if rows else None
        return bool(row) and not row["revoked"] and secrets.compare_digest(row["credential_digest"], digest(credential))

    def agent_revoked_at(self, site: str) -> float | None:
        """When the site's agent identity was revoked, or None if it is not revoked."""
        rows = self._fetch("SELECT revoked FROM agents WHERE site = %s", (site,))
        if not rows or not rows[0]["revoked"]:
            return None
        ts = self._fetch("SELECT MAX(ts) AS ts FROM events WHERE kind = 'Site' AND name = %s AND action = 'agent-revoked'", (site,))[0]["ts"]
        return float(ts) if ts is not None else 0.0

    def revoke_agent(self, site: str, actor: str) -> bool:
        with self._tx() as db:
            n = db.execute("UPDATE agents SET revoked = TRUE WHERE site = %s", (site,)).rowcount
            if n:
                self._log(db, Event(actor, "agent-revoked", "Site", site, "agent identity revoked"), self._clock())
        return bool(n)


def _event(row: Mapping[str, Any]) -> LoggedEvent:
    return LoggedEvent(row["id"], row["ts"], row["actor"], row["action"], row["kind"], row["name"], row["reason"], json.loads(row["details"]))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _redacted(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    if info.get("password"):
        return url.replace(f":{info['password']}@", ":***@")
    return url
