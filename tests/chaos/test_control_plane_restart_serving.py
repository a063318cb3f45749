"""A control plane that restarts (kill -9, then the same data dir and ports) must not make
the edge agents stop serving, at any moment: not while it is down, and not while it comes
back, plans again and takes their rejoins (a first plan that called their sites lost
before they rejoined would have them unload what they serve until a later pass put it
back). Every agent is asked back to back through two restarts, the second with the agents
held stopped until the restarted control plane has been up for a second."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import threading
import time
from collections.abc import Iterator

import httpx

from orchestrator.testing import harness, onnx_models

from .conftest import ServeProcess, infer_body, start_two_sites, wait_for


class Prober:
    """Posts to every agent back to back from a thread and keeps each answer that was not a
    200; :meth:`paused` holds it between two rounds (while the agents are stopped)."""

    def __init__(self, agents: list[harness.AgentProcess], model: onnx_models.BuiltModel) -> None:
        self._agents, self._body = agents, infer_body(model)
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
                for a in self._agents:
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
        assert prober.requests > 100
        assert prober.failures == [], f"{len(prober.failures)} of {prober.requests} requests to the agents failed: {prober.failures[:5]}"
    finally:
        cp.stop()
