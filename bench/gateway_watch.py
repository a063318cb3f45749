"""How fast a change of the endpoint table reaches standalone gateways, and what it costs.

    .venv/bin/python -m bench.gateway_watch [--quick]

The fleet is bench.gateway's: ``edgeplane serve`` in its own process, two agents serving one
model. K followers (``orchestrator.gatewayd.follow.TableFollower``, what each standalone
gateway runs) watch it from this process, each on its own connection. Measured:

- the size of one snapshot event for a synthetic table of N endpoints (bytes on the wire
  per change per gateway), and the time a follower takes to parse and apply it (no
  network: a fleet of 10,000 real endpoints is out of reach of this machine);
- the time from an agent's loss at the control plane (kill -9 of an agent) to every
  follower's table showing it, with K followers: detection by heartbeats (the control
  plane's ``--missed-heartbeats`` × ``--heartbeat-interval``) plus the watch's delivery.

Writes bench/results/gateway_watch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import time

import httpx
from rich.console import Console
from rich.table import Table

from bench.gateway import Setup
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import routing, wire
from orchestrator.gatewayd import follow

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "gateway_watch.json"


def synthetic_table(n: int) -> endpoints_mod.EndpointTable:
    table = endpoints_mod.EndpointTable()
    table.replace([routing.Endpoint(f"model-{i % 100}", f"dep-{i % 100}", f"site-{i}", "edge", "FR", "fr", 48.0 + i * 1e-4, 2.35,
                                    f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:9000", inflight=i % 7,
                                    allowed_countries=frozenset({"FR", "DE"}), fallback=("edge", "datacenter"))
                   for i in range(n)], routing.RegionIndex({"fr": (48.0, 2.35)}))
    return table


def measure_apply(n: int, repeats: int) -> dict[str, float]:
    table, same = synthetic_table(n), synthetic_table(n)
    compare = []
    for _ in range(repeats):  # the control plane's cost per reconcile pass: is the table unchanged? (worst case: it is)
        t = time.perf_counter()
        assert wire.contents_of(table) == wire.contents_of(same)
        compare.append((time.perf_counter() - t) * 1000)
    doc = wire.table_to_json(table)
    line = json.dumps({"type": "snapshot", "epoch": "e", "version": 1, "table": doc}, separators=(",", ":")).encode() + b"\n"
    decode, swap = [], []
    for _ in range(repeats):
        target = endpoints_mod.EndpointTable()
        t = time.perf_counter()
        _, _, contents = follow.decode_snapshot(line.decode())  # off the gateway's event loop
        t2 = time.perf_counter()
        assert contents is not None
        wire.apply(target, contents)  # on it
        decode.append((t2 - t) * 1000)
        swap.append((time.perf_counter() - t2) * 1000)
    # what a change costs since the watch sends deltas: one endpoint's health flipped
    base = wire.contents_of(table)
    flipped = [dataclasses.replace(e, healthy=False) if i == n // 2 else e for i, e in enumerate(base.endpoints)]
    table.replace(flipped)
    delta = json.dumps({"type": "delta", "epoch": "e", "version": 2, "base": 1, **wire.delta_to_json(base, wire.contents_of(table))},
                       separators=(",", ":")).encode() + b"\n"
    encode, apply_delta = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        wire.delta_to_json(base, wire.contents_of(table))  # the control plane, once per change for every gateway
        t2 = time.perf_counter()
        got = follow.decode_event(delta.decode(), ("e", 1, base))  # a gateway, off its event loop
        assert got is not None and got[2] == wire.contents_of(table)
        apply_delta.append((time.perf_counter() - t2) * 1000)
        encode.append((t2 - t) * 1000)
    return {"endpoints": n, "snapshot_bytes": len(line), "decode_p50_ms": statistics.median(decode), "decode_max_ms": max(decode),
            "swap_p50_ms": statistics.median(swap), "swap_max_ms": max(swap), "publish_compare_p50_ms": statistics.median(compare),
            "delta_bytes": len(delta), "delta_diff_p50_ms": statistics.median(encode), "delta_apply_p50_ms": statistics.median(apply_delta)}


async def measure_propagation(s: Setup, followers: int, kills: int) -> dict[str, object]:
    tables = [endpoints_mod.EndpointTable() for _ in range(followers)]
    fs = [follow.TableFollower([s.url], t) for t in tables]
    tasks = [asyncio.create_task(f.run()) for f in fs]
    results = []
    try:
        for f in fs:
            assert await f.wait_snapshot(0, 60), f.status()
        for _ in range(kills):
            await asyncio.to_thread(_wait_both_healthy, s)
            for f, t in zip(fs, tables):
                while len([e for e in t.endpoints("bench") if e.healthy]) < 2:
                    assert await f.wait_update(f.updates, 60), f.status()
            victim = "edge-b"
            killed = time.perf_counter()
            s.agents[victim].kill(signal.SIGKILL)
            seen = []
            for f, t in zip(fs, tables):
                while any(e.healthy and e.site == victim for e in t.endpoints("bench")):
                    assert await f.wait_update(f.updates, 60), f.status()
                seen.append((time.perf_counter() - killed) * 1000)
            results.append({"first_ms": min(seen), "last_ms": max(seen)})
            await asyncio.to_thread(s.agents[victim].process.wait, 5)
            await asyncio.to_thread(s.start_agent, victim)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for f in fs:
            await f.close()
    return {"followers": followers, "kills": results, "last_follower_p50_ms": statistics.median(r["last_ms"] for r in results),
            "spread_p50_ms": statistics.median(r["last_ms"] - r["first_ms"] for r in results)}


def _wait_both_healthy(s: Setup) -> None:
    deadline = time.monotonic() + 60
    while len(s.endpoints()) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("both endpoints back")
        time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    sizes = (100, 1_000, 10_000)
    applies = [measure_apply(n, 5 if args.quick else 20) for n in sizes]
    followers, kills = (8, 2) if args.quick else (32, 5)
    with tempfile.TemporaryDirectory(prefix="ep-bench-watch-") as tmp:
        s = Setup(pathlib.Path(tmp))
        try:
            heartbeat = {"interval_s": 0.5, "missed": 3}  # bench.gateway's control plane: --heartbeat-interval 0.5, default 3 missed
            httpx.get(f"{s.url}/v1/endpoints").raise_for_status()
            propagation = asyncio.run(measure_propagation(s, followers, kills))
        finally:
            s.stop()
    table = Table(title="Endpoint table per change, per gateway: the first snapshot, then deltas", header_style="bold")
    for h in ("endpoints", "snapshot bytes", "control plane: changed? p50 ms", "gateway: decode p50 ms (thread)", "max ms",
              "swap p50 ms (event loop)", "max ms", "delta bytes (1 flip)", "diff p50 ms", "delta apply p50 ms (thread)"):
        table.add_column(h, justify="right")
    for a in applies:
        table.add_row(f"{a['endpoints']:,}", f"{a['snapshot_bytes']:,}", f"{a['publish_compare_p50_ms']:.2f}",
                      f"{a['decode_p50_ms']:.2f}", f"{a['decode_max_ms']:.2f}",
                      f"{a['swap_p50_ms']:.2f}", f"{a['swap_max_ms']:.2f}",
                      f"{a['delta_bytes']:,}", f"{a['delta_diff_p50_ms']:.2f}", f"{a['delta_apply_p50_ms']:.2f}")
    console = Console(width=120)
    console.print(table)
    console.print(f"kill -9 of an agent → every one of {followers} followers' tables: p50 {propagation['last_follower_p50_ms']:.0f} ms "
                  f"(heartbeat detection {heartbeat['interval_s']} s × {heartbeat['missed']} missed included); first to last follower "
                  f"{propagation['spread_p50_ms']:.1f} ms p50")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "gateway_watch", "quick": args.quick, "cpu_count": os.cpu_count(), "apply": applies,
                                   "propagation": propagation, "heartbeat": heartbeat}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
