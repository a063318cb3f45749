"""What the one-deployment-per-model rule on edge sites costs the planner.

    .venv/bin/python -m bench.scheduler_shared_models [--sites N]

The fleet of ``bench.scheduler_scale`` (10,000 sites × 1,000 deployments of ~20 replicas
by default), planned with every deployment of its own model (the baseline: the rule then
never binds), then with the same deployments spread over 100 and over 10 models (10 and
100 deployments a model), where each deployment must stay off the edge sites of the
others. Per row: a plan from scratch, a re-plan from that placement, building the standing
plan from it (best of three, wall clock), replicas placed, and the hard-rule breaches
``placement_rules.violations`` finds (always 0). Writes
bench/results/scheduler_shared_models.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.scheduler_instances import make_deployments, make_fleet
from orchestrator.scheduler import plan
from orchestrator.scheduler.standing import Standing
from orchestrator.testing.placement_rules import violations

RESULTS = Path(__file__).parent / "results" / "scheduler_shared_models.json"


def _best_ms(run: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10_000)
    args = parser.parse_args()
    rng = np.random.default_rng(args.sites)
    sites = make_fleet(rng, args.sites)
    base = make_deployments(rng, sites, args.sites // 10, replicas_per=20)
    rows = []
    for models in (None, 100, 10):
        deployments = base if models is None else [dataclasses.replace(d, model=f"model-{i % models}")
                                                   for i, d in enumerate(base)]
        first = plan(sites, deployments)
        running = first.as_running()
        rows.append({
            "models": models or len(deployments),
            "deployments": len(deployments),
            "replicas": len(running),
            "plan_ms": _best_ms(lambda d=deployments: plan(sites, d)),  # each timed here, in this turn of the loop
            "replan_ms": _best_ms(lambda d=deployments, r=running: plan(sites, d, r)),
            "standing_ms": _best_ms(lambda d=deployments, r=running: Standing(sites, d, r)),
            "violations": len(violations(sites, deployments, running)),
        })
    table = Table(title=f"one deployment per model per edge site: {args.sites:,} sites ({os.cpu_count()} CPUs; best of 3)")
    for col in ("models", "deployments a model", "replicas", "plan ms", "re-plan ms", "standing ms", "violations"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(f"{row['models']:,}", f"{row['deployments'] // row['models']}", f"{row['replicas']:,}",
                      f"{row['plan_ms']:.0f}", f"{row['replan_ms']:.0f}", f"{row['standing_ms']:.0f}", str(row["violations"]))
    Console(width=150).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpus": os.cpu_count(), "sites": args.sites, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
