"""Where replicas should run: a pure planner over sites, deployments and running replicas.

``plan(sites, deployments, current)`` returns a ``PlanResult``: the new placement, the typed
actions that reach it, each deployment's status with reasons, and predicted latency and
energy. Nothing here performs I/O or reads a clock; the reconciler persists the plan and
an executor applies its actions. ``exact.solve`` is the MILP baseline the planner is
measured against.
"""

from orchestrator.scheduler.model import (
    ALL_TIERS,
    DemandPoint,
    Deployment,
    GpuGroup,
    Placement,
    Replica,
    Runtime,
    Site,
    Spread,
    Tier,
    Tuning,
    Variant,
    Weights,
)
from orchestrator.scheduler.objective import evaluate
from orchestrator.scheduler.planner import plan
from orchestrator.scheduler.residency import EU_COUNTRIES, expand_residency
from orchestrator.scheduler.result import (
    Action,
    DemandLatency,
    DeploymentPlan,
    Energy,
    MoveReplica,
    Objective,
    PlaceReplica,
    PlannedReplica,
    PlanResult,
    RemoveReplica,
    SiteDiff,
    Status,
    diff_by_site,
)

__all__ = [
    "ALL_TIERS",
    "EU_COUNTRIES",
    "Action",
    "DemandLatency",
    "DemandPoint",
    "Deployment",
    "DeploymentPlan",
    "Energy",
    "GpuGroup",
    "MoveReplica",
    "Objective",
    "PlaceReplica",
    "Placement",
    "PlanResult",
    "PlannedReplica",
    "RemoveReplica",
    "Replica",
    "Runtime",
    "Site",
    "SiteDiff",
    "Spread",
    "Status",
    "Tier",
    "Tuning",
    "Variant",
    "Weights",
    "diff_by_site",
    "evaluate",
    "expand_residency",
    "plan",
]
