"""``edgeplane-agent`` as a real process: kill -9, SIGTERM drain, restart without uplink."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable

import httpx
import numpy as np
import psutil
import pytest

from edgeplane_proto import oip
from orchestrator.agents import model
from orchestrator.testing import harness, onnx_models

from .conftest import TOKEN, ControlPlane, Models, start_control_plane
from .test_artifacts_runtime import _SilentServer

SITE = "edge-lyon-1"


def agent_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "edgeplane-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_agent.main"]


class AgentProcess:
    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url

    async def wait(self, timeout: float = 15) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


@pytest.fixture
async def spawn(tmp_path: pathlib.Path) -> AsyncIterator[Callable[..., object]]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(target: str, data_dir: pathlib.Path | None = None, heartbeat_interval: float = 0.5,
                    site: str = SITE) -> AgentProcess:
        proc = await asyncio.create_subprocess_exec(
            *agent_command(),
            "--control-plane", target,
            "--site", site,
            "--token", TOKEN,
            "--listen", "127.0.0.1:0",
            "--data-dir", str(data_dir or tmp_path / "agent"),
            "--heartbeat-interval", str(heartbeat_interval),  # 0.5: 1.5 s to miss three, room for a loaded machine
            "--drain-timeout", "5",
            "--insecure",
            "--country", "FR",
            "--log-level", "WARNING",
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("serving "), f"agent did not start: {line!r}"
        return AgentProcess(proc, line.split()[1])

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


async def wait_model_ready(url: str, name: str = "mlp") -> None:
    """Poll across the process boundary (no event to await there); bounded."""
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(200):
            if (await client.get(f"/v2/models/{name}/ready")).status_code == 200:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"model {name} never became ready at {url}")


async def infer(url: str, x: np.ndarray) -> np.ndarray:
    body, _ = oip.encode_request({"input": x})
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/v2/models/mlp/infer", content=body)
    assert response.status_code == 200, response.text
    return oip.decode_response(response.content).outputs[0].array


async def test_kill_9_is_noticed_by_missed_heartbeats(control_plane: ControlPlane, spawn) -> None:
    agent = await spawn(control_plane.target)
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    agent.proc.send_signal(signal.SIGKILL)
    lost = await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.LOST, timeout=5)
    assert "missed" in lost.reason
    assert control_plane.hub.status(SITE).healthy is False


async def test_kill_9_closes_the_agent_s_stream_and_it_is_lost_without_waiting_for_every_missed_heartbeat(spawn) -> None:
    """With 2 s heartbeats three misses take 6 s; the kernel closes a killed agent's
    connection at once, and the hub gives it one interval (the grace here is shorter) to
    come back."""
    cp = await start_control_plane(reconnect_grace=0.3)
    try:
        agent = await spawn(cp.target, heartbeat_interval=2.0)
        await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
        await asyncio.wait_for(cp.hub.next_heartbeat(SITE), 15)
        agent.proc.send_signal(signal.SIGKILL)
        lost = await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.LOST, timeout=15)
        assert "heartbeat stream ended" in lost.reason and "did not come back" in lost.reason, lost.reason
        assert lost.at - cp.hub.status(SITE).last_heartbeat < 6.0  # type: ignore[union-attr]
    finally:
        await cp.server.stop(grace=None)


async def test_sigterm_drains_and_restart_serves_from_cache_without_control_plane(
    spawn, models: Models, tmp_path: pathlib.Path
) -> None:
    # 20 missed heartbeats (10 s) before the hub gives up on its own: on a loaded machine an
    # agent loading its model can be late by a few beats, and then its draining beat would
    # find it already lost, with "no heartbeat" as the reason (seen once in CI at 1.7 s)
    cp = await start_control_plane(missed=20)
    try:
        agent = await spawn(cp.target)
        cp.hub.set_assignments(
            SITE, [model.Assignment("mlp", "intent", "small", models.v1_url, models.v1.sha256)], 1
        )
        await wait_model_ready(agent.url)
        agent.proc.send_signal(signal.SIGTERM)
        assert await agent.wait() == 0
        lost = await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.LOST)
        assert lost.reason == "agent is draining"
    finally:
        await cp.server.stop(grace=None)

    # Control plane gone for good: the restarted agent serves what it had, from its cache.
    restarted = await spawn(cp.target)
    await wait_model_ready(restarted.url)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    weights = onnx_models.mlp_weights(8, 16, 4, 2, 0)
    np.testing.assert_allclose(await infer(restarted.url, x), onnx_models.mlp_reference(x, weights, True), rtol=1e-5)
    restarted.proc.send_signal(signal.SIGTERM)
    assert await restarted.wait() == 0


async def test_damaged_state_files_are_set_aside_and_the_agent_joins_again(control_plane: ControlPlane, spawn, models: Models,
                                                                            tmp_path: pathlib.Path) -> None:
    """A state file damaged outside the agent (its own writes are atomic) does not keep it
    from starting: the saved assignments are a cache the control plane sends again, and a
    bootstrap token joins again; the damaged files are kept for inspection."""
    data = tmp_path / "damaged"
    data.mkdir()
    (data / "state.json").write_text('{"format": 1, "site": "edge-ly')  # cut short
    (data / "identity.json").write_bytes(b"\x00" * 64)
    agent = await spawn(control_plane.target, data)
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    control_plane.hub.set_assignments(SITE, [model.Assignment("mlp", "intent", "small", models.v1_url, models.v1.sha256)], 1)
    await wait_model_ready(agent.url)
    assert (data / "state.json.unreadable").read_text() == '{"format": 1, "site": "edge-ly'
    assert (data / "identity.json.unreadable").read_bytes() == b"\x00" * 64
    assert '"site": "edge-lyon-1"' in (data / "state.json").read_text()  # written anew, whole


async def test_temporary_files_of_writes_a_crash_cut_short_are_removed_at_the_next_start(spawn, tmp_path: pathlib.Path) -> None:
    data = tmp_path / "agent"
    data.mkdir()
    whole = '{"format": 1, "site": "edge-lyon-1", "assignments": {"version": 3, "assignments": []}}'
    (data / "state.json").write_text(whole)
    # as a crash between a write and its rename leaves them (the pid and counter in their names)
    left = [".state.json.4242.7.tmp", ".identity.json.4242.0.tmp", ".agent.key.new.4242.1.tmp", ".ca.crt.99.0.tmp"]
    for name in left:
        (data / name).write_text('{"format": 1, "si')
    others = ["notes.tmp", ".state.json.tmp", "state.json.unreadable", ".state.json.1.2.tmp.keep"]
    for name in others:
        (data / name).write_text("not the agent's")
    (data / ".a-folder.1.2.tmp").mkdir()
    an_hour_ago = time.time() - 3600
    for name in [*left, *others]:
        os.utime(data / name, (an_hour_ago, an_hour_ago))
    agent = await spawn(f"127.0.0.1:{closed_port()}", data)
    names = {p.name for p in data.iterdir()}
    assert not names & set(left), names
    assert set(others) | {".a-folder.1.2.tmp"} <= names
    assert (data / "state.json").read_text() == whole  # the real file, untouched
    agent.proc.send_signal(signal.SIGTERM)
    assert await agent.wait() == 0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_damaged_identity_without_a_token_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    import subprocess

    (tmp_path / "identity.json").write_text("{")
    proc = subprocess.run([*agent_command(), "--control-plane", "127.0.0.1:1", "--site", SITE, "--insecure",
                           "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "EDGEPLANE_TOKEN"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().endswith("give a bootstrap token (--token) to join again as a new agent"), proc.stderr
    assert (tmp_path / "identity.json").read_text() == "{"  # left as it was


@pytest.mark.parametrize("name", ["state.json", "identity.json"])
def test_state_a_newer_agent_wrote_is_refused_and_left_as_it_was(name: str, tmp_path: pathlib.Path) -> None:
    """A rollback of the agent's package, or a data dir shared by mistake: the file is the
    newer agent's, whole. With a bootstrap token this one took its identity for damaged,
    set it aside and joined as a new agent; it says what happened and leaves the data dir be."""
    import subprocess

    files = {"state.json": {"format": 1, "site": SITE, "assignments": {"version": 3, "assignments": []}},
             "identity.json": {"format": 1, "site": SITE, "agent_id": "a-1", "credential": "c"}}
    files[name] = {**files[name], "format": 2, "addedLater": {"x": 1}}
    for file, doc in files.items():
        (tmp_path / file).write_text(json.dumps(doc))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = subprocess.run([*agent_command(), "--control-plane", f"127.0.0.1:{closed_port()}", "--site", SITE, "--insecure",
                           "--token", TOKEN, "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=os.environ)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().endswith(
        f"{tmp_path / name} was written by a newer edgeplane-agent (format 2); this one reads format 1 "
        "— upgrade it or use another --data-dir"), proc.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "agent.owner"} == before


@pytest.mark.parametrize(("written", "newer"), [(2, True), (17, True), (0, False), ("2", False), (2.0, False), (None, False)])
def test_only_a_whole_number_above_this_agents_format_is_a_newer_agents(written: object, newer: bool, tmp_path: pathlib.Path) -> None:
    """Anything else is a damaged file, set aside as before."""
    from edge_agent import errors, state

    (tmp_path / "state.json").write_text(json.dumps({"format": written, "site": SITE, "assignments": {"version": 1, "assignments": []}}))
    store = state.StateStore(tmp_path)
    if newer:
        with pytest.raises(errors.NewerState, match=rf"\(format {written}\); this one reads format 1"):
            store.refuse_newer()
        with pytest.raises(errors.NewerState):
            store.load_assignments(SITE)
        assert (tmp_path / "state.json").exists() and not (tmp_path / "state.json.unreadable").exists()
    else:
        store.refuse_newer()
        assert store.load_assignments(SITE) is None
        assert (tmp_path / "state.json.unreadable").exists()


def test_a_data_dir_that_cannot_be_looked_into_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    import subprocess

    data_dir = tmp_path / ("x" * 300)  # a name longer than the file system takes: not merely absent
    proc = subprocess.run([*agent_command(), "--control-plane", "127.0.0.1:1", "--site", SITE, "--insecure",
                           "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "EDGEPLANE_TOKEN"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File name too long" in proc.stderr, proc.stderr


async def test_an_assignment_it_cannot_save_is_served_and_the_session_holds(control_plane: ControlPlane, spawn, models: Models,
                                                                           tmp_path: pathlib.Path) -> None:
    """A disk that refuses the state file (full, failing) does not cost the control plane's
    word: the agent acts on the new set, says it could not save it, and stays connected
    (it failed its session and joined again, over and over, serving nothing new)."""
    data = tmp_path / "agent"
    agent = await spawn(control_plane.target, data)
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    control_plane.hub.set_assignments(SITE, [], 1)  # the first set is saved
    await harness.wait_until(lambda: (data / "state.json").exists(), 10, what="the first set saved")
    (data / "state.json").unlink()
    (data / "state.json").mkdir()  # the next save cannot replace it
    joined = control_plane.events.kinds(SITE).count(model.AgentEventKind.JOINED)
    control_plane.hub.set_assignments(SITE, [model.Assignment("mlp", "intent", "small", models.v1_url, models.v1.sha256)], 2)
    await wait_model_ready(agent.url)
    x = np.ones((1, 8), dtype=np.float32)
    weights = onnx_models.mlp_weights(8, 16, 4, 2, 0)
    np.testing.assert_allclose(await infer(agent.url, x), onnx_models.mlp_reference(x, weights, True), rtol=1e-5)
    assert control_plane.events.kinds(SITE).count(model.AgentEventKind.JOINED) == joined  # no new session
    assert (data / "state.json").is_dir()


async def test_a_second_agent_on_the_same_data_dir_is_refused_until_the_first_is_gone(control_plane: ControlPlane, spawn,
                                                                                     tmp_path: pathlib.Path) -> None:
    import subprocess

    data = tmp_path / "shared"
    first = await spawn(control_plane.target, data)
    second = await asyncio.to_thread(
        subprocess.run, [*agent_command(), "--control-plane", control_plane.target, "--site", SITE, "--token", TOKEN, "--insecure",
                         "--listen", "127.0.0.1:0", "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert second.stderr.rstrip().endswith(f"another agent (pid {first.proc.pid}) is using the data dir {data}: "
                                           "stop it first, or give this one another --data-dir"), second.stderr
    first.proc.send_signal(signal.SIGKILL)
    await first.wait()
    await spawn(control_plane.target, data)  # the kernel dropped the lock with its holder


def _in_a_container(host: str) -> list[str]:
    """A command's prefix that runs it as a container runs its process: pid 1 of a pid
    namespace of its own, under a host name of its own (an unprivileged user namespace makes
    both); [] where this machine allows no such namespace."""
    import subprocess

    prefix = ["unshare", "--user", "--map-root-user", "--uts", "--pid", "--fork", "--kill-child"]
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [*prefix, "sh", "-c", f'hostname {host} && exec "$@"', "sh"]


async def test_an_agent_in_another_container_on_the_same_data_dir_is_named_by_its_host(tmp_path: pathlib.Path) -> None:
    """Two containers given one data dir (a hostPath, a volume): each agent is pid 1 in its
    own, so 'pid 1' alone named the refused agent itself."""
    import subprocess

    container = _in_a_container("agent-a")
    if not container:
        pytest.skip("this machine allows no user, pid and host name namespaces (unshare)")
    data = tmp_path / "shared"
    common = ["--control-plane", f"127.0.0.1:{closed_port()}", "--site", SITE, "--token", TOKEN, "--insecure",
              "--listen", "127.0.0.1:0", "--data-dir", str(data)]
    first = await asyncio.create_subprocess_exec(*container, *agent_command(), *common, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert first.stdout is not None
        async with asyncio.timeout(30):
            assert (await first.stdout.readline()).startswith(b"serving ")
        second = await asyncio.to_thread(subprocess.run, [*agent_command(), *common], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert second.stderr.rstrip().endswith(f"another agent (pid 1 on host agent-a) is using the data dir {data}: "
                                               "stop it first, or give this one another --data-dir"), second.stderr
    finally:
        first.kill()
        await first.wait()


def _fetch_children(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [c for c in psutil.Process(pid).children() if "edge_agent.fetch" in " ".join(c.cmdline())]
    return []


def _gone(child: psutil.Process) -> bool:
    """Exited (a zombie counts: whoever inherited it may not reap it at once)."""
    try:
        return child.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_kill_9_mid_download_takes_the_download_child_with_it(control_plane: ControlPlane, spawn,
                                                                    tmp_path: pathlib.Path) -> None:
    """An orphaned download child would go on writing the ``.partial`` file under the agent
    started in its place."""
    data = tmp_path / "agent"
    agent = await spawn(control_plane.target, data)
    await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    stalled = _SilentServer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)  # then nothing: held mid-way
    async with stalled as url:
        control_plane.hub.set_assignments(SITE, [model.Assignment("mlp", "intent", "small", url, "0" * 64)], 1)
        await asyncio.wait_for(stalled.connected.wait(), 30)
        children = await harness.wait_until(lambda: _fetch_children(agent.proc.pid), 10, what="the download child")
        agent.proc.send_signal(signal.SIGKILL)
        await agent.wait()
        try:
            await asyncio.wait_for(stalled.closed.wait(), 10)  # far below the child's 30 s socket timeout
            await harness.wait_until(lambda: _gone(children[0]), 10, what="the download child gone")
        finally:
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
