"""Idle cost of a real ``edgeplane-agent``: resident memory and CPU at the default heartbeat.

    .venv/bin/python -m bench.agent_idle [--quick]

The agent is a subprocess holding one small model, heartbeating every 5 s (the default),
with no inference traffic, measured twice: joined to a bare agent hub in this process
(plaintext gRPC, the model copied from a file:// URL: the least an agent loads), and
joined to a whole control plane in this process the way a site runs it (enrolled with a
bootstrap token, mutual TLS, the model downloaded over HTTP). Baseline in the same run: a
bare Python process that imports the same libraries (numpy, onnxruntime, grpc, httptools)
and sleeps, i.e. what any Python agent costs before doing anything; like the agent, with
onnxruntime's telemetry off (``bench`` sets ``ORT_DISABLE_TELEMETRY``; runs before 6
December 07:10 had it on in the baseline, about 2.4 MB more).

The agent's own packages are byte-compiled first, as ``pip install`` does: without
``__pycache__`` (a source checkout run with ``PYTHONDONTWRITEBYTECODE``) every start compiles
them from source, which leaves about 1 MB more of heap behind.

To compare two versions, run it from each tree's own folder (``cd TREE && PYTHONPATH=TREE
python -m bench.agent_idle``): Python puts the working directory first on the path, so run
from one checkout with the other on ``PYTHONPATH`` it takes its harness, and with it the
mutual-TLS agent, from the checkout.
Writes bench/results/agent_idle.json.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from bench.agent_common import ControlPlaneAndAgent
from orchestrator.agents import model
from orchestrator.testing import harness, manifests, onnx_models

RESULTS = Path(__file__).parent / "results" / "agent_idle.json"
BASELINE = "import numpy, onnxruntime, grpc, grpc.aio, httptools, time; time.sleep(3600)"


async def sample(pid: int, duration: float) -> dict:
    proc = psutil.Process(pid)
    cpu0 = proc.cpu_times()
    t0 = time.perf_counter()
    rss, uss = [], []
    deadline = t0 + duration
    while time.perf_counter() < deadline:
        full = proc.memory_full_info()
        rss.append(full.rss)
        uss.append(full.uss)
        await asyncio.sleep(1.0)
    cpu1 = proc.cpu_times()
    wall = time.perf_counter() - t0
    busy = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "rss_mb": round(max(rss) / 2**20, 1),
        # unique set: RSS less the pages shared with other processes or backed by a file
        # and still clean (library code, most of all onnxruntime's 20 MB)
        "uss_mb": round(max(uss) / 2**20, 1),
        "cpu_percent_of_core": round(100 * busy / wall, 3),
        "seconds": round(wall, 1),
    }


async def _with_control_plane(root: Path, duration: float) -> dict:
    """An enrolled agent on mutual TLS that downloaded its model from the control plane."""
    built = onnx_models.build_mlp(root / "artifacts" / "tiny.onnx")
    fleet = harness.Fleet(root)
    try:
        cp = await fleet.start_control_plane(heartbeat_interval_s=5.0)
        body = manifests.bundle(manifests.edge_site("bench-site", "FR", 48.8, 2.3),
                                manifests.onnx_model("tiny", "tiny.onnx", built.sha256),
                                manifests.deployment("tiny", "tiny", 1, {"tiers": ["edge"]}))
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            (await http.post("/v1/apply", content=body)).raise_for_status()
        agent = await fleet.start_agent("bench-site", country="FR", lat=48.8, lon=2.3, heartbeat_interval=5.0,
                                        extra=("--log-level", "WARNING"))
        await harness.wait_until(lambda: any(e.healthy for e in cp.table.endpoints("tiny")), 60, what="the model served")
        await asyncio.sleep(2.0)
        measured = await sample(agent.pid, duration)
        status = cp.hub.status("bench-site")
        return {**measured, "healthy_at_hub": bool(status and status.healthy)}
    finally:
        await fleet.stop()


async def run(duration: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built = onnx_models.build_mlp(root / "tiny.onnx")
        rig = ControlPlaneAndAgent(root / "agent")
        await rig.start()
        try:
            await rig.assign(
                [model.Assignment("tiny", "tiny", "cpu", built.path.as_uri(), built.sha256)], ["tiny"]
            )
            await asyncio.sleep(2.0)  # let start-up work settle before measuring idle
            assert rig.proc is not None
            agent = await sample(rig.proc.pid, duration)
            status = rig.hub.status(rig.site)
            rows.append({"process": "edgeplane-agent (1 model, 5 s heartbeat)", **agent,
                         "healthy_at_hub": bool(status and status.healthy)})
        finally:
            code = await rig.stop()
        rows[-1]["sigterm_exit_code"] = code
        rows.append({"process": "edgeplane-agent, mutual TLS, model over HTTP", **await _with_control_plane(root / "tls", duration)})
    base = await asyncio.create_subprocess_exec(sys.executable, "-c", BASELINE)
    try:
        await asyncio.sleep(3.0)
        rows.append({"process": "baseline: python + same imports, sleeping", **await sample(base.pid, duration)})
    finally:
        base.kill()
        await base.wait()
    return rows


def compile_agent() -> None:
    import edge_agent
    import edgeplane_proto

    for package in (edge_agent, edgeplane_proto):
        compileall.compile_dir(str(Path(package.__file__).parent), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 15 s)")
    args = parser.parse_args()
    duration = 5.0 if args.quick else 20.0
    compile_agent()
    rows = asyncio.run(run(duration))
    table = Table(title=f"Idle agent ({os.cpu_count()} cores, {duration:g} s each)")
    for col in ["process", "RSS MB", "USS MB", "CPU % of a core"]:
        table.add_column(col, justify="left" if col == "process" else "right")
    for r in rows:
        table.add_row(r["process"], str(r["rss_mb"]), str(r["uss_mb"]), str(r["cpu_percent_of_core"]))
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "agent_idle",
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "target": {"rss_mb": 80, "cpu_percent_of_core": 0.5},
        "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
