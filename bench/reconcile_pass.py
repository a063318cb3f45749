"""What a reconcile pass over a large fleet costs the control plane's event loop.

    .venv/bin/python -m bench.reconcile_pass [--quick] [--sites N ...] [--rounds R]

A reconciler (SQLite store, in this process) with N edge Sites, each with its agent joined
to a real agent hub and serving what the first pass sent it, 20 Models and 20
deployments spread over the edge tier (N replicas in all). Then, each round, a pass after
an apply (one deployment's replicas changed: the scheduler plans in full) and a pass with
nothing changed (as the resync and agents' news start them: the plan in force is kept).
Measured for each: the pass's wall time, and the longest the event loop went without
running a task meanwhile (a ticker wakes every 5 ms, as 1,000 agents' heartbeats every 5 s
would): what an agent's heartbeat, a gateway request or an API call on the same process
waits at worst; and the time spent in the garbage collector's full collections meanwhile
(one that a pass's allocations start holds every thread, the loop's too, whichever thread
started it). A full collection comes before each pass, so that each starts from the same
state of the collector.

Taking turns in the same run, each on its own store with the same fleet: the reconciler as
it is (the pure planning in a worker thread; each stored object decoded and validated once
per write of it, ``reconciler.desired``) against the code before: every stored object
decoded and validated at every pass (``ParsingEveryObject``, kept here), and that with the
planning on the event loop too (``OnTheLoop``). The pass's read of the desired state (in a
store thread) is timed apart. Writes bench/results/reconcile_pass.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import logging
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator import catalog
from orchestrator import maintenance as maintenance_mod
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.manifests import loader
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import desired, loop, planning
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import standing as standing_mod
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import manifests

RESULTS = Path(__file__).parent / "results" / "reconcile_pass.json"
MODELS = 20
TICK_S = 0.005


class ParsingEveryObject(desired.DesiredReader):
    """The code before: every stored object (of every kind, status too) decoded, and each a
    pass reads validated, at every read."""

    def read(self, store: store_mod.Store) -> snap.Desired:
        stored: dict[str, list[store_mod.StoredObject]] = {"Site": [], "Model": [], "ModelDeployment": []}
        for o in store.list():
            stored.setdefault(o.kind, []).append(o)
        parsers = {"Site": catalog.parse_site, "Model": catalog.parse_model, "ModelDeployment": catalog.parse_deployment}
        read = {kind: catalog.read_each(stored[kind], parse) for kind, parse in parsers.items()}
        by_name = {(o.kind, o.name): o for objs in stored.values() for o in objs}
        maintenance, bad_maintenance = maintenance_mod.read_each(stored.get(maintenance_mod.KIND, ()))
        unreadable = {(kind, name): why for kind, (_, bad) in read.items() for name, why in bad.items()}
        unreadable.update(((maintenance_mod.KIND, name), why) for name, why in bad_maintenance.items())
        return snap.Desired(
            tuple(snap.SiteRecord(n, dict((o := by_name["Site", n]).labels), spec, o.created_at) for n, spec in read["Site"][0].items()),
            read["Model"][0],
            tuple(snap.DeploymentRecord(n, (o := by_name["ModelDeployment", n]).generation, spec, store_mod.capture_since(o), o.created_at)
                  for n, spec in read["ModelDeployment"][0].items()),
            unreadable, maintenance)


class Timed(loop.Reconciler):
    """The reconciler as it is, timing each read of the desired state (in the store's thread)."""

    read_s: float = 0.0

    def read_desired(self) -> snap.Desired:
        started = time.perf_counter()
        try:
            return super().read_desired()
        finally:
            self.read_s = time.perf_counter() - started


class OnTheLoop(Timed):
    """The code before: the pass planned on the event loop."""

    async def _plan(self, snapshot: snap.Snapshot, standing: standing_mod.Standing | None) -> planning.PassPlan:
        return self.planner(snapshot, standing)


#: The paths taking turns: the reconciler's class, and how it reads the desired state.
PATHS: dict[str, tuple[type[Timed], Callable[[], desired.DesiredReader]]] = {
    "now": (Timed, desired.DesiredReader),
    "parsing": (Timed, ParsingEveryObject),
    "loop": (OnTheLoop, ParsingEveryObject),
}
LABELS = {
    "now": "as it is: planned in a thread, parsed once a write",
    "parsing": "every object parsed each pass (before)",
    "loop": "and planned on the loop (before both)",
}


def declare(store: store_mod.Store, root: pathlib.Path, sites: int) -> None:
    docs = [manifests.edge_site(f"edge-{i}", "FR", 43.0 + (i % 100) / 20, -1.0 + (i // 100) / 20, region="fr") for i in range(sites)]
    for m in range(MODELS):
        (root / f"m{m}.onnx").write_bytes(f"m{m}".encode())
        docs.append(manifests.onnx_model(f"m{m}", f"m{m}.onnx", hashlib.sha256(f"m{m}".encode()).hexdigest()))
        docs.append(manifests.deployment(f"d{m}", f"m{m}", sites // MODELS, manifests.spread_by_site(tiers=["edge"])))
    for start in range(0, len(docs), 500):  # a file holds at most 1,000 documents
        catalog.apply_documents(store, loader.load_text(manifests.bundle(*docs[start:start + 500])), actor="bench")


def fleet(store: store_mod.Store, root: pathlib.Path, sites: int, path: str) -> tuple[Timed, dict[str, str]]:
    hub = hub_mod.AgentHub(agent_auth.InMemoryJoinAuthenticator(["tok"]), heartbeat_interval=3600.0)
    ids = {f"edge-{i}": hub.join(agent_model.JoinApplication(
        f"edge-{i}", "tok", None, "", f"http://10.0.{i // 250}.{i % 250}:8081", agent_model.Location(), {}, "bench", 3600.0,
        agent_model.Capacity(cpu_cores=4, memory_total_bytes=8 << 30))).agent_id for i in range(sites)}
    kind, reader = PATHS[path]
    reconciler = kind(store, hub, dc_mod.DataCentres(dc_mod.LocalRay()), artifacts_mod.ArtifactCatalog((root,), "http://cp"),
                      endpoints_mod.EndpointTable(), resync_s=3600.0, desired_reader=reader())
    return reconciler, ids


def serve_what_was_sent(reconciler: loop.Reconciler, ids: dict[str, str]) -> None:
    """Each agent's heartbeat: it serves what it was sent."""
    for site, agent_id in ids.items():
        sent = reconciler.hub.assignments(site)
        models = tuple(agent_model.ModelState(a.model, a.sha256, agent_model.ModelPhase.READY, serving_sha256=a.sha256,
                                              deployment=a.deployment, variant=a.variant) for a in (sent.assignments if sent else ()))
        reconciler.hub.record_heartbeat(site, agent_id, agent_model.Heartbeat(
            seq=1, sent_unix_ms=0, inflight=0, cpu_percent=1.0, memory_available_bytes=4 << 30,
            assignment_version=sent.version if sent else 0, draining=False, capacity=None, models=models, gpu_free_bytes=()))


class FullCollections:
    """The time the garbage collector spends in full collections (of the oldest generation):
    whichever thread's allocation starts one, it holds every thread, the event loop's too."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._began = 0.0
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                self._began = time.perf_counter()
            else:
                self.spent += time.perf_counter() - self._began


COLLECTIONS = FullCollections()


async def timed_pass(reconciler: Timed) -> tuple[float, float, float, float]:
    """One pass: its wall time, its read of the desired state, the event loop's longest stall
    and the full collections meanwhile (s)."""
    done = asyncio.Event()
    longest = 0.0
    collected = COLLECTIONS.spent

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            longest, last = max(longest, now - last - TICK_S), now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker runs first
    started = time.perf_counter()
    await reconciler.reconcile_once()
    took = time.perf_counter() - started
    done.set()
    await ticking
    collected = COLLECTIONS.spent - collected
    await reconciler.publishes_done()  # the table's write, beside the pass: not in the next one's time
    return took, reconciler.read_s, longest, collected


def change(store: store_mod.Store, sites: int, round_: int) -> None:
    """An apply between passes (deployment d0 one replica up, then down again): the pass plans in full."""
    replicas = sites // MODELS + round_ % 2
    catalog.apply_documents(store, loader.load_text(manifests.deployment("d0", "m0", replicas, manifests.spread_by_site(tiers=["edge"]))),
                            actor="bench")


async def measure(root: pathlib.Path, sites: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Each path on a store of its own, the same fleet declared in each; the paths take turns."""
    stores: dict[str, store_mod.Store] = {}
    paths: dict[str, Timed] = {}
    try:
        for name in PATHS:
            (root / name).mkdir()
            stores[name] = store = store_mod.Store(root / name / "state.db")
            declare(store, root / name, sites)
            reconciler, ids = fleet(store, root / name, sites, name)
            await reconciler.reconcile_once()
            serve_what_was_sent(reconciler, ids)
            await reconciler.reconcile_once()
            await reconciler.publishes_done()
            paths[name] = reconciler
        got: dict[str, dict[str, list[float]]] = {
            name: {f"{when}{what}": [] for when in ("full", "same") for what in ("", "_read", "_stall", "_gc")} for name in paths}
        for i in range(rounds):
            for name, reconciler in paths.items():
                change(stores[name], sites, i)
                for when in ("full", "same"):  # after the apply, then with nothing changed
                    gc.collect()  # each pass starts from the same state of the collector, whichever path ran before
                    for what, value in zip(("", "_read", "_stall", "_gc"), await timed_pass(reconciler)):
                        got[name][f"{when}{what}"].append(value)
        return {name: {**runs, **{f"{key}_median_s": statistics.median(values) for key, values in runs.items()},
                       **{f"{key}_max_s": max(values) for key, values in runs.items() if key.endswith("stall")}}
                for name, runs in got.items()}
    finally:
        for store in stores.values():
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 Sites, 3 rounds")
    parser.add_argument("--sites", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sizes, rounds = ([1000], 3) if args.quick else (args.sites, args.rounds)
    logging.basicConfig(level=logging.ERROR)
    results = {}
    for sites in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            results[sites] = asyncio.run(measure(Path(tmp), sites, rounds))
    table = Table(title=f"A reconcile pass, {MODELS} deployments, one agent per Site (SQLite, {rounds} rounds, median; stall: median / max)")
    for column in ("Sites", "path", *(f"{when}: {what}" for when in ("after an apply", "nothing changed")
                                      for what in ("pass ms", "read ms", "loop's longest stall ms", "full GC ms"))):
        table.add_column(column)
    for sites, paths in results.items():
        for name, label in LABELS.items():
            row = paths[name]
            table.add_row(str(sites), label, *(cell for when in ("full", "same") for cell in (
                f"{row[f'{when}_median_s'] * 1000:.0f}",
                f"{row[f'{when}_read_median_s'] * 1000:.0f}",
                f"{row[f'{when}_stall_median_s'] * 1000:.0f} / {row[f'{when}_stall_max_s'] * 1000:.0f}",
                f"{row[f'{when}_gc_median_s'] * 1000:.0f}")))
    Console(width=200).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rounds": rounds, "models": MODELS, "by_sites": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
