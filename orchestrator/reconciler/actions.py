"""What a reconcile pass decided, as typed values for the executor to carry out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters import serve_config
from orchestrator.agents import model as agent_model
from orchestrator.gateway import cascade_rules, routing
from orchestrator.store import sqlite as store_mod


@dataclass(frozen=True)
class RecordPlacement:
    """Persist the new placement (the intent) before anything outside is touched."""

    rows: tuple[store_mod.PlacementRow, ...]
    events: tuple[store_mod.Event, ...]


@dataclass(frozen=True)
class PushAssignments:
    site: str
    assignments: tuple[agent_model.Assignment, ...]
    #: The set's version: none when planned; the loop takes it from the store under the lease
    #: when it executes the pass (``Reconciler._execute_all``).
    version: int | None = None


@dataclass(frozen=True)
class ForgetAgent:
    """Drop the record of a lost agent whose Site is no longer stored: nothing else ever
    would, and it was counted as an unhealthy agent for as long as the process ran. Only
    once it was sent an empty set (``delivery.agents_to_forget``): its watch stream ends here."""

    site: str


@dataclass(frozen=True)
class ApplyServeApps:
    site: str
    apps: tuple[serve_config.ServeAppSpec, ...]
    drift: str = ""  # applied again because another writer changed them: how


@dataclass(frozen=True)
class ReportUnapplied:
    """The deployments whose Serve applications the pass could not render (a value the
    adapter refuses, stored by an earlier version), each with why: each is an event and a
    log line once, and again only if why changes; their statuses say it at every pass."""

    reasons: Mapping[str, str]  # deployment -> why, one line


@dataclass(frozen=True)
class SetStatus:
    kind: str
    name: str
    status: Mapping[str, Any]
    #: When the object the status was worked out from was stored: one of that name deleted
    #: and applied again since is another, and is not given it. None: whichever is stored.
    created_at: float | None = None


@dataclass(frozen=True)
class SetStatuses:
    """Every status of a pass, written in one transaction."""

    items: tuple[SetStatus, ...]


@dataclass(frozen=True)
class PublishEndpoints:
    endpoints: tuple[routing.Endpoint, ...]
    regions: routing.RegionIndex
    deployed: Mapping[str, str]  # model -> why it has no endpoint, when it has none
    cold: frozenset[str] = frozenset()  # models scaled to zero (or starting from zero): requests wait
    starting: frozenset[str] = frozenset()  # models with replicas placed that do not answer yet: callers retry


@dataclass(frozen=True)
class RefreshHealth:
    """The table's endpoints again, less those of deleted deployments, their health refreshed
    and their residency narrowed to the stored specs, all else in it kept (a pass on hold), but
    for why each model it leaves with no endpoint has none."""

    endpoints: tuple[routing.Endpoint, ...]
    unrouted: Mapping[str, str] = field(default_factory=dict)  # model -> why it has no endpoint now
    #: Models no stored deployment serves any more (theirs were deleted): not deployed, as outside a hold.
    undeployed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PublishCascades:
    """The cascades the gateway runs, by model (deployments with ``spec.cascade``)."""

    routes: Mapping[str, cascade_rules.CascadeRoute]


Action = (RecordPlacement | PushAssignments | ForgetAgent | ApplyServeApps | ReportUnapplied | SetStatuses | PublishEndpoints
          | RefreshHealth | PublishCascades)
