"""What one reconcile pass asks of the store as the fleet grows: a pass that sends every
edge site its assignment set (a deployment applied to the whole edge fleet, a new leader's
first pass) takes one block of assignment versions, and reads the statuses it compares
against a batch at a time, so its transactions and statements do not grow with the number
of sites (at 5,000 sites on PostgreSQL each one is a round trip, most of them holding the
write lock)."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib

from orchestrator import catalog
from orchestrator.manifests import loader
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests
from tests.controlplane import support
from tests.foundation.support import sqlite_connection

SHA = hashlib.sha256(b"m1").hexdigest()


def _first_pass(root: pathlib.Path, n: int) -> tuple[list[str], list[int]]:
    """The statements of the first pass over ``n`` edge sites, each with a joined agent, and
    the assignment versions it sent them."""
    root.mkdir()
    (root / "m1.onnx").write_bytes(b"m1")
    store = store_mod.Store(root / "state.db")
    try:
        sites = [f"edge-{i}" for i in range(n)]
        catalog.apply_documents(store, loader.load_text(manifests.bundle(
            *(manifests.edge_site(s, "FR", 48.0 + i / 100, 2.0, region="fr") for i, s in enumerate(sites)),
            manifests.onnx_model("m1", "m1.onnx", SHA),
            manifests.deployment("d1", "m1", n, manifests.spread_by_site(tiers=["edge"])))), actor="test")
        hub, reconciler = support.reconciler_with_agents(store, sites, root)
        statements: list[str] = []
        sqlite_connection(store).set_trace_callback(statements.append)

        async def one_pass() -> None:
            await reconciler.reconcile_once()
            await reconciler.publishes_done()  # the table's write, beside the pass, is the pass's too

        asyncio.run(one_pass())
        sqlite_connection(store).set_trace_callback(None)
        versions = [a.version for s in sites if (a := hub.assignments(s)) is not None and a.assignments]
        return statements, versions
    finally:
        store.close()


def _count(statements: list[str], verb: str) -> int:
    return sum(1 for s in statements if s.lstrip().upper().startswith(verb))


def test_a_pass_that_sends_every_edge_site_its_set_takes_the_same_transactions_and_reads_for_10_or_80_sites(
        tmp_path: pathlib.Path) -> None:
    small, small_versions = _first_pass(tmp_path / "small", 10)
    large, large_versions = _first_pass(tmp_path / "large", 80)
    assert (len(small_versions), len(large_versions)) == (10, 80)  # every site was sent its set in that pass
    assert len(set(large_versions)) == 80  # each set has its own version, as when each was taken alone
    assert _count(large, "BEGIN") == _count(small, "BEGIN")
    assert _count(large, "SELECT") == _count(small, "SELECT")
