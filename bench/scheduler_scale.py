"""Planning time against fleet size: 100, 1,000 and 10,000 sites, deployments at 10 %.

    .venv/bin/python -m bench.scheduler_scale [--quick] [--baseline-10k] [--huge] [--cordoned] [--power-budget F]

Each size plans ~20 replicas per deployment from scratch (10,000 sites × 1,000 deployments
≥ 20,000 replicas). The baseline, measured in the same run, is the same planner without
the spatial index / shortlist (``Tuning(candidates=None)``: every feasible site is a
candidate at every step), which shows what the index buys and that it costs no quality.
Times are the best of a few runs, wall clock and process CPU (the CPU figure is less
disturbed by other work on a shared machine). ``--huge`` adds 100,000 sites × 10,000
deployments (≥ 200,000 replicas, one run, no baseline) and reports the process's peak
memory before and after planning it (``ru_maxrss``; the instance itself is built first).
``--only-huge`` runs that size alone and writes scheduler_scale_100k.json instead.
``--cordoned`` plans each size with one site cordoned (``Site.admits``: the replicas a plan
from scratch put there), which sends every deployment through the cordon's checks.
``--power-budget F`` gives every site a power budget of F × what its hardware would draw
busy (the scheduler's per-CPU, per-GiB and per-GPU estimates × PUE), so that the budget, not
the hardware, binds on a site that fills up (F < 1).
Writes bench/results/scheduler_scale.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.scheduler_instances import make_deployments, make_fleet
from orchestrator.scheduler import Site, Tuning, plan
from orchestrator.scheduler.model import WATTS_PER_CPU, WATTS_PER_GPU, WATTS_PER_GPU_MEMORY_GIB, WATTS_PER_MEMORY_GIB

RESULTS = Path(__file__).parent / "results" / "scheduler_scale.json"
RESULTS_HUGE = Path(__file__).parent / "results" / "scheduler_scale_100k.json"  # --only-huge
TARGETS_MS = {1_000: 100.0, 10_000: 1_000.0, 100_000: 10_000.0}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(sites, deployments, tuning: Tuning, repeats: int) -> dict:
    walls, cpus = [], []
    result = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = plan(sites, deployments, tuning=tuning)
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    assert result is not None
    return {
        "wall_ms": min(walls) * 1e3,
        "cpu_ms": min(cpus) * 1e3,
        "replicas": len(result.replicas),
        "objective": result.objective.total,
        "scheduled": sum(d.status == "Scheduled" for d in result.deployments.values()),
    }


def _busy_watts(site: Site) -> float:
    """What ``site`` would draw with every CPU, GiB and GPU reserved (facility watts)."""
    gpus = sum(g.count * (WATTS_PER_GPU + g.memory_gib * WATTS_PER_GPU_MEMORY_GIB) for g in site.gpus)
    return (site.cpu * WATTS_PER_CPU + site.memory_gib * WATTS_PER_MEMORY_GIB + gpus) * site.pue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 sites only")
    parser.add_argument(
        "--baseline-10k",
        action="store_true",
        help="also run the full-scan baseline at 10,000 sites (slow)",
    )
    parser.add_argument("--huge", action="store_true", help="also 100,000 sites × 10,000 deployments (~2 min)")
    parser.add_argument("--only-huge", action="store_true", help="100,000 × 10,000 alone")
    parser.add_argument("--cordoned", action="store_true", help="one site cordoned, holding what a first plan put there")
    parser.add_argument("--power-budget", type=float, metavar="F", help="every site a power budget of F × its hardware's busy draw")
    args = parser.parse_args()
    sizes = [100, 1_000] if args.quick else [100, 1_000, 10_000]
    if args.only_huge:
        sizes = []
    if args.huge or args.only_huge:
        sizes.append(100_000)
    rows = []
    for n_sites in sizes:
        rng = np.random.default_rng(n_sites)
        sites = make_fleet(rng, n_sites)
        deployments = make_deployments(rng, sites, n_sites // 10, replicas_per=20)
        if args.power_budget is not None:
            sites = [dataclasses.replace(s, power_budget_watts=args.power_budget * _busy_watts(s)) for s in sites]
        if args.cordoned:
            held = Counter((r.deployment, r.variant) for r in plan(sites, deployments).replicas if r.site == sites[0].name)
            sites = [dataclasses.replace(sites[0], admits=held), *sites[1:]]
        repeats = 5 if n_sites <= 1_000 else 3 if n_sites <= 10_000 else 1
        peak_before = _peak_mib()
        ours = measure(sites, deployments, Tuning(), repeats)
        ours["peak_rss_mib_before"] = peak_before
        ours["peak_rss_mib_after"] = _peak_mib()
        base = None
        if n_sites < 10_000 or (n_sites == 10_000 and args.baseline_10k):
            base = measure(sites, deployments, Tuning(candidates=None), 1 if n_sites >= 10_000 else 3)
        rows.append(
            {
                "sites": n_sites,
                "deployments": len(deployments),
                "planner": ours,
                "full_scan": base,
                "target_ms": TARGETS_MS.get(n_sites),
                "cordoned": args.cordoned,
                "power_budget": args.power_budget,
            }
        )
    table = Table(title=f"scheduler scale ({os.cpu_count()} CPUs; best of runs)")
    for col in (
        "sites × deployments",
        "replicas",
        "planner wall ms",
        "planner CPU ms",
        "target ms",
        "full scan wall ms",
        "speed-up",
        "objective planner / full scan",
        "peak RSS MiB before → after",
    ):
        table.add_column(col, justify="right")
    for row in rows:
        ours, base = row["planner"], row["full_scan"]
        table.add_row(
            f"{row['sites']:,} × {row['deployments']:,}",
            f"{ours['replicas']:,}",
            f"{ours['wall_ms']:.0f}",
            f"{ours['cpu_ms']:.0f}",
            f"{row['target_ms']:.0f}" if row["target_ms"] else "–",
            f"{base['wall_ms']:.0f}" if base else "–",
            f"{base['wall_ms'] / ours['wall_ms']:.1f}×" if base else "–",
            f"{ours['objective']:.0f} / {base['objective']:.0f}" if base else "–",
            f"{ours['peak_rss_mib_before']:,.0f} → {ours['peak_rss_mib_after']:,.0f}",
        )
    Console(width=150).print(table)
    if len(rows) >= 2:
        growth = [
            f"{a['sites']:,}→{b['sites']:,}: sites ×{b['sites'] / a['sites']:.0f}, "
            f"time ×{b['planner']['cpu_ms'] / a['planner']['cpu_ms']:.1f}"
            for a, b in itertools.pairwise(rows)
        ]
        Console(width=150).print("growth (CPU time): " + "; ".join(growth))
    out = RESULTS_HUGE if args.only_huge else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
