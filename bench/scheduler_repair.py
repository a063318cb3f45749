"""Repair after a site loss: how long it takes and how many replicas move.

    .venv/bin/python -m bench.scheduler_repair [--quick] [--sites N] [--deployments N]

A fleet (10,000 sites × 1,000 deployments by default) is planned from scratch and taken
as running; then the site running the most replicas is marked unhealthy and the fleet is
re-planned from the running placement, two ways, in the same run:

  full re-plan   ``plan(sites, deployments, running)``: every deployment planned again,
                 running replicas keeping their seats (what the reconciler calls)
  repair only    the deployments that had a replica on the lost site re-planned against
                 the capacity the others leave (``simulation.sweep.Sweeper.lose``, the
                 path the N-1 sweep takes per site)
  standing       ``Standing.repair(sites)`` on the plan in force (``scheduler.standing``):
                 every replica not on the lost site kept as it is, only the lost ones
                 placed again (the reconciler's path when only capacity changed); built
                 once per full plan (its build time is reported apart), then each run
                 loses the site and gets it back ("site back" row: nothing moves)

For each: the time (best of a few runs, wall and process CPU), the replicas lost, the
replicas moved (``MoveReplica`` actions) and any other change. Target: ≤ 50 ms and moved
= lost. Writes bench/results/scheduler_repair.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.scheduler_instances import make_deployments, make_fleet
from orchestrator.scheduler import MoveReplica, plan
from orchestrator.scheduler.standing import Standing
from orchestrator.simulation import sweep, whatif

RESULTS = Path(__file__).parent / "results" / "scheduler_repair.json"
TARGET_MS = 50.0


def _timed(fn, repeats: int):  # noqa: ANN001, ANN202
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    return out, min(walls) * 1e3, min(cpus) * 1e3


def run(n_sites: int, n_deps: int, repeats: int) -> dict:
    rng = np.random.default_rng(n_sites)
    sites = make_fleet(rng, n_sites)
    deployments = make_deployments(rng, sites, n_deps, replicas_per=20)
    running = plan(sites, deployments).as_running()
    busiest, lost = Counter(r.site for r in running).most_common(1)[0]
    after = [dataclasses.replace(s, healthy=False) if s.name == busiest else s for s in sites]

    full, full_wall, full_cpu = _timed(lambda: plan(after, deployments, running), repeats)
    before, now = Counter(running), Counter(full.as_running())
    full_row = {
        "path": "full re-plan",
        "wall_ms": full_wall,
        "cpu_ms": full_cpu,
        "moved": sum(isinstance(a, MoveReplica) for a in full.actions),
        "other_changes": len(full.actions) - sum(isinstance(a, MoveReplica) for a in full.actions),
        "replicas_changed": sum((before - now).values()),
    }
    sweeper = sweep.Sweeper(whatif.State(sites=tuple(sites), deployments=tuple(deployments), current=tuple(running)))
    index = [i for i, s in enumerate(sites) if s.name == busiest]
    impact, wall, cpu = _timed(lambda: sweeper.lose(busiest, index), repeats)
    repair_row = {
        "path": "repair only",
        "wall_ms": wall,
        "cpu_ms": cpu,
        "moved": impact.moved,
        "other_changes": impact.unschedulable,
        "replicas_changed": None,
    }
    losses, backs, builds = [], [], []
    for _ in range(repeats):  # a fresh standing plan each time: a repair changes it
        standing, build_wall, build_cpu = _timed(lambda: Standing(sites, deployments, running), 1)
        builds.append((build_wall, build_cpu))
        losses.append(_timed(lambda s=standing: s.repair(after), 1))
        backs.append(_timed(lambda s=standing: s.repair(sites), 1))
    kept, kept_wall, kept_cpu = losses[-1][0], min(x[1] for x in losses), min(x[2] for x in losses)
    kept_moves = sum(isinstance(a, MoveReplica) for a in kept.actions)
    back, back_wall, back_cpu = backs[-1][0], min(x[1] for x in backs), min(x[2] for x in backs)
    standing_rows = [
        {
            "path": "standing repair",
            "wall_ms": kept_wall,
            "cpu_ms": kept_cpu,
            "moved": kept_moves,
            "other_changes": len(kept.actions) - kept_moves,
            "replicas_changed": sum((before - Counter(kept.as_running())).values()),
            "build_wall_ms": min(b[0] for b in builds),
            "build_cpu_ms": min(b[1] for b in builds),
        },
        {
            "path": "standing, site back",
            "wall_ms": back_wall,
            "cpu_ms": back_cpu,
            "moved": sum(isinstance(a, MoveReplica) for a in back.actions),
            "other_changes": len(back.actions) - sum(isinstance(a, MoveReplica) for a in back.actions),
            "replicas_changed": sum((Counter(kept.as_running()) - Counter(back.as_running())).values()),
        },
    ]
    return {
        "sites": n_sites,
        "deployments": n_deps,
        "replicas": len(running),
        "lost_site": busiest,
        "replicas_lost": lost,
        "target_ms": TARGET_MS,
        "rows": [full_row, repair_row, *standing_rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 sites × 100 deployments")
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--deployments", type=int, default=1_000)
    args = parser.parse_args()
    n_sites, n_deps = (1_000, 100) if args.quick else (args.sites, args.deployments)
    report = run(n_sites, n_deps, repeats=3)
    table = Table(
        title=(
            f"scheduler repair: lose the busiest site ({report['replicas_lost']} replicas) of "
            f"{n_sites:,} sites × {n_deps:,} deployments ({report['replicas']:,} replicas; "
            f"{os.cpu_count()} CPUs; best of 3; standing plan built in "
            f"{report['rows'][2]['build_cpu_ms']:.0f} ms CPU)"
        )
    )
    for col in ("path", "wall ms", "CPU ms", "target ms", "replicas lost", "moved", "other actions / short"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for row in report["rows"]:
        table.add_row(
            row["path"],
            f"{row['wall_ms']:.1f}",
            f"{row['cpu_ms']:.1f}",
            f"{TARGET_MS:.0f}",
            str(report["replicas_lost"]),
            str(row["moved"]),
            str(row["other_changes"]),
        )
    Console(width=150).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
