"""Small constructors with sensible defaults, so each test states only what it is about."""

from __future__ import annotations

from orchestrator.scheduler import (
    DemandPoint,
    Deployment,
    GpuGroup,
    Placement,
    Site,
    Spread,
    Tier,
    Variant,
)

CITIES = {
    "paris": ("FR", 48.86, 2.35),
    "lyon": ("FR", 45.76, 4.84),
    "marseille": ("FR", 43.30, 5.37),
    "frankfurt": ("DE", 50.11, 8.68),
    "berlin": ("DE", 52.52, 13.40),
    "madrid": ("ES", 40.42, -3.70),
    "zurich": ("CH", 47.38, 8.54),
    "london": ("GB", 51.51, -0.13),
    "virginia": ("US", 38.9, -77.4),
}


def site(
    name: str,
    city: str = "paris",
    tier: str = "edge",
    cpu: float = 8,
    memory_gib: float = 32,
    gpus: tuple[tuple[int, float], ...] = (),
    carbon: float = 100.0,
    pue: float = 1.0,
    healthy: bool = True,
    labels: dict[str, str] | None = None,
    region: str | None = None,
) -> Site:
    country, lat, lon = CITIES[city]
    return Site(
        name=name,
        tier=Tier(tier),
        country=country,
        region=region or city,
        lat=lat,
        lon=lon,
        cpu=cpu,
        memory_gib=memory_gib,
        gpus=tuple(GpuGroup("gpu", n, mem) for n, mem in gpus),
        carbon_g_per_kwh=carbon,
        pue=pue,
        healthy=healthy,
        labels=labels or {},
    )


SMALL = Variant("small", "onnx", cpu=1, memory_mib=1024, throughput_rps=50)
LARGE = Variant("large", "ray-serve", cpu=8, memory_mib=32768, gpus=2, gpu_memory_gib=80)


def deployment(
    name: str = "d",
    variants: tuple[Variant, ...] = (SMALL,),
    replicas: tuple[int, int] = (1, 1),
    residency: set[str] | None = None,
    tiers: set[str] | None = None,
    selector: dict[str, str] | None = None,
    spread: tuple[str, int] | None = None,
    demand: tuple[tuple[str, float], ...] = (),
    variant_by_tier: dict[str, str] | None = None,
) -> Deployment:
    return Deployment(
        name=name,
        model=name,
        variants=variants,
        min_replicas=replicas[0],
        max_replicas=replicas[1],
        placement=Placement(
            residency=frozenset(residency) if residency is not None else None,
            tiers=frozenset(Tier(t) for t in tiers) if tiers else frozenset(Tier),
            site_selector=selector or {},
            spread=Spread(spread[0], spread[1]) if spread else None,  # type: ignore[arg-type]
        ),
        demand=tuple(DemandPoint(rps, region=region) for region, rps in demand),
        variant_by_tier={Tier(k): v for k, v in (variant_by_tier or {}).items()},
    )
