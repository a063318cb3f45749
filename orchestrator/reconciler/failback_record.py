"""Failback's memory in the store, so that it outlives the leader that made it.

The seats a lost site's replicas left, and since when the site is back (``failback``), were
the leader's alone: a restarted control plane or a new leader knew of no stand-in, and the
replicas stayed in the data centre for good. The leader now keeps them in the store, under
the ``published`` key ``failback`` (one small document, on SQLite and PostgreSQL alike),
written in the pass that changed them before its moves are made and fenced by its lease; a
new term reads them back as its first pass gathers, and goes on with each hold-down where
the last leader left it.

A site's return is a time on the reconciler's clock, which is the process's own (monotonic)
and means nothing to another: it is kept as the store's time (:meth:`Store.now`, which the
replicas sharing a store agree on), translated at each end by the two clocks read together.
The start time each remembered site's agent said, as the last pass saw it, is kept beside
(``agentStarted``, the agent's own Unix milliseconds, compared only with what it says next):
a new leader tells by it an agent that restarted while no leader held it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.reconciler import failback as failback_mod
from orchestrator.scheduler import model as sched_model
from orchestrator.store import sqlite as store_mod

log = logging.getLogger(__name__)

PUBLISHED_KEY = "failback"
FORMAT = 1


def to_text(memory: failback_mod.Failback, stored_at: Callable[[float], float]) -> str:
    """The document of ``memory``'s sites; ``stored_at``: a return's time in the store's."""
    sites: dict[str, Any] = {}
    for name in sorted(memory.seats):
        site: dict[str, Any] = {"seats": _counted(memory.seats[name])}
        if name in memory.losing:
            site["losing"] = _counted(memory.losing[name])
        if name in memory.back_since:
            site["backSince"] = stored_at(memory.back_since[name])
        if name in memory.started_seen:
            site["agentStarted"] = memory.started_seen[name]
        sites[name] = site
    return json.dumps({"format": FORMAT, "sites": sites}, sort_keys=True, separators=(",", ":"))


def from_text(text: str, local_at: Callable[[float], float]) -> failback_mod.Failback:
    """The memory a document holds; ``local_at``: a stored time on the reconciler's clock.
    ValueError says what in it does not read."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("sites"), dict):
            raise ValueError(f"not a format-{FORMAT} document")
        seats, losing, back, started = {}, {}, {}, {}
        for name, site in doc["sites"].items():
            seats[name] = _seats(name, site["seats"])
            if "losing" in site:
                losing[name] = _seats(name, site["losing"])
            if "backSince" in site:
                back[name] = local_at(float(site["backSince"]))
            if "agentStarted" in site:
                started[name] = int(site["agentStarted"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"the stored failback memory does not read ({exc!r})") from exc
    return failback_mod.Failback(seats=seats, back_since=back, losing=losing, started_seen=started)


def _counted(seats: tuple[sched_model.Replica, ...]) -> list[list[Any]]:
    return [[deployment, variant, n] for (deployment, variant), n in sorted(Counter((r.deployment, r.variant) for r in seats).items())]


def _seats(site: str, counted: list[list[Any]]) -> tuple[sched_model.Replica, ...]:
    return tuple(sched_model.Replica(str(deployment), site, str(variant))
                 for deployment, variant, n in counted for _ in range(int(n)))


def _kept(memory: failback_mod.Failback) -> tuple[Mapping[str, Any], ...]:
    """What of ``memory`` is kept: not the pass's clock nor the hold-down, which each pass sets."""
    return memory.seats, memory.back_since, memory.losing, memory.started_seen


@dataclass
class FailbackRecord:
    """The leader's reads and writes of the failback memory. ``clock``: the reconciler's;
    ``lease``: read at each write (the lease of the term that writes)."""

    store: store_mod.Store
    clock: Callable[[], float]
    lease: Callable[[], store_mod.Lease | None]
    _written: tuple[Mapping[str, Any], ...] | None = None  # what the store holds, as this term last read or wrote it (None: unknown)
    _unread: int = 0  # the stored version last found not to read: warned of once

    async def read(self, term: bool = True) -> failback_mod.Failback:
        """The memory the last leader left (none: an empty one). One that does not read is
        warned of (once per version) and forgotten: its stand-ins stay where they are, as
        before it was kept, and the term's first write replaces it.
        ``term``: read by a new term, which writes it from now on (else a follower's what-if)."""
        got = await self.store.run(self.store.published, PUBLISHED_KEY)
        memory, readable = failback_mod.Failback(), True
        if got is not None:
            offset = self.clock() - self.store.now()
            try:
                memory = from_text(got[1], lambda stored: stored + offset)
            except ValueError as exc:
                readable = False
                if got[0] != self._unread:
                    log.warning("%s: replicas moved off sites lost before are not moved back", exc)
                self._unread = got[0]
        if term:
            self._written = _kept(memory) if readable else None
        return memory

    async def write(self, memory: failback_mod.Failback) -> None:
        """``memory``, when it changed, under the lease; a failure fails the pass before it acts."""
        if _kept(memory) == self._written:
            return
        offset = self.store.now() - self.clock()
        text = to_text(memory, lambda local: local + offset)
        lease = self.lease()
        await self.store.run(lambda: self.store.publish(PUBLISHED_KEY, text, lease=lease))
        self._written = _kept(memory)
