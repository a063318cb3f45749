"""Retention of the event log: the leader deletes events once they are older than their
retention (``edgeplane serve --events-retention``, ``--audit-retention``).

Why: every lost heartbeat, every pass that moves a replica, every apply is an event, and a
fleet that runs for years would otherwise keep them all, in a table every replica reads.
Two retentions, because the log holds two things: what the fleet did of itself (most of
the rows, worth weeks) and what callers did (applies, deletes, tokens, revocations: the
audit trail, often required for a year or more); which is which is the store's
:data:`~orchestrator.store.values.FLEET_ACTIONS`. Tokens that no longer work go with the
audit trail of them (``prune_tokens``): every enrolment makes a bootstrap token, and the
token list would otherwise grow for the fleet's whole life.

Why the leader, in batches, at a bounded rate: one replica deletes, under its lease (one
deposed meanwhile is fenced, its deletes refused); each batch is one short transaction,
so applies and the reconciler's writes wait for one batch at most, and a pass deletes at
most ``max_batches`` batches of each kind before it waits ``every_s``, so a backlog
(retention turned on over years of events) drains over several passes instead of holding
the store. The deletes run on the store's threads, as every store call of the control
plane does: a database that stalls must not hold the event loop.

The same pass indexes the sites of events a replica of an earlier release logged during a
rolling update (it writes no ``event_sites``), up to ``max_batches`` batches: a read by site
finds them before as after, by their details, but by a scan of those not indexed
(:mod:`orchestrator.store.event_sites`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from orchestrator import leadership
from orchestrator.store import StateStore
from orchestrator.store import sqlite as store_mod

log = logging.getLogger("edgeplane")

DAY_S = 86400.0
EVENTS_S = 30 * DAY_S  # default: the fleet's own events
AUDIT_S = 365 * DAY_S  # default: what callers did
#: The shortest retention: replicas read revocations and wakes from the log within a poll,
#: and an operator following it (``edgeplane events -w``) may be away for a while.
MIN_S = 3600.0


@dataclass(frozen=True)
class Retention:
    """How long each kind of event is kept, in seconds; 0 keeps them all."""

    events_s: float = EVENTS_S
    audit_s: float = AUDIT_S

    def cutoffs(self, now: float) -> list[tuple[bool, float]]:
        """``(audit, before)`` for each kind with a retention: its events logged before
        ``before`` are past it."""
        return [(audit, now - keep) for audit, keep in ((False, self.events_s), (True, self.audit_s)) if keep > 0]

    def problem(self) -> str | None:
        """What is wrong with it, in one line, or None."""
        for flag, keep in (("--events-retention", self.events_s), ("--audit-retention", self.audit_s)):
            if not (keep == 0 or MIN_S <= keep < float("inf")):
                return f"{flag} must be 0 (keep all) or at least {MIN_S:g} seconds (1h), not {keep:g}"
        return None


@dataclass
class EventPruner:
    """Deletes the events past their retention while this replica leads. ``elector``:
    None where this process always leads (one control plane on its SQLite file), else
    it prunes only while it holds the lease, and under it."""

    store: StateStore
    retention: Retention
    elector: leadership.Elector | None
    registry: CollectorRegistry
    clock: Callable[[], float] | None = None  # the store's time (its now()), which events carry; a test's
    every_s: float = 60.0
    batch: int = 1000
    max_batches: int = 10
    pruned: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.pruned = Counter("edgeplane_events_pruned", "Events deleted from the event log past their retention "
                              "(log=tokens: tokens expired or revoked before the audit retention)", ["log"], registry=self.registry)
        backfill = getattr(self.store, "event_sites", None)  # the start's indexing of earlier events (event_sites.Backfill)
        Gauge("edgeplane_event_sites_backfill_remaining", "Events logged before this release whose sites this replica's "
              "start has still to index (reads by site are exact meanwhile, slower)", registry=self.registry).set_function(
            lambda: backfill.remaining() if backfill is not None else 0)

    async def prune(self) -> int:
        """One pass: how many events it deleted (none on a follower)."""
        lease = self.elector.lease if self.elector is not None else None
        if self.elector is not None and lease is None:
            return 0
        for _ in range(self.max_batches):  # an earlier release's events, for the reads by site
            if not await self.store.run(self.store.index_event_sites):
                break
        deleted = 0
        for audit, before in self.retention.cutoffs(self.clock() if self.clock is not None else self.store.now()):
            for _ in range(self.max_batches):
                n = await self.store.run(self.store.prune_events, before, audit, self.batch, lease)
                self.pruned.labels("audit" if audit else "events").inc(n)
                deleted += n
                if n < self.batch:
                    break
            if audit:  # tokens that no longer work go with the audit trail of them
                n = await self.store.run(self.store.prune_tokens, before, self.batch, lease)
                self.pruned.labels("tokens").inc(n)
        return deleted

    async def run(self) -> None:
        """A pass every ``every_s`` until cancelled; a failed one is logged and the next comes as due."""
        while True:
            try:
                if deleted := await self.prune():
                    log.info("event retention: deleted %d events past their retention", deleted)
            except store_mod.Fenced:
                pass  # no longer leading: the new leader prunes
            except store_mod.StoreError as exc:
                log.warning("event retention: %s; trying again in %.0f s", exc, self.every_s)
            except Exception:  # not the store's: a fault, with its traceback; the log must not grow for good
                log.exception("event retention pass failed; trying again in %.0f s", self.every_s)
            await asyncio.sleep(self.every_s)
