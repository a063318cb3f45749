"""Plan quality: the planner's objective against the exact MILP optimum, same instances.

    .venv/bin/python -m bench.scheduler_quality [--quick] [--instances N]

For each seeded instance (5–50 sites × 2–20 deployments; half of them re-plans from a
running placement with one site lost) both the planner and ``exact.solve`` are scored by
``objective.evaluate``. Reports the median, p95 and worst relative gap and checks every
hard rule on both answers. Re-plans are solved twice: free (the MILP may give up running
replicas of one deployment to start more of another) and with ``keep_seats=True`` (the
planner's rule that it never does); from-scratch instances have no seats, so both are
one solve. Writes bench/results/scheduler_quality.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.scheduler_instances import make_deployments, make_fleet
from orchestrator.testing.placement_rules import violations
from orchestrator.scheduler import Replica, Tuning, exact, plan

RESULTS = Path(__file__).parent / "results" / "scheduler_quality.json"


def make_instance(seed: int):
    rng = np.random.default_rng(seed)
    n_sites = int(rng.integers(5, 51))
    n_deps = int(rng.integers(2, 21))
    sites = make_fleet(rng, n_sites, n_regions=max(2, n_sites // 5))
    # edge sites are small here so that capacity binds in some instances
    deployments = make_deployments(rng, sites, n_deps, replicas_per=float(rng.uniform(1, 5)))
    current: list[Replica] = []
    if seed % 2:  # a re-plan: the previous plan ran, then one site was lost
        before = plan(sites, deployments)
        current = before.as_running()
        if current:
            lost = current[int(rng.integers(len(current)))].site
            sites = [dataclasses.replace(s, healthy=False) if s.name == lost else s for s in sites]
    return sites, deployments, current


def run(instances: int, time_limit_s: float, tuning: Tuning) -> dict:
    rows = []
    for seed in range(instances):
        sites, deployments, current = make_instance(seed)
        t0 = time.perf_counter()
        ours = plan(sites, deployments, current, tuning=tuning)
        t1 = time.perf_counter()
        best = exact.solve(sites, deployments, current, time_limit_s=time_limit_s)
        t2 = time.perf_counter()
        kept = exact.solve(sites, deployments, current, time_limit_s=time_limit_s, keep_seats=True) if current else best
        mine = ours.as_running()
        gap = (ours.objective.total - best.objective.total) / max(1e-9, abs(best.objective.total))
        gap_kept = (ours.objective.total - kept.objective.total) / max(1e-9, abs(kept.objective.total))
        rows.append(
            {
                "seed": seed,
                "sites": len(sites),
                "deployments": len(deployments),
                "replicas": len(mine),
                "planner": ours.objective.total,
                "milp": best.objective.total,
                "milp_optimal": best.optimal and kept.optimal,
                "milp_keep_seats": kept.objective.total,
                "gap": gap,
                "gap_keep_seats": gap_kept,
                "planner_ms": (t1 - t0) * 1e3,
                "milp_ms": (t2 - t1) * 1e3,
                "planner_violations": violations(sites, deployments, mine),
                "milp_violations": violations(sites, deployments, best.replicas),
            }
        )
    gaps = np.array([r["gap"] for r in rows])
    kept = np.array([r["gap_keep_seats"] for r in rows])
    worst = max(rows, key=lambda r: r["gap"])
    return {
        "instances": len(rows),
        "median_gap": float(np.median(gaps)),
        "p95_gap": float(np.percentile(gaps, 95)),
        "max_gap": float(gaps.max()),
        "max_gap_seed": worst["seed"],
        "over_5_pct": int((gaps > 0.05).sum()),
        "over_10_pct": int((gaps > 0.10).sum()),
        "median_gap_keep_seats": float(np.median(kept)),
        "p95_gap_keep_seats": float(np.percentile(kept, 95)),
        "max_gap_keep_seats": float(kept.max()),
        "planner_better_than_milp": int((gaps < -1e-9).sum()),
        "milp_not_proven_optimal": sum(not r["milp_optimal"] for r in rows),
        "planner_violations": sum(len(r["planner_violations"]) for r in rows),
        "milp_violations": sum(len(r["milp_violations"]) for r in rows),
        "planner_ms_median": float(np.median([r["planner_ms"] for r in rows])),
        "milp_ms_median": float(np.median([r["milp_ms"] for r in rows])),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 instances (CI)")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--time-limit", type=float, default=30.0, help="per MILP, seconds")
    parser.add_argument("--no-improve", action="store_true", help="greedy only, no relocation")
    args = parser.parse_args()
    instances = 20 if args.quick else args.instances
    report = run(instances, args.time_limit, Tuning(improve=not args.no_improve))
    table = Table(title=f"scheduler quality: planner vs MILP over {instances} instances")
    for col in (
        "median gap",
        "p95 gap",
        "max gap (seed)",
        "> 5 % / > 10 %",
        "max gap, MILP keeping seats",
        "violations planner/MILP",
        "MILP not proven optimal",
        "planner ms (median)",
        "MILP ms (median)",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        f"{report['median_gap']:.2%}",
        f"{report['p95_gap']:.2%}",
        f"{report['max_gap']:.2%} ({report['max_gap_seed']})",
        f"{report['over_5_pct']} / {report['over_10_pct']}",
        f"{report['max_gap_keep_seats']:.2%}",
        f"{report['planner_violations']}/{report['milp_violations']}",
        str(report["milp_not_proven_optimal"]),
        f"{report['planner_ms_median']:.1f}",
        f"{report['milp_ms_median']:.0f}",
    )
    Console(width=150).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
