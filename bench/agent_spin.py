"""What onnxruntime's thread policy costs and gives an agent: CPU and latency per request.

    .venv/bin/python -m bench.agent_spin [--quick]

One real ``edgeplane-agent`` per policy serves the wide model of ``bench.agent_infer``
(MLP 1024 -> 1024 x3 -> 16) and is called one request at a time with binary tensors, at
a steady pace (5, 50 and 200 requests a second) and back to back. Policies: the default
(idle intra-op threads sleep when a run ends), ``--spin-after-run-us 250`` (they spin
250 us first) and ``--spin-between-runs`` (onnxruntime's own default: they spin for
milliseconds). For each: the agent process's CPU time per request (all its threads, from
/proc/PID/task/*/schedstat; heartbeats and the event loop included), the answer's p50
latency at the client, and back to back, requests a second against raw ``session.run``
of the same input in this process (the faster of onnxruntime's defaults and the agent's
session options), measured right before. The three agents run side by side and take
turns in short slices of each row, so that they see the same minutes of a shared machine.
The default policy is the baseline: the other rows say what the same traffic costs more
and gains. First, with no agent: the CPU time of a bare ``session.run`` of batch 8, one
every 20 ms, under each policy and a longer spin (what a spin costs after a run that
nothing follows). Writes bench/results/agent_spin.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from bench.agent_common import ControlPlaneAndAgent, write_results
from bench.agent_infer import KeepAlive, infer_request, raw_baseline
from edge_agent.runtime import onnx
from orchestrator.agents import model
from orchestrator.testing import onnx_models

RESULTS = Path(__file__).parent / "results" / "agent_spin.json"
POLICIES = (("sleep after a run (default)", []), ("--spin-after-run-us 250", ["--spin-after-run-us", "250"]),
            ("--spin-between-runs", ["--spin-between-runs"]))
RATES = (5, 50, 200, None)  # requests a second; None: back to back


def cpu_seconds(pid: int) -> float:
    """Time on a CPU of every live thread of ``pid`` so far, to the nanosecond (schedstat;
    /proc/PID/stat counts in ticks of 10 ms, too coarse for a few requests)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
    return total / 1e9


async def paced(conn: KeepAlive, pid: int, rate: float | None, seconds: float) -> tuple[list[float], float, float]:
    """One request at a time at ``rate`` a second (None: back to back) for ``seconds``:
    the latencies, the wall time and the agent's CPU time."""
    latencies: list[float] = []
    gap = 0.0 if rate is None else 1.0 / rate
    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()
    next_at = start
    while time.perf_counter() - start < seconds:
        sent = time.perf_counter()
        await conn.call()
        latencies.append(time.perf_counter() - sent)
        next_at += gap
        if rate is not None and next_at > time.perf_counter():
            await asyncio.sleep(next_at - time.perf_counter())  # the pace is the workload
    return latencies, time.perf_counter() - start, cpu_seconds(pid) - cpu_before


BARE_POLICIES = (("sleep after a run (default)", {}), ("spin 250 us", {"spin_after_run_us": 250}),
                 ("spin 2,000 us", {"spin_after_run_us": 2000}), ("onnxruntime's default", {"spin_between_runs": True}))


def bare_runs(path: Path, runs: int = 50, gap: float = 0.02) -> list[dict]:
    """CPU time per ``session.run`` of batch 8 in this process, one every ``gap`` seconds."""
    x = np.random.default_rng(8).standard_normal((8, 1024)).astype(np.float32)
    rows = []
    for label, policy in BARE_POLICIES:
        session = ort.InferenceSession(path.read_bytes(), onnx.session_options(**policy), providers=["CPUExecutionProvider"])
        for _ in range(20):
            session.run(None, {"input": x})
        time.sleep(0.2)  # the warm-up's spinning ends
        cpu_before, run_s = time.process_time(), 0.0
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, {"input": x})
            run_s += time.perf_counter() - started
            time.sleep(gap)  # a caller that waits between requests
        time.sleep(0.1)  # the last run's spinning, counted
        rows.append({"policy": label, "cpu_ms_per_run": round((time.process_time() - cpu_before) / runs * 1000, 3),
                     "run_ms": round(run_s / runs * 1000, 3)})
    return rows


async def run(batches: tuple[int, ...], seconds: float, rounds: int) -> tuple[list[dict], list[dict]]:
    """Every policy's agent runs at once; each (batch, pace) cell is measured in ``rounds``
    slices per policy, the policies taking turns, so that all see the same minutes."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wide = onnx_models.build_mlp(root / "wide.onnx", in_dim=1024, hidden=1024, out_dim=16, layers=4, softmax=False)
        bare = bare_runs(wide.path)
        rigs = [ControlPlaneAndAgent(root / f"agent-{i}", extra=flags) for i, (_, flags) in enumerate(POLICIES)]
        try:
            for i, rig in enumerate(rigs):
                await rig.start(site=f"bench-site-{i}")
                await rig.assign([model.Assignment("wide", "wide", "cpu", wide.path.as_uri(), wide.sha256)], ["wide"])
            for batch in batches:
                x = np.random.default_rng(batch).standard_normal((batch, 1024)).astype(np.float32)
                conns = [await KeepAlive.open(rig.url, infer_request(rig.url, "wide", x, True)) for rig in rigs]
                try:
                    for conn in conns:
                        for _ in range(20):
                            await conn.call()
                    for rate in RATES:
                        raw = raw_baseline(wide.path, x, seconds / 2) if rate is None else None
                        got: list[tuple[list[float], float, float]] = [([], 0.0, 0.0) for _ in rigs]
                        for r in range(rounds):
                            for i in (range(len(rigs)) if r % 2 == 0 else reversed(range(len(rigs)))):
                                assert rigs[i].proc is not None
                                latencies, wall, cpu = await paced(conns[i], rigs[i].proc.pid, rate, seconds / rounds)
                                done = got[i]
                                got[i] = (done[0] + latencies, done[1] + wall, done[2] + cpu)
                        for (label, _), (latencies, wall, cpu) in zip(POLICIES, got, strict=True):
                            row = {
                                "policy": label, "batch": batch, "rate": "back to back" if rate is None else rate,
                                "requests": len(latencies),
                                "per_s": round(len(latencies) / wall, 1),
                                "p50_ms": round(statistics.median(latencies) * 1000, 3),
                                "cpu_ms_per_request": round(cpu / len(latencies) * 1000, 3),
                                "cpu_cores": round(cpu / wall, 3),
                            }
                            if raw is not None:
                                row["vs_raw"] = round(row["per_s"] / raw["per_s"], 3)
                            rows.append(row)
                finally:
                    for conn in conns:
                        conn.close()
        finally:
            for rig in rigs:
                await rig.stop()
    for row in rows:
        base = next(r for r in rows if r["policy"] == POLICIES[0][0] and r["batch"] == row["batch"] and r["rate"] == row["rate"])
        row["cpu_vs_default"] = round(row["cpu_ms_per_request"] / base["cpu_ms_per_request"], 2)
    return bare, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 24 only, shorter steps (about 40 s)")
    args = parser.parse_args()
    batches, seconds, rounds = ((24,), 3.0, 3) if args.quick else ((8, 24, 64), 8.0, 4)
    bare, rows = asyncio.run(run(batches, seconds, rounds))
    bare_table = Table(title="a bare session.run of batch 8 every 20 ms, CPU per run by thread policy")
    for col in ["policy", "CPU ms / run", "run ms"]:
        bare_table.add_column(col, justify="left" if col == "policy" else "right")
    for r in bare:
        bare_table.add_row(r["policy"], str(r["cpu_ms_per_run"]), str(r["run_ms"]))
    Console(width=140).print(bare_table)
    table = Table(title=f"the agent's CPU and latency per request by thread policy, wide model ({os.cpu_count()} cores)")
    for col in ["policy", "batch", "pace", "req/s", "p50 ms", "CPU ms / req", "x default's CPU", "x raw"]:
        table.add_column(col, justify="left" if col in ("policy", "pace") else "right")
    for r in rows:
        pace = r["rate"] if isinstance(r["rate"], str) else f"{r['rate']}/s"
        table.add_row(r["policy"], str(r["batch"]), pace, f"{r['per_s']:,}", str(r["p50_ms"]), str(r["cpu_ms_per_request"]),
                      f"{r['cpu_vs_default']:.2f}", f"{r['vs_raw']:.2f}" if "vs_raw" in r else "")
    Console(width=140).print(table)
    write_results(RESULTS, "agent_spin", rows, quick=args.quick, seconds_per_row=seconds, slices_per_row=rounds,
                  bare_session_every_20ms=bare)

if __name__ == "__main__":
    main()
