"""A replica the KubeRay pod shape cannot hold, on a site whose declared capacity can (the
scheduler places by the Site, the RayService sizes its workers by the shape): its deployment
is Failing, saying so, and the site's other applications are applied and removed as ever; so
are replicas past the shape's pod limit. The Kubernetes API is a stateful emulator (kmock) over real HTTP."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import httpx
import kmock
import yaml

from orchestrator import server
from orchestrator.adapters import rayservice
from orchestrator.testing import harness
from tests.controlplane.datacentres import SHAPE, MODEL, RES, bundle, deployment, kuberay_on, site, site_events, start

BIG_MODEL = """
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: big}
spec:
  variants:
    - {name: v, runtime: ray-serve, importPath: "pkg.big:app", resources: {cpu: 8, memoryMiB: 256}}
"""

BIG_DEPLOYMENT = """
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: big}
spec:
  model: big
  replicas: {min: 1, max: 1}
  placement: {tiers: [datacenter], siteSelector: {site: dc-1}}
"""


def served(kube: kmock.KubernetesEmulator) -> set[str]:
    """The applications dc-1's RayService runs."""
    key = (RES, "ns-dc-1", rayservice.rayservice_name("dc-1"))
    if key not in kube.objects or (obj := kube.objects[key]).deleted:
        return set()
    return {a["name"] for a in yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"]}


def status(cp: server.ControlPlane, name: str) -> Mapping[str, Any]:
    stored = cp.store.get("ModelDeployment", name)
    return stored.status if stored is not None else {}


async def test_a_replica_no_pod_holds_fails_its_deployment_alone(fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    cp = await start(fleet, kuberay_on(kube))  # 4-CPU CPU workers, on a Site of 64 CPUs
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1"), BIG_MODEL, BIG_DEPLOYMENT))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: len(served(kube)) == 1, 30, what="d's application in dc-1's RayService")
        await harness.wait_until(lambda: status(cp, "big").get("phase") == "Failing", 30, what="big to be Failing")
        assert "dc-1: DEPLOY_FAILED: a replica asks for 8 CPU / 256 MiB but a CPU worker pod offers 4 CPU" in status(cp, "big")["reason"]
        assert "error" not in cp.store.get("Site", "dc-1").status  # type: ignore[union-attr]

        assert (await http.delete("/v1/modeldeployments/d")).status_code == 200
    await harness.wait_until(lambda: not served(kube), 30, what="d's application to leave dc-1's RayService")


async def test_the_serve_applied_event_names_apart_the_applications_left_out_and_why(
        fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    """It listed one left out of the RayService as applied."""
    cp = await start(fleet, kuberay_on(kube))
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1"), BIG_MODEL, BIG_DEPLOYMENT))
        assert applied.status_code == 200, applied.text

    def said() -> list[str]:
        return [reason for action, reason in site_events(cp, "dc-1") if action == "serve-applied"]

    await harness.wait_until(lambda: any("ep-big" in reason for reason in said()), 30, what="dc-1 given both deployments")
    assert served(kube) == {"ep-d.v.dc-1"}
    assert said() == ["1 Serve application(s): ep-d.v.dc-1x1; 1 not applied as asked: ep-big.v.dc-1: a replica asks for "
                      "8 CPU / 256 MiB but a CPU worker pod offers 4 CPU / 9830 MiB usable"], said()


async def test_an_application_past_the_worker_pod_limit_fails_alone_and_a_deletion_still_reaches_the_site(
        fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    """Replicas past ``max_worker_pods`` failed the whole apply: the site took no change at
    all, a deleted deployment's application running on. Of the applications the RayService
    does not run yet, the last by name is left out and its deployment Failing, naming the
    limit; the others are applied, and it runs once there is room."""
    cp = await start(fleet, kuberay_on(kube, dataclasses.replace(SHAPE, max_worker_pods=1)))  # one 4-CPU worker pod
    whole = BIG_MODEL.replace("cpu: 8", "cpu: 4")
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1"), whole, BIG_DEPLOYMENT))
        assert applied.status_code == 200, applied.text
        why = "its replicas would take the RayService's CPU worker pods past the limit of 1 (max_worker_pods)"
        await harness.wait_until(lambda: status(cp, "d").get("phase") == "Failing", 30, what="d to be Failing")
        assert f"dc-1: DEPLOY_FAILED: {why}" in status(cp, "d")["reason"], status(cp, "d")
        assert served(kube) == {"ep-big.v.dc-1"}
        assert any(f"ep-d.v.dc-1: {why}" in reason for action, reason in site_events(cp, "dc-1") if action == "serve-applied")

        assert (await http.delete("/v1/modeldeployments/big")).status_code == 200
        await harness.wait_until(lambda: served(kube) == {"ep-d.v.dc-1"}, 30, what="big removed and d applied in its room")
