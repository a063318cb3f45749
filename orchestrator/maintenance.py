"""Sites taken out for maintenance: cordoned (no new replicas) or drained (emptied).

An operator who must take a site down (a hardware swap, an OS upgrade) cordons it, so
that nothing new lands there, or drains it, so that its replicas are moved elsewhere
before it goes; uncordoning makes it schedulable again. This is operator state, not
part of what the Site declares: it is kept as an object of its own kind
(``SiteMaintenance``, named after the Site), which no manifest can name, so that
applying the manifests again never undoes it, as ``kubectl apply`` never uncordons a
Node. Deleting the Site leaves it: a Site declared again under that name is still
cordoned until uncordoned.

The writes here check the Site in the store's write transaction and log who did it and
why in that same transaction: the log is part of the change, so a crash or a refused
write leaves both or neither. What a cordon or drain does to the placement is decided
by the reconciler's pass (:mod:`orchestrator.reconciler.maintenance`).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator import catalog
from orchestrator.store import sqlite as store_mod

KIND = "SiteMaintenance"


class Mode(enum.StrEnum):
    CORDON = "cordon"
    DRAIN = "drain"


@dataclass(frozen=True)
class Maintenance:
    """A Site taken out of scheduling: ``cordon`` keeps what it runs, ``drain`` moves it
    away (make before break); ``force``: a drain removes even replicas that have nowhere
    allowed to go."""

    site: str
    mode: Mode
    reason: str = ""
    actor: str = ""
    since: float = 0.0  # wall-clock seconds, when it was cordoned or drained
    force: bool = False

    @property
    def draining(self) -> bool:
        return self.mode is Mode.DRAIN

    def to_spec(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "reason": self.reason, "actor": self.actor, "since": self.since, "force": self.force}

    @classmethod
    def from_stored(cls, obj: store_mod.StoredObject) -> Maintenance:
        """The stored value; ValueError when this version does not read it."""
        spec = obj.spec
        try:
            mode = Mode(spec.get("mode"))
        except ValueError:
            raise ValueError(f"unknown maintenance mode {spec.get('mode')!r}") from None
        since, force = spec.get("since", 0.0), spec.get("force", False)
        if not isinstance(since, (int, float)) or isinstance(since, bool) or not isinstance(force, bool):
            raise ValueError("since must be a number and force true or false")
        return cls(obj.name, mode, str(spec.get("reason", "")), str(spec.get("actor", "")), float(since), force)


@dataclass(frozen=True)
class Change:
    """What a cordon, drain or uncordon did: ``changed`` is False when the Site was already so."""

    site: str
    changed: bool
    now: Maintenance | None  # None: schedulable


def read_each(stored: Iterable[store_mod.StoredObject]) -> tuple[dict[str, Maintenance], dict[str, str]]:
    """The maintenance of each Site, and by name why one does not read."""
    return catalog.read_each(stored, Maintenance.from_stored)


def in_force(found: Mapping[str, Maintenance], sites: Collection[str]) -> dict[str, Maintenance]:
    """The maintenance of the Sites that exist (``sites``): a deleted Site's is kept for a
    Site declared again under its name, and takes no site out until then."""
    return {name: m for name, m in found.items() if name in sites}


def read_in_force(store: store_mod.Store, sites: Collection[str] | None = None) -> dict[str, Maintenance]:
    """:func:`in_force`, read from ``store`` (one read of each kind; ``sites``: the stored
    Sites' names, when the caller read them already)."""
    return in_force(read_each(store.list(KIND))[0], sites if sites is not None else {o.name for o in store.list("Site")})


def take_out(store: store_mod.Store, site: str, mode: Mode, *, actor: str, reason: str, now: float,
             force: bool = False) -> Change:
    """Cordon or drain ``site`` (:class:`~orchestrator.store.values.NotFound` when no such
    Site is stored). The same mode again changes nothing and logs nothing; another mode
    replaces the one in force (a drain of a cordoned site; a cordon of a draining one stops
    the drain: what moved stays moved, what has not stays)."""
    wanted = Maintenance(site, mode, reason, actor, now, force)
    kept: list[Maintenance] = []

    def writes() -> list[store_mod.ObjectWrite]:  # in the write transaction: the Site cannot go in between
        if store.get("Site", site) is None:
            raise store_mod.NotFound(f"Site {site!r} does not exist")
        stored = store.get(KIND, site)
        if stored is not None:
            try:
                current = Maintenance.from_stored(stored)
            except ValueError:
                current = None
            if current is not None and (current.mode, current.force) == (mode, force):
                kept.append(current)
                return []
        return [store_mod.ObjectWrite(KIND, site, {}, wanted.to_spec())]

    details = {"force": True} if force else {}
    logged = store_mod.Event(actor, f"site-{'cordoned' if mode is Mode.CORDON else 'drained'}", "Site", site, reason, details)
    store.apply(writes, also=(logged,))
    return Change(site, False, kept[0]) if kept else Change(site, True, wanted)


def bring_back(store: store_mod.Store, site: str, *, actor: str, reason: str) -> Change:
    """Uncordon ``site``: schedulable again. Nothing is moved back by force: the scheduler
    weighs a move back as any other (its few-moves goal decides). NotFound when neither the
    Site nor its maintenance is stored."""
    def check() -> None:
        if store.get("Site", site) is None and store.get(KIND, site) is None:
            raise store_mod.NotFound(f"Site {site!r} does not exist")

    gone = store.delete_many([(KIND, site)], None, missing_ok=True, check=check,  # one event says it: site-uncordoned
                             also=(store_mod.Event(actor, "site-uncordoned", "Site", site, reason),))
    return Change(site, bool(gone), None)


def states(maintenance: Mapping[str, Maintenance]) -> dict[str, int]:
    """How many sites are cordoned and how many draining (the metrics' gauge)."""
    return {"cordoned": sum(not m.draining for m in maintenance.values()), "draining": sum(m.draining for m in maintenance.values())}
