"""A control plane that restarts (kill -9, then the same data dir and ports) must not make
the edge agents stop serving, at any moment: not while it is down, and not while it comes
back, plans again and takes their rejoins (a first plan that called their sites lost
before they rejoined would have them unload what they serve until a later pass put it
back). Every agent is asked back to back through two restarts, the second with the agents
held stopped until the restarted control plane has been up for a second."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx

from orchestrator.testing import harness, onnx_models

from .conftest import TWO_SITES, ServeProcess, fleet_yaml, infer_body, spawn_agent, start_two_sites, wait_for
from .proxy import ChaosProxy


class Prober:
    """Posts to every agent (or gateway) back to back from a thread and keeps each answer
    that was not a 200; :meth:`paused` holds it between two rounds (while the agents are
    stopped)."""

    def __init__(self, targets: list[harness.AgentProcess], model: onnx_models.BuiltModel) -> None:
        self._targets, self._body = targets, infer_body(model)
        self.failures: list[tuple[str, float, int | str]] = []
        self.requests = 0
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                if not self._go.is_set():
                    self._idle.set()
                    self._go.wait(30)
                    continue
                self._idle.clear()
                for a in self._targets:
                    try:
                        status: int | str = client.post(f"{a.url}/v2/models/intent/infer", content=self._body).status_code
                    except httpx.TransportError as exc:
                        status = type(exc).__name__
                    self.requests += 1
                    if status != 200:
                        self.failures.append((a.site, time.monotonic(), status))
                time.sleep(0.005)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._go.clear()
        assert self._idle.wait(10), "the prober did not pause"
        try:
            yield
        finally:
            self._go.set()

    def __enter__(self) -> "Prober":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._go.set()
        self._thread.join(10)


def restart_twice(cp: ServeProcess, agents: list[harness.AgentProcess], prober: Prober) -> None:
    """kill -9 and restart ``cp`` twice, the second time with ``agents`` held stopped until
    it has been up for a second; return once both have rejoined and passes ran with them."""
    for late in (False, True):
        cp.kill9()
        time.sleep(0.3)
        if late:  # the agents come back only after the restarted control plane is up and planning
            with prober.paused():
                for a in agents:
                    a.kill(signal.SIGSTOP)
                cp.start()
                time.sleep(1.0)
                for a in agents:
                    a.kill(signal.SIGCONT)
        else:
            cp.start()
        time.sleep(1.0)
        wait_for(lambda: all(item.get("status", {}).get("health") == "Healthy"
                             for item in httpx.get(f"{cp.url}/v1/sites", timeout=5).json()["items"]), 30, "both agents rejoined")
        time.sleep(2.0)  # passes with both agents back


def test_agents_keep_serving_through_a_control_plane_restart(
        tmp_path: pathlib.Path, models: tuple[onnx_models.BuiltModel, onnx_models.BuiltModel],
        agents: list[harness.AgentProcess]) -> None:
    v1, _ = models
    cp = ServeProcess(tmp_path, v1.path.parent)
    try:
        start_two_sites(cp, tmp_path, v1, agents)
        wait_for(lambda: all(httpx.post(f"{a.url}/v2/models/intent/infer", content=infer_body(v1), timeout=5).status_code == 200
                             for a in agents), 60, "both agents serving")
        with Prober(agents, v1) as prober:
            restart_twice(cp, agents, prober)
        assert prober.requests > 100
        assert prober.failures == [], f"{len(prober.failures)} of {prober.requests} requests to the agents failed: {prober.failures[:5]}"
    finally:
        cp.stop()



class ProxyThread:
    """A :class:`ChaosProxy` to ``port`` on an event loop of its own thread (the test and the
    control plane here are processes and threads, not coroutines)."""

    def __init__(self, port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.proxy = asyncio.run_coroutine_threadsafe(ChaosProxy("127.0.0.1", port).start(), self._loop).result(10)

    def call(self, fn: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_a_standalone_gateway_keeps_the_endpoints_of_agents_not_back_yet(
        tmp_path: pathlib.Path, models: tuple[onnx_models.BuiltModel, onnx_models.BuiltModel],
        agents: list[harness.AgentProcess]) -> None:
    """A gateway that runs alone routes with its last table while the control plane is away;
    when the control plane is back it takes the new one at once, and that table must still
    have the agents that serve but have not rejoined yet (here their uplink is cut; after a
    long outage their reconnect backoff is up to 30 s, the gateway's 5 s), or the gateway
    answers 503 until they are back."""
    v1, _ = models
    cp = ServeProcess(tmp_path, v1.path.parent)
    uplink = ProxyThread(cp.agent_port)
    gateway: harness.AgentProcess | None = None
    try:
        cp.start()
        assert httpx.post(f"{cp.url}/v1/apply", content=fleet_yaml(TWO_SITES, v1, replicas=2).encode(), timeout=30).status_code == 200
        for site, lat in TWO_SITES.items():
            agents.append(spawn_agent(uplink.proxy.address, site, tmp_path / "agents" / site, lat))
        gateway = harness.spawn_gateway([cp.url], "gateway", tmp_path / "gateway")
        ready = f"{gateway.url}/readyz"
        wait_for(lambda: httpx.get(ready, timeout=5).json().get("endpoints") == 2, 60, "the gateway with both agents")
        before = httpx.get(ready, timeout=5).json()["epoch"]
        with Prober([gateway], v1) as prober:
            uplink.call(uplink.proxy.blackhole)  # the agents serve on, but cannot reach the control plane
            cp.kill9()
            cp.start()
            wait_for(lambda: (got := httpx.get(ready, timeout=5).json())["epoch"] != before and got["connected"], 30,
                     "the gateway following the restarted control plane")
            asked = prober.requests
            wait_for(lambda: prober.requests >= asked + 100, 30, "100 requests through the new table")
            uplink.call(uplink.proxy.heal)
            wait_for(lambda: all(item.get("status", {}).get("health") == "Healthy"
                                 for item in httpx.get(f"{cp.url}/v1/sites", timeout=5).json()["items"]), 60, "both agents rejoined")
            asked = prober.requests
            wait_for(lambda: prober.requests >= asked + 100, 30, "100 requests with both agents back")
        assert prober.failures == [], (f"{len(prober.failures)} of {prober.requests} requests to the gateway failed: {prober.failures[:5]}\n"
                                       f"gateway log:\n{gateway.log()[-3000:]}")
    finally:
        if gateway is not None:
            gateway.stop()
        cp.stop()
        uplink.close()
