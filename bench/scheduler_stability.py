"""Stability: how many running replicas move after a 10 % change in demand.

    .venv/bin/python -m bench.scheduler_stability [--quick]

For each seeded fleet the planner places everything, the placement is taken as running,
every demand point's rate is scaled by a random factor in [0.9, 1.1], and the planner
re-plans from the running placement. A move is a running replica stopped on one site
and started on another (``MoveReplica``); added or removed replicas (the wanted count
follows demand) are reported apart. The baseline, in the same run, is re-planning from
scratch (no running placement, so nothing anchors it), counted the same way.
Target: ≤ 5 % of replicas move. Writes bench/results/scheduler_stability.json.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.scheduler_instances import make_deployments, make_fleet, perturb_demand
from orchestrator.scheduler import MoveReplica, PlaceReplica, RemoveReplica, Replica, plan

RESULTS = Path(__file__).parent / "results" / "scheduler_stability.json"


def placement_churn(before: list[Replica], after: list[Replica]) -> int:
    """Replicas that changed (deployment, site, variant) beyond what scaling explains."""
    old, new = Counter(before), Counter(after)
    removed = sum((old - new).values())
    added = sum((new - old).values())
    return min(removed, added)


def run(seeds: int, n_sites: int, n_deps: int) -> dict:
    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        sites = make_fleet(rng, n_sites)
        deployments = make_deployments(rng, sites, n_deps, replicas_per=6)
        first = plan(sites, deployments)
        running = first.as_running()
        changed = perturb_demand(rng, deployments, 0.10)
        again = plan(sites, changed, running)
        kinds = Counter(type(a).__name__ for a in again.actions)
        scratch = plan(sites, changed)
        scratch_moves = placement_churn(running, scratch.as_running())
        rows.append(
            {
                "seed": seed,
                "replicas": len(running),
                "moved": kinds[MoveReplica.__name__],
                "added": kinds[PlaceReplica.__name__],
                "removed": kinds[RemoveReplica.__name__],
                "moved_fraction": kinds[MoveReplica.__name__] / max(1, len(running)),
                "scratch_moved_fraction": scratch_moves / max(1, len(running)),
            }
        )
    total = sum(r["replicas"] for r in rows)
    return {
        "seeds": seeds,
        "sites": n_sites,
        "deployments": n_deps,
        "replicas": total,
        "moved_fraction": sum(r["moved"] for r in rows) / total,
        "worst_moved_fraction": max(r["moved_fraction"] for r in rows),
        "added_fraction": sum(r["added"] for r in rows) / total,
        "removed_fraction": sum(r["removed"] for r in rows) / total,
        "scratch_moved_fraction": sum(r["scratch_moved_fraction"] * r["replicas"] for r in rows) / total,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 small fleets (CI)")
    args = parser.parse_args()
    report = run(3, 200, 20) if args.quick else run(10, 1_000, 100)
    table = Table(
        title=(
            f"scheduler stability: ±10 % demand, {report['seeds']} fleets of "
            f"{report['sites']:,} sites × {report['deployments']} deployments"
        )
    )
    for col in (
        "replicas",
        "moved (planner)",
        "worst fleet",
        "added",
        "removed",
        "moved (re-plan from scratch)",
        "target",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        f"{report['replicas']:,}",
        f"{report['moved_fraction']:.2%}",
        f"{report['worst_moved_fraction']:.2%}",
        f"{report['added_fraction']:.2%}",
        f"{report['removed_fraction']:.2%}",
        f"{report['scratch_moved_fraction']:.2%}",
        "≤ 5 %",
    )
    Console(width=150).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
