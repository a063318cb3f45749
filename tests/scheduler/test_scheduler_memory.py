"""What a plan allocates: bounded by its inputs, not by products of their sizes."""

from __future__ import annotations

import random
import tracemalloc

from orchestrator.scheduler import DemandPoint, Deployment, Site, Tier, Variant, plan


def test_relocating_many_replicas_between_many_demand_points_stays_within_tens_of_mebibytes():
    # The relocation pass scores every (replica, candidate site, demand point): 60 replicas
    # × ~1,500 candidates × 400 points is 290 MB of float64 in one array, where the inputs
    # and the candidates' RTT table (1,500 × 400: 5 MB) are a few MB.
    rng = random.Random(1)
    sites = [Site(f"s{i}", Tier.EDGE, "FR", f"r{i % 50}", rng.uniform(35, 60), rng.uniform(-10, 30), cpu=4, memory_gib=8,
                  carbon_g_per_kwh=100.0) for i in range(1500)]
    demand = tuple(DemandPoint(rps=1.0, lat=rng.uniform(35, 60), lon=rng.uniform(-10, 30)) for _ in range(400))
    d = Deployment("d", "m", (Variant("v", "onnx", cpu=1, memory_mib=512),), min_replicas=60, max_replicas=60, demand=demand)
    tracemalloc.start()
    try:
        result = plan(sites, [d])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.deployments["d"].placed == 60
    assert peak < 96 * 2**20, f"peak {peak / 2**20:.0f} MiB"
