"""Heartbeat ingestion at the hub: many simulated agents on client streams.

    .venv/bin/python -m bench.agent_heartbeats [--quick] [--agents N ...] [--rate R] [--relays K]

The hub and its gRPC server run in this process; the simulated agents run in other
processes (so the load generator does not share the hub's interpreter), one per
``--per-generator`` agents (25,000). Each agent joins
with the bootstrap token, then keeps one Heartbeats client stream open.

Phases, all in the same run:
  paced      for each fleet size (1k, 5k, 10k agents by default), every agent sends at the
             interval that makes the fleet offer ``--rate``/s; reports the achieved rate
             and the heartbeat lag (send stamp -> hub) p50/p99 in steady state, once
             every agent's stream has delivered a heartbeat, and how long that took
             from the first heartbeat (ramp s)
  saturated  every agent writes back to back: the hub's ceiling
  baseline   the same saturated load into a servicer that only counts messages, which
             is the floor of gRPC streaming in Python on this machine
  relayed    with ``--relays K``: the paced phases again, the agents spread over K
             control-plane replicas that do not lead (each its own process, hub and gRPC
             server), which relay them to the leader's hub here over one stream each
             (``orchestrator.agents.relay``); reports the leader's applied rate, CPU and
             memory, and each relaying replica's CPU and memory
Writes bench/results/agent_heartbeats.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import grpc
import psutil
from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.agent.v1 import agent_pb2_grpc as pb_grpc
from rich.console import Console
from rich.table import Table

from bench import native as _native
from orchestrator.agents import auth, hub, relay, relay_leader, service

RESULTS = Path(__file__).parent / "results" / "agent_heartbeats.json"
TOKEN = "bench-token"
MAX_RUN_S = 300.0  # a generator is stopped by the hub side; this bounds it if that fails
#: joins and first beats may take this long per 1,000 agents (min 120 s); --ramp-per-1000
#: sets it (through the environment, which the generator processes inherit)
RAMP_S_PER_1000 = float(os.environ.get("EDGEPLANE_BENCH_RAMP_S_PER_1000", "3.0"))


def _ramp_limit(agents: int) -> float:
    return max(120.0, agents / 1000 * RAMP_S_PER_1000)


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


# -- load generator (second process) -------------------------------------------------


async def _generate(target: str, agents: int, interval: float, stop, join: bool, first_site: int = 0) -> dict[str, int]:  # noqa: ANN001
    """Agents ``site-{first_site}`` … on, until ``stop`` (a multiprocessing Event) is set, or MAX_RUN_S passes."""
    # A local subchannel pool per channel: without it every channel with the same target
    # shares one TCP connection, and the whole fleet multiplexes on a single HTTP/2 link.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(min(agents, max(8, agents // 100)))
    ]
    stubs = [pb_grpc.AgentControlStub(c) for c in channels]
    idents: list[tuple[tuple[str, str], ...]] = [()] * agents

    async def join_one(i: int) -> None:
        site = f"site-{first_site + i}"
        if join:
            stub = stubs[i % len(stubs)]
            grant = await stub.Join(
                pb.JoinRequest(
                    site=site,
                    bootstrap_token=TOKEN,
                    endpoint_url=f"http://10.{(first_site + i) // 62500}.{(first_site + i) // 250 % 250}.{(first_site + i) % 250}:8080",
                    heartbeat_interval_ms=max(50, round((interval or 1.0) * 1000)),
                    capacity=pb.Capacity(cpu_cores=4, memory_total_bytes=8 << 30,
                                         execution_providers=["CPUExecutionProvider"]),
                )
            )
            idents[i] = (
                (service.SITE_KEY, site),
                (service.AGENT_ID_KEY, grant.agent_id),
                (service.CREDENTIAL_KEY, grant.credential),
            )

    for first in range(0, agents, 200):  # joins 200 at a time
        await asyncio.gather(*(join_one(i) for i in range(first, min(agents, first + 200))))
    calls = [stubs[i % len(stubs)].Heartbeats(metadata=idents[i]) for i in range(agents)]
    seqs = [0] * agents
    sent = reopened = 0
    deadline = time.monotonic() + MAX_RUN_S + _ramp_limit(agents)

    def running() -> bool:
        return time.monotonic() < deadline and not stop.is_set()

    def beat(i: int) -> pb.Heartbeat:
        seqs[i] += 1
        beat = pb.Heartbeat(
            seq=seqs[i], sent_unix_ms=int(time.time() * 1000), inflight=seqs[i] % 3,
            cpu_percent=7.5, memory_available_bytes=4 << 30, assignment_version=1,
        )
        # one model's counters, as an agent serving one model sends on every beat
        beat.model_load.add(name="intent", requests_total=seqs[i] * 40, busy_seconds_total=seqs[i] * 0.4)
        return beat

    if interval:
        # One ticker for the fleet (not one timer per agent): every TICK, the agents whose
        # turn it is write once, concurrently; each agent still sends once per interval.
        tick = 0.01
        per_tick = agents * tick / interval
        due = 0.0
        cursor = 0
        next_tick = time.monotonic()
        while running():
            due += per_tick
            batch = int(due)
            due -= batch
            idx = [(cursor + k) % agents for k in range(batch)]
            cursor = (cursor + batch) % agents
            done = await asyncio.gather(*(calls[i].write(beat(i)) for i in idx), return_exceptions=True)
            for i, outcome in zip(idx, done):
                if outcome is None:
                    sent += 1
                    continue
                # A stream the hub shed while it was overloaded (the server's pending-stream
                # bound, or an accepted call it could not take up in time): as an agent does,
                # open it again; its next turn writes on the new stream.
                code = await calls[i].code() if calls[i].done() else None
                if code not in RETRIED or reopened >= agents:
                    detail = f"{code}: {await calls[i].details()}" if code is not None else repr(outcome)
                    raise RuntimeError(f"heartbeat stream of site-{first_site + i} failed ({reopened} reopened): {detail}")
                calls[i] = stubs[i % len(stubs)].Heartbeats(metadata=idents[i])
                reopened += 1
            next_tick += tick
            delay = next_tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    else:
        async def flood(i: int) -> None:
            nonlocal sent
            while running():
                await calls[i].write(beat(i))
                sent += 1

        await asyncio.gather(*(flood(i) for i in range(agents)))
    for call in calls:
        await call.done_writing()
    await asyncio.gather(*calls, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return {"sent": sent, "reopened": reopened}


#: what a shedding hub answers an agent's stream; anything else fails the run
RETRIED = {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}


def _generator_main(target: str, agents: int, interval: float, stop, join: bool, out, first_site: int = 0) -> None:  # noqa: ANN001
    out.send(asyncio.run(_generate(target, agents, interval, stop, join, first_site)))


class _Generators:
    """The simulated fleet: ``shares[k]`` agents on ``targets[k % len(targets)]``, one process
    each, numbered on from ``site-0``. ``native`` runs ``bench/native/hbgen`` (C++, paced
    only, joins always), else :func:`_generate` in Python processes."""

    def __init__(self, native: bool, targets: list[str], shares: list[int], interval: float, join: bool) -> None:
        self.native = native
        self._procs: list = []
        self._pipes: list = []
        self._reports: list[dict] | None = None
        firsts = [sum(shares[:k]) for k in range(len(shares))]
        if native:
            if not interval or not join:
                raise ValueError("the native generator only runs paced, joining agents")
            limit = MAX_RUN_S + _ramp_limit(sum(shares))
            self._procs = [_native.Hbgen(targets[k % len(targets)], share, interval=interval, token=TOKEN, first_site=firsts[k],
                                         max_seconds=limit) for k, share in enumerate(shares)]
            return
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        for k, share in enumerate(shares):
            parent, child = ctx.Pipe()
            self._procs.append(ctx.Process(target=_generator_main, args=(targets[k % len(targets)], share, interval, self._stop,
                                                                         join, child, firsts[k])))
            self._pipes.append(parent)
            self._procs[-1].start()

    def __len__(self) -> int:
        return len(self._procs)

    def cpu_seconds(self) -> float:
        """CPU time the generator processes have used so far."""
        total = 0.0
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(proc.pid).cpu_times()
                total += times.user + times.system
        return total

    def alive(self) -> bool:
        return all(proc.running() if self.native else proc.is_alive() for proc in self._procs)

    async def stop(self) -> list[dict]:
        """Stops every generator (once; later calls return the same); their reports
        ({"sent", "reopened", ...}; a failed one's carries "error") in order, or {} for one
        that died without a word."""
        if self._reports is not None:
            return self._reports
        if self.native:
            self._reports = list(await asyncio.gather(*(proc.stop() for proc in self._procs)))
            return self._reports
        self._stop.set()
        reports = [await asyncio.to_thread(_report, parent, 30.0) for parent in self._pipes]
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
        self._reports = [r if isinstance(r, dict) else {} for r in reports]
        return self._reports

    async def why_short(self) -> str:
        """After a fleet fell short: stops it and says what its generators reported or how
        they ended ("" when none failed)."""
        reports = await self.stop()
        why = [f"generator {k}: {report['error']}" for k, report in enumerate(reports) if report.get("error")]
        for k, proc in enumerate(self._procs):
            code = proc.process.returncode if self.native else proc.exitcode
            if code and not reports[k].get("error"):
                why.append(f"generator {k} exited with {code}")
        return "; ".join(why)


# -- a relaying replica (one process each) ----------------------------------------------

RELAY_SECRET = "bench-relay-secret"


def _relay_main(leader: str, replica: str, conn) -> None:  # noqa: ANN001
    asyncio.run(_relay_replica(leader, replica, conn))


async def _relay_replica(leader: str, replica: str, conn) -> None:  # noqa: ANN001
    """A follower's agent side: hub, gRPC server, relay to ``leader``. Answers the parent's
    "mark" with (CPU seconds, heartbeats, RSS MiB, batches, reports); "stop" ends it."""
    logging.getLogger("orchestrator").setLevel(logging.ERROR)
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), missed_heartbeats=5)
    server = await service.start_agent_server(agent_hub, "127.0.0.1", 0)
    client = relay.RelayClient(agent_hub, replica)
    task = asyncio.create_task(client.run())
    client.point(relay.Leader("leader", leader, RELAY_SECRET, answers_claims=True))
    conn.send(server.port)
    try:
        while True:
            if not await asyncio.to_thread(conn.poll, 0.5):
                continue
            if conn.recv() == "stop":
                return
            conn.send((time.process_time(), agent_hub.heartbeats_total, _rss_mib(), client.batches_total, client.reports_total))
    finally:
        task.cancel()
        await server.stop(None)


async def _run_relayed_phase(agents: int, interval: float, duration: float, relays: int, per_generator: int,
                             native: bool = False) -> dict:
    """Agents on ``relays`` replicas that relay them to the leader's hub in this process."""
    ctx = multiprocessing.get_context("spawn")
    rss_before = _rss_mib()
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), missed_heartbeats=5)
    servicer = relay_leader.RelayServicer(agent_hub, lambda: RELAY_SECRET)
    leader = await service.start_agent_server(agent_hub, "127.0.0.1", 0, more=(servicer.handler(),))
    replicas, ports = [], []
    for k in range(relays):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_relay_main, args=(f"127.0.0.1:{leader.port}", f"relay-{k}", child))
        proc.start()
        replicas.append((proc, parent))
    generators: _Generators | None = None
    reports: list[dict] = []
    try:
        for _, conn in replicas:
            ports.append(await asyncio.to_thread(_report, conn, 60.0))
        count = max(relays, -(-agents // per_generator))
        shares = [agents // count + (k < agents % count) for k in range(count)]
        generators = _Generators(native, [f"127.0.0.1:{port}" for port in ports], shares, interval, join=True)
        first = time.perf_counter()
        ramp_deadline = first + _ramp_limit(agents)
        while agent_hub.reporting() < agents and time.perf_counter() < ramp_deadline and generators.alive():
            await asyncio.sleep(1.0)
        ramp_s = time.perf_counter() - first
        if agent_hub.reporting() < agents:
            short = f"relayed: only {agent_hub.reporting()} of {agents} agents reached the leader in {ramp_s:.0f}s"
            why = await generators.why_short()
            raise RuntimeError(f"{short} ({why})" if why else short)
        await asyncio.sleep(1.0)
        agent_hub.lag = hub.LagHistogram()

        async def marks() -> list[tuple[float, int, float, int, int]]:
            for _, conn in replicas:
                conn.send("mark")
            return [await asyncio.to_thread(_report, conn, 30.0) for _, conn in replicas]  # type: ignore[misc]

        before = await marks()
        cpu0, n0, t0, reports0 = time.process_time(), agent_hub.heartbeats_total, time.perf_counter(), servicer.reports_total
        gen0 = generators.cpu_seconds()
        await asyncio.sleep(duration)
        cpu1, n1, t1, reports1 = time.process_time(), agent_hub.heartbeats_total, time.perf_counter(), servicer.reports_total
        gen1 = generators.cpu_seconds()
        after = await marks()
        rss_steady = _rss_mib()
        healthy = sum(s.healthy for s in agent_hub.snapshot())
    finally:
        if generators is not None:
            reports = await generators.stop()
        for proc, conn in replicas:
            with contextlib.suppress(OSError):
                conn.send("stop")
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
        await leader.stop(None)
    span = t1 - t0
    return {
        "phase": f"relayed ({relays} replicas -> leader)",
        "agents": agents,
        "generators": len(generators),
        "generator": "native" if native else "python",
        "relays": relays,
        "offered_per_s": round(agents / interval),
        "heartbeats_per_s": round((n1 - n0) / span),  # applied by the leader's hub
        "relay_reports_per_s": round((reports1 - reports0) / span),
        "relay_batches_per_s": round(sum(a[3] - b[3] for a, b in zip(after, before)) / span, 1),
        "hub_cpu_cores": round((cpu1 - cpu0) / span, 2),  # the leader
        "generator_cpu_cores": round((gen1 - gen0) / span, 2),
        "relay_heartbeats_per_s": [round((a[1] - b[1]) / span) for a, b in zip(after, before)],
        "relay_cpu_cores": [round((a[0] - b[0]) / span, 2) for a, b in zip(after, before)],
        "relay_rss_mib": [round(a[2], 1) for a in after],
        "sent": sum(r.get("sent", 0) for r in reports),
        "streams_reopened": sum(r.get("reopened", 0) for r in reports),
        "generator_errors": [r["error"] for r in reports if r.get("error")],
        "ramp_s": round(ramp_s, 2),
        "hub_rss_mib": round(rss_steady, 1),
        "hub_rss_added_mib": round(rss_steady - rss_before, 1),
        "hub_mib_per_10k_agents": round((rss_steady - rss_before) / agents * 10_000, 1),
        "lag_p50_ms": agent_hub.lag.quantile(0.5),
        "lag_p99_ms": agent_hub.lag.quantile(0.99),
        "agents_healthy": healthy,
    }


# -- control plane side (this process) -----------------------------------------------


class _CountOnly:
    """Baseline servicer: parses and counts, nothing else."""

    def __init__(self) -> None:
        self.count = 0

    def handler(self) -> grpc.GenericRpcHandler:
        async def beats(request_iterator, context):  # noqa: ANN001, ANN202
            async for raw in request_iterator:
                pb.Heartbeat.FromString(raw)
                self.count += 1
            return pb.HeartbeatSummary()

        return grpc.method_handlers_generic_handler(
            service.SERVICE_NAME,
            {"Heartbeats": grpc.stream_unary_rpc_method_handler(
                beats, response_serializer=pb.HeartbeatSummary.SerializeToString)},
        )


def _report(conn, timeout: float) -> object:  # noqa: ANN001
    """The generator's last word, or None if it died without one."""
    return conn.recv() if conn.poll(timeout) else None


async def _run_phase(name: str, agents: int, interval: float, duration: float, baseline: bool, generators: int = 1,
                     native: bool = False) -> dict:
    rss_before = _rss_mib()
    if baseline:
        counter = _CountOnly()
        server = grpc.aio.server(options=service.server_options())
        server.add_generic_rpc_handlers((counter.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        agent_hub = None
        stop = server.stop
    else:
        agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), missed_heartbeats=5)
        running = await service.start_agent_server(agent_hub, "127.0.0.1", 0)
        port = running.port
        stop = running.stop
    # the fleet split across ``generators`` processes (one Python process tops out at tens of
    # thousands of streams); each keeps its share's interval, so the fleet offers the same rate
    shares = [agents // generators + (k < agents % generators) for k in range(generators)]
    try:
        fleet = _Generators(native, [f"127.0.0.1:{port}"], shares, interval, join=not baseline)
    except BaseException:
        await stop(None)
        raise
    alive = fleet.alive

    def received() -> int:
        return counter.count if agent_hub is None else agent_hub.heartbeats_total

    def streams_open() -> int:
        """Agents whose stream has delivered at least one heartbeat (a hub knows; the
        count-only servicer does not, and is taken as open after two beats per agent)."""
        if agent_hub is None:
            return agents if received() >= 2 * agents else 0
        return agent_hub.reporting()  # not snapshot(): 100,000 status objects every poll would load the hub it measures

    # Steady state only: the window opens once every agent's stream has delivered a
    # heartbeat (opening thousands of streams at once is a burst a real fleet spreads over
    # its restarts; its length is reported as ramp_s), and a second later.
    try:
        while received() == 0 and alive():
            await asyncio.sleep(0.05)
        first = time.perf_counter()
        ramp_deadline = first + _ramp_limit(agents)
        while streams_open() < agents and alive() and time.perf_counter() < ramp_deadline:
            await asyncio.sleep(1.0)
        ramp_s = time.perf_counter() - first
        if streams_open() < agents:
            short = f"{name}: only {streams_open()} of {agents} streams delivered a heartbeat in {ramp_s:.0f}s"
            why = await fleet.why_short()
            raise RuntimeError(f"{short} ({why})" if why else short)
        await asyncio.sleep(1.0)
        if agent_hub is not None:
            agent_hub.lag = hub.LagHistogram()
        cpu0, n0, t0, gen0 = time.process_time(), received(), time.perf_counter(), fleet.cpu_seconds()
        await asyncio.sleep(duration)
        cpu1, n1, t1, gen1 = time.process_time(), received(), time.perf_counter(), fleet.cpu_seconds()
        rss_steady = _rss_mib()
    finally:  # the generator and the server go whether the phase finished or not
        reports = await fleet.stop()
        sent = sum(r.get("sent", 0) for r in reports)
        reopened = sum(r.get("reopened", 0) for r in reports)
        generator_errors = [r["error"] for r in reports if r.get("error")]
        await stop(None)
    rate = (n1 - n0) / (t1 - t0)
    row = {
        "phase": name,
        "agents": agents,
        "generators": generators,
        "generator": "native" if native else "python",
        "offered_per_s": round(agents / interval) if interval else None,
        "heartbeats_per_s": round(rate),
        "hub_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 2),
        "generator_cpu_cores": round((gen1 - gen0) / (t1 - t0), 2),  # the simulated fleet, on the same cores
        "generator_join_s": max((r.get("join_s", 0.0) for r in reports), default=None) if native else None,
        "sent": sent,
        "streams_reopened": reopened,  # shed by the hub while it was overloaded, opened again
        "generator_errors": generator_errors,
        "ramp_s": round(ramp_s, 2),
        # the control-plane process: what holding this many agents' streams and records adds
        "hub_rss_mib": round(rss_steady, 1),
        "hub_rss_added_mib": round(rss_steady - rss_before, 1),
        "hub_mib_per_10k_agents": round((rss_steady - rss_before) / agents * 10_000, 1),
    }
    if agent_hub is not None:
        row["lag_p50_ms"] = agent_hub.lag.quantile(0.5)
        row["lag_p99_ms"] = agent_hub.lag.quantile(0.99)
        row["agents_healthy"] = sum(s.healthy for s in agent_hub.snapshot())
    return row


def run(fleets: list[int], rate: float, duration: float, saturated_phases: bool = True, per_generator: int = 25_000,
        relays: int = 0, native: bool = False) -> list[dict]:
    """Each phase gets a fresh event loop, so one phase's teardown cannot slow the next.
    ``native`` simulates the paced phases' agents with ``bench/native/hbgen``."""
    if relays:
        return [asyncio.run(_run_relayed_phase(agents, agents / rate, duration, relays, per_generator, native))
                for agents in fleets]
    rows = [
        asyncio.run(_run_phase("paced (hub)", agents, agents / rate, duration, baseline=False,
                               generators=max(1, -(-agents // per_generator)), native=native))
        for agents in fleets
    ]
    if not saturated_phases:
        return rows
    saturated = min(min(fleets), 500)
    rows.append(asyncio.run(_run_phase("saturated (hub)", saturated, 0.0, duration, baseline=False)))
    rows.append(
        asyncio.run(
            _run_phase("saturated (count-only baseline)", saturated, 0.0, duration, baseline=True)
        )
    )
    return rows


def main() -> None:
    logging.getLogger("orchestrator").setLevel(logging.ERROR)  # one LOST line per agent at the end
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 20 s)")
    parser.add_argument("--no-saturated", action="store_true",
                        help="paced phases only (large fleets, where the saturated phases add nothing)")
    parser.add_argument("--agents", type=int, action="append", default=None,
                        help="simulated fleet size of a paced phase (repeatable) [1000, 5000, 10000]")
    parser.add_argument("--rate", type=float, default=10_000.0, help="offered heartbeats/s when paced")
    parser.add_argument("--per-generator", type=int, default=25_000,
                        help="simulated agents per generator process (a larger fleet gets more processes)")
    parser.add_argument("--relays", type=int, default=0, metavar="K",
                        help="agents on K replicas that relay them to the leader (paced phases only) [0: agents on the hub]")
    parser.add_argument("--generator", choices=["python", "native"], default="python",
                        help="what simulates the paced phases' agents: grpc.aio processes, or bench/native/hbgen (C++, "
                             "built on first use; needs Debian's libgrpc++-dev and protobuf-compiler-grpc) [python]")
    parser.add_argument("--ramp-per-1000", type=float, metavar="SECONDS",
                        help=f"how long opening the fleet's streams may take per 1,000 agents [{RAMP_S_PER_1000:g}]")
    args = parser.parse_args()
    if args.ramp_per_1000:
        os.environ["EDGEPLANE_BENCH_RAMP_S_PER_1000"] = str(args.ramp_per_1000)
        globals()["RAMP_S_PER_1000"] = args.ramp_per_1000
    fleets = args.agents or [1000, 5000, 10000]
    duration = 5.0 if args.quick else 15.0

    if args.generator == "native":
        try:
            _native.hbgen()  # build it now, so a missing package is said before any phase starts
        except _native.BuildError as exc:
            parser.exit(2, f"bench.agent_heartbeats: {exc}\n")
    try:
        rows = run(fleets, args.rate, duration, saturated_phases=not args.no_saturated, per_generator=args.per_generator,
                   relays=args.relays, native=args.generator == "native")
    except RuntimeError as exc:  # a fleet fell short, or a generator failed: one line, no traceback
        parser.exit(1, f"bench.agent_heartbeats: {exc}\n")
    table = Table(title=f"Heartbeat ingestion ({os.cpu_count()} cores, {args.generator} generators in other processes)")
    for col in ["phase", "agents", "offered/s", "received/s", "hub CPU (cores)", "generators' CPU", "lag p50 ms", "lag p99 ms",
                "ramp s", "hub RSS MiB", "MiB / 10k agents", "streams reopened"]:
        table.add_column(col, justify="right" if col != "phase" else "left")
    for r in rows:
        table.add_row(
            r["phase"], str(r["agents"]), str(r["offered_per_s"] or "max"), f"{r['heartbeats_per_s']:,}",
            str(r["hub_cpu_cores"]), str(r["generator_cpu_cores"]), str(r.get("lag_p50_ms", "-")), str(r.get("lag_p99_ms", "-")), str(r["ramp_s"]),
            f"{r['hub_rss_mib']:,.0f}", f"{r['hub_mib_per_10k_agents']:,.0f}", f"{r['streams_reopened']:,}",
        )
    Console().print(table)
    for r in rows:
        if "relays" in r:
            print(f"{r['phase']}, {r['agents']:,} agents: {r['relay_batches_per_s']} batches/s carrying {r['relay_reports_per_s']:,} "
                  f"reports/s; replicas received {r['relay_heartbeats_per_s']} heartbeats/s with CPU {r['relay_cpu_cores']} cores "
                  f"and RSS {r['relay_rss_mib']} MiB")
    results = RESULTS.with_name("agent_heartbeats_relayed.json") if args.relays else RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({
        "benchmark": "agent_heartbeats",
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "duration_s": duration,
        "relays": args.relays,
        "generator": args.generator,
        "target": {"heartbeats_per_s": 10_000, "lag_p99_ms": 1000},
        "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
