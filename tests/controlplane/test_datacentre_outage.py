"""A data centre out of reach for less time than an agent is given before it is declared lost
keeps its replicas: its cluster most likely serves on (an API server restarting for an
upgrade, a dropped connection), and moving off would build all it runs again elsewhere,
then delete it there once it answers, for a KubeRay site its RayService and the whole Ray
cluster with it. The Kubernetes API is a stateful emulator (kmock) over real HTTP that
answers 503 for the outage."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import kmock
import pytest

from orchestrator.adapters import rayservice
from orchestrator.testing import harness
from tests.controlplane.test_datacentre_sites import MODEL, bundle, has_rayservice, kuberay_on, site, site_events, start

ANYWHERE = """
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: d}
spec:
  model: m
  replicas: {min: 1, max: 1}
  placement: {tiers: [datacenter]}
"""


@pytest.fixture
async def kube() -> AsyncIterator[kmock.KubernetesEmulator]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        yield emulator


async def test_a_kubernetes_api_outage_shorter_than_the_loss_time_neither_moves_replicas_nor_deletes_the_rayservice(
        fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    cp = await start(fleet, kuberay_on(kube))  # declared lost after 3 heartbeats of 0.5 s
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-1"), site("dc-2"), MODEL, ANYWHERE))
        assert applied.status_code == 200, applied.text
    await harness.wait_until(lambda: has_rayservice(kube, "dc-1") or has_rayservice(kube, "dc-2"), 30, what="d's RayService")
    home, other = ("dc-1", "dc-2") if has_rayservice(kube, "dc-1") else ("dc-2", "dc-1")
    placed = cp.store.placements()

    # The next two reads of home's RayService fail: an outage through one backoff, answered
    # again by the try its loss time brings.
    reads = kube["get", kmock.path(f"/apis/ray.io/v1/namespaces/ns-{home}/rayservices/{rayservice.rayservice_name(home)}")]
    done = len(list(reads))
    reads[done:done + 2] << 503
    await harness.wait_until(lambda: any(action == "datacentre-recovered" for action, _ in site_events(cp, home)), 30,
                             what=f"{home} observed again after its outage")
    await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)  # and planned, applied and removed from since

    assert any(action == "datacentre-error" and "503" in reason for action, reason in site_events(cp, home)), site_events(cp, home)
    assert cp.store.placements() == placed
    assert has_rayservice(kube, home), f"{home}'s RayService was deleted"
    assert not has_rayservice(kube, other), f"d was placed on {other} too"
