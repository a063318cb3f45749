"""A fleet rejoining a restarted control plane: how long its joins wait, and its events' log.

    .venv/bin/python -m bench.agent_rejoin [--quick] [--agents N] [--max-joins N]

A control plane (SQLite, in this process) with N edge Sites, as one that ran before left
them; N agents (in-process gRPC clients, 8 connections, each agent its own call) all send
their Join at once, as a fleet does within its first reconnect step (0.25-0.5 s) after a
restart, each with the credential it was given before. An agent refused for a busy control
plane (RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms``) waits as the agent does
(``edge_agent.retry.pushback_delay``) and joins again. Measured: each Join call's answer time
(p50, max; an agent gives up on one after 10 s, ``edge_agent.uplink.JOIN_TIMEOUT_S``), each
agent's time until it was joined (its waits included), the refusals, the time until every
join is in the event log, and the reconcile passes meanwhile.

Taking turns in the same run: the control plane as it is (at most ``--max-joins`` joins
worked on at once) against the baseline of no bound (every join worked on as it comes, the
code before). Writes bench/results/agent_rejoin.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from edge_agent import retry
from edgeplane_proto import reconnect
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from orchestrator import server, server_config
from orchestrator.agents import admission, service
from orchestrator.testing import harness

RESULTS = Path(__file__).parent / "results" / "agent_rejoin.json"
TOKEN = "bench-token"
LIMIT_S = 900.0  # one path's wait for its log, at most
UNBOUNDED = 1 << 30  # --max-joins of the baseline: every join worked on as it comes


async def control_plane(data_dir: pathlib.Path, max_joins: int) -> server.ControlPlane:
    config = server_config.ServerConfig(data_dir=data_dir, port=0, agent_port=0, agent_join_port=0, insecure_agents=True,
                                        heartbeat_interval_s=60.0, bootstrap_tokens=(TOKEN,), max_joins=max_joins)
    return await server.ControlPlane(config).start()


class Fleet:
    """Each agent's identity, and what its joins took (Join call answer times, time until joined, refusals)."""

    def __init__(self, agents: int) -> None:
        self.idents: list[tuple[str, str] | None] = [None] * agents
        self.calls: list[float] = []
        self.joined: list[float] = []
        self.refused = 0


async def join_all(target: str, fleet: Fleet, rng: random.Random) -> None:
    """Every agent's Join at once; one refused with a pushback waits it (jittered) and joins again."""
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
    stubs = [pb_grpc.AgentControlStub(c) for c in channels]
    fleet.calls, fleet.joined, fleet.refused = [], [], 0
    started = time.perf_counter()

    async def one(i: int) -> None:
        known = fleet.idents[i]
        request = pb.JoinRequest(site=f"site-{i}", bootstrap_token=TOKEN, agent_id=known[0] if known else "",
                                 endpoint_url=f"http://10.0.{i // 250}.{i % 250}:8080", heartbeat_interval_ms=60_000,
                                 location=pb.Location(country="FR", region="eu-west", lat=48.8, lon=2.3, has_coordinates=True),
                                 capacity=pb.Capacity(cpu_cores=4, memory_total_bytes=8 << 30, execution_providers=["CPUExecutionProvider"]))
        while True:
            sent = time.perf_counter()
            try:
                grant = await stubs[i % len(stubs)].Join(request, metadata=((service.CREDENTIAL_KEY, known[1]),) if known else (),
                                                         timeout=300)
            except grpc.aio.AioRpcError as exc:
                fleet.calls.append(time.perf_counter() - sent)
                asked = dict(exc.trailing_metadata() or ()).get(reconnect.PUSHBACK_KEY)
                if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or not isinstance(asked, str):
                    raise
                fleet.refused += 1
                await asyncio.sleep(retry.pushback_delay(int(asked) / 1000, rng))
                continue
            fleet.calls.append(time.perf_counter() - sent)
            fleet.joined.append(time.perf_counter() - started)
            fleet.idents[i] = (grant.agent_id, grant.credential)
            return

    try:
        await asyncio.gather(*(one(i) for i in range(len(fleet.idents))))
    finally:
        for channel in channels:
            await channel.close()


def joins_logged(cp: server.ControlPlane, since: int) -> int:
    return sum(e.action == "agent-joined" for e in cp.store.events(since=since, limit=1_000_000))


async def rejoin(root: pathlib.Path, agents: int, max_joins: int) -> dict[str, Any]:
    """Agents join once, the control plane restarts, and they all join again at once."""
    data_dir = root / f"joins-{max_joins}"
    harness.declare_edge_sites(data_dir, [f"site-{i}" for i in range(agents)], by="bench")
    fleet = Fleet(agents)
    rng = random.Random(0)
    cp = await control_plane(data_dir, max_joins)
    try:
        await join_all(cp.agent_target, fleet, rng)
    finally:
        await cp.stop()
    cp = await control_plane(data_dir, max_joins)
    try:
        since = cp.store.events_last_id()
        passes = cp.reconciler.passes
        started = time.perf_counter()
        await join_all(cp.agent_target, fleet, rng)
        while (logged := await cp.store.run(joins_logged, cp, since)) < agents and time.perf_counter() - started < LIMIT_S:
            await asyncio.sleep(0.1)
        calls, joined = sorted(fleet.calls), sorted(fleet.joined)
        return {"agents": agents, "max_joins": max_joins if max_joins < UNBOUNDED else None,
                "call_p50_s": statistics.median(calls), "call_max_s": calls[-1], "calls_over_10s": sum(t > 10.0 for t in calls),
                "joined_p50_s": statistics.median(joined), "joined_max_s": joined[-1], "refused": fleet.refused,
                "logged": logged, "all_logged_s": time.perf_counter() - started, "passes": cp.reconciler.passes - passes}
    finally:
        await cp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 agents")
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--max-joins", type=int, default=admission.MAX_JOINS)
    args = parser.parse_args()
    agents = 500 if args.quick else args.agents
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [asyncio.run(rejoin(Path(tmp), agents, limit)) for limit in (args.max_joins, UNBOUNDED)]
    table = Table(title=f"{agents} agents rejoining a restarted control plane at once ({agents} Sites, SQLite)")
    for column in ("path", "Join call p50 s", "Join call max s", "calls > 10 s", "joined p50 s", "joined max s", "refused",
                   "every join logged s", "passes"):
        table.add_column(column)
    for row, name in zip(rows, (f"at most {args.max_joins} joins at once", "no bound (before)")):
        table.add_row(name, f"{row['call_p50_s']:.2f}", f"{row['call_max_s']:.2f}", str(row["calls_over_10s"]),
                      f"{row['joined_p50_s']:.2f}", f"{row['joined_max_s']:.2f}", str(row["refused"]),
                      f"{row['all_logged_s']:.1f}" + ("" if row["logged"] >= agents else f" ({row['logged']} logged)"), str(row["passes"]))
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"agents": agents, "now": rows[0], "before": rows[1]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
