"""A fleet rejoining a restarted control plane: how long its joins wait, and its events' log.

    .venv/bin/python -m bench.agent_rejoin [--quick] [--agents N]

A control plane (SQLite, in this process) with N edge Sites, as one that ran before left
them; N agents (in-process gRPC clients, 8 connections, each agent its own call) all send
their Join at once, as a fleet does within its first reconnect step (0.25-0.5 s) after a
restart, each with the credential it was given before. Measured: each join's answer time
(p50, max; an agent gives up on a join after 10 s, ``edge_agent.uplink.JOIN_TIMEOUT_S``),
the time until every join is in the event log, and the reconcile passes meanwhile.

Taking turns in the same run: the control plane as it is (what waits is logged in one
transaction, ``server.LOG_BATCH`` events at most, one pass after each batch) against the
baseline of one event a transaction and a pass after each (``LOG_BATCH = 1``, the code
before). Writes bench/results/agent_rejoin.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from rich.console import Console
from rich.table import Table

from orchestrator import server, server_config
from orchestrator.agents import service
from orchestrator.store import sqlite as store_mod

RESULTS = Path(__file__).parent / "results" / "agent_rejoin.json"
TOKEN = "bench-token"
LIMIT_S = 900.0  # one path's wait for its log, at most


def declare(data_dir: pathlib.Path, agents: int) -> None:
    store = store_mod.Store(data_dir / "state.db")
    try:
        spec = {"tier": "edge", "location": {"country": "FR", "region": "eu-west", "lat": 48.8, "lon": 2.3}}
        store.apply([store_mod.ObjectWrite("Site", f"site-{i}", {}, spec, expected_version=0) for i in range(agents)],
                    store_mod.Event("bench", "apply", "Site", "site-0", "the fleet"))
    finally:
        store.close()


async def control_plane(data_dir: pathlib.Path) -> server.ControlPlane:
    config = server_config.ServerConfig(data_dir=data_dir, port=0, agent_port=0, agent_join_port=0, insecure_agents=True,
                                        heartbeat_interval_s=60.0, bootstrap_tokens=(TOKEN,))
    return await server.ControlPlane(config).start()


async def join_all(target: str, idents: list[tuple[str, str] | None]) -> list[float]:
    """Every agent's Join at once; each one's answer time (s)."""
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
    stubs = [pb_grpc.AgentControlStub(c) for c in channels]

    async def one(i: int) -> float:
        known = idents[i]
        request = pb.JoinRequest(site=f"site-{i}", bootstrap_token=TOKEN, agent_id=known[0] if known else "",
                                 endpoint_url=f"http://10.0.{i // 250}.{i % 250}:8080", heartbeat_interval_ms=60_000,
                                 location=pb.Location(country="FR", region="eu-west", lat=48.8, lon=2.3, has_coordinates=True),
                                 capacity=pb.Capacity(cpu_cores=4, memory_total_bytes=8 << 30, execution_providers=["CPUExecutionProvider"]))
        started = time.perf_counter()
        grant = await stubs[i % len(stubs)].Join(request, metadata=((service.CREDENTIAL_KEY, known[1]),) if known else (), timeout=300)
        idents[i] = (grant.agent_id, grant.credential)
        return time.perf_counter() - started

    try:
        return list(await asyncio.gather(*(one(i) for i in range(len(idents)))))
    finally:
        for channel in channels:
            await channel.close()


def joins_logged(cp: server.ControlPlane, since: int) -> int:
    return sum(e.action == "agent-joined" for e in cp.store.events(since=since, limit=1_000_000))


async def rejoin(root: pathlib.Path, agents: int, batch: int) -> dict[str, Any]:
    """Agents join once, the control plane restarts, and they all join again at once."""
    server.LOG_BATCH = batch
    data_dir = root / f"batch-{batch}"
    declare(data_dir, agents)
    idents: list[tuple[str, str] | None] = [None] * agents
    cp = await control_plane(data_dir)
    try:
        await join_all(cp.agent_target, idents)
    finally:
        await cp.stop()
    cp = await control_plane(data_dir)
    try:
        since = cp.store.events_last_id()
        passes = cp.reconciler.passes
        started = time.perf_counter()
        answered = sorted(await join_all(cp.agent_target, idents))
        while (logged := await cp.store.run(joins_logged, cp, since)) < agents and time.perf_counter() - started < LIMIT_S:
            await asyncio.sleep(0.1)
        return {"agents": agents, "batch": batch, "join_p50_s": statistics.median(answered), "join_max_s": answered[-1],
                "joins_over_10s": sum(t > 10.0 for t in answered), "logged": logged,
                "all_logged_s": time.perf_counter() - started, "passes": cp.reconciler.passes - passes}
    finally:
        await cp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 agents")
    parser.add_argument("--agents", type=int, default=1000)
    args = parser.parse_args()
    agents = 200 if args.quick else args.agents
    logging.basicConfig(level=logging.ERROR)
    kept = server.LOG_BATCH
    with tempfile.TemporaryDirectory() as tmp:
        rows = [asyncio.run(rejoin(Path(tmp), agents, batch)) for batch in (kept, 1)]
    server.LOG_BATCH = kept
    table = Table(title=f"{agents} agents rejoining a restarted control plane at once ({agents} Sites, SQLite)")
    for column in ("path", "join p50 s", "join max s", "joins > 10 s", "every join logged s", "passes"):
        table.add_column(column)
    for row, name in zip(rows, (f"batches of up to {kept}", "one event a transaction (before)")):
        table.add_row(name, f"{row['join_p50_s']:.2f}", f"{row['join_max_s']:.2f}", str(row["joins_over_10s"]),
                      f"{row['all_logged_s']:.1f}" + ("" if row["logged"] >= agents else f" ({row['logged']} logged)"), str(row["passes"]))
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"agents": agents, "now": rows[0], "before": rows[1]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
