"""The state store on one embedded SQLite file.

Why SQLite: the control plane must run on one machine with nothing else installed, and
must survive being killed at any instant. Each public mutation is one ``BEGIN IMMEDIATE``
transaction (so writers are serialised and a crash leaves either all of it or none), the
journal is WAL (readers never block the writer), and every object carries a
``generation`` (bumped when its spec changes) and a store-wide ``resourceVersion``
(bumped on every write) for optimistic concurrency: a write that names a stale
``resourceVersion`` is refused with :class:`Conflict`, never silently lost.

The event log is append-only: who did what, to which object, when and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, name TEXT NOT NULL,
    labels TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL DEFAULT '{}',
    generation INTEGER NOT NULL, resource_version INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS placements (
    deployment TEXT NOT NULL, site TEXT NOT NULL, variant TEXT NOT NULL,
    replicas INTEGER NOT NULL CHECK (replicas > 0),
    PRIMARY KEY (deployment, site, variant)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    reason TEXT NOT NULL, details TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_object ON events (kind, name, id);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, purpose TEXT NOT NULL,
    role TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL,
    revoked INTEGER NOT NULL DEFAULT 0, description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS agents (
    site TEXT PRIMARY KEY, agent_id TEXT NOT NULL, credential_digest TEXT NOT NULL,
    joined_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('resource_version', 0);
"""


class StoreError(Exception):
    """Base of the store's errors."""


class Conflict(StoreError):
    """A write named a resourceVersion that is no longer current."""


class NotFound(StoreError):
    pass


@dataclass(frozen=True)
class StoredObject:
    kind: str
    name: str
    labels: Mapping[str, str]
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    generation: int
    resource_version: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ObjectWrite:
    kind: str
    name: str
    labels: Mapping[str, str]
    spec: Mapping[str, Any]
    expected_version: int | None = None  # optimistic concurrency


@dataclass(frozen=True)
class WriteOutcome:
    kind: str
    name: str
    action: str  # created | configured | unchanged | deleted
    generation: int
    resource_version: int


@dataclass(frozen=True)
class Event:
    actor: str
    action: str
    kind: str
    name: str
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoggedEvent:
    id: int
    ts: float
    actor: str
    action: str
    kind: str
    name: str
    reason: str
    details: Mapping[str, Any]


@dataclass(frozen=True)
class PlacementRow:
    deployment: str
    site: str
    variant: str
    replicas: int


@dataclass(frozen=True)
class TokenInfo:
    id: str
    purpose: str  # "api" | "bootstrap"
    role: str  # "admin" | "read" | "agent"
    expires_at: float | None
    description: str
    created_at: float = 0.0


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Store:
    def __init__(self, path: str | pathlib.Path, clock: Callable[[], float] = time.time):
        self.path = str(path)
        self._clock = clock
        self._lock = threading.RLock()
        if self.path != ":memory:":
            pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx() as db:
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self, commit: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``commit=False`` rolls it back at the end (a dry run)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT" if commit else "ROLLBACK")

    def _next_version(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'resource_version'")
        return int(db.execute("SELECT value FROM meta WHERE key = 'resource_version'").fetchone()[0])

    def next_sequence(self, key: str) -> int:
        """A durable counter that only grows (e.g. assignment versions agents compare)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", (f"seq:{key}",))
            db.execute("UPDATE meta SET value = value + 1 WHERE key = ?", (f"seq:{key}",))
            return int(db.execute("SELECT value FROM meta WHERE key = ?", (f"seq:{key}",)).fetchone()[0])

    def resource_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key = 'resource_version'").fetchone()[0])

    @staticmethod
    def _row(row: sqlite3.Row) -> StoredObject:
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
        )

    # --- objects --------------------------------------------------------------------

    def get(self, kind: str, name: str) -> StoredObject | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM objects WHERE kind = ? AND name = ?", (kind, name)).fetchone()
        return self._row(row) if row else None

    def list(self, kind: str | None = None) -> list[StoredObject]:
        with self._lock:
            if kind is None:
                rows = self._db.execute("SELECT * FROM objects ORDER BY kind, name").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM objects WHERE kind = ? ORDER BY name", (kind,)).fetchall()
        return [self._row(r) for r in rows]

    def apply(self, writes: Sequence[ObjectWrite], event: Event | None = None, dry_run: bool = False) -> list[WriteOutcome]:
        """Create or update all objects in one transaction: all of them or none. A dry run
        decides the same way and rolls back: what it says is what the write would do."""
        now = self._clock()
        outcomes: list[WriteOutcome] = []
        with self._tx(commit=not dry_run) as db:
            for w in writes:
                row = db.execute("SELECT * FROM objects WHERE kind = ? AND name = ?", (w.kind, w.name)).fetchone()
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
                        " VALUES (?, ?, ?, ?, 1, ?, ?, ?)",
                        (w.kind, w.name, labels, spec, rv, now, now),
                    )
                    outcomes.append(WriteOutcome(w.kind, w.name, "created", 1, rv))
                elif _canonical(current.spec) == spec and _canonical(current.labels) == labels:
                    outcomes.append(WriteOutcome(w.kind, w.name, "unchanged", current.generation, current.resource_version))
                else:
                    rv = self._next_version(db)
                    generation = current.generation + (1 if _canonical(current.spec) != spec else 0)
                    db.execute(
                        "UPDATE objects SET labels = ?, spec = ?, generation = ?, resource_version = ?, updated_at = ?"
                        " WHERE kind = ? AND name = ?",
                        (labels, spec, generation, rv, now, w.kind, w.name),
                    )
                    outcomes.append(WriteOutcome(w.kind, w.name, "configured", generation, rv))
            if event is not None:
                changed = [o for o in outcomes if o.action != "unchanged"]
                for o in changed:
                    self._log(db, Event(event.actor, o.action, o.kind, o.name, event.reason, {**event.details, "generation": o.generation}), now)
        return outcomes

    def delete(self, kind: str, name: str, event: Event, expected_version: int | None = None) -> WriteOutcome:
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT * FROM objects WHERE kind = ? AND name = ?", (kind, name)).fetchone()
            if row is None:
                raise NotFound(f"{kind} {name!r} does not exist")
            current = self._row(row)
            if expected_version is not None and current.resource_version != expected_version:
                raise Conflict(f"{kind} {name!r} changed since resourceVersion {expected_version}; re-read and retry")
            db.execute("DELETE FROM objects WHERE kind = ? AND name = ?", (kind, name))
            if kind == "ModelDeployment":
                db.execute("DELETE FROM placements WHERE deployment = ?", (name,))
            rv = self._next_version(db)
            self._log(db, Event(event.actor, "deleted", kind, name, event.reason, event.details), now)
        return WriteOutcome(kind, name, "deleted", current.generation, rv)

    def set_status(self, kind: str, name: str, status: Mapping[str, Any]) -> bool:
        """Record observed status; returns False when the object is gone. Does not bump generation."""
        return self.set_statuses([(kind, name, status)]) == 1

    def set_statuses(self, statuses: Sequence[tuple[str, str, Mapping[str, Any]]]) -> int:
        """Record many observed statuses in one transaction, writing only those that
        changed; objects that are gone are skipped. Returns how many objects exist.
        (A reconcile pass over 11,000 objects took 0.14-0.27 s one transaction each.)"""
        encoded = {(kind, name): _canonical(status) for kind, name, status in statuses}
        with self._tx() as db:
            current = {}
            for key in encoded:
                row = db.execute("SELECT status FROM objects WHERE kind = ? AND name = ?", key).fetchone()
                if row is not None:
                    current[key] = row["status"]
            db.executemany(
                "UPDATE objects SET status = ? WHERE kind = ? AND name = ?",
                [(value, kind, name) for (kind, name), value in encoded.items()
                 if (kind, name) in current and current[kind, name] != value],
            )
        return sum(key in current for key in encoded)

    # --- placement intent ------------------------------------------------------------

    def placements(self) -> list[PlacementRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM placements ORDER BY deployment, site, variant").fetchall()
        return [PlacementRow(r["deployment"], r["site"], r["variant"], r["replicas"]) for r in rows]

    def replace_placements(self, rows: Sequence[PlacementRow], events: Sequence[Event] = ()) -> None:
        """Persist the whole new placement (the intent) and its events atomically."""
        now = self._clock()
        with self._tx() as db:
            db.execute("DELETE FROM placements")
            db.executemany(
                "INSERT INTO placements (deployment, site, variant, replicas) VALUES (?, ?, ?, ?)",
                [(r.deployment, r.site, r.variant, r.replicas) for r in rows if r.replicas > 0],
            )
            for e in events:
                self._log(db, e, now)

    # --- events ----------------------------------------------------------------------

    def _log(self, db: sqlite3.Connection, e: Event, now: float) -> None:
        db.execute(
            "INSERT INTO events (ts, actor, action, kind, name, reason, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, e.actor, e.action, e.kind, e.name, e.reason, _canonical(e.details)),
        )

    def record(self, *events: Event) -> None:
        now = self._clock()
        with self._tx() as db:
            for e in events:
                self._log(db, e, now)

    def events(self, since: int = 0, limit: int = 100, kind: str | None = None, name: str | None = None) -> list[LoggedEvent]:
        sql, args = "SELECT * FROM events WHERE id > ?", [since]
        if kind:
            sql, args = sql + " AND kind = ?", [*args, kind]
        if name:
            sql, args = sql + " AND name = ?", [*args, name]
        sql += " ORDER BY id LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, max(1, min(limit, 10_000)))).fetchall()
        return [_event(r) for r in rows]

    def recent_events(self, kind: str, name: str, limit: int = 20) -> list[LoggedEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE kind = ? AND name = ? ORDER BY id DESC LIMIT ?", (kind, name, limit)
            ).fetchall()
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
                "INSERT INTO tokens (id, digest, purpose, role, created_at, expires_at, description) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, digest(secret), purpose, role, now, expires, description),
            )
            self._log(db, Event(actor, "token-created", "Token", token_id, description or f"{purpose} token", {"role": role, "expiresAt": expires}), now)
        return secret, TokenInfo(token_id, purpose, role, expires, description, now)

    def verify_token(self, secret: str, purpose: str) -> TokenInfo | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM tokens WHERE digest = ? AND purpose = ? AND revoked = 0", (digest(secret), purpose)
            ).fetchone()
        if row is None or (row["expires_at"] is not None and row["expires_at"] < self._clock()):
            return None
        return TokenInfo(row["id"], row["purpose"], row["role"], row["expires_at"], row["description"], row["created_at"])

    def revoke_token(self, token_id: str, actor: str) -> bool:
        with self._tx() as db:
            n = db.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (token_id,)).rowcount
            if n:
                self._log(db, Event(actor, "token-revoked", "Token", token_id, "revoked"), self._clock())
        return bool(n)

    def has_api_tokens(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM tokens WHERE purpose = 'api' AND revoked = 0 LIMIT 1").fetchone() is not None

    def save_agent(self, site: str, agent_id: str, credential: str, actor: str) -> None:
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO agents (site, agent_id, credential_digest, joined_at, revoked) VALUES (?, ?, ?, ?, 0)"
                " ON CONFLICT(site) DO UPDATE SET agent_id = excluded.agent_id,"
                " credential_digest = excluded.credential_digest, joined_at = excluded.joined_at, revoked = 0",
                (site, agent_id, digest(credential), now),
            )
            # the join itself is logged once, as `agent-joined`, when the agent hub records it

    def agent_credential_ok(self, site: str, credential: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT credential_digest, revoked FROM agents WHERE site = ?", (site,)).fetchone()
        return bool(row) and not row["revoked"] and secrets.compare_digest(row["credential_digest"], digest(credential))

    def agent_revoked_at(self, site: str) -> float | None:
        """When the site's agent identity was revoked, or None if it is not revoked."""
        with self._lock:
            row = self._db.execute("SELECT revoked FROM agents WHERE site = ?", (site,)).fetchone()
            if row is None or not row["revoked"]:
                return None
            ts = self._db.execute(
                "SELECT MAX(ts) FROM events WHERE kind = 'Site' AND name = ? AND action = 'agent-revoked'", (site,)
            ).fetchone()[0]
        return float(ts) if ts is not None else 0.0

    def revoke_agent(self, site: str, actor: str) -> bool:
        with self._tx() as db:
            n = db.execute("UPDATE agents SET revoked = 1 WHERE site = ?", (site,)).rowcount
            if n:
                self._log(db, Event(actor, "agent-revoked", "Site", site, "agent identity revoked"), self._clock())
        return bool(n)


def _event(row: sqlite3.Row) -> LoggedEvent:
    return LoggedEvent(row["id"], row["ts"], row["actor"], row["action"], row["kind"], row["name"], row["reason"], json.loads(row["details"]))
