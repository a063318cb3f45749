"""What a reconcile pass reads of the store: the desired state of one moment, although
applies are written from worker threads and, with several replicas, by other processes."""

from __future__ import annotations

import pathlib

from orchestrator import catalog
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.manifests import loader
from orchestrator.reconciler import loop
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
