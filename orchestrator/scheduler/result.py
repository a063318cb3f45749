"""What a plan says: the new placement, the typed actions to reach it, and why.

``edgeplane plan`` prints these values and ``apply`` hands the actions to the executor, so
they carry everything a person needs to trust a change: a reason for every replica placed
or removed, each deployment's status with the precise reason when it falls short, and the
predicted latency and energy of the result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator.scheduler.model import Replica


class Status(StrEnum):
    SCHEDULED = "Scheduled"  # the wanted number of replicas is placed
    DEGRADED = "Degraded"  # fewer than wanted, but at least replicas.min
    UNSCHEDULABLE = "Unschedulable"  # fewer than replicas.min (possibly none)


@dataclass(frozen=True)
class PlaceReplica:
    """Start one replica of ``deployment`` as ``variant`` on ``site``."""

    deployment: str
    site: str
    variant: str
    reason: str


@dataclass(frozen=True)
class RemoveReplica:
    """Stop one replica of ``deployment`` running as ``variant`` on ``site``."""

    deployment: str
    site: str
    variant: str
    reason: str


@dataclass(frozen=True)
class MoveReplica:
    """Start a replica on ``to_site`` in place of one on ``from_site``.

    One value so the executor can make before it breaks: start the new one, wait until it
    is ready, then stop the old one.
    """

    deployment: str
    from_site: str
    from_variant: str
    to_site: str
    to_variant: str
    reason: str


Action = PlaceReplica | RemoveReplica | MoveReplica


@dataclass(frozen=True)
class PlannedReplica:
    """One replica of the new placement and why it is where it is."""

    deployment: str
    site: str
    variant: str
    kept: bool  # already ran there before this plan
    reason: str


@dataclass(frozen=True)
class DemandLatency:
    """Predicted round-trip time from one demand point to its nearest replica."""

    deployment: str
    point: str
    rps: float
    site: str | None  # None: no replica serves this deployment
    rtt_ms: float | None


@dataclass(frozen=True)
class Energy:
    """Power at the wall (replica draw × PUE) and the emissions it causes."""

    watts: float = 0.0
    g_co2_per_hour: float = 0.0

    def __add__(self, other: Energy) -> Energy:
        return Energy(self.watts + other.watts, self.g_co2_per_hour + other.g_co2_per_hour)


@dataclass(frozen=True)
class Objective:
    """The weighted cost of a placement, term by term (see docs/scheduler.md)."""

    latency: float = 0.0
    carbon: float = 0.0
    moves: float = 0.0
    variant_fit: float = 0.0
    shortfall: float = 0.0

    @property
    def total(self) -> float:
        return self.latency + self.carbon + self.moves + self.variant_fit + self.shortfall

    def __add__(self, other: Objective) -> Objective:
        return Objective(
            self.latency + other.latency,
            self.carbon + other.carbon,
            self.moves + other.moves,
            self.variant_fit + other.variant_fit,
            self.shortfall + other.shortfall,
        )


@dataclass(frozen=True)
class Shortfall:
    """Why a deployment got fewer replicas than it wants: the rule that binds
    (``constraint``, and ``detail`` when there is more to say) and the count placed. Kept
    apart so that a caller who adds replicas the plan does not count (a drain keeps some
    on their site) can say the reason with the count true, or without it."""

    constraint: str
    placed: int
    wanted: int
    detail: str = ""

    @property
    def cause(self) -> str:
        """The reason without the count."""
        return f"{self.constraint}: {self.detail}" if self.detail else self.constraint

    def __str__(self) -> str:
        counted = f"{self.constraint}; {self.placed} of {self.wanted} placed"
        return f"{counted}: {self.detail}" if self.detail else counted


@dataclass(frozen=True)
class DeploymentPlan:
    """One deployment's outcome."""

    name: str
    status: Status
    wanted: int
    placed: int
    reason: str
    replicas: tuple[PlannedReplica, ...] = ()
    latency: tuple[DemandLatency, ...] = ()
    energy: Energy = field(default_factory=Energy)
    notes: tuple[str, ...] = ()  # e.g. demand points that could not be located
    shortfall: Shortfall | None = None  # why fewer than wanted are placed (``reason`` says it with the count)


@dataclass(frozen=True)
class PlanResult:
    """The planner's answer. ``actions`` turn the current placement into ``replicas``."""

    replicas: tuple[PlannedReplica, ...]
    actions: tuple[Action, ...]
    deployments: Mapping[str, DeploymentPlan]
    energy: Energy
    objective: Objective

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Replicas per (deployment, site, variant)."""
        return dict(Counter((r.deployment, r.site, r.variant) for r in self.replicas))

    def as_running(self) -> list[Replica]:
        """The planned replicas as the running placement of a next plan."""
        return [Replica(r.deployment, r.site, r.variant) for r in self.replicas]


@dataclass(frozen=True)
class SiteDiff:
    """Changes one plan makes at one site, for ``edgeplane plan``."""

    site: str
    added: tuple[PlaceReplica, ...] = ()
    moved_in: tuple[MoveReplica, ...] = ()
    moved_out: tuple[MoveReplica, ...] = ()
    removed: tuple[RemoveReplica, ...] = ()


def diff_by_site(actions: Iterable[Action]) -> tuple[SiteDiff, ...]:
    """Group actions per site, sites in name order; a move shows at both of its ends."""
    added: dict[str, list[PlaceReplica]] = {}
    moved_in: dict[str, list[MoveReplica]] = {}
    moved_out: dict[str, list[MoveReplica]] = {}
    removed: dict[str, list[RemoveReplica]] = {}
    for action in actions:
        if isinstance(action, PlaceReplica):
            added.setdefault(action.site, []).append(action)
        elif isinstance(action, RemoveReplica):
            removed.setdefault(action.site, []).append(action)
        else:
            moved_in.setdefault(action.to_site, []).append(action)
            moved_out.setdefault(action.from_site, []).append(action)
    sites = sorted(set(added) | set(moved_in) | set(moved_out) | set(removed))
    return tuple(
        SiteDiff(
            site=site,
            added=tuple(added.get(site, ())),
            moved_in=tuple(moved_in.get(site, ())),
            moved_out=tuple(moved_out.get(site, ())),
            removed=tuple(removed.get(site, ())),
        )
        for site in sites
    )
