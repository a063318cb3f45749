"""Captured records on disk: one SQLite file per residency zone, and the writer that fills them.

Each zone's records live in their own file (``<root>/<ZONE>.db``) and nothing here copies
a record from one file to another: a record's zone is decided once, when it is captured
(:func:`orchestrator.distill.capture.zone_for`), and the store of that zone is the only
place it is ever written. The root is the control plane's data directory by default; an
operator bound to keep a zone's data on storage inside that zone mounts it there.

The gateway never waits for a disk: :meth:`CaptureWriter.offer` puts the record on a
bounded queue and returns; a background task writes batches in a worker thread. The queue
is bounded in records and in bytes (a record holds a whole request and answer, up to
80 MiB, so a lagging disk must not let the gateway hold gigabytes of them); a record past
either bound is dropped and counted (``edgeplane_capture_dropped_total``). A record its
zone's store refuses (a full disk, an unwritable directory) is lost too, counted by zone
(``edgeplane_capture_failed_total``) and logged once per error, not once per record: a
zone whose disk is full would otherwise log every request the gateway samples.

A deployment's ``dailyCap`` is counted where every replica and every restart sees the same
count: before a batch is written the writer takes its records' share of the day from
:class:`DailyCounts` (the control plane's state store), and drops the records past it, counted
by zone (``edgeplane_capture_capped_total``). The
gateway's own :class:`~orchestrator.distill.capture.Sampler` only stops queueing what this
process alone could not keep; a process's memory forgets at a restart, and a second replica
has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from orchestrator.distill import capture

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    model TEXT NOT NULL,
    zone TEXT NOT NULL,
    captured_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    site TEXT NOT NULL,
    stage TEXT NOT NULL,
    first_confidence REAL,
    input BLOB NOT NULL,
    input_binary INTEGER,
    output BLOB NOT NULL,
    output_binary INTEGER,
    deployment_created REAL
);
CREATE INDEX IF NOT EXISTS records_by_deployment ON records (deployment, captured_at);
CREATE INDEX IF NOT EXISTS records_by_expiry ON records (expires_at);
"""


@dataclass(frozen=True)
class Record:
    """One captured request: the v2 request body and the answer the cascade returned."""

    id: str
    deployment: str
    model: str
    zone: str
    captured_at: float
    expires_at: float
    site: str  # the site that received the request (the first stage's)
    stage: str  # the variant whose answer was returned: the last stage that ran
    first_confidence: float | None
    input: bytes
    input_binary: int | None  # Inference-Header-Content-Length of the request, if binary
    output: bytes
    output_binary: int | None
    #: Which deployment of its name captured it (``capture.CapturePolicy.deployment``): one
    #: deleted and created again is another, whose policy does not cover this record. None:
    #: captured by an earlier release, or from a route that did not say.
    deployment_created: float | None = None

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def summary(self) -> dict[str, object]:
        return {"id": self.id, "deployment": self.deployment, "model": self.model, "zone": self.zone,
                "capturedAt": self.captured_at, "expiresAt": self.expires_at, "site": self.site, "stage": self.stage,
                "firstConfidence": self.first_confidence, "inputBytes": len(self.input), "outputBytes": len(self.output)}


class ZoneStore:
    """The records of one zone."""

    def __init__(self, path: pathlib.Path, zone: str):
        self.path, self.zone = path, zone
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        # an erased record must leave no bytes behind: deleted content is overwritten in the
        # database file (not every SQLite build does so by default), and the write-ahead log that
        # still holds it is checkpointed and truncated after each delete (:meth:`_erase`)
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        if "deployment_created" not in columns:  # a file an earlier release wrote: its records are unstamped
            self._db.execute("ALTER TABLE records ADD COLUMN deployment_created REAL")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, records: list[Record]) -> None:
        wrong = [r.id for r in records if r.zone != self.zone]
        if wrong:  # a programming error, never a user's: the zone was decided at capture
            raise ValueError(f"records {wrong} belong to another zone than {self.zone}")
        with self._tx() as db:
            db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(r.id, r.deployment, r.model, r.zone, r.captured_at, r.expires_at, r.site, r.stage,
                             r.first_confidence, r.input, r.input_binary, r.output, r.output_binary, r.deployment_created)
                            for r in records])

    def records(self, deployment: str | None = None, *, model: str | None = None, now: float, retention_s: float | None = None,
                limit: int = 1_000_000, newest: bool = False) -> list[Record]:
        """Unexpired records (of ``deployment`` serving ``model``, when given), oldest first: the
        ``limit`` oldest, or with ``newest`` the ``limit`` newest (what was just captured, which
        an erasure asks after); ``retention_s``, the deployment's current retention, expires
        them too when it is shorter than the one they were captured under."""
        sql, args = "SELECT * FROM records WHERE expires_at > ?", [now]
        if retention_s is not None:
            sql, args = sql + " AND captured_at > ?", [*args, now - retention_s]
        sql, args = _of(sql, args, deployment, model)
        order = " ORDER BY captured_at DESC, id DESC" if newest else " ORDER BY captured_at, id"
        with self._lock:
            rows = self._db.execute(sql + order + " LIMIT ?", [*args, limit]).fetchall()
        return [Record(*row) for row in (reversed(rows) if newest else rows)]

    def holds(self, record_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone() is not None

    def held(self, record_ids: Sequence[str]) -> set[str]:
        """Which of ``record_ids`` this zone holds now (asked 500 at a time: SQLite's limit on a
        statement's parameters was 999 before 3.32)."""
        found: set[str] = set()
        for at in range(0, len(record_ids), 500):
            chunk = record_ids[at:at + 500]
            with self._lock:
                found.update(row[0] for row in self._db.execute(
                    f"SELECT id FROM records WHERE id IN ({', '.join('?' * len(chunk))})", chunk))
        return found

    def count(self, deployment: str | None = None, *, model: str | None = None) -> int:
        sql, args = _of("SELECT COUNT(*) FROM records WHERE 1", [], deployment, model)
        with self._lock:
            return int(self._db.execute(sql, args).fetchone()[0])

    def purge(self, now: float, retention: Mapping[str, capture.Covered | None] | None) -> int:
        """Delete the records whose retention has run out (``capture.expired``), and those no
        policy covers any more; how many. ``retention`` is what every capturing deployment's
        policy covers now (None: its spec does not read, and the expiry a record was captured
        under stands): a record expires by the shorter of the two retentions, and is deleted
        when its deployment keeps no records in this zone now, or is not the one that captured
        it (re-created: the record is a deleted deployment's; or its capture was turned off and
        on again since the record was captured; told by the identity the record
        is stamped with, not by comparing times, which another replica's clock wrote); a
        record an earlier release captured, unstamped, when captured before the deployment
        was created; a deployment missing from it
        (capture off, or deleted) keeps none. ``retention`` None (the policies cannot be read
        now): only the expiry a record was captured with."""
        def delete(db: sqlite3.Connection) -> int:
            deleted = db.execute("DELETE FROM records WHERE expires_at <= ?", (now,)).rowcount
            if retention is None:
                return deleted
            for (deployment,) in db.execute("SELECT DISTINCT deployment FROM records").fetchall():
                covered = retention.get(deployment)
                if covered is None and deployment in retention:  # its spec does not read: the stored expiry stands
                    continue
                if covered is None or self.zone not in covered.zones:  # capture off or deleted; or this zone no longer listed
                    deleted += db.execute("DELETE FROM records WHERE deployment = ?", (deployment,)).rowcount
                else:
                    deleted += db.execute("DELETE FROM records WHERE deployment = ? AND (captured_at <= ? OR deployment_created <> ?"
                                          " OR (deployment_created IS NULL AND captured_at < ?))",
                                          (deployment, now - covered.retention_s, covered.created, covered.created)).rowcount
            return deleted
        return self._erase(delete)

    def delete(self, record_id: str) -> bool:
        return self._erase(lambda db: db.execute("DELETE FROM records WHERE id = ?", (record_id,)).rowcount) > 0

    def _erase(self, delete: Callable[[sqlite3.Connection], int]) -> int:
        """Delete, then move the log into the (securely overwritten) file and empty it: until
        then the log still holds the deleted records' bytes."""
        with self._tx() as db:
            deleted = delete(db)
        if deleted:
            with self._lock:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                log.warning("capture store %s: the log was not emptied after a delete; the next one retries", self.path)
        return deleted

    def close(self) -> None:
        with self._lock:
            self._db.close()


def is_zone(name: str) -> bool:
    """Whether ``name`` is a residency zone a store may be kept for (``EU``, ``CH``...)."""
    return len(name) == 2 and name.isalpha() and name.isupper() and capture.zone_countries(name) != frozenset()


class ZoneStores:
    """The zone stores under one root, opened on first use."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self._open: dict[str, ZoneStore] = {}
        self._lock = threading.Lock()

    def zone(self, zone: str) -> ZoneStore:
        if not is_zone(zone):
            raise ValueError(f"{zone!r} is not a residency zone")
        with self._lock:
            if zone not in self._open:
                self._open[zone] = ZoneStore(self.root / f"{zone}.db", zone)
            return self._open[zone]

    def zones(self) -> list[str]:
        """Zones that have a store on disk. Another file named ``*.db`` there (an operator's
        ``EU-backup.db``) is not a zone's store and is left alone."""
        found = {p.stem for p in self.root.glob("*.db") if is_zone(p.stem)} if self.root.is_dir() else set()
        return sorted(found | set(self._open))

    def find(self, record_id: str) -> ZoneStore | None:
        for zone in self.zones():
            store = self.zone(zone)
            with store._lock:
                if store._db.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone():
                    return store
        return None

    def purge(self, now: float, retention: Mapping[str, capture.Covered | None] | None) -> int:
        """Delete every zone's expired records (:meth:`ZoneStore.purge`); how many. A zone whose
        store fails is logged and skipped: the others' retention still runs."""
        purged = 0
        for zone in self.zones():
            try:
                purged += self.zone(zone).purge(now, retention)
            except (sqlite3.Error, OSError) as exc:
                log.error("capture retention: zone %s not purged: %s", zone, exc)
        return purged

    def close(self) -> None:
        with self._lock:
            for store in self._open.values():
                store.close()
            self._open.clear()


#: The most payload bytes (requests and answers) the capture queue holds.
MAX_QUEUED_BYTES = 256 << 20


class CountUnavailable(Exception):
    """The daily cap could not be counted (the state store did not answer): the records it
    was asked for are not kept, since none can be shown to be within the cap."""


class DailyCounts(Protocol):
    """Where the records a deployment captures in a zone on a UTC day are counted against its
    ``dailyCap``: the control plane's state store (:mod:`orchestrator.capture_counts`)."""

    def take(self, deployment: str, zone: str, day: int, count: int, cap: int) -> int:
        """Up to ``count`` of what is left of ``cap`` that day: how many may be kept. Raises
        :class:`CountUnavailable` when it cannot count."""
        ...


class CaptureWriter:
    """A bounded queue between the gateway and the zone stores; ``counts``: where the daily
    cap is counted (None: the cap a record is offered with is not counted here)."""

    def __init__(self, stores: ZoneStores, registry: CollectorRegistry | None = None, *, maxsize: int = 1024, batch: int = 256,
                 max_bytes: int = MAX_QUEUED_BYTES, counts: DailyCounts | None = None):
        self.stores = stores
        self.counts = counts
        self.queue: asyncio.Queue[tuple[Record, int | None]] = asyncio.Queue(maxsize)
        self.batch = batch
        self.max_bytes, self.queued_bytes = max_bytes, 0
        self.captured = self.dropped = self.failed = self.capped = 0
        self._captured_c = Counter("edgeplane_capture_records", "Cascade requests captured for distillation, by zone",
                                   ["zone"], registry=registry) if registry is not None else None
        self._dropped_c = Counter("edgeplane_capture_dropped", "Captured requests dropped because the write queue was full "
                                  "(in records or bytes)", registry=registry) if registry is not None else None
        self._failed_c = Counter("edgeplane_capture_failed", "Captured requests lost because their zone's store could not write them, by zone",
                                 ["zone"], registry=registry) if registry is not None else None
        self._capped_c = Counter("edgeplane_capture_capped", "Captured requests not kept because their deployment's "
                                 "capture.dailyCap was reached for the day, by zone", ["zone"], registry=registry) if registry is not None else None
        self._failing: dict[str, str] = {}  # zone -> the error its writes fail with (logged once), until one succeeds
        self._task: asyncio.Task[None] | None = None

    def offer(self, record: Record, daily_cap: int | None = None) -> bool:
        """Queue ``record`` (False: dropped, the queue full); ``daily_cap``: its deployment's
        ``dailyCap``, counted before it is written."""
        size = _payload(record)
        try:
            if self.queued_bytes + size > self.max_bytes:
                raise asyncio.QueueFull
            self.queue.put_nowait((record, daily_cap))
        except asyncio.QueueFull:
            self.dropped += 1
            if self._dropped_c is not None:
                self._dropped_c.inc()
            return False
        self.queued_bytes += size
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="capture-writer")

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            while len(items) < self.batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            try:
                await asyncio.to_thread(self._write, items)
            finally:
                self.queued_bytes -= sum(_payload(r) for r, _ in items)
                for _ in items:
                    self.queue.task_done()

    def _write(self, items: list[tuple[Record, int | None]]) -> None:
        by_zone: dict[str, list[Record]] = {}
        for r in self._within_cap(items):
            by_zone.setdefault(r.zone, []).append(r)
        for zone, records in by_zone.items():
            try:
                self.stores.zone(zone).add(records)
            except (sqlite3.Error, OSError, ValueError) as exc:
                self._lost(zone, records, exc)
                continue
            if self._failing.pop(zone, None) is not None:
                log.info("capture: zone %s keeps records again", zone)
            self.captured += len(records)
            if self._captured_c is not None:
                self._captured_c.labels(zone).inc(len(records))

    def _within_cap(self, items: list[tuple[Record, int | None]]) -> list[Record]:
        """The records of ``items`` their deployment's daily cap still lets be kept, taken
        from :attr:`counts` (one call per deployment, zone and day of the batch), in order."""
        if self.counts is None:
            return [r for r, _ in items]
        groups: dict[tuple[str, str, int], list[tuple[Record, int]]] = {}
        for r, cap in items:
            if cap is not None:
                groups.setdefault((r.deployment, r.zone, int(r.captured_at // capture.DAY_S)), []).append((r, cap))
        kept = {id(r) for r, cap in items if cap is None}
        for (deployment, zone, day), group in groups.items():
            try:
                granted = self.counts.take(deployment, zone, day, len(group), min(cap for _, cap in group))
            except CountUnavailable as exc:
                self._lost(zone, [r for r, _ in group], exc)
                continue
            kept.update(id(r) for r, _ in group[:granted])
            self.capped += len(group) - granted
            if self._capped_c is not None and granted < len(group):
                self._capped_c.labels(zone).inc(len(group) - granted)
        return [r for r, _ in items if id(r) in kept]

    def _lost(self, zone: str, records: list[Record], exc: Exception) -> None:
        self.failed += len(records)
        if self._failed_c is not None:
            self._failed_c.labels(zone).inc(len(records))
        error = f"{type(exc).__name__}: {exc}"
        if self._failing.get(zone) != error:
            self._failing[zone] = error
            log.warning("capture: zone %s cannot keep captured records, which are lost until it can (%s); "
                        "each one is counted in edgeplane_capture_failed_total", zone, error)

    async def flush(self) -> None:
        """Wait until every record offered so far is written."""
        await self.queue.join()

    async def stop(self) -> None:
        if self._task is not None:
            if not self._task.done():  # write what is queued, but never hang a shutdown on a disk
                with contextlib.suppress(asyncio.TimeoutError):
                    async with asyncio.timeout(10):
                        await self.flush()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _payload(record: Record) -> int:
    return len(record.input) + len(record.output)


def _of(sql: str, args: list[object], deployment: str | None, model: str | None) -> tuple[str, list[object]]:
    """``sql`` narrowed to the records of ``deployment`` and of ``model``, each when given."""
    for column, value in (("deployment", deployment), ("model", model)):
        if value is not None:
            sql, args = sql + f" AND {column} = ?", [*args, value]
    return sql, args
