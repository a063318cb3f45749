"""Control-plane failover: how long until another replica leads once the leader is gone.

Two ``edgeplane serve`` processes share one PostgreSQL database (a throwaway server from
the Debian packages, ``orchestrator.testing.postgres``). Each round finds the leader
(``GET /v1/controlplane``), stops it, with ``kill -9`` or with SIGTERM (a clean stop
releases the lease), and measures the time until the other replica answers that it
leads; then a fresh replica takes the stopped one's place. The baseline is the bound the
design gives: after a kill, the lease's time to live plus one follower attempt period
(``4/3 × ttl``); after a clean stop, one attempt period (``ttl/3``).

Run::

    .venv/bin/python -m bench.failover [--quick]
"""

from __future__ import annotations

import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from bench import cli
from orchestrator.testing import postgres
from orchestrator.ports import free_port

RESULTS = pathlib.Path(__file__).parent / "results" / "failover.json"
EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"


class Replica:
    def __init__(self, root: pathlib.Path, name: str, url: str, lease_s: float):
        self.port = free_port()
        self.log = open(root / f"{name}.log", "w")
        self.process = subprocess.Popen(
            [str(EDGEPLANE), "serve", "--data-dir", str(root / name), "--port", str(self.port), "--agent-port", str(free_port()),
             "--agent-join-port", str(free_port()), "--store", url, "--leader-lease", str(lease_s), "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("EDGEPLANE_")},
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def role(self) -> str | None:
        try:
            return str(httpx.get(f"{self.url}/v1/controlplane", timeout=5).json()["role"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self, sig: int) -> None:
        self.signal(sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.log.close()


def _wait(check: Any, within_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if check():
            return time.monotonic() - start
        time.sleep(0.01)
    raise RuntimeError(f"{what}: not within {within_s}s")


def _rounds(url: str, root: pathlib.Path, lease_s: float, kills: int, clean: int) -> dict[str, list[float]]:
    replicas = [Replica(root, f"r{i}", url, lease_s) for i in range(2)]
    made = 2
    out: dict[str, list[float]] = {"kill": [], "clean": []}
    try:
        for how in ["kill"] * kills + ["clean"] * clean:
            _wait(lambda rs=replicas: sorted(r.role() or "" for r in rs) == ["follower", "leader"], 120, "one leader, one follower")
            leader = next(r for r in replicas if r.role() == "leader")
            other = next(r for r in replicas if r is not leader)
            started = time.monotonic()
            sig = signal.SIGKILL if how == "kill" else signal.SIGTERM
            leader.signal(sig)  # the clock runs from the signal, not from the process's exit
            _wait(lambda o=other: o.role() == "leader", 60, "the other replica took over")
            out[how].append(time.monotonic() - started)
            leader.stop(sig)
            replicas = [other, Replica(root, f"r{made}", url, lease_s)]
            made += 1
    finally:
        for r in replicas:
            r.stop(signal.SIGTERM)
    return out


def _summary(times: list[float]) -> dict[str, Any]:
    return {"runs": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}


async def run(quick: bool) -> cli.Report:
    leases = (2.0,) if quick else (2.0, 3.0)  # the test suite's lease, and the default
    kills, clean = (3, 2) if quick else (6, 3)
    results = []
    with postgres.running() as server:
        if isinstance(server, str):
            raise SystemExit(f"bench.failover needs PostgreSQL: {server}")
        for lease_s in leases:
            with tempfile.TemporaryDirectory(prefix="edgeplane-failover-") as tmp:
                times = _rounds(server.create_database(), pathlib.Path(tmp), lease_s, kills, clean)
            results.append({"lease_s": lease_s, "kill_9": {**_summary(times["kill"]), "bound_s": round(lease_s * 4 / 3, 3)},
                            "sigterm": {**_summary(times["clean"]), "bound_s": round(lease_s / 3, 3)}})
    return {"benchmark": "failover", "quick": quick, "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "results": results}


def print_table(report: cli.Report) -> None:
    print(f"{'lease':>6} {'stop':>8} {'median':>8} {'max':>8} {'bound':>8}  runs")
    for r in report["results"]:
        for label, key in (("kill -9", "kill_9"), ("SIGTERM", "sigterm")):
            row = r[key]
            print(f"{r['lease_s']:>5g}s {label:>8} {row['median_s']:>7.2f}s {row['max_s']:>7.2f}s {row['bound_s']:>7.2f}s  {row['runs']}")


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "a 2 s lease only, 3 kills and 2 clean stops")
    return cli.main(parser, argv, lambda args: run(args.quick), print_table, RESULTS)


if __name__ == "__main__":
    sys.exit(main())
