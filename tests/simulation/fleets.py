"""Small hand-made fleets for the simulation tests."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from orchestrator import server
from orchestrator.scheduler import model as sched
from orchestrator.testing import harness

SMALL = sched.Variant("small", sched.Runtime.ONNX, cpu=1, memory_mib=512, throughput_rps=100)


def site(name: str, country: str, region: str, lat: float, lon: float, tier: str = "edge", cpu: float = 8,
         carbon: float = 100.0) -> sched.Site:
    return sched.Site(name, sched.Tier(tier), country, region, lat, lon, cpu=cpu, memory_gib=32, carbon_g_per_kwh=carbon)


def deployment(name: str, replicas: int = 1, residency: set[str] | None = None, demand: tuple[sched.DemandPoint, ...] = (),
               tiers: frozenset[sched.Tier] = sched.ALL_TIERS, max_replicas: int | None = None,
               variant: sched.Variant = SMALL) -> sched.Deployment:
    return sched.Deployment(
        name, name, (variant,), min_replicas=replicas, max_replicas=max_replicas or replicas,
        placement=sched.Placement(residency=frozenset(residency) if residency else None, tiers=tiers), demand=demand,
    )


PARIS = site("edge-paris", "FR", "eu-west", 48.86, 2.35)
LYON = site("edge-lyon", "FR", "eu-west", 45.76, 4.84)
BERLIN = site("edge-berlin", "DE", "eu-central", 52.52, 13.40)
MADRID = site("edge-madrid", "ES", "eu-south", 40.42, -3.70)
FRANKFURT = site("dc-frankfurt", "DE", "eu-central", 50.11, 8.68, tier="datacenter", cpu=64, carbon=380.0)
SITES = (PARIS, LYON, BERLIN, MADRID, FRANKFURT)

#: Two edge sites as manifests, for the tests that apply them to a control plane.
TWO_SITES = """
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {name: edge-a}
spec: {tier: edge, location: {country: FR, region: fr, lat: 48.8, lon: 2.3}, capacity: {cpu: 4, memoryGiB: 8}}
---
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {name: edge-b}
spec: {tier: edge, location: {country: DE, region: de, lat: 52.5, lon: 13.4}, capacity: {cpu: 4, memoryGiB: 8}}
"""


@contextlib.asynccontextmanager
async def two_sites_served(root: pathlib.Path, **config: Any) -> AsyncIterator[server.ControlPlane]:
    """A real control plane (``config``: its ServerConfig fields) holding :data:`TWO_SITES`."""
    f = harness.Fleet(root)
    try:
        cp = await f.start_control_plane(**config)
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            resp = await http.post("/v1/apply", content=TWO_SITES)
            assert resp.status_code == 200, resp.text
        yield cp
    finally:
        await f.stop()
