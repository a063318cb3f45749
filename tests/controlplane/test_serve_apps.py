"""The Serve applications a reconcile pass gives data-centre sites: one per variant of a
deployment on a site, named so that sites sharing one Ray cluster never take each other's,
and counted once each in the deployment's status and the endpoint table."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx

from orchestrator.adapters import ray_serve, serve_config
from orchestrator.manifests import loader, schema
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import applications, planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.store.values import PlacementRow

FLEET = """
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {name: dc1}
spec:
  tier: datacenter
  location: {country: FR, region: eu-west, lat: 48.8, lon: 2.3}
  capacity: {cpu: 8, memoryGiB: 64}
  ray: {address: "http://127.0.0.1:9"}
---
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: m}
spec:
  variants:
    - {name: big, runtime: ray-serve, importPath: "pkg.mod:big", resources: {cpu: 2, memoryMiB: 256}, throughputRps: 100}
    - {name: small, runtime: ray-serve, importPath: "pkg.mod:small", resources: {cpu: 1, memoryMiB: 256}, throughputRps: 10}
---
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: d}
spec:
  model: m
  replicas: {min: 3, max: 3}
  placement: {tiers: [datacenter]}
"""


def _running(site: str, variant: str, replicas: int) -> serve_config.ServeAppStatus:
    return serve_config.ServeAppStatus(
        name=applications.app_name(site, "d", variant), status=serve_config.ServeAppState.RUNNING, message="",
        replicas_running=replicas, replicas_target=replicas,
        endpoint_url=f"http://127.0.0.1:8000{applications.route_prefix(site, 'd', variant)}")


def _snapshot(*running: serve_config.ServeAppStatus) -> snap.Snapshot:
    """``d`` ran ``variant: big`` x1 on dc1, and is now applied with no variant pinned and 3 replicas."""
    docs = loader.load_text(loader.bundle([("fleet.yaml", FLEET)]))
    return snap.Snapshot(
        sites=tuple(snap.SiteRecord(d.name, dict(d.doc.metadata.labels), d.doc.spec) for d in docs if isinstance(d.doc, schema.SiteDoc)),
        models={d.name: d.doc.spec for d in docs if isinstance(d.doc, schema.ModelDoc)},
        deployments=tuple(snap.DeploymentRecord(d.name, 2, d.doc.spec) for d in docs if isinstance(d.doc, schema.ModelDeploymentDoc)),
        placements=(PlacementRow("d", "dc1", "big", 1),), agents=(),
        datacentres={"dc1": snap.DataCentreObservation(True, {a.name: a for a in running})},
        artifacts={}, assignments={}, applied_apps={},
    )


class FakeDashboard:
    """A Ray dashboard's Serve REST API: answers GET with ``applications``, records each PUT."""

    def __init__(self, applications: dict[str, dict[str, Any]]) -> None:
        self.applications = applications
        self.puts: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            self.puts.append(json.loads(request.content))
            return httpx.Response(200)
        return httpx.Response(200, json={"applications": self.applications, "http_options": {"port": 8000}})


def _declared(name: str) -> dict[str, Any]:
    return {"source": "declarative", "status": "RUNNING", "deployed_app_config": {"name": name, "route_prefix": f"/{name}", "import_path": "x:app"}}


async def test_two_variants_of_a_deployment_on_one_site_are_two_applications_the_cluster_takes() -> None:
    plan = planning.plan_pass(_snapshot())
    assert {(r.site, r.variant, r.replicas) for r in planning.placement_rows(plan.result)} == {("dc1", "big", 1), ("dc1", "small", 2)}
    (apply,) = [a for a in plan.actions if isinstance(a, act.ApplyServeApps) and a.site == "dc1"]
    assert {(a.import_path, a.num_replicas) for a in apply.apps} == {("pkg.mod:big", 1), ("pkg.mod:small", 2)}
    assert len({a.name for a in apply.apps}) == len({a.route_prefix for a in apply.apps}) == 2
    dashboard = FakeDashboard({})
    async with ray_serve.RayServeActuator("http://ray:8265", owns=applications.owns_app("dc1"), transport=httpx.MockTransport(dashboard)) as dc1:
        await dc1.apply(apply.apps)  # refused as a whole when two applications share a name
    assert sorted(a["name"] for a in dashboard.puts[0]["applications"]) == sorted(a.name for a in apply.apps)


def test_each_application_counts_once_in_ready_replicas_and_is_an_endpoint() -> None:
    def status_and_urls(s: snap.Snapshot) -> tuple[int, list[str]]:
        plan = planning.plan_pass(s)
        (statuses,) = [a for a in plan.actions if isinstance(a, act.SetStatuses)]
        (status,) = [i.status for i in statuses.items if i.kind == "ModelDeployment"]
        (published,) = [a for a in plan.actions if isinstance(a, act.PublishEndpoints)]
        return status["readyReplicas"], sorted(e.url for e in published.endpoints)

    # only the big replica runs so far: one ready, not one per variant placed
    assert status_and_urls(_snapshot(_running("dc1", "big", 1))) == (1, ["http://127.0.0.1:8000/ep/dc1/d/big"])
    both = _snapshot(_running("dc1", "big", 1), _running("dc1", "small", 2))
    assert status_and_urls(both) == (3, ["http://127.0.0.1:8000/ep/dc1/d/big", "http://127.0.0.1:8000/ep/dc1/d/small"])


def test_an_application_changing_its_replica_count_stays_a_healthy_endpoint() -> None:
    """Serve reports an application DEPLOYING while its replica count changes through the
    config, which is how every scale edgeplane makes reaches it; its running replicas keep
    answering, so the gateway keeps routing to it (callers of a data-centre-only model got
    503 "no healthy replica" for every scale up or down before)."""
    def published(status: serve_config.ServeAppState, running: int) -> list[tuple[str, bool]]:
        app = dataclasses.replace(_running("dc1", "big", running), status=status, replicas_target=3)
        (table,) = [a for a in planning.plan_pass(_snapshot(app)).actions if isinstance(a, act.PublishEndpoints)]
        return [(e.url, e.healthy) for e in table.endpoints]

    url = "http://127.0.0.1:8000/ep/dc1/d/big"
    assert published(serve_config.ServeAppState.DEPLOYING, 1) == [(url, True)]
    assert published(serve_config.ServeAppState.DEPLOYING, 0) == []  # nothing answers yet
    assert published(serve_config.ServeAppState.UNHEALTHY, 2) == [(url, False)]
    assert published(serve_config.ServeAppState.RUNNING, 3) == [(url, True)]


def test_sites_whose_names_hold_dashes_own_only_their_own_applications() -> None:
    # Site names are DNS labels: "a" and "b--a" are both valid, as are deployments "d" and "d--b".
    pairs = [("a", "d"), ("a", "d--b"), ("b--a", "d"), ("b", "a--d"), ("a" * 63, "d"), ("a" * 62 + "b", "d"), ("a", "d" * 63)]
    names = {(site, deployment): applications.app_name(site, deployment, "v") for site, deployment in pairs}
    assert len(set(names.values())) == len(pairs), names
    for (site, deployment), name in names.items():
        assert serve_config.spec_problems(serve_config.ServeAppSpec(
            name=name, route_prefix=applications.route_prefix(site, deployment, "v"), model_name="m", runtime="ray-serve",
            num_replicas=1, import_path="x:app")) == []
        owners = {other for other, _ in pairs if applications.owns_app(other)(name)}
        assert owners == {site}, (name, owners)


async def test_a_site_s_apply_replaces_its_applications_named_the_earlier_way_and_keeps_other_sites() -> None:
    # Earlier versions named an application "ep-<deployment>--<site>", one per deployment on a site.
    earlier, other_site = "ep-d--dc1", applications.app_name("dc2", "d", "big")
    dashboard = FakeDashboard({earlier: _declared(earlier), other_site: _declared(other_site), "team": _declared("team")})
    plan = planning.plan_pass(_snapshot())
    (apply,) = [a for a in plan.actions if isinstance(a, act.ApplyServeApps) and a.site == "dc1"]
    async with ray_serve.RayServeActuator("http://ray:8265", owns=applications.owns_app("dc1"), transport=httpx.MockTransport(dashboard)) as dc1:
        assert earlier in await dc1.observe()  # its own, to replace
        await dc1.apply(apply.apps)
    assert sorted(a["name"] for a in dashboard.puts[0]["applications"]) == sorted([other_site, "team", *(a.name for a in apply.apps)])


class SizingServe:
    """Serve as its REST API shows it: each application runs the config last PUT, its one
    (ingress) deployment ``Model`` at the replica count configured, or Serve's default 1."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {"applications": []}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            self.config = json.loads(request.content)
            return httpx.Response(200)
        apps = {}
        for app in self.config["applications"]:
            n = next((d["num_replicas"] for d in app.get("deployments") or [] if d["name"] == "Model"), 1)
            apps[app["name"]] = {
                "source": "declarative", "status": "RUNNING", "route_prefix": app["route_prefix"], "deployed_app_config": app,
                "deployment_topology": {"ingress_deployment": "Model"},
                "deployments": {"Model": {"status": "HEALTHY", "target_num_replicas": n, "replicas": [{"state": "RUNNING"}] * n}}}
        return httpx.Response(200, json={"applications": apps, "http_options": {"port": 8000}})


async def test_a_ray_serve_application_runs_the_replicas_placed_once_its_ingress_is_known() -> None:
    """The variant names no deployment: the first apply runs the application with its own
    defaults, and the pass after the cluster reports its ingress sizes that."""
    one_variant = FLEET.replace('    - {name: small, runtime: ray-serve, importPath: "pkg.mod:small", resources: {cpu: 1, memoryMiB: 256}, throughputRps: 10}\n', "")
    docs = loader.load_text(loader.bundle([("fleet.yaml", one_variant)]))
    serve = SizingServe()
    placements: tuple[PlacementRow, ...] = ()
    applied: dict[str, tuple[serve_config.ServeAppSpec, ...]] = {}
    running: list[int] = []

    def snapshot(observed: snap.DataCentreObservation) -> snap.Snapshot:
        return snap.Snapshot(
            sites=tuple(snap.SiteRecord(d.name, dict(d.doc.metadata.labels), d.doc.spec) for d in docs if isinstance(d.doc, schema.SiteDoc)),
            models={d.name: d.doc.spec for d in docs if isinstance(d.doc, schema.ModelDoc)},
            deployments=tuple(snap.DeploymentRecord(d.name, 1, d.doc.spec) for d in docs if isinstance(d.doc, schema.ModelDeploymentDoc)),
            placements=placements, agents=(), datacentres={"dc1": observed}, artifacts={}, assignments={}, applied_apps=applied)

    async with ray_serve.RayServeActuator("http://ray:8265", owns=applications.owns_app("dc1"), transport=httpx.MockTransport(serve)) as dc1:
        for _ in range(3):  # as Reconciler.reconcile_once: observe, plan, apply
            passed = planning.plan_pass(snapshot(snap.DataCentreObservation(True, await dc1.observe(), drift=dc1.drift)))
            placements = planning.placement_rows(passed.result)
            for action in passed.actions:
                if isinstance(action, act.ApplyServeApps):
                    await dc1.apply(action.apps)
                    applied = {"dc1": action.apps}
            running.append(sum(a.replicas_running for a in (await dc1.observe()).values()))
    assert [r.replicas for r in placements] == [3]
    assert running == [1, 3, 3]
    # a pass that does not see the application (being replaced, say) keeps it sized, not back to Serve's default
    assert [a.deployment for a in applications.serve_apps(snapshot(snap.DataCentreObservation(True, {})), placements).by_site["dc1"]] == ["Model"]


def test_an_onnx_application_downloads_through_redirects_only_to_the_allowed_hosts() -> None:
    """The replica is told the control plane's --artifact-host list with the URL it was
    checked against; a fleet without the setting keeps the arguments it had."""
    sha = "a" * 64
    onnx = FLEET.replace(
        '    - {name: big, runtime: ray-serve, importPath: "pkg.mod:big", resources: {cpu: 2, memoryMiB: 256}, throughputRps: 100}\n',
        f'    - {{name: big, runtime: onnx, artifact: {{uri: "https://models.example.com/m.onnx", sha256: "{sha}"}}, '
        'resources: {cpu: 2, memoryMiB: 256}}\n')
    docs = loader.load_text(loader.bundle([("fleet.yaml", onnx)]))
    base = _snapshot()

    def args(hosts: tuple[str, ...]) -> dict[str, Any]:
        s = dataclasses.replace(base, models={d.name: d.doc.spec for d in docs if isinstance(d.doc, schema.ModelDoc)},
                                artifacts={("m", "big"): snap.ArtifactRef("https://models.example.com/m.onnx", hosts=hosts)})
        (app,) = applications.serve_apps(s, [PlacementRow("d", "dc1", "big", 1)]).by_site["dc1"]
        return serve_config.render_application(app)["args"]

    assert args((".example.com", "mirror.example.net")) == {"artifact_uri": "https://models.example.com/m.onnx", "sha256": sha,
                                                           "model_name": "m", "artifact_hosts": [".example.com", "mirror.example.net"]}
    assert "artifact_hosts" not in args(())


def test_an_onnx_application_is_given_the_inputs_and_outputs_its_variant_declares() -> None:
    """The replica checks its file against them (orchestrator.serving.onnx_app); a variant
    declaring none keeps the arguments it had, and either reads back from the cluster as applied."""
    sha = "a" * 64

    def app(declared: str) -> serve_config.ServeAppSpec:
        onnx = FLEET.replace(
            '    - {name: big, runtime: ray-serve, importPath: "pkg.mod:big", resources: {cpu: 2, memoryMiB: 256}, throughputRps: 100}\n',
            f'    - {{name: big, runtime: onnx, artifact: {{uri: "https://models.example.com/m.onnx", sha256: "{sha}"}}, '
            f'resources: {{cpu: 2, memoryMiB: 256}}{declared}}}\n')
        docs = loader.load_text(loader.bundle([("fleet.yaml", onnx)]))
        s = dataclasses.replace(_snapshot(), models={d.name: d.doc.spec for d in docs if isinstance(d.doc, schema.ModelDoc)},
                                artifacts={("m", "big"): snap.ArtifactRef("https://models.example.com/m.onnx")})
        (spec,) = applications.serve_apps(s, [PlacementRow("d", "dc1", "big", 1)]).by_site["dc1"]
        return spec

    declared = app(", inputs: [{name: x, datatype: FP32, shape: [-1, 8]}], outputs: [{name: y, datatype: INT64, shape: [-1]}]")
    rendered = serve_config.render_application(declared)
    assert rendered["args"] == {"artifact_uri": "https://models.example.com/m.onnx", "sha256": sha, "model_name": "m",
                                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
                                "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}]}
    assert serve_config.application_from_config(rendered, declared) == declared
    plain = app("")
    assert set(serve_config.render_application(plain)["args"]) == {"artifact_uri", "sha256", "model_name"}


def test_a_pass_publishes_its_routing_before_it_waits_on_a_data_centre() -> None:
    """The loop runs a pass's actions in order, and a Ray dashboard's calls take seconds: the
    table that follows from the new placement (which may have taken a replica from a country
    a stricter residency now forbids) goes to the gateway first, right after the placement."""
    kinds = [type(a) for a in planning.plan_pass(_snapshot(_running("dc1", "big", 1))).actions]
    assert kinds[:3] == [act.RecordPlacement, act.PublishEndpoints, act.PublishCascades]
    assert act.ApplyServeApps in kinds


def test_an_application_the_adapter_refuses_fails_its_deployment_alone_and_one_applied_before_runs_as_it_was() -> None:
    """A variant an earlier version stored with an import path the Serve adapter refuses:
    its application is left out (or kept as this leader last applied it), the deployment
    says why, and the pass plans on, not raises."""
    base = _snapshot()
    models = dict(base.models)
    (big, small) = models["m"].variants
    models["m"] = models["m"].model_copy(update={"variants": [big.model_copy(update={"importPath": "pkgapp"}), small]})
    rows = [PlacementRow("d", "dc1", "big", 1), PlacementRow("d", "dc1", "small", 2)]
    fresh = applications.serve_apps(dataclasses.replace(base, models=models), rows)
    assert [a.name for a in fresh.by_site["dc1"]] == [applications.app_name("dc1", "d", "small")]
    assert fresh.unapplied == {"d": "dc1: not applied: import_path 'pkgapp' is not one Ray Serve takes: it names no module, only an "
                                    "attribute; write 'package.module:attribute' (or 'package.module.attribute')"}

    before = applications.serve_apps(base, rows).by_site["dc1"]  # what this leader applied while the path was good
    kept = applications.serve_apps(dataclasses.replace(base, models=models, applied_apps={"dc1": before}), rows)
    assert kept.by_site["dc1"] == before and kept.unapplied["d"].endswith("; it runs as it was")

    plan = planning.plan_pass(dataclasses.replace(base, models=models))
    (status,) = [i.status for a in plan.actions if isinstance(a, act.SetStatuses) for i in a.items if i.name == "d"]
    assert status["phase"] == "Failing" and "dc1: not applied: import_path 'pkgapp'" in status["reason"]
    assert [a.reasons for a in plan.actions if isinstance(a, act.ReportUnapplied)] == [fresh.unapplied]
