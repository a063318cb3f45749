"""Control-plane replicas under faults, with real processes on a real PostgreSQL server.

- The leader is killed with -9 while writes go to both replicas and inference goes through
  a standalone gateway following both: another replica leads within the lease's bound, no
  acknowledged write is lost, no request through the gateway fails, the agent moves to the
  other replica, which takes it whether or not it leads yet.
- The database is restarted under the replicas: they reconnect by themselves, the same
  replica leads on, and nothing acknowledged is lost.
- The leader is cut off from the database (its connection runs through a proxy the test
  cuts): it stops acting before the other replica starts leading.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import os
import pathlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from orchestrator.store import open_store
from orchestrator.testing import harness
from orchestrator.testing import postgres as postgres_server
from orchestrator.testing.postgres import PostgresServer

from . import support
from .test_serve_replicas import LEASE_S, MODEL, REQUEST, SITE, agent_joins, endpoints, leaders, start_replicas, the_leader, view, wait_for

_ROWS = json.loads(REQUEST.read_text())["input"]
BODY = json.dumps({"inputs": [{"name": "input", "shape": [len(_ROWS), len(_ROWS[0])], "datatype": "FP32",
                               "data": [x for row in _ROWS for x in row]}]}).encode()
HEADERS = {"content-type": "application/json", "x-edgeplane-location": "45.7,4.8"}
WRITE_EVERY_S = 0.05
LOAD_BOUND = 20_000  # requests or writes per load thread, whatever happens


def marker(i: int) -> str:
    """A write the fault must not lose: a Site far from any demand, so nothing is planned on it."""
    doc = {"apiVersion": support.API_VERSION, "kind": "Site", "metadata": {"name": f"marker-{i}", "labels": {"load": "chaos"}},
           "spec": support.edge_site_spec(lat=43.0, lon=1.0)}
    return yaml.safe_dump(doc)


class Load:
    """Inference through the gateway and writes to every replica, on threads, until stopped."""

    def __init__(self, gateway_url: str, replica_urls: list[str]):
        self.gateway_url, self.replica_urls = gateway_url, replica_urls
        self.answers: list[tuple[float, int, str]] = []  # time, status, answering site (or the error)
        self.acknowledged: dict[str, int] = {}  # name -> resourceVersion the API answered with
        self.refused: list[str] = []  # writes not acknowledged (the replica written to was dead)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._infer, daemon=True) for _ in range(2)]
        self._threads.append(threading.Thread(target=self._write, daemon=True))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _infer(self) -> None:
        with httpx.Client(base_url=self.gateway_url, timeout=30) as http:
            for _ in range(LOAD_BOUND):
                if self._stop.is_set():
                    return
                try:
                    r = http.post(f"/v2/models/{MODEL}/infer", content=BODY, headers=HEADERS)
                    self.answers.append((time.monotonic(), r.status_code, r.headers.get("x-edgeplane-site", r.text[:200])))
                except httpx.HTTPError as exc:
                    self.answers.append((time.monotonic(), 0, repr(exc)))

    def _write(self) -> None:
        for i in range(LOAD_BOUND):
            if self._stop.wait(WRITE_EVERY_S):
                return
            url = self.replica_urls[i % len(self.replica_urls)]
            try:
                r = httpx.post(f"{url}/v1/apply", content=marker(i), timeout=30)
            except httpx.HTTPError as exc:
                self.refused.append(f"marker-{i}: {exc!r}")
                continue
            if r.status_code == 200:
                (result,) = r.json()["results"]
                self.acknowledged[result["name"]] = int(result["resourceVersion"])
            else:
                self.refused.append(f"marker-{i}: {r.status_code} {r.text[:200]}")

    def answered_since(self, t: float) -> int:
        return sum(1 for a in self.answers if a[0] > t and a[1] == 200)


def markers_in_store(url: str) -> dict[str, int]:
    store = open_store(url)
    try:
        return {o.name: o.resource_version for o in store.list("Site") if o.name.startswith("marker-")}
    finally:
        store.close()


def last_event(url: str) -> int:
    store = open_store(url)
    try:
        return max((e.id for e in store.events(limit=100_000)), default=0)
    finally:
        store.close()


def elections(url: str) -> list[Any]:
    store = open_store(url)
    try:
        return [e for e in store.events(limit=100_000) if e.action == "leader-elected"]
    finally:
        store.close()


def test_leader_killed_under_apply_and_inference_load_loses_nothing_and_fails_no_request(
    tmp_path: pathlib.Path, offline_fleet: pathlib.Path, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    replicas = start_replicas(tmp_path, offline_fleet, [url, url])
    agent: harness.AgentProcess | None = None
    gateway: harness.AgentProcess | None = None
    try:
        leader = the_leader(replicas)
        follower = next(r for r in replicas if r is not leader)
        token = view(follower)["leader"]["fencingToken"]
        applied = support.cli("apply", "-f", str(offline_fleet), server_url=follower.url)
        assert applied.returncode == 0, applied.stderr
        addresses = ",".join(f"127.0.0.1:{r.agent_port}" for r in (leader, follower))  # the leader's first: killing it moves the agent
        agent = harness.spawn_agent(harness.agent_command(addresses, SITE, tmp_path / "agent", heartbeat_interval=0.5), SITE,
                                    tmp_path / "agent")
        wait_for("the leader routes to the agent", lambda: endpoints(leader), within_s=120, every_s=0.2)
        gateway = harness.spawn_agent(harness.gateway_command([r.url for r in replicas]), "gateway", tmp_path / "gateway")
        answers: list[httpx.Response] = []
        try:
            wait_for("the gateway answers from the agent", lambda: answers.append(httpx.post(
                f"{gateway.url}/v2/models/{MODEL}/infer", content=BODY, headers=HEADERS, timeout=30)) or answers[-1].status_code == 200,
                within_s=60, every_s=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer {answers[-1].status_code} {answers[-1].text[:300]}\n{gateway.log()[-2000:]}") from None

        with Load(gateway.url, [r.url for r in replicas]) as load:
            wait_for("load before the kill", lambda: load.answered_since(0) >= 50 and len(load.acknowledged) >= 10, within_s=60)
            before_kill = last_event(url)
            os.killpg(leader.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            after = wait_for("another replica leads", lambda: (v := view(follower))["role"] == "leader" and v,
                             within_s=4 / 3 * LEASE_S + 2, every_s=0.02)
            took_over = time.monotonic() - killed
            wait_for("the election logged", lambda: elections(url)[1:],
                               within_s=10)
            wait_for("the agent joined the other replica", lambda: agent_joins(url, before_kill), within_s=60, every_s=0.2)
            rejoined = time.monotonic()
            # the new leader has planned with the agent and the writes go on to the survivor
            wait_for("load after the agent moved", lambda: load.answered_since(rejoined + 1) >= 50
                     and sum(1 for n in load.acknowledged if int(n.split("-")[1]) % 2 == replicas.index(follower)) >= 20,
                     within_s=120)
        print(f"\nleader killed under load: another led after {took_over:.2f}s (lease {LEASE_S:g}s); "
              f"{len(load.answers)} requests through the gateway, {len(load.acknowledged)} writes acknowledged")
        assert after["leader"]["fencingToken"] > token
        # the other replica took the agent at once, leading or not: the agent moved to it
        # without waiting (its backoff ladder would have reached 2 s, 4 s, …)
        waits = [float(m) for m in re.findall(r"reconnecting to \S+ in ([0-9.]+)s", agent.log())]
        assert waits and max(waits) == 0, waits
        failed = [a for a in load.answers if a[1] != 200]
        assert not failed, failed[:5]
        assert {a[2] for a in load.answers} == {SITE}
        # every acknowledged write is in the store, at the version the API answered with
        stored = markers_in_store(url)
        lost = {n: v for n, v in load.acknowledged.items() if stored.get(n) != v}
        assert not lost, lost
        # what was refused was refused by the dead replica, never by the survivor
        survivor = replicas.index(follower)
        assert all(int(r.split(":")[0].split("-")[1]) % 2 != survivor for r in load.refused), load.refused[:5]
    finally:
        for p in (gateway, agent):
            if p is not None:
                p.stop()
        for r in replicas:
            r.stop()


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own: it is restarted, which others must not see."""
    with postgres_server.running() as server:
        if isinstance(server, str):
            pytest.skip(server)
        yield server


def test_replicas_reconnect_after_the_database_restarts_and_lose_nothing(tmp_path: pathlib.Path, offline_fleet: pathlib.Path,
                                                                          own_server: PostgresServer) -> None:
    url = own_server.create_database()
    replicas = start_replicas(tmp_path, offline_fleet, [url, url])
    try:
        leader = the_leader(replicas)
        follower = next(r for r in replicas if r is not leader)
        acknowledged = {}
        for i in range(6):
            r = httpx.post(f"{replicas[i % 2].url}/v1/apply", content=marker(i), timeout=30)
            assert r.status_code == 200, r.text
            acknowledged[f"marker-{i}"] = int(r.json()["results"][0]["resourceVersion"])
        own_server.stop("fast")
        down = httpx.post(f"{follower.url}/v1/apply", content=marker(100), timeout=30)
        assert down.status_code == 503 and "PostgreSQL" in down.text, (down.status_code, down.text)
        own_server.start()
        # the same processes: a write through each replica lands again, and reads see all of it
        for i in range(6, 8):
            r = wait_for("a write after the restart", lambda i=i: (a := httpx.post(f"{replicas[i % 2].url}/v1/apply", content=marker(i),
                                                                                    timeout=30)).status_code == 200 and a, within_s=60, every_s=0.2)
            acknowledged[f"marker-{i}"] = int(r.json()["results"][0]["resourceVersion"])
        assert markers_in_store(url) == acknowledged
        # one leader again (the lease may have lapsed while the database was down)
        wait_for("one leader after the restart", lambda: len(leaders(replicas)) == 1, within_s=30, every_s=0.2)
        for r in replicas:
            assert r.process.poll() is None, r.log()
            listed = httpx.get(f"{r.url}/v1/sites", timeout=10).json()["items"]
            assert {s["metadata"]["name"] for s in listed} >= set(acknowledged)
    finally:
        for r in replicas:
            r.stop()


class CuttableProxy:
    """A TCP proxy on loopback to the database; ``cut()`` makes it a black hole (bytes in
    both directions are dropped, connections stay open): a partition, not a refusal."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.cut_event = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            self._open += (client, upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with src, dst:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if self.cut_event.is_set():
                    continue  # dropped on the floor
                try:
                    dst.sendall(data)
                except OSError:
                    return

    def cut(self) -> None:
        self.cut_event.set()

    def close(self) -> None:
        """Ends every connection (the replica behind it sees the database gone, and stops fast)."""
        self._closed = True
        self._server.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def log_time(text: str, needle: str) -> float | None:
    """The time (epoch seconds) of the first log line holding ``needle``
    (``2026-12-03 23:13:36,318 WARNING …``, the machine's local time, as time.time())."""
    for line in text.splitlines():
        if needle in line:
            with contextlib.suppress(ValueError):
                return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def test_a_leader_cut_off_from_the_database_stops_acting_before_another_leads(
    tmp_path: pathlib.Path, offline_fleet: pathlib.Path, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    proxy = CuttableProxy(postgres.port)
    proxied = url.replace(f":{postgres.port}/", f":{proxy.port}/")
    # the first replica reaches the database only through the proxy, and leads alone at first
    first = start_replicas(tmp_path / "a", offline_fleet, [proxied], "--log-level", "info")
    replicas = first
    try:
        assert the_leader(first) is first[0]
        replicas = first + start_replicas(tmp_path / "b", offline_fleet, [url], "--log-level", "info")
        token = view(replicas[1])["leader"]["fencingToken"]
        proxy.cut()
        cut_at = time.time()
        after = wait_for("the other replica leads", lambda: (v := view(replicas[1]))["role"] == "leader" and v,
                         within_s=4 / 3 * LEASE_S + 10, every_s=0.02)
        assert after["leader"]["fencingToken"] == token + 1
        old = first[0].log()
        stepped_down = log_time(old, "no longer leading")
        took_over = log_time(replicas[1].log(), "leading with fencing token")
        assert stepped_down is not None, old
        assert took_over is not None, replicas[1].log()
        print(f"\npartition: old leader stepped down {stepped_down - cut_at:.2f}s after the cut, "
              f"the other led {took_over - cut_at:.2f}s after it (lease {LEASE_S:g}s)")
        assert stepped_down < took_over, (stepped_down, took_over)
    finally:
        proxy.close()
        for r in replicas:
            r.stop()
