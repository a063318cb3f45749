"""v2 inference through a real ``edgeplane-agent`` vs raw ``session.run``, same model.

    .venv/bin/python -m bench.agent_infer [--quick]

Models (built on the spot): ``wide`` = MLP 1024 -> 1024 x3 -> 16 (one run of a batch of 64
takes over 1 ms on CPU) and ``tiny`` = MLP 8 -> 16 -> 4 (run time in microseconds: the
result is the agent's per-request overhead). The raw baseline runs the same ONNX bytes
with the same session options in this process, sequentially; the agent is a subprocess
joined to a control plane in this process and is called over HTTP keep-alive, one request
at a time (latency) and with 4 in flight (throughput). The client shares the machine's
cores with the agent, as a co-located caller would. Writes bench/results/agent_infer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.agent_common import ControlPlaneAndAgent
from edge_agent.runtime import onnx
from edgeplane_proto import oip
from orchestrator.agents import model
from orchestrator.testing import onnx_models

RESULTS = Path(__file__).parent / "results" / "agent_infer.json"


def _stats(latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "per_s": round(len(ordered) / wall, 1),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def raw_baseline(path: Path, x: np.ndarray, duration: float) -> dict:
    runtime = onnx.OnnxModel.load(path.read_bytes())
    feeds = {"input": x}
    names = runtime.output_names(())
    for _ in range(20):
        runtime.run(feeds, names)
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        t = time.perf_counter()
        runtime.run(feeds, names)
        latencies.append(time.perf_counter() - t)
    return _stats(latencies, time.perf_counter() - start)


async def through_agent(url: str, name: str, x: np.ndarray, binary: bool, concurrency: int, duration: float) -> dict:
    body, header = oip.encode_request({"input": x}, binary=binary)
    headers = {oip.BINARY_HEADER: str(header)} if header is not None else {}
    headers["content-type"] = "application/octet-stream" if binary else "application/json"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        for _ in range(20):
            (await client.post(f"/v2/models/{name}/infer", content=body, headers=headers)).raise_for_status()
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                response = await client.post(f"/v2/models/{name}/infer", content=body, headers=headers)
                latencies.append(time.perf_counter() - t)
                if response.status_code != 200:
                    raise RuntimeError(response.text)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return _stats(latencies, time.perf_counter() - start)


async def run(duration: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wide = onnx_models.build_mlp(root / "wide.onnx", in_dim=1024, hidden=1024, out_dim=16, layers=4, softmax=False)
        tiny = onnx_models.build_mlp(root / "tiny.onnx")
        cases = [
            ("wide", wide, np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)),
            ("tiny", tiny, np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)),
        ]
        baselines = {name: raw_baseline(built.path, x, duration) for name, built, x in cases}
        rig = ControlPlaneAndAgent(root / "agent")
        await rig.start()
        try:
            await rig.assign(
                [model.Assignment(n, n, "cpu", b.path.as_uri(), b.sha256) for n, b, _ in cases],
                [n for n, _, _ in cases],
            )
            for name, _, x in cases:
                base = baselines[name]
                rows.append({"model": name, "path": "raw session.run", "concurrency": 1, **base, "vs_raw": 1.0})
                for binary in (True, False):
                    for concurrency in (1, 4):
                        got = await through_agent(rig.url, name, x, binary, concurrency, duration)
                        rows.append({
                            "model": name,
                            "path": f"agent HTTP v2 {'binary' if binary else 'JSON'}",
                            "concurrency": concurrency,
                            **got,
                            "vs_raw": round(got["per_s"] / base["per_s"], 3),
                            "overhead_ms_p50": round(got["p50_ms"] - base["p50_ms"], 3),
                        })
        finally:
            await rig.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 20 s)")
    args = parser.parse_args()
    duration = 1.5 if args.quick else 5.0
    rows = asyncio.run(run(duration))
    table = Table(title=f"v2 inference through the agent vs raw session.run ({os.cpu_count()} cores)")
    for col in ["model", "path", "in flight", "req/s", "p50 ms", "p99 ms", "x raw"]:
        table.add_column(col, justify="left" if col in ("model", "path") else "right")
    for r in rows:
        table.add_row(r["model"], r["path"], str(r["concurrency"]), f"{r['per_s']:,}", str(r["p50_ms"]),
                      str(r["p99_ms"]), f"{r['vs_raw']:.2f}")
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "agent_infer",
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "duration_s_per_row": duration,
        "target": {"wide_vs_raw": 0.8},
        "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
