"""A data centre's Site deleted, or moved to another cluster, namespace or tier, through the
whole control plane: what it ran on the cluster it left is removed, after a restart too,
while the API server fails, or given up by an operator once that cluster is gone for good;
its new cluster is applied to at once. KubeRay sites are RayServices on a stateful
Kubernetes API emulator (kmock) over real HTTP, reached through ``kube_factory``; Ray sites
are Serve REST APIs on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import kmock
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import server
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from tests.controlplane.datacentres import (MODEL, Cluster, ServeDashboard, bundle, deployment, has_rayservice, kuberay_on, site,
                                            site_events, site_status, start)


@pytest.fixture
def dashboards() -> Iterator[tuple[ServeDashboard, ServeDashboard]]:
    pair = ServeDashboard(), ServeDashboard()
    yield pair
    for dashboard in pair:
        dashboard.stop()


async def delete_while_unreachable(cp: server.ControlPlane, cluster: Cluster, name: str) -> None:
    """``name`` declared with a deployment on it, running; then deleted while its cluster is down."""
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site(name), MODEL, deployment("d", name)))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(cluster.running), 30, what=f"{name}'s application")
        cluster.down = True
        assert (await http.delete(f"/v1/sites/{name}")).status_code == 200
    await harness.wait_until(lambda: any("not removed yet" in e.reason for e in cp.store.events(kind="Site", name=name, limit=1000)),
                             30, what=f"{name}'s removal to fail")


async def test_deleting_a_kuberay_site_deletes_its_rayservice(fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    """Its replicas move elsewhere: the cluster it ran them on goes with it, retried while
    the API server fails, each failure an event on the Site."""
    cp = await start(fleet, kuberay_on(kube))
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-old"), MODEL, deployment("d", "dc-old")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: has_rayservice(kube, "dc-old"), 30, what="dc-old's RayService")
        kube["delete"][:1] << 503  # the first delete fails
        assert (await http.delete("/v1/sites/dc-old")).status_code == 200

    await harness.wait_until(lambda: ("serve-removed", "the Site is deleted: its 1 Serve application(s) removed") in site_events(cp, "dc-old"),
                             30, what="dc-old's applications to be removed")
    assert not has_rayservice(kube, "dc-old")
    assert any(action == "datacentre-error" and "not removed yet" in reason
               for action, reason in site_events(cp, "dc-old")), site_events(cp, "dc-old")


async def test_a_deleted_sites_applications_are_removed_after_a_restart(fleet: harness.Fleet) -> None:
    """The control plane that saw the Site deleted stops before it could remove them: the
    next one (restarted, or another replica taking over) knows the Site only from the
    store, and removes them once the cluster answers."""
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    await delete_while_unreachable(cp, cluster, "dc-old")
    await fleet.stop()
    cluster.down = False
    cp = await start(fleet, lambda name, spec, ownership: cluster)

    def removed() -> bool:
        return any(e.action == "serve-removed" for e in cp.store.events(kind="Site", name="dc-old", limit=1000))

    await harness.wait_until(removed, 20, what="dc-old's applications to be removed")
    assert cluster.running == {}
    assert cp.store.deleted_sites() == []  # nothing left to remove


async def test_a_site_declared_again_takes_over_the_deleted_ones_applications(fleet: harness.Fleet) -> None:
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    await delete_while_unreachable(cp, cluster, "dc-old")
    assert [d.name for d in cp.store.deleted_sites()] == ["dc-old"]
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert (await http.post("/v1/apply", content=site("dc-old"))).status_code == 200
    assert cp.store.deleted_sites() == []
    cluster.down = False
    await harness.wait_until(lambda: bool(site_status(cp, "dc-old")) and "error" not in site_status(cp, "dc-old"), 20,
                             what="dc-old observed again")
    assert cluster.running
    assert not any(e.action == "serve-removed" for e in cp.store.events(kind="Site", name="dc-old", limit=1000))


async def test_a_site_moved_to_the_edge_tier_has_its_applications_removed_after_a_restart(fleet: harness.Fleet) -> None:
    """Moved while its cluster is down, then the control plane stops: the next one knows the
    cluster only from the store, and removes them once it answers."""
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc"), MODEL, deployment("d", "dc")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(cluster.running), 30, what="dc's application")
        cluster.down = True
        edge = site("dc").replace("tier: datacenter", "tier: edge").replace("kubernetes: {context: test, namespace: ns-dc}", "")
        assert (await http.post("/v1/apply", content=edge)).status_code == 200
    await harness.wait_until(lambda: any("not removed yet" in r for _, r in site_events(cp, "dc")), 30,
                             what="the removal from dc's cluster to fail")
    await fleet.stop()
    cluster.down = False
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    await harness.wait_until(lambda: not cluster.running, 30, what="dc's application removed")
    await harness.wait_until(lambda: cp.store.deleted_sites() == [], 10, what="the record of dc's cluster forgotten")


async def test_a_site_declared_again_elsewhere_still_removes_the_deleted_ones_applications(fleet: harness.Fleet) -> None:
    """Declared again under its name on another cluster before the deleted one's applications
    were removed: they are removed once their cluster answers, and the new one runs its own."""
    clusters = {"ns-dc": Cluster(), "ns-new": Cluster()}
    cp = await start(fleet, lambda name, spec, ownership: clusters[spec.kubernetes.namespace])
    await delete_while_unreachable(cp, clusters["ns-dc"], "dc")
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        again = await http.post("/v1/apply", content=site("dc", on="kubernetes: {context: test, namespace: ns-new}"))
        assert again.status_code == 200, again.text
    assert [d.target for d in cp.store.deleted_sites()] == ["kubernetes test ns-dc"]
    await harness.wait_until(lambda: bool(clusters["ns-new"].running), 30, what="dc's application on its new cluster")
    clusters["ns-dc"].down = False
    removed = ("serve-removed", "the Site moved off kubernetes test ns-dc: its 1 Serve application(s) removed")
    # the event is the retirement's last step: the applications went, then the record
    await harness.wait_until(lambda: removed in site_events(cp, "dc"), 30, what="the deleted dc's application removed")
    assert not clusters["ns-dc"].running
    assert cp.store.deleted_sites() == []
    assert clusters["ns-new"].running


async def test_a_site_moved_off_a_cluster_that_is_down_is_applied_to_its_new_one_at_once(fleet: harness.Fleet) -> None:
    """The failures on the old cluster (often why a Site is moved) hold up nothing on the new
    one: with the reconciler's clock stopped, a backoff from them would never run out."""
    clusters = {"ns-dc": Cluster(), "ns-new": Cluster()}
    clusters["ns-dc"].down = True
    cp = await start(fleet, lambda name, spec, ownership: clusters[spec.kubernetes.namespace])
    stopped = time.monotonic()
    cp.reconciler.clock = lambda: stopped
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc"), MODEL, deployment("d", "dc")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: "cannot reach the cluster" in site_status(cp, "dc").get("error", ""), 30,
                                 what="dc's cluster found down")
        moved = await http.post("/v1/apply", content=site("dc", on="kubernetes: {context: test, namespace: ns-new}"))
        assert moved.status_code == 200, moved.text
    await harness.wait_until(lambda: bool(clusters["ns-new"].running), 30, what="dc's application on its new cluster")
    await harness.wait_until(lambda: "error" not in site_status(cp, "dc"), 30, what="dc observed on its new cluster")


async def test_a_site_moved_to_the_edge_tier_counts_its_applications_once(fleet: harness.Fleet) -> None:
    """What it left on its cluster is counted where it is removed: none of it is counted again
    when the Site, declared a data centre once more, is deleted before a pass has seen it."""
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    edge = site("dc").replace("tier: datacenter", "tier: edge").replace("kubernetes: {context: test, namespace: ns-dc}", "")
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc"), MODEL, deployment("d", "dc")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(cluster.running), 30, what="dc's application")
        assert (await http.post("/v1/apply", content=edge)).status_code == 200
    moved = ("serve-removed", "the Site moved off kubernetes test ns-dc: its 1 Serve application(s) removed")
    await harness.wait_until(lambda: moved in site_events(cp, "dc"), 30, what="dc's application removed from its cluster")
    [declared] = cp.store.list("Site")  # a data centre again, and deleted, between two passes
    cp.store.apply([store_mod.ObjectWrite("Site", "dc", dict(declared.labels), yaml.safe_load(site("dc"))["spec"])])
    cp.store.delete("Site", "dc", store_mod.Event("test", "deleted", "Site", "dc", ""))
    cp.reconciler.trigger()
    await harness.wait_until(lambda: cp.store.deleted_sites() == [], 30, what="the deleted dc's cluster found empty")
    await cp.reconciler.wait_for_pass(cp.reconciler.passes + 1)
    assert [e for e in site_events(cp, "dc") if e[0] == "serve-removed"] == [moved]


async def test_a_deleted_sites_applications_can_be_abandoned_once_its_cluster_is_gone_for_good(fleet: harness.Fleet) -> None:
    """The cluster was decommissioned before its Site was deleted: removing its applications
    would be tried forever, by every leader. An operator gives up on them: nothing is tried
    again, here or after a restart, and the event log says who gave up."""
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    await delete_while_unreachable(cp, cluster, "dc-old")
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        abandoned = await http.delete("/v1/sites/dc-old", params={"abandonApplications": "true"},
                                      headers={"x-edgeplane-reason": "cluster decommissioned"})
        again = await http.delete("/v1/sites/dc-old", params={"abandonApplications": "true"})
    assert abandoned.status_code == 200 and abandoned.json()["action"] == "applications-abandoned", abandoned.text
    assert again.status_code == 404, again.text
    assert cp.store.deleted_sites() == []
    [event] = [e for e in cp.store.events(kind="Site", name="dc-old", limit=1000) if e.action == "applications-abandoned"]
    assert event.reason == "cluster decommissioned"
    await cp.reconciler.wait_for_pass(cp.reconciler.passes + 1)  # a whole pass after it: the actuator is let go
    assert "dc-old" not in cp.reconciler.datacentres.sites()
    await fleet.stop()
    cluster.down = False
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    await cp.reconciler.wait_for_pass(cp.reconciler.passes)
    assert cluster.running  # left as it was: the control plane no longer owns it
    assert not any(e.action == "serve-removed" for e in cp.store.events(kind="Site", name="dc-old", limit=1000))


async def test_a_kuberay_site_moved_to_another_namespace_deletes_the_rayservice_it_left(
        fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    """Its applications run in the new namespace; the RayService in the old one, and the
    GPU pods of its cluster with it, would otherwise run on, driven by nothing."""
    cp = await start(fleet, kuberay_on(kube))
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc"), MODEL, deployment("d", "dc")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: has_rayservice(kube, "dc"), 30, what="dc's RayService")
        kube["delete"][:1] << 503  # the first delete fails
        moved = await http.post("/v1/apply", content=site("dc", on="kubernetes: {context: test, namespace: ns-moved}"))
        assert moved.status_code == 200, moved.text
    await harness.wait_until(lambda: has_rayservice(kube, "dc", "ns-moved"), 30, what="dc's RayService in its new namespace")
    await harness.wait_until(lambda: any(a == "serve-removed" for a, _ in site_events(cp, "dc")), 30,
                             what="the applications dc left in ns-dc to be removed")
    assert not has_rayservice(kube, "dc")
    assert ("serve-removed", "the Site moved off kubernetes test ns-dc: its 1 Serve application(s) removed") in site_events(cp, "dc")
    assert any(a == "datacentre-error" and "moved off kubernetes test ns-dc, but its Serve applications there are not removed yet"
               in r for a, r in site_events(cp, "dc")), site_events(cp, "dc")
    assert cp.store.deleted_sites() == []
    assert has_rayservice(kube, "dc", "ns-moved")


async def test_a_ray_site_moved_to_another_cluster_removes_its_applications_from_the_old_one(
        fleet: harness.Fleet, dashboards: tuple[ServeDashboard, ServeDashboard]) -> None:
    """Over the Serve REST API. The old cluster, once gone for good, holds up nothing: the
    new one runs the applications while the removal fails, and an operator gives it up
    without deleting the Site."""
    old, new = dashboards
    cp = await start(fleet, kuberay_on(kmock.KubernetesEmulator()))
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc", on=f"ray: {{address: '{old.url}'}}"), MODEL, deployment("d", "dc")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(old.applications), 30, what="dc's application on its first cluster")
        moved = await http.post("/v1/apply", content=site("dc", on=f"ray: {{address: '{new.url}'}}"))
        assert moved.status_code == 200, moved.text
        removed = ("serve-removed", f"the Site moved off ray {old.url}: its 1 Serve application(s) removed")
        # the event is the retirement's last step: the applications went, then the record
        await harness.wait_until(lambda: bool(new.applications) and removed in site_events(cp, "dc"), 30,
                                 what="dc's application moved to the other cluster")
        assert not old.applications
        assert cp.store.deleted_sites() == []

        old.stop()  # moved back, then away again, from a cluster that is gone for good
        assert (await http.post("/v1/apply", content=site("dc", on=f"ray: {{address: '{old.url}'}}"))).status_code == 200
        assert [d.target for d in cp.store.deleted_sites()] == [f"ray {new.url}"]
        await harness.wait_until(lambda: not new.applications, 30, what="dc's application gone from the cluster it left")
        assert (await http.post("/v1/apply", content=site("dc", on=f"ray: {{address: '{new.url}'}}"))).status_code == 200
        await harness.wait_until(lambda: bool(new.applications), 30, what="dc's application back on the cluster that answers")
        await harness.wait_until(lambda: any("not removed yet" in r for _, r in site_events(cp, "dc")), 30,
                                 what="the removal from the cluster that is gone to fail")
        abandoned = await http.post("/v1/sites/dc/abandon-applications")
        assert abandoned.status_code == 200 and abandoned.json()["action"] == "applications-abandoned", abandoned.text
        again = await http.post("/v1/sites/dc/abandon-applications")
        assert again.status_code == 404, again.text
    assert cp.store.deleted_sites() == []
    assert cp.store.get("Site", "dc") is not None
    assert new.applications


async def test_a_deleted_sites_reapply_count_leaves_the_metrics(fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    """Its series would be kept for the life of the process, one per data centre ever declared."""
    cluster = Cluster()
    cluster.drift = "another writer's apply"  # at every pass: each applies ours again
    cp = await start(fleet, kuberay_on(kube, **{"dc-1": cluster}))

    async def reapplied(http: httpx.AsyncClient) -> set[str]:
        return {s.labels["site"] for f in text_string_to_metric_families((await http.get("/metrics")).text)
                if f.name == "edgeplane_datacentre_reapplied" for s in f.samples}

    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert (await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1")))).status_code == 200
        await harness.wait_until(lambda: any(a == "serve-reapplied" for a, _ in site_events(cp, "dc-1")), 30, what="dc-1 applied again")
        assert await reapplied(http) == {"dc-1"}
        assert (await http.delete("/v1/sites/dc-1")).status_code == 200
        await harness.wait_until(lambda: any(a == "serve-removed" for a, _ in site_events(cp, "dc-1")), 30,
                                 what="a pass that removed the deleted site's applications")
        assert await reapplied(http) == set()
