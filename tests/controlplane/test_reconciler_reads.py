"""What a reconcile pass reads of the store: the desired state of one moment, although
applies are written from worker threads and, with several replicas, by other processes;
and what a preview or a what-if reads, which must be the fleet as a pass sees it."""

from __future__ import annotations

import asyncio
import pathlib

from orchestrator import catalog, views
from orchestrator.api import simulate
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.manifests import loader
from orchestrator.reconciler import loop, planning
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests


class ApplyingMidRead(store_mod.Store):
    """A store that another writer changes after its second read: an apply in a worker thread,
    or on another replica, lands between two reads of one pass."""

    change: str | None = None  # what the other writer applies, once set
    reads = 0

    def list(self, kind: str | None = None) -> list[store_mod.StoredObject]:
        got = super().list(kind)
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
            _, models, deployments = reconciler.read_desired()
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
