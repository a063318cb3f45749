"""What the control plane's per-fleet paths cost at 5,000 edge sites, each against the
per-object path it replaced, same store, same process, taking turns.

    .venv/bin/python -m bench.control_plane_scale [--quick] [--sites N]

On the SQLite store and, when a PostgreSQL server can be started here
(``orchestrator.testing.postgres``), on a fresh database on loopback:

- **assignment versions** of a pass that sends every site its set: one block
  (``next_sequences``) against one transaction per site (``next_sequence`` each);
- **statuses** of a pass over every Site when none changed: ``set_statuses`` reading the
  current ones 500 a statement against one SELECT per object (the code before, kept here);

and in memory: the **endpoint table** with 20 cascades (bytes of the document with the
fleet's energy once, against each route carrying its own copy), the **bundle delete
check** of 200 Models over 500 deployments (one read of the deployments against one per
Model) and the **plan preview's rows** of 1,000 deployments placed on 20 sites each (what
one replica takes of GPUs, each row's deployment looked up by name against a scan; the
whole preview also schedules the fleet, seconds at this size). Wall ms, best and median of the rounds.
Writes bench/results/control_plane_scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator import catalog, views
from orchestrator.gateway import cascade_rules, endpoints, wire
from orchestrator.manifests import loader
from orchestrator.reconciler import snapshot as snap
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests
from orchestrator.testing import postgres as postgres_server

RESULTS = Path(__file__).parent / "results" / "control_plane_scale.json"


def per_object_statuses(store: Any, statuses: Sequence[tuple[str, str, Mapping[str, Any]]]) -> int:
    """``set_statuses`` as it was: each object's current status read with its own SELECT."""
    encoded = {(kind, name): json.dumps(status, sort_keys=True, separators=(",", ":")) for kind, name, status in statuses}
    with store._tx() as db:
        current = {}
        for key in encoded:
            row = store._one(db, "SELECT status FROM objects WHERE kind = ? AND name = ?", key)
            if row is not None:
                current[key] = row["status"]
        changed = [(value, kind, name) for (kind, name), value in encoded.items() if (kind, name) in current and current[kind, name] != value]
        if changed:
            store._many(db, store._q("UPDATE objects SET status = ? WHERE kind = ? AND name = ?"), changed)
    return len(current)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def take_turns(paths: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    taken: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            taken[name].append(timed(paths[name]))
    return taken


def store_rows(location: str, backend: str, sites: int, rounds: int) -> list[dict[str, Any]]:
    store = open_store(location)
    try:
        names = [f"edge-{i}" for i in range(sites)]
        store.apply([store_mod.ObjectWrite("Site", n, {}, {"tier": "edge"}) for n in names])
        statuses = [("Site", n, {"health": "Healthy", "capacitySource": "measured"}) for n in names]
        store.set_statuses(statuses)
        taken = take_turns({
            "versions: one block (next_sequences)": lambda: store.next_sequences("bench", sites),
            "versions: one transaction per site (before)": lambda: [store.next_sequence("bench") for _ in names],
            "statuses, none changed: 500 a statement": lambda: store.set_statuses(statuses),
            "statuses, none changed: one SELECT each (before)": lambda: per_object_statuses(store, statuses),
        }, rounds)
    finally:
        store.close()
    return [{"backend": backend, "path": name, "best_ms": round(min(t), 1), "median_ms": round(statistics.median(t), 1)}
            for name, t in taken.items()]


def table_bytes(sites: int, cascades: int) -> dict[str, int]:
    energy = {f"edge-{i}": cascade_rules.SiteEnergy(50.0 + i % 300, 1.1) for i in range(sites)}
    stages = (cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.TensorRule("p", False, "top1", 0.8)),
              cascade_rules.StageRoute("large", frozenset({"datacenter"}), None))
    routes = {}
    for c in range(cascades):
        route = cascade_rules.CascadeRoute(f"m{c}", f"d{c}", stages, energy)
        routes[f"m{c}"] = routes[f"d{c}"] = route
    table = endpoints.EndpointTable()
    table.set_cascades(routes)
    now = wire.contents_to_json(wire.contents_of(table))
    before = dict(now)  # each route with its own copy, as the release before wrote it
    before["cascades"] = {name: {**route, "energy": now["energy"]} for name, route in now["cascades"].items()}
    del before["energy"]
    return {"fleet energy once": len(json.dumps(now)), "each route its own copy (before)": len(json.dumps(before))}


@contextlib.contextmanager
def catalog_store(models: int, deployments: int) -> Iterator[store_mod.Store]:
    with tempfile.TemporaryDirectory() as work:
        store = store_mod.Store(Path(work) / "state.db")
        try:
            docs = [manifests.doc("Model", f"m{i:03d}", {"variants": [{"name": "v", "runtime": "onnx",
                                                                        "artifact": {"uri": "v.onnx", "sha256": "0" * 64}}]})
                    for i in range(models)]
            docs += [manifests.doc("ModelDeployment", f"d{i:03d}", {"model": f"m{i % models:03d}"}) for i in range(deployments)]
            catalog.apply_documents(store, loader.load_text(manifests.bundle(*docs)), actor="bench")
            yield store
        finally:
            store.close()


def users_per_model(store: store_mod.Store, models: list[str]) -> None:
    """The delete check as it was: every deployment listed and decoded once per Model."""
    for m in models:
        sorted(o.name for o in store.list("ModelDeployment") if o.spec.get("model") == m)


def preview_snapshot(deployments: int, sites: int) -> snap.Snapshot:
    texts = [
        *(manifests.edge_site(f"edge-{i}", "FR", 48.0 + i / 100, 2.0) for i in range(sites)),
        manifests.doc("Model", "m", {"variants": [{"name": "v", "runtime": "onnx", "artifact": {"uri": "v.onnx", "sha256": "0" * 64},
                                                   "resources": {"cpu": 0.01, "memoryMiB": 1}}]}),
        *(manifests.doc("ModelDeployment", f"d{i:04d}", {"model": "m", "replicas": {"min": sites, "max": sites}})
          for i in range(deployments))]
    docs = [d for start in range(0, len(texts), 500) for d in loader.load_text(manifests.bundle(*texts[start:start + 500]))]
    return snap.Snapshot(
        tuple(snap.SiteRecord(d.name, {}, d.doc.spec) for d in docs if d.kind == "Site"),
        {d.name: d.doc.spec for d in docs if d.kind == "Model"},
        tuple(snap.DeploymentRecord(d.name, 1, d.doc.spec) for d in docs if d.kind == "ModelDeployment"),
        tuple(store_mod.PlacementRow(f"d{i:04d}", f"edge-{s}", "v", 1) for i in range(deployments) for s in range(sites)),
        (), {}, {}, {}, {})


@contextlib.contextmanager
def scanning_preview() -> Iterator[None]:
    """``views._replica_gpus`` as it was: each row's deployment found by a scan of them all."""
    lookup = views._replica_gpus

    def scan(s: snap.Snapshot, deployment: str, variant: str) -> dict[str, Any]:
        next((d for d in s.deployments if d.name == deployment), None)
        return lookup(s, deployment, variant)

    views._replica_gpus = scan  # type: ignore[assignment]
    try:
        yield
    finally:
        views._replica_gpus = lookup  # type: ignore[assignment]


def print_table(title: str, rows: list[dict[str, Any]], unit: str = "ms") -> None:
    table = Table(title=title)
    for col in ("where", "path", f"best {unit}", f"median {unit}"):
        table.add_column(col, justify="left" if col in ("where", "path") else "right")
    for row in rows:
        table.add_row(row["backend"], row["path"], f"{row['best_ms']:.1f}", f"{row['median_ms']:.1f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 sites, 3 rounds")
    parser.add_argument("--sites", type=int, help="fleet size [5,000; 1,000 with --quick]")
    args = parser.parse_args()
    sites = args.sites or (1_000 if args.quick else 5_000)
    rounds = 3 if args.quick else 5
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        rows += store_rows(str(Path(work) / "state.db"), "SQLite", sites, rounds)
    with postgres_server.running() as server:
        postgres = server if isinstance(server, str) else "loopback"
        if not isinstance(server, str):
            rows += store_rows(server.create_database(), "PostgreSQL", sites, rounds)
    with catalog_store(200, 500) as store:
        model_names = [f"m{i:03d}" for i in range(200)]
        for name, t in take_turns({"delete check, 200 Models: deployments read once": lambda: catalog._users(store),
                                   "delete check, 200 Models: read once per Model (before)": lambda: users_per_model(store, model_names)},
                                  rounds).items():
            rows.append({"backend": "SQLite", "path": name, "best_ms": round(min(t), 1), "median_ms": round(statistics.median(t), 1)})
    current = preview_snapshot(1_000 if not args.quick else 200, 20)

    def each_row() -> None:
        for row in current.placements:
            views._replica_gpus(current, row.deployment, row.variant)

    def scanned() -> None:
        with scanning_preview():
            each_row()

    for name, t in take_turns({"plan preview's rows: deployment by name": each_row,
                               "plan preview's rows: scan per row (before)": scanned}, rounds).items():
        rows.append({"backend": "memory", "path": name, "best_ms": round(min(t), 1), "median_ms": round(statistics.median(t), 1)})
    print_table(f"control plane at {sites:,} edge sites ({os.cpu_count()} cores, wall ms, {rounds} rounds taking turns; "
                f"PostgreSQL: {postgres})", rows)
    sizes = table_bytes(sites, 20)
    Console().print(f"endpoint table with 20 cascades on {sites:,} sites: {sizes['fleet energy once'] / 1e6:.3f} MB with the fleet's "
                    f"energy once, {sizes['each route its own copy (before)'] / 1e6:.2f} MB with each route's own copy (before)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "control_plane_scale", "quick": args.quick, "cpu_count": os.cpu_count(),
                                   "load_avg_1m": os.getloadavg()[0], "sites": sites, "rounds": rounds, "postgres": postgres,
                                   "rows": rows, "table_bytes_20_cascades": sizes}, indent=2))


if __name__ == "__main__":
    main()
