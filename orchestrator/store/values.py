"""The store's records and errors: what callers hand the state store and get back.

Why apart from the SQL that keeps them: these are plain values (frozen dataclasses, an
enum, the error tree, how a token's state and a secret's digest are worked out, how free
text is kept storable) that the
whole control plane names, the reconciler, the API and the agents' admission among them,
while :mod:`orchestrator.store.sql` is how both backends write and read them. Reading
one should not mean reading the other. Callers name them through
:mod:`orchestrator.store.sqlite` (or this package), which re-exports them.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class StoreError(Exception):
    """Base of the store's errors."""


class StoreUnavailable(StoreError):
    """The database cannot take the call for now (unreachable, read-only during a failover, a
    full disk, the store closing): asking again later may succeed, and a write may or may not
    have taken effect. Any other :class:`StoreError` is refused for what it is (a constraint,
    a bug): asking again gets the same answer."""


class Conflict(StoreError):
    """A write named a resourceVersion that is no longer current."""


class NotFound(StoreError):
    pass


class Fenced(StoreError):
    """A write of intent named a lease that is no longer held: another replica leads."""


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
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: A ModelDeployment's: when an apply turned its ``spec.cascade.capture`` on again after it
    #: was off (the store's clock); None: on since it was created, or never on. See
    #: :func:`capture_since`.
    capture_since: float | None = None

    @property
    def written(self) -> tuple[int, float]:
        """Which write of the object this is: its resource version and when it was written
        (a status is no write: it changes neither). The time too, since a store's counter can
        go back (a backup restored, a standby that missed the last commits) and number another
        write with a version seen before."""
        return self.resource_version, self.updated_at


@dataclass(frozen=True)
class Unchanged:
    """An object the caller holds already as of its current write, named only
    (:meth:`~orchestrator.store.sql.SqlStore.list_changed`)."""

    kind: str
    name: str


@dataclass(frozen=True)
class ObjectWrite:
    kind: str
    name: str
    labels: Mapping[str, str]
    spec: Mapping[str, Any]
    expected_version: int | None = None  # optimistic concurrency
    #: Kept and shown, never read by edgeplane (owners, tickets, tools' notes): a change is
    #: a new resourceVersion, not a new generation, as for labels.
    annotations: Mapping[str, str] = field(default_factory=dict)


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


#: The events the fleet logs of itself, as it runs: placements, agents' joins, losses and
#: recoveries, data centres' applies, elections, wakes. They are most of the log (each
#: lost heartbeat, each pass that moves a replica) and are kept for the events retention
#: (``edgeplane serve --events-retention``). Every other event records what a caller did
#: (applies, deletes, tokens, revocations, captures read): the audit trail, kept for the
#: audit retention. An action not named here counts as audit, the longer-kept side.
FLEET_ACTIONS = frozenset({
    "replica-placed", "replica-removed", "replica-moved", "failback",
    "serve-applied", "serve-reapplied", "serve-removed", "serve-app-invalid", "datacentre-error", "datacentre-recovered",
    "agent-joined", "agent-lost", "agent-recovered", "leader-elected", "wake-requested",
})

#: Events no retention removes: a site's last revocation (its event id) is the cut-off for the
#: bootstrap tokens its agent may rejoin with, state the log holds, not history.
KEPT_ACTIONS = frozenset({"agent-revoked"})


@dataclass(frozen=True)
class PlacementRow:
    deployment: str
    site: str
    variant: str
    replicas: int


@dataclass(frozen=True)
class DeletedSite:
    """A data-centre target whose Serve applications are not removed yet: a deleted Site's,
    or the one a Site still declared was moved away from (another cluster, or the edge
    tier). Its spec (where they run) outlives the change until the leader has removed them,
    whichever replica leads. One Site may leave several."""

    name: str
    spec: Mapping[str, Any]
    version: int  # the change's resourceVersion: a later change of the same name is another record

    @property
    def target(self) -> str | None:
        return datacentre_target(self.spec)


def datacentre_target(spec: Mapping[str, Any]) -> str | None:
    """Where a Site's Serve applications run, or None for an edge Site: the Ray cluster, or
    the Kubernetes context and namespace of its RayService (named after the Site). Two specs
    with one target drive the same applications; anything else in them (a token file, an
    image, the capacity) changes how, not where."""
    if spec.get("tier") != "datacenter":
        return None
    if (ray := spec.get("ray")) is not None:
        return f"ray {str(ray.get('address', '')).rstrip('/')}"
    kube = spec.get("kubernetes") or {}
    return f"kubernetes {kube.get('context', '')} {kube.get('namespace') or 'default'}"


def captures(spec: Mapping[str, Any]) -> bool:
    """Whether a ModelDeployment's stored spec captures (has ``cascade.capture``)."""
    cascade = spec.get("cascade")
    return isinstance(cascade, Mapping) and cascade.get("capture") is not None


def capture_since(obj: StoredObject) -> float:
    """Which capture of a ModelDeployment is in force, as an identity its captured records are
    stamped with: when it was created (a deployment deleted and applied again is another), or
    when its capture was last turned on again after it was off (turned off, the records
    captured until then are covered no more, whether or not it is turned on again before the
    purge). A time of the store's clock, only ever compared for equality."""
    return obj.capture_since if obj.capture_since is not None else obj.created_at


@dataclass(frozen=True)
class TokenInfo:
    id: str
    purpose: str  # "api" | "bootstrap"
    role: str  # "admin" | "read" | "agent"
    expires_at: float | None
    description: str
    created_at: float = 0.0
    state: str = "active"  # "active" | "expired" | "revoked"
    # the id of its token-created event: where it stands in the store's sequence (a revocation
    # refuses the bootstrap tokens before it); 0 for one made before the store recorded it
    created_seq: int = 0
    # an API token's scope (docs/security.md): the models it may call at the gateway (empty:
    # every one) and the residency its requests are held to (ISO codes or groups; empty: the caller's)
    models: tuple[str, ...] = ()
    residency: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServeTokenRow:
    """A working API token as the agents that check tokens are sent it: its secret's digest
    (sha256, hex), never the secret, and its scope (:class:`TokenInfo`'s)."""

    id: str
    digest: str
    role: str
    expires_at: float | None
    models: tuple[str, ...] = ()
    residency: tuple[str, ...] = ()


class AgentSaved(enum.Enum):
    """What :meth:`~orchestrator.store.sql.SqlStore.save_agent` did."""

    SAVED = "saved"
    REPLACED = "replaced"  # the site's identity is no longer the one the join read: nothing written
    REVOKED = "revoked"  # the site's identity is revoked, and the join was not admitted after: nothing written



def token_state(revoked: bool, expires_at: float | None, now: float) -> str:
    """"revoked" wins over "expired", which wins over "active"."""
    if revoked:
        return "revoked"
    return "expired" if expires_at is not None and expires_at < now else "active"


@dataclass(frozen=True)
class Lease:
    """A held lease. ``token`` (the fencing token) grows each time the lease changes
    hands; ``remaining_s`` is how long it is held from the moment the store granted it."""

    name: str
    holder: str
    token: int
    remaining_s: float


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(purpose: str) -> str:
    """A new token's secret, which names its id: ``ep<purpose initial>_<id>_<random>``. Only
    its digest is stored."""
    return f"ep{purpose[0]}_{secrets.token_hex(4)}_{secrets.token_urlsafe(24)}"


__all__ = [
    "FLEET_ACTIONS", "KEPT_ACTIONS", "AgentSaved", "Conflict", "DeletedSite", "Event", "Fenced", "Lease", "LoggedEvent", "NotFound", "ObjectWrite", "PlacementRow",
    "StoreError", "StoredObject", "TokenInfo", "WriteOutcome", "datacentre_target", "digest", "new_secret", "token_state",
]


def storable(text: str) -> str:
    """``text`` with each NUL written as ``\\x00`` and each lone UTF-16 surrogate (which JSON's
    ``\\ud800`` escape can carry) as ``\\ud800``: PostgreSQL refuses NUL in text, neither
    backend can encode a surrogate, and both must keep the same log. Free text comes from
    callers and agents (a reason, a record id, an error message); JSON columns escape it
    themselves."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode()
    return text


def canonical(value: Any) -> str:
    """``value`` as the store keeps JSON (specs, labels, statuses, events' details): keys
    sorted, no spaces, so that equal values are equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
