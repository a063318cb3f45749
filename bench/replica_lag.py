"""How late replicas hear of each other: the leader's table at a follower, a follower's agent at the leader.

    .venv/bin/python -m bench.replica_lag [--quick]

Two paths between control-plane replicas on one PostgreSQL store, each measured against
the way it worked before, in the same run, side by side in one process (so both see the
same machine at the same moment):

  table     the leader publishes its endpoint table (``store.publish``) at random gaps of
            50-300 ms; a follower reads a newer version when the store's change feed
            tells it (``PostgresStore.follow_changes``, as ``edgeplane serve`` does) or
            its poll comes (1 s). Baseline: the poll alone. Lag: publish returned ->
            the follower holds that version.
  relay     agents join a follower's hub at random gaps; its relay client sends the join
            to the leader's hub over gRPC on loopback (``orchestrator.agents.relay``).
            Lag: the join on the follower -> the leader's JOINED event. Baseline: the same
            client that waits for its next flush (0.25 s), as every report did before.

Needs the PostgreSQL server binaries (``tests/install-system-packages``) for ``table``;
without them that part is reported as skipped. Writes bench/results/replica_lag.json.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench import cli
from orchestrator.agents import auth, hub, model, relay, relay_leader, service
from orchestrator.testing import postgres

RESULTS = Path(__file__).parent / "results" / "replica_lag.json"
POLL_S = 1.0  # what `edgeplane serve --store-poll` defaults to
TOKEN = "bench-token"


def _summary(lags_s: list[float]) -> dict[str, float]:
    ms = np.array(lags_s) * 1e3
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "max_ms": float(ms.max())}


# -- table: the leader's publish at a follower -------------------------------------------------


class _Follower:
    """A follower's store loop as ``following.StoreFollower`` runs it: a read when told, or each poll."""

    def __init__(self, url: str, notified: bool) -> None:
        from orchestrator.store.postgres import PostgresStore

        self.store = PostgresStore(url)
        self.changed = asyncio.Event()
        self.seen_at: dict[int, float] = {}
        self.feed = None
        if notified:
            loop = asyncio.get_running_loop()
            self.feed = self.store.follow_changes(
                lambda what: loop.call_soon_threadsafe(self.changed.set) if what in ("*", "published:table") else None)

    async def run(self) -> None:
        version = 0
        while True:
            try:
                async with asyncio.timeout(POLL_S):
                    await self.changed.wait()
            except TimeoutError:
                pass
            self.changed.clear()
            got = await asyncio.to_thread(self.store.published, "table", version)
            if got is not None:
                version = got[0]
                self.seen_at.setdefault(version, time.monotonic())

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        self.store.close()


def _publish(store: Any, body: str) -> tuple[int, float]:
    """Publish, and the moment the commit returned (taken in the publishing thread: the
    event loop may run a notified follower's read first)."""
    version = store.publish("table", body)
    return version, time.monotonic()


async def _table(url: str, publishes: int, rng: random.Random) -> dict[str, Any]:
    from orchestrator.store.postgres import PostgresStore

    leader = PostgresStore(url)
    followers = {"notified": _Follower(url, notified=True), "poll": _Follower(url, notified=False)}
    tasks = [asyncio.create_task(f.run()) for f in followers.values()]
    published_at: dict[int, float] = {}
    try:
        await asyncio.sleep(0.5)  # the feed is listening
        for i in range(publishes):
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            version, at = await asyncio.to_thread(_publish, leader, json.dumps({"version": i, "pad": "x" * 2000}))
            published_at[version] = at
        deadline = time.monotonic() + 2 * POLL_S + 1
        while time.monotonic() < deadline and not all(max(published_at) in f.seen_at for f in followers.values()):
            await asyncio.sleep(0.05)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for f in followers.values():
            f.close()
        leader.close()
    # a version replaced before a poll came was never read: it counts as late as the next one read
    out = {}
    for name, f in followers.items():
        lags = []
        for v, at in published_at.items():
            read = min((t for seen, t in f.seen_at.items() if seen >= v), default=None)
            if read is not None:
                lags.append(read - at)
        out[name] = _summary(lags) | {"skipped_versions": sum(v not in f.seen_at for v in published_at)}
    return out


# -- relay: a follower's agent at the leader ---------------------------------------------------


class _FlushOnly(relay.RelayClient):
    """The relay client as it was: every report waits for the next flush."""

    def touched(self, site: str) -> None:
        self._touched.add(site)


def _application(site: str) -> model.JoinApplication:
    return model.JoinApplication(site=site, bootstrap_token=TOKEN, credential=None, agent_id="", endpoint_url="http://10.0.0.1:8080",
                                 location=model.Location("FR", "eu-west", 48.85, 2.35), labels={}, agent_version="bench",
                                 heartbeat_interval=30.0, capacity=model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",)))


async def _relay(joins: int, rng: random.Random) -> dict[str, Any]:
    joined_at: dict[str, float] = {}

    def on_change(event: model.AgentEvent) -> None:
        if event.kind is model.AgentEventKind.JOINED:
            joined_at.setdefault(event.site, time.monotonic())

    leader_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), on_change=on_change, heartbeat_interval=30.0)
    secret = "bench-relay-secret"
    servicer = relay_leader.RelayServicer(leader_hub, lambda: secret)
    server = await service.start_agent_server(leader_hub, "127.0.0.1", 0, more=(servicer.handler(),))
    leader = relay.Leader("bench-leader", f"127.0.0.1:{server.port}", secret, answers_claims=True)
    hubs = {name: hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), heartbeat_interval=30.0) for name in ("at once", "flush")}
    followers = {"at once": relay.RelayClient(hubs["at once"], "bench-now"), "flush": _FlushOnly(hubs["flush"], "bench-flush")}
    tasks = [asyncio.create_task(c.run()) for c in followers.values()]
    sent_at: dict[str, dict[str, float]] = {name: {} for name in followers}
    try:
        for client in followers.values():
            client.point(leader)
        async with asyncio.timeout(30):
            while not all(c.connected for c in followers.values()):
                await asyncio.sleep(0.01)
        for i in range(joins):
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            for name, client in followers.items():
                site = f"{client.replica}-{i}"
                hubs[name].join(_application(site))
                sent_at[name][site] = time.monotonic()
        async with asyncio.timeout(10):
            while not all(site in joined_at for sites in sent_at.values() for site in sites):
                await asyncio.sleep(0.02)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop(grace=None)
    return {name: _summary([joined_at[site] - at for site, at in sites.items()])
            | {"batches": followers[name].batches_total} for name, sites in sent_at.items()}


async def _run(quick: bool) -> cli.Report:
    rng = random.Random(7)
    count = 30 if quick else 120
    results: cli.Report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "count": count, "poll_s": POLL_S, "flush_s": relay.FLUSH_S, "urgent_gap_s": relay.URGENT_GAP_S}
    with postgres.running() as server:
        if isinstance(server, str):
            results["table"] = {"skipped": server}
        else:
            results["table"] = await _table(server.create_database(), count, rng)
    results["relay"] = await _relay(count, rng)
    return results


def print_table(results: cli.Report) -> None:
    table = Table(title="replica lag (ms): now against before, same run")
    for col in ("path", "how", "n", "p50", "p95", "max", "note"):
        table.add_column(col, justify="left" if col in ("path", "how", "note") else "right")
    for path in ("table", "relay"):
        rows = results[path]
        if "skipped" in rows:
            table.add_row(path, "-", "-", "-", "-", "-", rows["skipped"])
            continue
        for how, r in rows.items():
            note = f"{r['skipped_versions']} versions never read" if "skipped_versions" in r else f"{r['batches']} batches"
            table.add_row(path, how, str(r["n"]), f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['max_ms']:.1f}", note)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "30 events per path instead of 120")
    return cli.main(parser, argv, lambda args: _run(args.quick), print_table, RESULTS)


if __name__ == "__main__":
    sys.exit(main())
