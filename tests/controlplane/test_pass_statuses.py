"""The statuses a reconcile pass writes describe the objects it read. A deployment deleted
and applied again while a pass runs (a script's `delete` then `apply`, an apply on another
replica) is another object: the status the pass worked out for the old one (its phase,
its replicas, an observedGeneration that the new one's generation 1 may equal) must not
land on it, where a tool waiting for the new deployment would take it for its own."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator import catalog
from orchestrator.manifests import loader
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests
from tests.controlplane import support

SHA = hashlib.sha256(b"m1").hexdigest()


class RecreatedBeforeStatuses(store_mod.Store):
    """Another writer deletes a deployment and applies it again after the pass read the
    store, before the pass writes its statuses."""

    again: str | None = None  # the deployment's manifest, applied again once set

    def set_statuses(self, statuses: Sequence[tuple[str, str, Mapping[str, Any]]], *args: Any, **kwargs: Any) -> int:
        if self.again is not None:
            again, self.again = self.again, None
            catalog.delete_object(self, "ModelDeployment", "d1", actor="other")
            catalog.apply_documents(self, loader.load_text(again), actor="other")
        return super().set_statuses(statuses, *args, **kwargs)


def test_a_deployment_deleted_and_applied_again_during_a_pass_is_not_given_the_old_ones_status(tmp_path: pathlib.Path) -> None:
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    ticks = itertools.count(1_000_000)
    store = RecreatedBeforeStatuses(tmp_path / "state.db", clock=lambda: float(next(ticks)))
    try:
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            manifests.edge_site("edge-a", "FR", 48.85, 2.35), manifests.onnx_model("m1", "m1.onnx", SHA),
            manifests.deployment("d1", "m1", 1, {"tiers": ["edge"]}))), actor="test")
        _, reconciler = support.reconciler_with_agents(store, ["edge-a"], tmp_path)
        store.again = manifests.deployment("d1", "m1", 2, {"tiers": ["edge"]})
        asyncio.run(reconciler.reconcile_once())
        d1 = store.get("ModelDeployment", "d1")
        assert d1 is not None and d1.generation == 1 and d1.spec["replicas"]["min"] == 2
        assert d1.status == {}, d1.status  # none yet: the next pass, which the apply wakes, says how it is
        site = store.get("Site", "edge-a")
        assert site is not None and site.status.get("health"), site.status  # the pass's other statuses are written

        asyncio.run(reconciler.reconcile_once())
        d1 = store.get("ModelDeployment", "d1")
        assert d1 is not None and d1.status.get("observedGeneration") == 1 and d1.status.get("phase"), d1.status
    finally:
        store.close()
