"""SIGTERM or SIGINT ends ``edgeplane-agent`` the same way whenever it comes: one line saying
it stopped, exit code 0, no traceback, and no half-made identity in its data dir; and within
``--drain-timeout``, whatever its models are doing. Real agent processes; the moments are
found from outside (its key-making child seen running, its ``--ca-file`` being read from a
FIFO, a marker its model load leaves), never guessed with a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from edge_agent import assignments, daemon, state
from edge_agent.runtime import onnx
from orchestrator.testing import harness

from .conftest import Models

SITE = "edge-a"
IDENTITY = {"agent.key", "agent.crt", "identity.json"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(cmd: list[str], log_path: pathlib.Path) -> subprocess.Popen[bytes]:
    """The agent in a process group of its own, so that a signal to the group reaches it and
    its children only (as systemd's stop or a terminal's Ctrl-C does)."""
    with log_path.open("w") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                cwd=harness.REPO, start_new_session=True)


def making_a_key(proc: subprocess.Popen[bytes]) -> bool:
    with contextlib.suppress(psutil.Error):
        return any("edgeplane_proto.identity" in " ".join(child.cmdline()) for child in psutil.Process(proc.pid).children())
    return False


def assert_stopped_cleanly(returncode: int, log: str) -> None:
    assert returncode == 0, log
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "agent stopped" in log, log


@pytest.mark.parametrize("to_group", [True, False], ids=["group", "agent-alone"])
async def test_a_stop_while_the_key_is_made_leaves_no_half_identity_and_the_next_start_enrols(
        tmp_path: pathlib.Path, to_group: bool) -> None:
    fleet = harness.Fleet(tmp_path)
    proc: subprocess.Popen[bytes] | None = None
    try:
        cp = await fleet.start_control_plane()
        assert cp.ca_file is not None
        data_dir = tmp_path / "agents" / SITE  # where fleet.start_agent starts it again
        cmd = harness.agent_command(cp.agent_target, SITE, data_dir, tls=(cp.ca_file, cp.agent_join_target))
        data_dir.mkdir(parents=True)
        log_path = tmp_path / "first-start.log"
        proc = launch(cmd, log_path)
        await harness.wait_until(lambda: making_a_key(proc), 30, interval=0.005, what="the agent's identity tool")
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(proc.wait, 30)
        assert_stopped_cleanly(returncode, log_path.read_text())
        names = {p.name for p in data_dir.iterdir()}
        assert IDENTITY <= names or not IDENTITY & names, names  # enrolled whole, or not at all
        assert not [n for n in names if n.endswith((".new", ".tmp"))], names

        await fleet.start_agent(SITE)  # waits until it has joined and beaten
        assert IDENTITY <= {p.name for p in data_dir.iterdir()}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        await fleet.stop()


@pytest.mark.parametrize("hang_up_first", [False, True], ids=["", "after-a-hang-up"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_before_the_agent_has_started_ends_it_the_same_way(tmp_path: pathlib.Path, sig: signal.Signals,
                                                                  hang_up_first: bool) -> None:
    fifo = tmp_path / "ca.crt"
    os.mkfifo(fifo)  # the agent blocks reading it: after its flags are parsed, before its event loop runs
    cmd = [sys.executable, "-m", "edge_agent.main", "--control-plane", f"127.0.0.1:{closed_port()}", "--site", SITE,
           "--token", "t", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0", "--ca-file", str(fifo)]
    log_path = tmp_path / "agent.log"
    proc = launch(cmd, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:  # bounded: the agent opens the FIFO once it reads --ca-file
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:  # ENXIO: no reader yet
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.01)
        if hang_up_first:  # not a stop: the one that follows is
            proc.send_signal(signal.SIGHUP)
        proc.send_signal(sig)
        os.write(writer, b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        os.close(writer)
        returncode = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log = log_path.read_text()
    assert_stopped_cleanly(returncode, log)
    assert f"{sig.name} came before it started" in log


def saved_model(data_dir: pathlib.Path, models: Models) -> None:
    """The model an agent serves from its data dir at start, before any control plane answers."""
    data_dir.mkdir(parents=True)
    state.StateStore(data_dir).save_assignments(SITE, assignments.AssignmentSet(
        1, (assignments.Assignment("m", "d", "v", models.v1.path.as_uri(), models.v1.sha256),)))


async def test_a_stop_ends_within_the_drain_timeout_while_runs_are_stuck_and_more_are_queued(
        tmp_path: pathlib.Path, models: Models) -> None:
    release = threading.Event()

    class Stuck(onnx.OnnxModel):  # a model whose runs hang (a stuck device, a huge batch)
        def run(self, feeds, outputs):  # type: ignore[no-untyped-def]
            release.wait(120)  # far past the drain timeout: a stop that waited for the runs would show
            return super().run(feeds, outputs)

    saved_model(tmp_path / "agent", models)
    config = daemon.AgentConfig(control_plane=f"127.0.0.1:{closed_port()}", site=SITE, token="t", data_dir=tmp_path / "agent",
                                listen_port=0, insecure=True, allow_file_artifacts=True, drain_timeout=0.5, workers=2,
                                inline_max_ms=0)
    agent = daemon.Agent(config, load_model=Stuck.load)
    await agent.start()
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [0] * 8}]}
    try:
        await harness.wait_until(lambda: agent.server.ready, 30, interval=0.01, what="the saved model loaded")
        async with httpx.AsyncClient(base_url=agent.endpoint_url, timeout=30) as client:
            requests = [asyncio.create_task(client.post("/v2/models/m/infer", json=body)) for _ in range(4)]
            await harness.wait_until(lambda: agent.server.inflight == 4, 10, interval=0.01, what="two runs under way, two queued")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await agent.stop()
            took = loop.time() - started
            await asyncio.gather(*requests, return_exceptions=True)
        assert took < 60, f"the stop took {took:.1f}s"  # half the runs' 2 minutes: it did not wait for them, nor for the queued ones
    finally:
        release.set()


# Run as ``python -c`` by the next test: the agent, with a model load that takes ten minutes.
SLOW_LOAD = """
import pathlib, sys, time
from edge_agent import main
from edge_agent.runtime import onnx

def load(data, **options):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(600)

onnx.OnnxModel.load = load
sys.exit(main.main(sys.argv[2:]))
"""


def test_a_stop_during_a_model_load_ends_the_process_within_the_drain_timeout(tmp_path: pathlib.Path, models: Models) -> None:
    data_dir, loading = tmp_path / "agent", tmp_path / "loading"
    saved_model(data_dir, models)
    cmd = [sys.executable, "-c", SLOW_LOAD, str(loading), "--control-plane", f"127.0.0.1:{closed_port()}", "--site", SITE,
           "--token", "t", "--insecure", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--allow-file-artifacts",
           "--drain-timeout", "0.5"]
    log_path = tmp_path / "agent.log"
    proc = launch(cmd, log_path)
    try:
        deadline = time.monotonic() + 30
        while not loading.exists():  # bounded: the saved model's load starts at once
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(120)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert_stopped_cleanly(returncode, log_path.read_text())
    assert took < 60, f"the process took {took:.1f}s to end"  # a tenth of the load's ten minutes: it did not wait for it


def test_a_hang_up_leaves_the_agent_serving_and_says_there_is_nothing_to_reload(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "agent"
    cmd = harness.agent_command(f"127.0.0.1:{closed_port()}", SITE, data_dir)
    proc, log_path = harness.launch_agent(cmd, data_dir)
    try:
        url = harness.await_serving(proc, SITE, log_path)
        proc.send_signal(signal.SIGHUP)  # logrotate's postrotate, a terminal closed
        deadline = time.monotonic() + 30
        while "SIGHUP" not in log_path.read_text():  # bounded: the agent says it took the signal
            assert proc.poll() is None, f"the agent ended with {proc.returncode}: {log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        assert "nothing to reload" in log_path.read_text()
        assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert_stopped_cleanly(returncode, log_path.read_text())
