"""SIGTERM or SIGINT ends ``edgeplane-agent`` the same way whenever it comes: one line saying
it stopped, exit code 0, no traceback, and no half-made identity in its data dir. Real agent
processes; the moments are found from outside (its key-making child seen running, its
``--ca-file`` being read from a FIFO), never guessed with a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from orchestrator.testing import harness

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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_before_the_agent_has_started_ends_it_the_same_way(tmp_path: pathlib.Path, sig: signal.Signals) -> None:
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
