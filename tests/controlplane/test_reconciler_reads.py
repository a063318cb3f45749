"""What a reconcile pass reads of the store: the desired state of one moment, although
applies are written from worker threads and, with several replicas, by other processes;
what a preview or a what-if reads, which must be the fleet as a pass sees it; and objects
an earlier version stored under rules made stricter since: one that still reads fails only
itself, and one that does not puts every change on hold, what runs kept as it is."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import threading
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

import httpx
import pytest

from orchestrator import catalog, views
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.api import simulate
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import cascade_rules
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import routing
from orchestrator.manifests import loader, schema
from orchestrator.manifests.errors import ManifestError
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import hold, loop, planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler.residency import EU_COUNTRIES
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness, manifests, onnx_models

T = TypeVar("T")


class ApplyingMidRead(store_mod.Store):
    """A store that another writer changes after its second read: an apply in a worker thread,
    or on another replica, lands between two reads of one pass."""

    change: str | None = None  # what the other writer applies, once set
    reads = 0

    def list(self, kind: str | None = None) -> list[store_mod.StoredObject]:
        return self.counted(super().list(kind))

    def list_changed(self, kinds: Collection[str], held: Mapping[tuple[str, str], tuple[int, float]]
                     ) -> list[store_mod.StoredObject | store_mod.Unchanged]:
        return self.counted(super().list_changed(kinds, held))

    def counted(self, got: list[T]) -> list[T]:
        self.reads += 1
        if self.reads == 2 and self.change is not None:
            change, self.change = self.change, None
            catalog.apply_documents(self, loader.load_text(change), actor="other")
        return got


def test_a_pass_reads_the_desired_state_of_one_moment(tmp_path: pathlib.Path) -> None:
    """A deployment and the new Model it names, applied together, are both in what a pass
    reads or neither: read apart, the deployment could be planned against a Model unknown to
    the pass and reported Invalid until the next one."""
    sha = "a" * 64
    store = ApplyingMidRead(tmp_path / "state.db")
    try:
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            manifests.edge_site("edge-a", "FR", 48.85, 2.35), manifests.onnx_model("m1", "m1.onnx", sha))), actor="test")
        store.reads = 0
        store.change = manifests.bundle(manifests.onnx_model("m2", "m2.onnx", sha), manifests.deployment("d2", "m2", 1, {"tiers": ["edge"]}))
        reconciler = loop.Reconciler(store, None, None, None, endpoints_mod.EndpointTable())  # type: ignore[arg-type]
        for _ in range(3):  # the change lands between two reads; the last pass sees it whole
            desired = reconciler.read_desired()
            models, deployments = desired.models, desired.deployments
            named = {d.spec.model for d in deployments}
            assert named <= set(models), f"deployments name {named - set(models)}, which the pass does not know"
        assert {d.name for d in deployments} == {"d2"} and "m2" in models
    finally:
        store.close()


class NoAgentsYet:
    """The agent hub of a control plane that just restarted: nobody has reconnected."""

    def snapshot(self) -> list[object]:
        return []

    def assignments(self, site: str) -> None:
        return None


class NoDataCentres:
    def sites(self) -> set[str]:
        return set()


class Artifacts:
    allowed_hosts: tuple[str, ...] = ()  # any host, as with no --artifact-host

    def register(self, uri: str, sha: str) -> str:
        return "/unused/m1.onnx"


def test_a_preview_and_a_what_if_while_edge_sites_rejoin_keep_their_replicas_as_the_pass_does(tmp_path: pathlib.Path) -> None:
    """After a restart on its own database, an edge site whose agent is not back yet keeps its
    replicas in every pass; a plan preview or a what-if of no change must say the same, not
    that the replica is removed and no longer fits."""
    store = store_mod.Store(tmp_path / "state.db")
    try:
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            manifests.edge_site("edge-a", "FR", 48.85, 2.35, region="fr"), manifests.onnx_model("m1", "m1.onnx", "a" * 64),
            manifests.deployment("d1", "m1", 1, {"tiers": ["edge"]}))), actor="test")
        store.replace_placements([store_mod.PlacementRow("d1", "edge-a", "distilled", 1)])  # what ran before the restart
        reconciler = loop.Reconciler(store, NoAgentsYet(), NoDataCentres(), Artifacts(),  # type: ignore[arg-type]
                                     endpoints_mod.EndpointTable())
        reconciler.resume(600.0)
        kept = planning.placement_rows(planning.plan_pass(asyncio.run(reconciler.gather())).result)
        assert [(p.deployment, p.site) for p in kept] == [("d1", "edge-a")]

        what_if = simulate.run(asyncio.run(reconciler.current()), b"")
        assert (what_if["summary"]["removed"], what_if["summary"]["unschedulableReplicas"], what_if["after"]["replicas"]) == (0, 0, 1)
        preview = views.preview(asyncio.run(reconciler.current()), [])
        assert [(c["site"], c["change"]) for c in preview["changes"]] == [("edge-a", "unchanged")]
    finally:
        store.close()


SHA = "a" * 64


def legacy_model(uri: str = "m-old.onnx", rps: float = 10.0) -> dict[str, object]:
    """A Model's spec as an earlier version stored it, whose schema took what this one refuses."""
    return {"variants": [{"name": "v1", "runtime": "onnx", "artifact": {"uri": uri, "sha256": SHA}, "inputs": [], "outputs": [], "args": {},
                          "resources": {"cpu": 0.25, "memoryMiB": 256, "gpus": 0, "gpuMemoryGiB": 0.0}, "throughputRps": rps}]}


def earlier_store(path: pathlib.Path, model: dict[str, object]) -> store_mod.Store:
    """A store as an earlier version left it: Model ``old`` (``model``), its deployment
    ``d-old`` placed on edge-a, and Model ``m1`` with ``d1`` beside it."""
    store = store_mod.Store(path)
    catalog.apply_documents(store, loader.load_text(manifests.bundle(
        manifests.edge_site("edge-a", "FR", 48.85, 2.35), manifests.edge_site("edge-b", "DE", 52.52, 13.40),
        manifests.onnx_model("m1", "m1.onnx", SHA), manifests.deployment("d1", "m1", 1, {"tiers": ["edge"]}))), actor="test")
    store.apply([store_mod.ObjectWrite("Model", "old", {}, model),
                 store_mod.ObjectWrite("ModelDeployment", "d-old", {}, {"model": "old", "replicas": {"min": 1, "max": 1},
                                                                         "placement": {"tiers": ["edge"]}})],
                store_mod.Event("earlier-version", "apply", "", "", "apply"))
    store.replace_placements([store_mod.PlacementRow("d-old", "edge-a", "v1", 1)])
    return store


def reconciler_of(store: store_mod.Store, tmp_path: pathlib.Path, table: endpoints_mod.EndpointTable | None = None) -> loop.Reconciler:
    return loop.Reconciler(store, NoAgentsYet(), NoDataCentres(), artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"),  # type: ignore[arg-type]
                           table or endpoints_mod.EndpointTable())


def status_of(plan: planning.PassPlan, kind: str, name: str) -> dict[str, object]:
    return next(i.status for a in plan.actions if isinstance(a, act.SetStatuses) for i in a.items if (i.kind, i.name) == (kind, name))


def test_a_model_an_earlier_version_stored_with_a_url_now_refused_is_only_its_variants_artifact_error(tmp_path: pathlib.Path) -> None:
    """Its port is out of range: apply refuses such a URL now, which an earlier version stored."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model("http://models.example.com:80800/legacy.onnx"))
    try:
        more = loader.load_text(manifests.bundle(manifests.onnx_model("m2", "m1.onnx", SHA), manifests.deployment("d2", "m2", 1, {"tiers": ["edge"]})))
        catalog.apply_documents(store, more, actor="test")  # an apply of other objects
        snapshot = asyncio.run(reconciler_of(store, tmp_path).gather())
        plan = planning.plan_pass(snapshot)
        assert {d for d in ("d1", "d2", "d-old") if "phase" in status_of(plan, "ModelDeployment", d)} == {"d1", "d2", "d-old"}  # planned
        assert "not a usable artifact URI" in snapshot.artifacts[("old", "v1")].error  # what a replica of d-old shows
        with pytest.raises(ManifestError, match="Port out of range"):  # as a manifest, refused
            catalog.apply_documents(store, loader.load_text(manifests.bundle(
                manifests.onnx_model("old", "http://models.example.com:80800/legacy.onnx", SHA, variant="v1"))), actor="test")
        catalog.apply_documents(store, loader.load_text(manifests.bundle(  # corrected
            manifests.onnx_model("old", "http://models.example.com:8080/legacy.onnx", SHA, variant="v1"))), actor="test")
    finally:
        store.close()


class Fleet:
    """Agents of edge-a and edge-b joined to a real hub, on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), clock=lambda: self.now, heartbeat_interval=1.0)
        self.ids = {site: self.hub.join(agent_model.JoinApplication(
            site, "tok", None, "", f"http://{site}:8081", agent_model.Location(), {}, "test", 1.0,
            agent_model.Capacity(cpu_cores=4, memory_total_bytes=8 << 30))).agent_id for site in ("edge-a", "edge-b")}
        for site in self.ids:
            self.beat(site)

    def beat(self, site: str) -> None:
        self.hub.record_heartbeat(site, self.ids[site], agent_model.Heartbeat(
            seq=int(self.now) + 1, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=8 << 30, assignment_version=0,
            draining=False, capacity=None, models=None, gpu_free_bytes=()))

    def lose(self, site: str) -> None:
        """``site``'s agent goes silent, and is found lost; the others beat on."""
        self.now += 60.0
        for other in set(self.ids) - {site}:
            self.beat(other)
        self.hub.sweep()


COUNTRY = {"edge-a": "FR", "edge-b": "DE"}  # as earlier_store declares them


def endpoint(deployment: str, model: str, site: str, allowed: frozenset[str] = frozenset()) -> routing.Endpoint:
    return routing.Endpoint(model=model, deployment=deployment, site=site, tier="edge", country=COUNTRY[site], region="", lat=48.85,
                            lon=2.35, url=f"http://{site}:8081", allowed_countries=allowed)


def test_while_a_stored_object_does_not_read_nothing_changes_and_a_deployment_applied_meanwhile_waits(tmp_path: pathlib.Path) -> None:
    """A throughput an earlier version took (it overflows demand / rate) and this one refuses
    even in what is stored: reported once; every change waits, what runs is kept as it is,
    until the Model is applied again, as this version checks it; then the rest is planned."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320))
    store.replace_placements([store_mod.PlacementRow("d-old", "edge-a", "v1", 1), store_mod.PlacementRow("d1", "edge-b", "v1", 1)])
    running = store.placements()
    fleet = Fleet()
    table = endpoints_mod.EndpointTable()
    table.replace([endpoint("d-old", "old", "edge-a"), endpoint("d1", "m1", "edge-b")])  # the table in force
    in_force = table.all_endpoints()
    reconciler = loop.Reconciler(store, fleet.hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table)
    try:
        async def passes(n: int) -> list[planning.PassPlan | None]:
            return [await reconciler.reconcile_once() for _ in range(n)]

        assert asyncio.run(passes(2)) == [None, None]  # on hold
        assert [(e.action, e.kind, e.name) for e in store.recent_events("Model", "old") if e.action == "unreadable"] == [
            ("unreadable", "Model", "old")]
        status = store.get("Model", "old").status  # type: ignore[union-attr]
        assert status["phase"] == "Unreadable" and "throughputRps" in status["reason"]
        catalog.apply_documents(store, loader.load_text(manifests.bundle(  # stored; placed once the hold ends
            manifests.onnx_model("m2", "m1.onnx", SHA), manifests.deployment("d2", "m2", 1, {"tiers": ["edge"]}))), actor="test")
        asyncio.run(passes(1))
        assert store.placements() == running
        assert fleet.hub.assignments("edge-a") is None and fleet.hub.assignments("edge-b") is None  # nothing sent
        assert table.all_endpoints() == in_force

        fleet.lose("edge-a")  # the only change made while on hold: the gateway stops routing to a lost agent
        asyncio.run(passes(1))
        assert {(e.site, e.healthy) for e in table.all_endpoints()} == {("edge-a", False), ("edge-b", True)}

        catalog.apply_documents(store, loader.load_text(manifests.bundle(manifests.onnx_model("old", "m1.onnx", SHA, variant="v1"))),
                                actor="test")
        plan = asyncio.run(reconciler.reconcile_once())
        assert plan is not None
        assert "d2" in {r.deployment for r in store.placements()}
        assert fleet.hub.assignments("edge-b") is not None  # sent its set again
    finally:
        store.close()


def test_on_hold_a_stricter_residency_or_a_site_in_another_country_takes_endpoints_out_of_routing_at_once(tmp_path: pathlib.Path) -> None:
    """Placement waits for the hold to end; routing into a country a deployment now forbids
    does not: d1, applied again with residency FR instead of EU, is no longer routed to its
    replica in Germany at the next pass, nor is d-old once edge-a is declared in Switzerland."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320))
    store.replace_placements([store_mod.PlacementRow("d-old", "edge-a", "v1", 1), store_mod.PlacementRow("d1", "edge-b", "v1", 1)])
    fleet = Fleet()
    table = endpoints_mod.EndpointTable()
    table.replace([endpoint("d-old", "old", "edge-a"), endpoint("d1", "m1", "edge-b", EU_COUNTRIES)])
    reconciler = loop.Reconciler(store, fleet.hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table)
    try:
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            manifests.deployment("d1", "m1", 1, {"tiers": ["edge"], "residency": ["FR"]}))), actor="test")
        assert asyncio.run(reconciler.reconcile_once()) is None  # on hold
        ranked = table.rank("m1", routing.Caller(), None)
        assert isinstance(ranked, routing.NoRoute) and "residency" in ranked.reason, ranked
        assert store.placements() == [store_mod.PlacementRow("d-old", "edge-a", "v1", 1), store_mod.PlacementRow("d1", "edge-b", "v1", 1)]

        catalog.apply_documents(store, loader.load_text(manifests.bundle(manifests.edge_site("edge-a", "CH", 46.2, 6.1))), actor="test")
        asyncio.run(reconciler.reconcile_once())
        assert table.endpoints("old") == ()  # nor routed from the country it was declared in, nor added in the new one
    finally:
        store.close()


def test_on_hold_a_deleted_deployment_is_no_longer_routed_to_nor_its_cascade_run(tmp_path: pathlib.Path) -> None:
    """A delete is the operator's decision, not a change to plan: d1 deleted while on hold is
    routed to no more at the next pass (its replica runs on until the hold ends), and its
    model, which no other deployment serves, is not deployed (404), as outside a hold; d-old,
    whose Model does not read, is kept as it is."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320))
    store.replace_placements([store_mod.PlacementRow("d-old", "edge-a", "v1", 1), store_mod.PlacementRow("d1", "edge-b", "v1", 1)])
    table = endpoints_mod.EndpointTable()
    table.replace([endpoint("d-old", "old", "edge-a"), endpoint("d1", "m1", "edge-b")], deployed={"old": "", "m1": ""})
    route = cascade_rules.CascadeRoute("m1", "d1", (cascade_rules.StageRoute("v1", frozenset({"edge"}), None),))
    table.set_cascades({"m1": route, "d1": route})
    fleet = Fleet()
    reconciler = loop.Reconciler(store, fleet.hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table)
    try:
        catalog.delete_object(store, "ModelDeployment", "d1", actor="test")
        assert asyncio.run(reconciler.reconcile_once()) is None  # on hold
        assert [e.deployment for e in table.all_endpoints()] == ["d-old"]
        assert table.cascades == {} and not table.knows("m1") and table.unavailable_reason("m1") is None
        assert fleet.hub.assignments("edge-b") is None  # nothing sent: its replica is removed once the hold ends
    finally:
        store.close()


def cascading(*deployments: str) -> snap.Desired:
    """Model ``task`` and its ``deployments``, each with a cascade, as stored while Model
    ``old`` does not read."""
    io = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
          "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 2]}]}
    variants = [{"name": v, "runtime": "onnx", "artifact": {"uri": f"{v}.onnx", "sha256": SHA}, **io} for v in ("small", "large")]
    cascade = {"stages": [{"variant": "small", "escalate": {"confidence": {"output": "p", "below": 0.8}}}, {"variant": "large"}]}
    docs = loader.load_text(manifests.bundle(manifests.doc("Model", "task", {"variants": variants}), *(
        manifests.doc("ModelDeployment", name, {"model": "task", "variant": {"edge": "small", "datacenter": "large"}, "cascade": cascade})
        for name in deployments)))
    return snap.Desired((), {d.name: d.doc.spec for d in docs if isinstance(d.doc, schema.ModelDoc)},
                        tuple(snap.DeploymentRecord(d.name, 1, d.doc.spec) for d in docs if isinstance(d.doc, schema.ModelDeploymentDoc)),
                        {("Model", "old"): "why"})


def test_on_hold_a_model_name_whose_cascade_was_deleted_leads_to_the_one_the_planner_would_choose() -> None:
    """Whatever order the table lists its cascades in: the first of the model's left as stored."""
    planned = planning.cascade_routes(snap.Snapshot((), (before := cascading("d-a", "d-b", "d-c")).models, before.deployments,
                                                    (), (), {}, {}, {}, {}))
    assert planned["task"].deployment == "d-a"
    in_force = {name: planned[name] for name in ("d-c", "task", "d-a", "d-b")}
    after = cascading("d-b", "d-c")  # d-a deleted while on hold
    published = [a.routes for a in hold.actions(after, (), (), cascades=in_force) if isinstance(a, act.PublishCascades)]
    replanned = planning.cascade_routes(snap.Snapshot((), after.models, after.deployments, (), (), {}, {}, {}, {}))
    assert published == [{"task": planned["d-b"], "d-b": planned["d-b"], "d-c": planned["d-c"]}]
    assert published[0]["task"].deployment == replanned["task"].deployment == "d-b"


async def test_on_hold_a_model_whose_only_site_is_declared_in_another_country_answers_503_saying_why(tmp_path: pathlib.Path) -> None:
    """Through the gateway: its one replica, on edge-paris, is no longer routed to once the
    Site is declared in Germany; the model is still deployed, and a caller is told why it
    cannot be reached now (the Site moved, changes on hold), not that it is running."""
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    fleet_yaml = manifests.bundle(manifests.edge_site("edge-paris", "FR", 48.85, 2.35), manifests.onnx_model("intent", "intent.onnx", built.sha256),
                                  manifests.deployment("intent-fr", "intent", 1, {"tiers": ["edge"]}))
    body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]}
    async with harness.serving_fleet(tmp_path, fleet_yaml, {"edge-paris": dict(country="FR", lat=48.85, lon=2.35)},
                                     ready=lambda cp: any(e.healthy for e in cp.table.endpoints("intent")), timeout=60,
                                     what="intent served at edge-paris") as fleet:
        cp = fleet.cp
        assert cp is not None
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v2/models/intent/infer", json=body)).status_code == 200
            cp.store.apply([store_mod.ObjectWrite("Model", "old", {}, legacy_model(rps=1e-320))],
                           store_mod.Event("earlier-version", "apply", "", "", "apply"))
            moved = await http.post("/v1/apply", content=manifests.bundle(manifests.edge_site("edge-paris", "DE", 52.52, 13.40)))
            assert moved.status_code == 200, moved.text
            await harness.wait_until(lambda: not cp.table.endpoints("intent"), 30, what="edge-paris out of routing")
            resp = await http.post("/v2/models/intent/infer", json=body)
        assert resp.status_code == 503, resp.text
        why = resp.json()["error"]
        assert "edge-paris" in why and "another country" in why and "changes on hold: Model 'old' cannot be read" in why, why


def site(name: str, country: str) -> snap.SiteRecord:
    return snap.SiteRecord(name, {}, schema.SiteSpec.model_validate({"tier": "edge", "location": {"country": country, "lat": 0, "lon": 0}}))


def deployment(name: str, residency: list[str]) -> snap.DeploymentRecord:
    return snap.DeploymentRecord(name, 1, schema.ModelDeploymentSpec.model_validate(
        {"model": "m1", "replicas": {"min": 1, "max": 1}, "placement": {"tiers": ["edge"], "residency": residency}}))


DE_EP = endpoint("d1", "m1", "edge-b", EU_COUNTRIES)
FR, DE, CH = frozenset({"FR"}), frozenset({"DE"}), frozenset({"CH"})


@pytest.mark.parametrize(("in_force", "sites", "deployments", "allowed"), [
    (DE_EP, [site("edge-b", "DE")], [deployment("d1", ["FR"])], FR),  # narrowed: Germany is no longer allowed
    (DE_EP, [site("edge-b", "DE")], [deployment("d1", ["DE", "CH"])], DE),  # never wider than the table's
    (DE_EP, [site("edge-b", "DE")], [deployment("d1", [])], EU_COUNTRIES),  # no residency now: kept as it was planned
    (DE_EP, [], [], EU_COUNTRIES),  # the deployment and Site do not read (or are gone): as they are
    (endpoint("d1", "m1", "edge-b", CH), [site("edge-b", "DE")], [deployment("d1", ["DE"])], CH),  # unreachable stays so
    (endpoint("d1", "m1", "edge-b"), [site("edge-b", "DE")], [deployment("d1", ["FR"])], FR),  # "any" narrowed too
    (DE_EP, [site("edge-b", "CH")], [deployment("d1", ["EU"])], None),  # declared in another country: dropped
])
def test_a_hold_only_narrows_the_residency_of_the_table(in_force: routing.Endpoint, sites: list[snap.SiteRecord],
                                                        deployments: list[snap.DeploymentRecord], allowed: frozenset[str] | None) -> None:
    out = hold.narrowed([in_force], sites, deployments)
    assert [e.allowed_countries for e in out] == ([] if allowed is None else [allowed])
    assert all(dataclasses.replace(e, allowed_countries=in_force.allowed_countries) == in_force for e in out)  # nothing else changes


def restarted_without_edge_a(store: store_mod.Store, tmp_path: pathlib.Path, published: list[routing.Endpoint]
                             ) -> tuple[Fleet, loop.Reconciler, Callable[[], set[tuple[str, bool]]]]:
    """A reconciler just restarted (30 s for agents to rejoin) with the endpoint table its last
    run ``published``, edge-a's agent not reconnected yet; and each endpoint's (site, health)."""
    fleet = Fleet()
    fleet.hub.forget("edge-a")
    table = endpoints_mod.EndpointTable()
    table.replace(published)
    reconciler = loop.Reconciler(store, fleet.hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table, clock=lambda: fleet.now)
    reconciler.resume(rejoin_s=30.0)
    return fleet, reconciler, lambda: {(e.site, e.healthy) for e in table.all_endpoints()}


def test_on_hold_a_revoked_agent_is_not_routed_to_and_one_not_back_after_a_restart_is_until_its_window_ends(tmp_path: pathlib.Path) -> None:
    """The table kept on hold still follows the agents: edge-b's agent revoked (a stolen
    device) is unhealthy at the next pass; edge-a's, not back yet after a restart, keeps its
    endpoints while the rejoin window is open, and is unhealthy once it has closed."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320))
    store.replace_placements([store_mod.PlacementRow("d-old", "edge-a", "v1", 1), store_mod.PlacementRow("d1", "edge-b", "v1", 1)])
    fleet, reconciler, health = restarted_without_edge_a(store, tmp_path, [endpoint("d-old", "old", "edge-a"), endpoint("d1", "m1", "edge-b")])
    try:
        assert asyncio.run(reconciler.reconcile_once()) is None  # on hold
        assert health() == {("edge-a", True), ("edge-b", True)}
        fleet.hub.revoke("edge-b")
        asyncio.run(reconciler.reconcile_once())
        assert health() == {("edge-a", True), ("edge-b", False)}
        fleet.now += 31.0  # the rejoin window closes with edge-a's agent still away
        asyncio.run(reconciler.reconcile_once())
        assert health() == {("edge-a", False), ("edge-b", False)}
    finally:
        store.close()


def test_on_hold_a_rejoin_window_that_closes_says_the_sites_are_planned_as_lost_only_once_the_hold_ends(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing is planned on hold: what the window's end changes is that the gateway stops
    routing to the sites not back, and the log says that, and when they are planned as lost."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320))
    fleet, reconciler, health = restarted_without_edge_a(store, tmp_path, [endpoint("d-old", "old", "edge-a")])
    try:
        assert asyncio.run(reconciler.reconcile_once()) is None  # on hold
        fleet.now += 31.0
        with caplog.at_level(logging.WARNING, logger=loop.__name__):
            asyncio.run(reconciler.reconcile_once())
        assert health() == {("edge-a", False)}
        said = [r.getMessage() for r in caplog.records if "did not rejoin in time" in r.getMessage()]
        assert said == ["1 edge site(s) that served before this control plane started did not rejoin in time (edge-a): the gateway "
                        "no longer routes to them; changes are on hold, so they are planned as lost once it ends, unless their agents "
                        "are back by then"], said
    finally:
        store.close()


def test_on_hold_after_a_restart_an_edge_site_that_does_not_read_keeps_its_endpoints_for_the_rejoin_window(tmp_path: pathlib.Path) -> None:
    """A Site left in a form this version does not read holds the fleet; which of its rows
    to await cannot be told from it, so its agent, not back yet, keeps its endpoints while
    the window is open (they go once it closes), and the window is not cut short for it."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = store_mod.Store(tmp_path / "state.db")
    catalog.apply_documents(store, loader.load_text(manifests.bundle(
        manifests.edge_site("edge-a", "FR", 48.85, 2.35), manifests.onnx_model("m1", "m1.onnx", SHA),
        manifests.deployment("d1", "m1", 1, {"tiers": ["edge"]}))), actor="test")
    site = store.get("Site", "edge-a")
    assert site is not None
    store.apply([store_mod.ObjectWrite("Site", "edge-a", dict(site.labels), {**site.spec, "capacity": {"cpu": -5}})],
                store_mod.Event("earlier-version", "apply", "", "", "apply"))  # a capacity this version refuses
    store.replace_placements([store_mod.PlacementRow("d1", "edge-a", "v1", 1)])
    fleet, reconciler, health = restarted_without_edge_a(store, tmp_path, [endpoint("d1", "m1", "edge-a")])
    try:
        assert asyncio.run(reconciler.reconcile_once()) is None  # on hold
        assert health() == {("edge-a", True)}
        asyncio.run(reconciler.reconcile_once())
        assert health() == {("edge-a", True)}
        fleet.now += 31.0
        asyncio.run(reconciler.reconcile_once())
        assert health() == {("edge-a", False)}
    finally:
        store.close()


async def test_a_model_applied_while_on_hold_is_answered_with_why_it_is_not_placed(tmp_path: pathlib.Path) -> None:
    """Not "just applied; its replicas are being placed", which it would say for the whole hold."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320))
    table = endpoints_mod.EndpointTable()
    reconciler = loop.Reconciler(store, Fleet().hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table, resync_s=3600.0)
    running = asyncio.create_task(reconciler.run())
    reconciler.trigger("start")
    try:
        await reconciler.wait_for_pass(0)  # on hold
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            manifests.onnx_model("m2", "m1.onnx", SHA), manifests.deployment("d2", "m2", 1, {"tiers": ["edge"]}))), actor="test")
        reconciler.applied("test")
        await harness.wait_until(lambda: table.unavailable_reason("m2") is not None, 10, what="m2 noted as applied")
        why = table.unavailable_reason("m2")
        assert why is not None and "it is placed when the hold ends (changes on hold: Model 'old' cannot be read" in why, why
    finally:
        reconciler.stop()
        await running
        store.close()


class ReadingHeld(store_mod.Store):
    """A store whose next read of the whole desired state (a pass's) waits until ``go`` is set:
    whatever happens meanwhile happens before that pass."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        self.go = threading.Event()

    def list_changed(self, kinds: Collection[str], held: Mapping[tuple[str, str], tuple[int, float]]
                     ) -> list[store_mod.StoredObject | store_mod.Unchanged]:
        assert self.go.wait(30), "the pass's read was never let through"
        return super().list_changed(kinds, held)


async def test_a_model_noted_as_being_placed_before_the_hold_began_is_answered_with_the_hold(tmp_path: pathlib.Path) -> None:
    """Its deployment was applied while the pass that finds the fleet on hold was on its way:
    noted "being placed" then, it would say so (retry shortly) for the whole hold."""
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320)).close()
    store = ReadingHeld(tmp_path / "state.db")
    table = endpoints_mod.EndpointTable()
    reconciler = loop.Reconciler(store, Fleet().hub, dc_mod.DataCentres(dc_mod.LocalRay()),
                                 artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"), table, resync_s=3600.0)
    running = asyncio.create_task(reconciler.run())
    try:
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            manifests.onnx_model("m2", "m1.onnx", SHA), manifests.deployment("d2", "m2", 1, {"tiers": ["edge"]}))), actor="test")
        reconciler.applied("test")  # the pass it starts waits to read
        await harness.wait_until(lambda: table.unavailable_reason("m2") is not None, 10, what="m2 noted as applied")
        assert table.unavailable_reason("m2") == "deployment d2 was just applied; its replicas are being placed"
        store.go.set()
        await reconciler.wait_for_pass(0)  # on hold
        await harness.wait_until(lambda: "hold" in (table.unavailable_reason("m2") or ""), 10, what="m2's note to say the hold")
        why = table.unavailable_reason("m2")
        assert why is not None and why.startswith("deployment d2 was applied; it is placed when the hold ends (changes on hold: Model 'old'")
    finally:
        store.go.set()
        reconciler.stop()
        await running
        store.close()


def test_an_unreadable_object_is_reported_once_per_leader_term(tmp_path: pathlib.Path) -> None:
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320))
    reconciler = reconciler_of(store, tmp_path)

    def reported() -> int:
        return sum(1 for e in store.recent_events("Model", "old") if e.action == "unreadable")

    async def passes(n: int) -> None:
        for _ in range(n):
            await reconciler.reconcile_once()

    try:
        asyncio.run(passes(2))
        assert reported() == 1 and reconciler.unreadable
        reconciler.step_down()
        assert not reconciler.unreadable  # a follower's view and metrics do not say it: the leader's do
        lease = store.acquire_lease("reconciler", "replica-b", 30.0)
        assert lease is not None
        reconciler.lead(lease)
        asyncio.run(passes(2))
        assert reported() == 2
    finally:
        store.close()


def test_a_preview_and_a_what_if_while_on_hold_say_why_nothing_takes_effect(tmp_path: pathlib.Path) -> None:
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = earlier_store(tmp_path / "state.db", legacy_model(rps=1e-320))
    reconciler = reconciler_of(store, tmp_path)
    try:
        held = "changes on hold: Model 'old' cannot be read (variants.0.throughputRps"
        assert simulate.run(asyncio.run(reconciler.current()), b"")["hold"].startswith(held)
        assert views.preview(asyncio.run(reconciler.current()), [])["hold"].startswith(held)
    finally:
        store.close()
