"""What the planner is asked: sites, deployments, the replicas running now, and the weights.

These are the scheduler's own input types, kept apart from the pydantic manifests so the
planner can be called (and tested, and benchmarked) with plain values; the control plane
maps validated manifests onto them. Every type is a frozen dataclass: a plan is a function
of these values and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

from orchestrator.scheduler.gpu_memory import GpuMemory


class Tier(StrEnum):
    DATACENTER = "datacenter"
    EDGE = "edge"


class Runtime(StrEnum):
    ONNX = "onnx"
    ONNX_GENAI = "onnx-genai"
    RAY_SERVE = "ray-serve"
    VLLM = "vllm"


#: Runtimes an edge agent runs.
EDGE_RUNTIMES = frozenset({Runtime.ONNX, Runtime.ONNX_GENAI})


ALL_TIERS: frozenset[Tier] = frozenset(Tier)

# Where no power figure is given, a replica's draw is estimated from what it reserves.
# The figures are round numbers for current server parts: a busy x86 core ~12 W, DRAM
# ~0.4 W per GiB, an accelerator ~60 W idle-to-busy baseline plus ~4 W per GiB of HBM/GDDR
# (24 GiB card ~156 W, 80 GiB card ~380 W).
WATTS_PER_CPU = 12.0
WATTS_PER_MEMORY_GIB = 0.4
WATTS_PER_GPU = 60.0
WATTS_PER_GPU_MEMORY_GIB = 4.0


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


def _frozen_mapping(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class GpuGroup:
    """``count`` identical GPUs of one ``model`` with ``memory_gib`` each."""

    model: str
    count: int
    memory_gib: float


@dataclass(frozen=True)
class Site:
    """A place that can run replicas, with its total capacity (not what is free)."""

    name: str
    tier: Tier
    country: str
    region: str
    lat: float
    lon: float
    cpu: float
    memory_gib: float
    gpus: tuple[GpuGroup, ...] = ()
    carbon_g_per_kwh: float = 0.0
    pue: float = 1.0
    healthy: bool = True
    labels: Mapping[str, str] = field(default_factory=_empty)
    # Measured round-trip times from a region's clients to this site; wins over the
    # great-circle estimate for demand given by region.
    rtt_ms: Mapping[str, float] = field(default_factory=_empty)
    # Being drained for maintenance: like an unhealthy site its replicas are placed
    # elsewhere and nothing new lands on it; unlike one, it still serves meanwhile (the
    # control plane keeps its replicas until their replacements serve), which is no
    # concern of the planner's.
    draining: bool = False
    # How many replicas of each (deployment, variant) the site may run, None for any
    # number of any: a site cordoned for maintenance runs as many of each as it held when
    # cordoned, and no more, of no other, whatever room a replica that moves off it frees.
    admits: Mapping[tuple[str, str], int] | None = None
    # The most the site's feed carries for the replicas placed here, in facility watts
    # (their estimated draw × ``pue``); None for no limit. A hard limit, like capacity.
    power_budget_watts: float | None = None
    # Replicas that leave the site once their replacements elsewhere serve, and hold their
    # room (CPU, memory, GPUs, power) until then: the site has the hardware it has, but
    # that room is not free to the plan (``capacity.Capacity``), and a reason says so.
    held: tuple[Variant, ...] = ()
    # A data centre out of reach but not declared lost is held as a cordoned site is
    # (``admits``): it most likely still serves, and takes nothing new until it answers. A
    # reason names it out of reach, not cordoned, and since when (wall clock, seconds since
    # the epoch; None: not known). ``first_answer_awaited``: it has not answered yet at all
    # (its first observation is still running), which the reason says instead.
    out_of_reach: bool = False
    out_of_reach_since: float | None = None
    first_answer_awaited: bool = False
    # Held alike for another reason: its cluster is another control plane's (this id), and
    # nothing can be applied there until an operator takes it over; the reason says so.
    owned_by: str | None = None
    # The runtimes the site runs replicas of, None for every one: an edge site runs what its
    # agent runs (``reconciler.inventory.agent_runtimes``), a hard limit like its hardware.
    runtimes: frozenset[Runtime] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tier", Tier(self.tier))
        if self.runtimes is not None:
            object.__setattr__(self, "runtimes", frozenset(Runtime(r) for r in self.runtimes))
        if self.admits is not None:
            object.__setattr__(self, "admits", MappingProxyType({pair: n for pair, n in self.admits.items() if n > 0}))
        object.__setattr__(self, "country", self.country.upper())
        object.__setattr__(self, "labels", _frozen_mapping(self.labels))
        object.__setattr__(self, "rtt_ms", MappingProxyType(dict(self.rtt_ms or {})))
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "held", tuple(self.held))

    @property
    def open(self) -> bool:
        """Whether replicas may run here: healthy and not being drained."""
        return self.healthy and not self.draining

    def why_closed(self) -> str:
        return f"site {self.name} is draining" if self.draining else f"site {self.name} is unhealthy"


@dataclass(frozen=True)
class Variant:
    """One way to serve a model, with what one replica reserves."""

    name: str
    runtime: Runtime
    cpu: float
    memory_mib: float
    gpus: int = 0
    gpu_memory_gib: float = 0.0
    throughput_rps: float | None = None
    # None: derived, an ONNX variant without GPU counts as distilled (small).
    distilled: bool | None = None
    # None: estimated from the resources (see WATTS_PER_* above).
    power_watts: float | None = None
    # The GPU model every one of its GPUs must be (a vllm variant's accelerator type).
    gpu_model: str | None = None
    # How a vllm replica's GPU memory was worked out (gpus and gpu_memory_gib follow it).
    llm_memory: GpuMemory | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "runtime", Runtime(self.runtime))

    @property
    def is_distilled(self) -> bool:
        if self.distilled is not None:
            return self.distilled
        return self.runtime in EDGE_RUNTIMES and self.gpus == 0

    @property
    def watts(self) -> float:
        if self.power_watts is not None:
            return self.power_watts
        return (
            self.cpu * WATTS_PER_CPU
            + self.memory_mib / 1024 * WATTS_PER_MEMORY_GIB
            + self.gpus * (WATTS_PER_GPU + self.gpu_memory_gib * WATTS_PER_GPU_MEMORY_GIB)
        )

    def runs_on(self, tier: Tier) -> bool:
        """Ray Serve applications need a Ray cluster, which only data centres have."""
        return self.runtime in EDGE_RUNTIMES or tier is Tier.DATACENTER

    def describe(self) -> str:
        parts = [f"{self.cpu:g} CPU", f"{self.memory_mib / 1024:g} GiB"]
        if self.llm_memory is not None:
            parts.insert(0, (f"{self.gpu_model} " if self.gpu_model else "") + self.llm_memory.describe())
        elif self.gpus:
            parts.insert(0, f"{self.gpus}×{self.gpu_memory_gib:g} GiB GPU")
        return ", ".join(parts)


@dataclass(frozen=True)
class Spread:
    """Replica counts per domain may differ by at most ``max_skew``."""

    by: Literal["region", "site"]
    max_skew: int = 1


@dataclass(frozen=True)
class Placement:
    """Hard placement rules. ``residency`` None means any country; countries are ISO codes
    already expanded (see ``residency.expand_residency``)."""

    residency: frozenset[str] | None = None
    tiers: frozenset[Tier] = ALL_TIERS
    site_selector: Mapping[str, str] = field(default_factory=_empty)
    spread: Spread | None = None

    def __post_init__(self) -> None:
        if self.residency is not None:
            object.__setattr__(self, "residency", frozenset(c.upper() for c in self.residency))
        object.__setattr__(self, "tiers", frozenset(Tier(t) for t in self.tiers))
        object.__setattr__(self, "site_selector", _frozen_mapping(self.site_selector))


@dataclass(frozen=True)
class DemandPoint:
    """Where requests come from: a ``region`` (located at its sites' centroid unless the
    caller gives its coordinates) or a ``lat``/``lon``."""

    rps: float
    region: str | None = None
    lat: float | None = None
    lon: float | None = None

    @property
    def label(self) -> str:
        if self.region is not None:
            return self.region
        return f"{self.lat:.2f},{self.lon:.2f}"


@dataclass(frozen=True)
class Weights:
    """Soft-objective weights, in cost points. One point ~ one millisecond of mean RTT."""

    latency_per_ms: float = 1.0  # per ms of demand-weighted mean RTT of a deployment
    carbon_per_g_per_hour: float = 0.2  # per gCO2/h of one replica (power × PUE × grid)
    move_per_replica: float = 5.0  # per replica started where it did not run before
    variant_fit_per_replica: float = 10.0  # distilled in a data centre / large at the edge
    # Unplaced replicas dominate every soft term: any plan that places more wins.
    shortfall_per_replica: float = 1_000.0  # below the wanted count
    below_min_per_replica: float = 10_000.0  # below replicas.min, on top of the above
    unserved_rtt_ms: float = 1_000.0  # latency charged to demand with no replica at all


DEFAULT_WEIGHTS = Weights()


@dataclass(frozen=True)
class Deployment:
    """What should run: a model's variants, a replica range, placement rules and demand.

    ``variants`` are the variants allowed; ``variant_by_tier`` (when non-empty) names the
    one variant to run on each tier and leaves the tiers it omits unused.
    """

    name: str
    model: str
    variants: tuple[Variant, ...]
    min_replicas: int = 1
    max_replicas: int = 1
    placement: Placement = field(default_factory=Placement)
    demand: tuple[DemandPoint, ...] = ()
    variant_by_tier: Mapping[Tier, str] = field(default_factory=_empty)  # type: ignore[assignment]
    fallback: tuple[Tier, ...] = ()  # routing order, informational for the planner
    weights: Weights | None = None
    autoscaled_replicas: int | None = None  # the autoscaler's count, when it has one

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "demand", tuple(self.demand))
        object.__setattr__(
            self,
            "variant_by_tier",
            MappingProxyType({Tier(k): v for k, v in (self.variant_by_tier or {}).items()}),
        )
        if self.min_replicas < 0 or self.max_replicas < self.min_replicas:
            raise ValueError(f"deployment {self.name}: replicas need 0 <= min <= max, got min={self.min_replicas} max={self.max_replicas}")

    def allows(self, variant: Variant, country: str, tier: Tier, labels: Mapping[str, str]) -> bool:
        """Whether the hard rules (residency, tiers, selector, the variant's tiers) let a
        replica of ``variant`` run on a site of this country, tier and labels; its hardware aside."""
        rules = self.placement
        return ((rules.residency is None or country in rules.residency) and variant in self.variants_for(tier)
                and all(labels.get(k) == v for k, v in rules.site_selector.items()))

    def variants_for(self, tier: Tier) -> tuple[Variant, ...]:
        """The variants this deployment may run on ``tier``."""
        if tier not in self.placement.tiers:
            return ()
        if self.variant_by_tier:
            wanted = self.variant_by_tier.get(tier)
            return tuple(v for v in self.variants if v.name == wanted and v.runs_on(tier))
        return tuple(v for v in self.variants if v.runs_on(tier))

    def runnable_variants(self) -> dict[str, Variant]:
        """The variants that may run on some tier, by name (the first of a name wins)."""
        out: dict[str, Variant] = {}
        for variant in self.variants:
            if variant.name not in out and any(variant in self.variants_for(t) for t in Tier):
                out[variant.name] = variant
        return out

    @property
    def total_rps(self) -> float:
        return sum(point.rps for point in self.demand)

    def wanted_replicas(self) -> int:
        """How many replicas to aim for.

        The autoscaler's count when it has one, else ``ceil(total demand rps /
        throughputRps)``, clamped to [min, max]; where several variants give a throughput
        the smallest one counts (enough replicas whichever variant lands). Without any of
        these the deployment runs ``min``.
        """
        if self.autoscaled_replicas is not None:
            return max(self.min_replicas, min(self.max_replicas, self.autoscaled_replicas))
        need = self.demand_replicas()
        if need is None:
            return self.min_replicas
        return max(self.min_replicas, min(self.max_replicas, need))

    def slowest_rps(self) -> float | None:
        """The smallest ``throughputRps`` among the variants (None: none gives one)."""
        rates = [v.throughput_rps for v in self.variants if v.throughput_rps]
        return min(rates) if rates else None

    def demand_replicas(self) -> int | None:
        """``ceil(total demand rps / slowest throughputRps)`` before [min, max] (None: no demand or rate).

        A quotient too large to count (one that overflows to inf, which ``ceil`` cannot
        convert) is ``max``: the clamp would take it there anyway. Any other is its ceiling,
        which the reason for the count shows beside the clamp.
        """
        rate = self.slowest_rps()
        if rate is None or self.total_rps <= 0:
            return None
        need = self.total_rps / rate
        return math.ceil(need - 1e-9) if need < 2.0**62 else self.max_replicas


@dataclass(frozen=True)
class Replica:
    """One replica running now (or planned): of ``deployment``, as ``variant``, on ``site``."""

    deployment: str
    site: str
    variant: str


@dataclass(frozen=True)
class Tuning:
    """Knobs that trade planning time for plan quality; the defaults meet the targets.

    ``candidates`` bounds how many sites per deployment the greedy looks at (nearest to
    each demand point, cheapest to run, where it runs now, best per spread domain); None
    scans every feasible site. ``improve`` runs the relocation pass after the greedy.
    ``keep_margin`` is what a running replica's move must save on top of its move cost
    (cost points): the search is a heuristic, and a re-plan that moved replicas for gains
    of a point or two would move them back and forth between plans of the same fleet.
    """

    candidates: int | None = 48
    improve: bool = True
    keep_margin: float = 2.5

    def __post_init__(self) -> None:
        if self.candidates is not None and self.candidates < 1:  # a search widened ×4 from 0 never widens
            raise ValueError(f"Tuning.candidates must be None or at least 1, got {self.candidates}")


DEFAULT_TUNING = Tuning()
