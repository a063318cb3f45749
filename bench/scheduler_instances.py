"""Random but plausible fleets and deployments for the scheduler benchmarks.

Shaped like the product's typical user: a few regional data centres with GPUs and many
small edge sites, mostly small distilled models at the edge, some large GPU models in data
centres, residency by country or EU, demand by region. Seeded, so every run of a bench
sees the same instances.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from orchestrator.scheduler import (
    EU_COUNTRIES,
    DemandPoint,
    Deployment,
    GpuGroup,
    Placement,
    Site,
    Spread,
    Tier,
    Variant,
)

# country → (lat, lon) of a rough centre; EU members and a few neighbours
COUNTRIES = {
    "FR": (46.6, 2.4),
    "DE": (51.1, 10.4),
    "ES": (40.4, -3.7),
    "IT": (42.8, 12.6),
    "NL": (52.2, 5.3),
    "PL": (52.1, 19.4),
    "SE": (60.1, 15.6),
    "AT": (47.6, 14.1),
    "PT": (39.6, -8.0),
    "IE": (53.4, -8.2),
    "GB": (54.0, -2.0),
    "CH": (46.8, 8.2),
    "NO": (60.5, 8.5),
    "US": (39.8, -98.6),
}


def make_fleet(rng: np.random.Generator, n_sites: int, n_regions: int | None = None) -> list[Site]:
    """``n_sites`` sites in ``n_regions`` regions (default ~sites/25), 10 % data centres."""
    n_regions = n_regions or max(2, n_sites // 25)
    codes = list(COUNTRIES)
    regions = []
    for r in range(n_regions):
        code = codes[r % len(codes)] if r < len(codes) else codes[int(rng.integers(len(codes)))]
        lat0, lon0 = COUNTRIES[code]
        spread = 12.0 if code == "US" else 2.5
        regions.append(
            (
                f"{code.lower()}-{r}",
                code,
                lat0 + rng.uniform(-spread, spread) / 2,
                lon0 + rng.uniform(-spread, spread),
            )
        )
    sites = []
    for i in range(n_sites):
        name, code, lat, lon = regions[i % n_regions] if i < n_regions else regions[int(rng.integers(n_regions))]
        datacenter = i < n_regions // 2 or rng.random() < 0.1
        if datacenter:
            gpus = [
                (GpuGroup("l4", 8, 24.0),),
                (GpuGroup("h100", 8, 80.0),),
                (GpuGroup("l4", 4, 24.0), GpuGroup("h100", 4, 80.0)),
            ][int(rng.integers(3))]
            cpu, mem, pue = float(rng.choice([128, 256, 512])), 1024.0, rng.uniform(1.1, 1.5)
        else:
            gpus = (GpuGroup("t4", 1, 16.0),) if rng.random() < 0.2 else ()
            cpu, mem, pue = float(rng.choice([8, 16, 32])), float(rng.choice([16, 32, 64])), 1.0
        sites.append(
            Site(
                name=f"site-{i}",
                tier=Tier.DATACENTER if datacenter else Tier.EDGE,
                country=code,
                region=name,
                lat=float(lat + rng.normal(0, 0.6)),
                lon=float(lon + rng.normal(0, 0.9)),
                cpu=cpu,
                memory_gib=mem,
                gpus=gpus,
                carbon_g_per_kwh=float(rng.uniform(20, 700)),
                pue=float(pue),
                healthy=bool(rng.random() > 0.03),
                labels={"zone": str(rng.choice(["a", "b", "c"]))},
            )
        )
    return sites


def make_deployments(rng: np.random.Generator, sites: list[Site], n: int, replicas_per: float = 4.0) -> list[Deployment]:
    """``n`` deployments whose demand asks for about ``replicas_per`` replicas each."""
    regions = sorted({(s.region, s.country) for s in sites})
    out = []
    for d in range(n):
        kind = rng.random()
        throughput = float(rng.choice([25, 50, 100]))
        if kind < 0.7:  # distilled task model, edge first
            variants = (
                Variant(
                    "distilled",
                    "onnx",
                    cpu=float(rng.choice([0.5, 1, 2])),
                    memory_mib=float(rng.choice([512, 1024, 2048])),
                    throughput_rps=throughput,
                ),
            )
            tiers, by_tier = frozenset(Tier), {}
        elif kind < 0.9:  # distilled at the edge, larger ONNX in data centres
            variants = (
                Variant("distilled", "onnx", cpu=1, memory_mib=1024, throughput_rps=throughput),
                Variant(
                    "full",
                    "onnx",
                    cpu=4,
                    memory_mib=8192,
                    gpus=int(rng.random() < 0.5),
                    gpu_memory_gib=16,
                    throughput_rps=throughput * 2,
                    distilled=False,
                ),
            )
            tiers, by_tier = frozenset(Tier), {Tier.EDGE: "distilled", Tier.DATACENTER: "full"}
        else:  # a large model on data-centre GPUs
            big = rng.random() < 0.5
            variants = (
                Variant(
                    "llm",
                    "ray-serve",
                    cpu=8,
                    memory_mib=65536,
                    gpus=int(rng.choice([1, 2])),
                    gpu_memory_gib=80.0 if big else 24.0,
                    throughput_rps=throughput / 5,
                ),
            )
            tiers, by_tier = frozenset({Tier.DATACENTER}), {}
        roll = rng.random()
        home = regions[int(rng.integers(len(regions)))]
        if roll < 0.4:
            residency = frozenset({home[1]})
        elif roll < 0.7:
            residency = EU_COUNTRIES
        else:
            residency = None
        local = [r for r in regions if residency is None or r[1] in residency] or [home]
        points = rng.choice(len(local), size=min(len(local), int(rng.integers(1, 5))), replace=False)
        rates = rng.dirichlet(np.ones(len(points))) * replicas_per * min(v.throughput_rps or 1 for v in variants) * rng.uniform(0.5, 1.5)
        demand = tuple(DemandPoint(rps=float(round(rate, 1)), region=local[p][0]) for p, rate in zip(points, rates))
        low = int(rng.integers(1, 3))
        spread = None
        if rng.random() < 0.2:
            spread = Spread("region" if rng.random() < 0.5 else "site", int(rng.integers(1, 3)))
        out.append(
            Deployment(
                name=f"dep-{d}",
                model=f"model-{d}",
                variants=variants,
                min_replicas=low,
                max_replicas=max(low, math.ceil(replicas_per * 2)),
                placement=Placement(
                    residency=residency,
                    tiers=tiers,
                    site_selector={"zone": "a"} if rng.random() < 0.05 else {},
                    spread=spread,
                ),
                demand=demand,
                variant_by_tier=by_tier,
            )
        )
    return out


def perturb_demand(rng: np.random.Generator, deployments: list[Deployment], change: float = 0.10) -> list[Deployment]:
    """Every demand point's rate scaled by a factor in [1 - change, 1 + change]."""
    return [
        dataclasses.replace(
            d,
            demand=tuple(dataclasses.replace(p, rps=p.rps * float(rng.uniform(1 - change, 1 + change))) for p in d.demand),
        )
        for d in deployments
    ]
