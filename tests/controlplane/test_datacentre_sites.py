"""Data-centre sites through the whole control plane: each KubeRay site is a RayService on a
stateful Kubernetes API emulator (kmock) over real HTTP, reached through ``kube_factory``,
the seam the control plane builds KubeRay actuators with."""

from __future__ import annotations

import asyncio
import http.server
import json
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import httpx
import kmock
import kubernetes
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import server
from orchestrator.adapters import kuberay, rayservice, serve_config
from orchestrator.manifests import schema
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from tests.foundation import support

SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0")
RES = kmock.resource("ray.io", "v1", "rayservices")


def site(name: str, on: str = "") -> str:
    """A data-centre Site on KubeRay in namespace ``ns-<name>``, or ``on`` another target
    (a ``kubernetes:`` or ``ray:`` line)."""
    return f"""
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {{name: {name}, labels: {{site: {name}}}}}
spec:
  tier: datacenter
  location: {{country: FR, region: eu-west, lat: 48.85, lon: 2.35}}
  capacity: {{cpu: 64, memoryGiB: 256}}
  {on or f"kubernetes: {{context: test, namespace: ns-{name}}}"}
"""


def deployment(name: str, on: str | None = None) -> str:
    """One replica of model m in a data centre: site ``on``, or any."""
    selector = f", siteSelector: {{site: {on}}}" if on is not None else ""
    return f"""
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {{name: {name}}}
spec:
  model: m
  replicas: {{min: 1, max: 1}}
  placement: {{tiers: [datacenter]{selector}}}
"""


MODEL = """
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: m}
spec:
  variants:
    - {name: v, runtime: ray-serve, importPath: "pkg.mod:app", resources: {cpu: 1, memoryMiB: 256}}
"""


def bundle(*docs: str) -> str:
    return "---".join(docs)


class Broken:
    """An actuator that fails the way a fault in an adapter would, not as a
    DataCentreError: in observe(), or in apply() only."""

    drift = ""

    def __init__(self, in_observe: bool) -> None:
        self.in_observe = in_observe

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        raise KeyError("name")

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        if self.in_observe:
            raise KeyError("name")
        return {}

    async def close(self) -> None:
        pass


class Outages:
    """An actuator whose cluster can be taken away and brought back."""

    drift = ""

    def __init__(self) -> None:
        self.down = False

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        await self.observe()
        return {}

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        if self.down:
            raise serve_config.DataCentreError("cannot reach the cluster: connection refused")
        return {}

    async def close(self) -> None:
        pass


class Cluster:
    """A data centre's cluster that outlives any control plane: what runs there is what was
    last applied, and it can be taken away and brought back."""

    drift = ""

    def __init__(self) -> None:
        self.running: dict[str, serve_config.ServeAppSpec] = {}
        self.down = False

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        await self.observe()
        self.running = {a.name: a for a in apps}
        return {}

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        if self.down:
            raise serve_config.DataCentreError("cannot reach the cluster: connection refused")
        return {n: serve_config.ServeAppStatus(n, serve_config.ServeAppState.RUNNING, "", a.num_replicas, a.num_replicas,
                                               f"http://127.0.0.1:9{a.route_prefix}") for n, a in self.running.items()}

    async def close(self) -> None:  # closing a client stops nothing on the cluster
        pass


class Refusing:
    """A cluster that answers but fails each apply with ``error``."""

    drift = ""

    def __init__(self, error: serve_config.DataCentreError) -> None:
        self.error = error

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        raise self.error

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        return {}

    async def close(self) -> None:
        pass


@pytest.fixture
async def kube() -> AsyncIterator[kmock.KubernetesEmulator]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        yield emulator


class ServeDashboard:
    """A Ray dashboard's Serve REST API on loopback, whose applications run as soon as they
    are PUT; ``stop()`` takes the cluster away for good."""

    def __init__(self) -> None:
        self.applications: dict[str, dict[str, Any]] = {}
        dashboard = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/api/serve/applications":
                    return self.send_error(404)
                self.answer({"applications": {name: dashboard.running(app) for name, app in dict(dashboard.applications).items()},
                             "http_options": {"port": 8000}})

            def do_PUT(self) -> None:
                config = json.loads(self.rfile.read(int(self.headers["content-length"])))
                dashboard.applications = {a["name"]: a for a in config["applications"]}
                self.answer({})

            def answer(self, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @staticmethod
    def running(app: Mapping[str, Any]) -> dict[str, Any]:
        replicas = int((app.get("deployments") or [{}])[0].get("num_replicas", 1))
        return {"status": "RUNNING", "source": "declarative", "route_prefix": app.get("route_prefix"), "deployed_app_config": app,
                "deployment_topology": {"ingress_deployment": "Ingress"},
                "deployments": {"Ingress": {"target_num_replicas": replicas, "replicas": [{"state": "RUNNING"}] * replicas}}}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def dashboards() -> Iterator[tuple[ServeDashboard, ServeDashboard]]:
    pair = ServeDashboard(), ServeDashboard()
    yield pair
    for dashboard in pair:
        dashboard.stop()


def kuberay_on(kube: kmock.KubernetesEmulator, shape: rayservice.RayClusterShape = SHAPE, **broken: Any) -> Callable[[str, schema.SiteSpec], Any]:
    """A ``kube_factory``: a KubeRay actuator on the emulator per site, or the one given by name."""
    def build(name: str, spec: schema.SiteSpec) -> Any:
        if name in broken:
            return broken[name]
        assert spec.kubernetes is not None
        config = kubernetes.client.Configuration()
        config.host, config.retries = str(kube.url).rstrip("/"), 0
        return kuberay.KubeRayActuator(kubernetes.client.ApiClient(config), spec.kubernetes.namespace, name, shape=shape)
    return build


def has_rayservice(kube: kmock.KubernetesEmulator, name: str, namespace: str = "") -> bool:
    key = (RES, namespace or f"ns-{name}", rayservice.rayservice_name(name))
    return key in kube.objects and not kube.objects[key].deleted


def site_status(cp: server.ControlPlane, name: str) -> Mapping[str, Any]:
    stored = cp.store.get("Site", name)
    return stored.status if stored is not None else {}


def site_events(cp: server.ControlPlane, name: str) -> list[tuple[str, str]]:
    return [(e.action, e.reason) for e in cp.store.events(kind="Site", name=name, limit=1000)]


async def start(fleet: harness.Fleet, factory: Callable[[str, schema.SiteSpec], Any]) -> server.ControlPlane:
    return await fleet.start_control_plane(kube_factory=factory, resync_s=0.2)


async def test_a_site_whose_adapter_fails_unexpectedly_holds_up_no_other_site(
        fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    cp = await start(fleet, kuberay_on(kube, **{"dc-unobserved": Broken(in_observe=True), "dc-unapplied": Broken(in_observe=False)}))
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-unobserved"), site("dc-unapplied"), site("dc-ok"),
                                                               MODEL, deployment("d", "dc-ok")))
        assert applied.status_code == 200, applied.text
    await harness.wait_until(lambda: has_rayservice(kube, "dc-ok"), 30, what="dc-ok's RayService")
    await harness.wait_until(lambda: "observing it failed: KeyError" in site_status(cp, "dc-unobserved").get("error", ""), 30,
                             what="dc-unobserved's status to say why it is not observed")
    await harness.wait_until(lambda: any("applying failed: KeyError" in e.reason for e in cp.store.events(kind="Site", name="dc-unapplied")),
                             30, what="an event saying why dc-unapplied is not applied")


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


async def test_each_outage_of_a_data_centre_is_logged_with_its_end(fleet: harness.Fleet) -> None:
    """A second outage with the same error as the first was in the site's status but not in
    the event log, and was retried after the first one's longer delay."""
    cluster = Outages()
    cp = await start(fleet, lambda name, spec: cluster)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert (await http.post("/v1/apply", content=site("dc-1"))).status_code == 200

    def events() -> list[str]:
        return [e.action for e in cp.store.events(kind="Site", name="dc-1", limit=1000)
                if e.action.startswith("datacentre-")]

    def observed() -> bool:
        status = site_status(cp, "dc-1")
        return bool(status) and "error" not in status

    await harness.wait_until(observed, 20, what="dc-1 observed")
    for outage in (1, 2):
        cluster.down = True
        await harness.wait_until(lambda: "cannot reach the cluster" in site_status(cp, "dc-1").get("error", ""), 20,
                                 what=f"outage {outage} in dc-1's status")
        cluster.down = False
        await harness.wait_until(observed, 20, what=f"dc-1 observed after outage {outage}")
    await harness.wait_until(lambda: len(events()) >= 4, 10, what="both outages in the event log")
    assert events() == ["datacentre-error", "datacentre-recovered"] * 2


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


async def test_a_deleted_sites_applications_are_removed_after_a_restart(fleet: harness.Fleet) -> None:
    """The control plane that saw the Site deleted stops before it could remove them: the
    next one (restarted, or another replica taking over) knows the Site only from the
    store, and removes them once the cluster answers."""
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec: cluster)
    await delete_while_unreachable(cp, cluster, "dc-old")
    await fleet.stop()
    cluster.down = False
    cp = await start(fleet, lambda name, spec: cluster)

    def removed() -> bool:
        return any(e.action == "serve-removed" for e in cp.store.events(kind="Site", name="dc-old", limit=1000))

    await harness.wait_until(removed, 20, what="dc-old's applications to be removed")
    assert cluster.running == {}
    assert cp.store.deleted_sites() == []  # nothing left to remove


async def test_a_site_declared_again_takes_over_the_deleted_ones_applications(fleet: harness.Fleet) -> None:
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec: cluster)
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
    cp = await start(fleet, lambda name, spec: cluster)
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
    cp = await start(fleet, lambda name, spec: cluster)
    await harness.wait_until(lambda: not cluster.running, 30, what="dc's application removed")
    await harness.wait_until(lambda: cp.store.deleted_sites() == [], 10, what="the record of dc's cluster forgotten")


async def test_a_site_declared_again_elsewhere_still_removes_the_deleted_ones_applications(fleet: harness.Fleet) -> None:
    """Declared again under its name on another cluster before the deleted one's applications
    were removed: they are removed once their cluster answers, and the new one runs its own."""
    clusters = {"ns-dc": Cluster(), "ns-new": Cluster()}
    cp = await start(fleet, lambda name, spec: clusters[spec.kubernetes.namespace])
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
    cp = await start(fleet, lambda name, spec: clusters[spec.kubernetes.namespace])
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
    cp = await start(fleet, lambda name, spec: cluster)
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
    cp = await start(fleet, lambda name, spec: cluster)
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
    cp = await start(fleet, lambda name, spec: cluster)
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


async def test_a_data_centre_is_neither_applied_to_nor_cleared_while_changes_are_on_hold(fleet: harness.Fleet, tmp_path: pathlib.Path) -> None:
    """A Model an earlier version stored that this one does not read holds every change: a
    deployment added to the site is not applied, and the Site deleted leaves its applications
    running; deleting that Model ends the hold, and they are removed."""
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec: cluster)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert (await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1")))).status_code == 200
        await harness.wait_until(lambda: bool(cluster.running), 30, what="dc-1's application")
        running = dict(cluster.running)
        legacy = {"variants": [{"name": "v", "runtime": "ray-serve", "importPath": "pkg.mod:app", "throughputRps": 1e-320,
                                "resources": {"cpu": 1, "memoryMiB": 256}}]}  # a throughput this version refuses even stored
        cp.store.apply([store_mod.ObjectWrite("Model", "old", {}, legacy)], store_mod.Event("earlier-version", "apply", "", "", "apply"))
        cp.reconciler.trigger("test")
        await harness.wait_until(lambda: any(e.action == "unreadable" for e in cp.store.events(kind="Model", name="old")), 20,
                                 what="Model old reported unreadable")
        view = (await http.get("/v1/controlplane")).json()
        assert view["hold"].startswith("changes on hold: Model 'old' cannot be read (variants.0.throughputRps"), view
        assert view["hold"].endswith(": apply it again or delete it")
        manifest = tmp_path / "d2.yaml"
        manifest.write_text(deployment("d2", "dc-1"))
        for command in (("plan", "-f", str(manifest)), ("apply", "-f", str(manifest), "--dry-run"), ("simulate", "--fail-site", "dc-1"),
                        ("status",)):  # each says so
            shown = await asyncio.to_thread(support.cli, *command, server_url=cp.http_url)
            assert shown.returncode == 0, shown.stderr
            assert view["hold"] in shown.stdout.splitlines(), (command, shown.stdout)
        assert (await http.post("/v1/apply", content=deployment("d2", "dc-1"))).status_code == 200  # stored
        await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)
        assert cluster.running == running  # not applied
        assert (await http.delete("/v1/sites/dc-1")).status_code == 200
        await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)
        assert cluster.running == running  # not removed
        assert not any(e.action == "serve-removed" for e in cp.store.events(kind="Site", name="dc-1", limit=1000))
        assert cp.store.get("Model", "old").status["phase"] == "Unreadable"  # type: ignore[union-attr]

        assert (await http.delete("/v1/models/old")).status_code == 200
        await harness.wait_until(lambda: any(e.action == "serve-removed" for e in cp.store.events(kind="Site", name="dc-1", limit=1000)),
                                 20, what="dc-1's applications removed once the hold ends")
        assert cluster.running == {}
        assert "hold" not in (await http.get("/v1/controlplane")).json()


async def test_only_an_apply_the_cluster_refuses_makes_its_deployment_failing(fleet: harness.Fleet) -> None:
    """Ray not answering yet is retried and passes on its own: the deployment is Progressing
    while the site's status says why. A config the cluster refuses is the operator's to fix:
    Failing, naming the site."""
    cluster = Refusing(serve_config.RayUnreachable("http://127.0.0.1:8265", "connection refused"))
    cp = await start(fleet, lambda name, spec: cluster)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1")))
        assert applied.status_code == 200, applied.text

    def phase() -> tuple[str, str]:
        stored = cp.store.get("ModelDeployment", "d")
        status = stored.status if stored is not None else {}
        return status.get("phase", ""), str(status.get("reason", ""))

    await harness.wait_until(lambda: "unreachable" in site_status(cp, "dc-1").get("error", ""), 30, what="dc-1's apply to fail")
    await harness.wait_until(lambda: phase()[0] == "Progressing", 30, what="d to be Progressing")
    cluster.error = serve_config.ServeConfigRejected("422: bad field")
    await harness.wait_until(lambda: phase()[0] == "Failing", 90, what="d to be Failing")
    assert "dc-1: Ray Serve rejected the config: 422: bad field" in phase()[1], phase()


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

