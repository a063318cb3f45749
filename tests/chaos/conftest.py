"""Chaos fixtures: ``edgeplane serve`` as a subprocess that tests kill -9 and restart on
the same data dir and ports, agents as subprocesses (optionally with a file-size limit),
one-model fleet manifests, and a recorder of measured recovery times."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from orchestrator.testing import harness, manifests, onnx_models
from orchestrator.ports import free_port

EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"
RECOVERY: dict[str, float] = {}

def fleet_yaml(sites: dict[str, float], model: onnx_models.BuiltModel, replicas: int) -> str:
    """FR edge sites at the given latitudes and one intent model spread over them."""
    return manifests.bundle(
        *(manifests.edge_site(name, "FR", lat, 2.35, region="fr") for name, lat in sites.items()),
        manifests.onnx_model("intent", model.path.name, model.sha256),
        manifests.deployment("intent-fr", "intent", replicas, manifests.spread_by_site(residency=["FR"], tiers=["edge"])),
    )


def infer_body(model: onnx_models.BuiltModel, rows: int = 1) -> bytes:
    x = np.ones((rows, model.in_dim), dtype=np.float32)
    return json.dumps({"inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [rows, model.in_dim], "data": x.ravel().tolist()}]}).encode()



def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (httpx.TransportError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class ServeProcess:
    """``edgeplane serve`` on fixed ports and a fixed data dir, restartable after kill -9."""

    def __init__(self, root: pathlib.Path, artifacts: pathlib.Path, extra: tuple[str, ...] = ()) -> None:
        self.root = root
        self.port, self.agent_port = free_port(), free_port()
        self.cmd = [str(EDGEPLANE), "serve", "--data-dir", str(root / "cp"), "--port", str(self.port), "--agent-port", str(self.agent_port),
                    "--heartbeat-interval", "0.5", "--missed-heartbeats", "3", "--artifact-root", str(artifacts),
                    "--bootstrap-token", harness.BOOTSTRAP_TOKEN, "--log-level", "warning",
                    "--insecure-agents", *extra]  # faults, not identity, are under test here (tests/security covers mTLS)
        self.url = f"http://127.0.0.1:{self.port}"
        self.agent_target = f"127.0.0.1:{self.agent_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> float:
        """Start and wait for /healthz; returns the seconds it took."""
        started = time.monotonic()
        self.starts += 1
        log = (self.root / f"serve-{self.starts}.log").open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=harness.die_with_parent)
        wait_for(lambda: self.proc.poll() is None and httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, timeout, "edgeplane serve")
        return time.monotonic() - started

    def log(self) -> str:
        """What the latest start logged."""
        path = self.root / f"serve-{self.starts}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


#: Two FR edge sites, as the control-plane crash tests run them.
TWO_SITES = {"edge-a": 48.0, "edge-b": 48.1}


def start_two_sites(cp: ServeProcess, root: pathlib.Path, model: onnx_models.BuiltModel, agents: list[harness.AgentProcess]) -> None:
    """Start ``cp``, apply :data:`TWO_SITES` with ``model`` on two replicas and start an agent
    for each site (appended to ``agents``)."""
    cp.start()
    assert httpx.post(f"{cp.url}/v1/apply", content=fleet_yaml(TWO_SITES, model, replicas=2).encode(), timeout=30).status_code == 200
    for site, lat in TWO_SITES.items():
        agents.append(spawn_agent(cp.agent_target, site, root / "agents" / site, lat))


#: Sets RLIMIT_FSIZE, then becomes the agent: no preexec_fn, so no fork() of a process
#: that may run gRPC threads (an in-process control plane).
_WITH_FSIZE = ("import os, resource, sys; n = int(sys.argv[1]); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])")


def spawn_agent(target: str, site: str, data_dir: pathlib.Path, lat: float, fsize_limit: int | None = None,
                extra: tuple[str, ...] = (), tls: tuple[pathlib.Path, str] | None = None) -> harness.AgentProcess:
    """An ``edgeplane-agent`` subprocess; ``fsize_limit`` caps the size of any file it writes
    (RLIMIT_FSIZE: a full disk as the process sees it, write() fails with EFBIG)."""
    cmd = harness.agent_command(target, site, data_dir, country="FR", region="fr", lat=lat, lon=2.35, heartbeat_interval=0.5,
                                extra=extra, tls=tls)
    if fsize_limit is not None:
        cmd = [sys.executable, "-c", _WITH_FSIZE, str(fsize_limit), *cmd]
    proc, log_path = harness.launch_agent(cmd, data_dir)
    return harness.AgentProcess(site, data_dir, proc, harness.await_serving(proc, site, log_path), log_path)


@pytest.fixture
def models(tmp_path: pathlib.Path) -> tuple[onnx_models.BuiltModel, onnx_models.BuiltModel]:
    art = tmp_path / "artifacts"
    v1 = onnx_models.build_mlp(art / "intent-v1.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    v2 = onnx_models.build_mlp(art / "intent-v2.onnx", in_dim=8, hidden=16, out_dim=4, seed=2)
    return v1, v2


@pytest.fixture
def agents() -> Iterator[list[harness.AgentProcess]]:
    started: list[harness.AgentProcess] = []
    yield started
    for a in started:
        a.kill(signal.SIGCONT)
        a.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RECOVERY:
        terminalreporter.write_sep("-", "chaos recovery times (s)")
        for name, seconds in RECOVERY.items():
            terminalreporter.write_line(f"{name}: {seconds:.2f}")
