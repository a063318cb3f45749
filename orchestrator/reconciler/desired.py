"""The desired state a pass reads: every stored object parsed once per write of it.

A pass is level-based: it reads every stored Site, Model, ModelDeployment and Site
maintenance at every pass, though between two passes few of them change, most often none.
Decoding each one's JSON and validating it against the schema again was most of a pass's
read (70-80 ms at 3,000 Sites on SQLite, ``bench/reconcile_pass.py``), and allocated
enough to start a full collection of the garbage collector, which holds every thread, the
event loop's too, at nearly every pass. So each object's parsed value is kept with the
write it was parsed from (``StoredObject.written``), and the store decodes, and this module
parses, only those written since (``StateStore.list_changed``), in one read as before: an
apply lands wholly before it or wholly after. What is kept is what the last read found:
an object deleted leaves it at the next read.

Reads run on the store's threads, a pass's and a preview's maybe at once: each builds the
cache anew from the one it started with and puts it in place whole (a read that ends last
with an older view only has the next one parse again). What is kept is shared by the passes
that find it unchanged, and with the last snapshot, which the views read on the event loop
while the next pass plans in a thread: it is frozen (pydantic models with ``frozen=True``,
frozen dataclasses, a Site's labels a read-only mapping).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator import catalog
from orchestrator import maintenance as maintenance_mod
from orchestrator.reconciler import snapshot as snap
from orchestrator.store import sqlite as store_mod

Parser = Callable[[store_mod.StoredObject], Any]


def site_record(o: store_mod.StoredObject) -> snap.SiteRecord:
    return snap.SiteRecord(o.name, types.MappingProxyType(dict(o.labels)), catalog.parse_site(o), o.created_at)


def deployment_record(o: store_mod.StoredObject) -> snap.DeploymentRecord:
    return snap.DeploymentRecord(o.name, o.generation, catalog.parse_deployment(o), store_mod.capture_since(o), o.created_at)


#: How each kind a pass reads is parsed (a ValueError: this version does not read it).
PARSERS: Mapping[str, Parser] = {
    "Site": site_record,
    "Model": catalog.parse_model,
    "ModelDeployment": deployment_record,
    maintenance_mod.KIND: maintenance_mod.Maintenance.from_stored,
}


@dataclass(frozen=True)
class Parsed:
    """One stored object as parsed from one write of it: its value, or why it does not read."""

    written: tuple[int, float]
    value: Any = None
    why: str | None = None
    generation: int = 0  # the object's generation as written


class DesiredReader:
    """Reads the desired state (:meth:`read`), keeping each object's parsed value until it is
    written again or deleted. ``parsers``: by kind (a seam: a test counts the validations)."""

    def __init__(self, parsers: Mapping[str, Parser] = PARSERS) -> None:
        self._parsers = parsers
        self._held: dict[tuple[str, str], Parsed] = {}  # replaced whole by each read, never changed in place

    def __len__(self) -> int:
        """How many objects are kept parsed: those the last read found."""
        return len(self._held)

    def read(self, store: store_mod.Store) -> snap.Desired:
        """The stored Sites, Models and ModelDeployments as validated values, and the Sites'
        maintenance, read in one query: applies run in threads (and on other replicas), and
        two reads could see a new deployment without the new Model it names. One this
        version does not read is left out, with why: the fleet is then on hold
        (:mod:`orchestrator.reconciler.hold`). Call it off the event loop (``store.run``)."""
        held = self._held
        fresh: dict[tuple[str, str], Parsed] = {}
        for o in store.list_changed(self._parsers.keys(), {key: p.written for key, p in held.items()}):
            key = (o.kind, o.name)
            fresh[key] = held[key] if isinstance(o, store_mod.Unchanged) else self._parse(o)
        self._held = fresh
        read: dict[str, dict[str, Any]] = {kind: {} for kind in self._parsers}
        unreadable: dict[tuple[str, str], str] = {}
        for (kind, name), parsed in fresh.items():
            if parsed.why is not None:
                unreadable[kind, name] = parsed.why
            else:
                read[kind][name] = parsed.value
        generations = {name: p.generation for (kind, name), p in fresh.items() if kind == "Model" and name in read["Model"]}
        return snap.Desired(tuple(read["Site"].values()), read["Model"], tuple(read["ModelDeployment"].values()),
                            unreadable, read[maintenance_mod.KIND], generations)

    def _parse(self, o: store_mod.StoredObject) -> Parsed:
        try:
            return Parsed(o.written, self._parsers[o.kind](o), generation=o.generation)
        except ValueError as exc:  # pydantic's ValidationError is one
            return Parsed(o.written, why=catalog.why_unreadable(exc), generation=o.generation)
