"""A store brought back to an older state under a running control plane (a restore of last
night's dump, a failover to a standby that missed the last commits): its assignment counter
is below the versions the hub already sent, and agents take only a newer set for news. The
next pass numbers its sets above them and moves the counter past them, on its own."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pathlib
import sqlite3

import pytest

from orchestrator import catalog
from orchestrator.agents import model as agent_model
from orchestrator.manifests import loader
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests
from tests.controlplane import support

SHA = hashlib.sha256(b"m1").hexdigest()
SHA2 = hashlib.sha256(b"m2").hexdigest()
SITES = ("edge-a", "edge-b")
PLACEMENT = manifests.spread_by_site(tiers=["edge"])


def _counter(db: pathlib.Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'seq:assignments'").fetchone()[0])


def test_a_pass_after_the_stores_counter_went_back_sends_every_site_a_newer_set(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    (tmp_path / "m2.onnx").write_bytes(b"m2")
    db = tmp_path / "state.db"
    store = store_mod.Store(db)
    try:
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            *(manifests.edge_site(s, "FR", 48.0 + i, 2.0, region="fr") for i, s in enumerate(SITES)),
            manifests.onnx_model("m1", "m1.onnx", SHA),
            manifests.deployment("d1", "m1", len(SITES), PLACEMENT))), actor="test")
        hub, reconciler = support.reconciler_with_agents(store, SITES, tmp_path)

        async def two_passes() -> tuple[dict[str, object], dict[str, object]]:
            await reconciler.reconcile_once()
            sent = {s: hub.assignments(s) for s in SITES}
            # the counter goes back to where a backup taken before these sets left it
            with sqlite3.connect(db) as conn:
                conn.execute("UPDATE meta SET value = 0 WHERE key = 'seq:assignments'")
            catalog.apply_documents(store, loader.load_text(manifests.bundle(  # one site's set gains a model
                manifests.onnx_model("m2", "m2.onnx", SHA2), manifests.deployment("d2", "m2", 1, PLACEMENT))), actor="test")
            await reconciler.reconcile_once()
            await reconciler.publishes_done()
            return sent, {s: hub.assignments(s) for s in SITES}

        with caplog.at_level(logging.WARNING, logger=loop.__name__):
            sent, after = asyncio.run(two_passes())
        assert all(isinstance(a, agent_model.AssignmentSet) and a.assignments for a in sent.values())
        newest = max(a.version for a in sent.values() if isinstance(a, agent_model.AssignmentSet))
        changed = [s for s in SITES if after[s] != sent[s]]
        assert changed and all(isinstance(a := after[s], agent_model.AssignmentSet) and a.version > newest for s in changed)
        assert _counter(db) > newest  # the next restart numbers above what agents hold too
        assert "assignment counter went back" in caplog.text
    finally:
        store.close()
