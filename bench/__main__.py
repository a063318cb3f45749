"""Run every benchmark, each in its own process: ``python -m bench [--full] [NAME ...]``.

Without ``--full`` each runs with ``--quick`` (minutes in all on 2 cores). Each prints its
own table (with the baseline measured in the same run) and writes bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = (
    "scheduler_scale",
    "scheduler_quality",
    "scheduler_stability",
    "scheduler_repair",
    "agent_idle",
    "oip_codec",
    "json_budget",
    "agent_infer",
    "agent_path",
    "agent_spin",
    "genai_agent",
    "genai_calls",
    "genai_mixed",
    "agent_heartbeats",
    "gateway",
    "gateway_rank",
    "ray_serve_path",
    "cascade",
    "cascade_genai",
    "simulate",
    "manifest_read",
    "control_plane_scale",
    "reconcile_pass",
    "vllm_gpu",
    "distill",
    "failover",
    "replica_lag",
)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--full", action="store_true", help="full-size runs (slower)")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    args = p.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in args.names or BENCHMARKS:
        print(f"\n=== bench.{name}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *([] if args.full else ["--quick"])])
        print(f"=== bench.{name}: exit {code} in {time.monotonic() - started:.0f}s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
