"""Each reconcile pass reads every stored Site, Model and deployment, but validates again only
those written since the pass before: the rest are kept parsed, by the write they were parsed
from, and an object deleted is no longer kept. Counted, not timed (bench/reconcile_pass.py
times it)."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
from collections import Counter
from typing import Any

from orchestrator import catalog
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.manifests import loader
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import desired, loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests

SHA = hashlib.sha256(b"m1").hexdigest()


class CountingParsers:
    """The reader's parsers, each counting the objects it parses (validates), by kind."""

    def __init__(self) -> None:
        self.parsed: Counter[str] = Counter()

    def by_kind(self) -> dict[str, desired.Parser]:
        def counting(kind: str, parse: desired.Parser) -> desired.Parser:
            def parse_counted(o: store_mod.StoredObject) -> Any:
                self.parsed[kind] += 1
                return parse(o)
            return parse_counted
        return {kind: counting(kind, parse) for kind, parse in desired.PARSERS.items()}

    def taken(self) -> dict[str, int]:
        """The counts since the last call."""
        counts, self.parsed = dict(self.parsed), Counter()
        return counts


def apply(store: store_mod.Store, *docs: str) -> None:
    catalog.apply_documents(store, loader.load_text(manifests.bundle(*docs)), actor="test")


def test_a_pass_validates_only_the_objects_written_since_the_pass_before(tmp_path: pathlib.Path) -> None:
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    store = store_mod.Store(tmp_path / "state.db")
    try:
        apply(store, *(manifests.edge_site(f"edge-{i}", "FR", 48.0 + i, 2.0, region="fr") for i in range(3)),
              manifests.onnx_model("m1", "m1.onnx", SHA), manifests.deployment("d1", "m1", 2, manifests.spread_by_site(tiers=["edge"])))
        counting = CountingParsers()
        reader = desired.DesiredReader(counting.by_kind())
        reconciler = loop.Reconciler(store, hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"])),
                                     dc_mod.DataCentres(dc_mod.LocalRay()), artifacts_mod.ArtifactCatalog((tmp_path,), "http://cp"),
                                     endpoints_mod.EndpointTable(), desired_reader=reader)

        def one_pass() -> dict[str, int]:
            asyncio.run(reconciler.reconcile_once())
            return counting.taken()

        assert one_pass() == {"Site": 3, "Model": 1, "ModelDeployment": 1}
        assert one_pass() == {}, "a pass validated again objects nobody wrote since (the statuses the pass before wrote are no write)"

        apply(store, manifests.edge_site("edge-1", "FR", 45.5, 2.0, region="fr"))
        assert one_pass() == {"Site": 1}
        assert reconciler.last_snapshot is not None and reconciler.last_snapshot.site_by_name["edge-1"].spec.location.lat == 45.5

        before = reconciler.last_snapshot.site_by_name["edge-2"].created_at
        store.delete("Site", "edge-2", store_mod.Event("test", "delete", "Site", "edge-2", ""))
        assert one_pass() == {} and len(reader) == 4, "a deleted Site is still kept parsed"
        apply(store, manifests.edge_site("edge-2", "FR", 50.0, 2.0, region="fr"))  # the same spec, another Site
        assert one_pass() == {"Site": 1}
        assert reconciler.last_snapshot.site_by_name["edge-2"].created_at != before
    finally:
        store.close()
