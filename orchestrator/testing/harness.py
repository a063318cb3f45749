"""Start a control plane in-process and edge agents as real subprocesses.

Tests, benchmarks and the demo all build their fleets with this, so each of them runs
the same binaries an operator runs: ``edgeplane-agent`` processes that join over gRPC on
loopback and serve the Open Inference Protocol on their own ports.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator import proxyenv, server, server_config
from orchestrator.adapters import local_ray
from orchestrator.agents import model as agent_model
from orchestrator.gatewayd import server as gatewayd
from orchestrator.store import sqlite as sqlite_store

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGED_EXAMPLES = REPO / "orchestrator" / "examples"


def examples_folder(packaged: pathlib.Path = PACKAGED_EXAMPLES, checkout: pathlib.Path = REPO / "manifests" / "examples") -> pathlib.Path:
    """The example manifests and their artifacts: the copy an installed package carries (its
    build puts ``manifests/examples`` there, setup.py), else the checkout's, which a source
    tree and an editable install read."""
    return packaged if packaged.is_dir() else checkout


EXAMPLES = examples_folder()
BOOTSTRAP_TOKEN = "harness-bootstrap-token"


def declare_edge_sites(data_dir: pathlib.Path, names: list[str], by: str) -> None:
    """Edge Sites ``names`` (all in Paris) in the store of ``data_dir``, in one write, as a
    control plane that ran before left them: what a fleet rejoining a restart finds."""
    store = sqlite_store.Store(data_dir / "state.db")
    try:
        spec = {"tier": "edge", "location": {"country": "FR", "region": "eu-west", "lat": 48.8, "lon": 2.3}}
        store.apply([sqlite_store.ObjectWrite("Site", name, {}, spec, expected_version=0) for name in names],
                    sqlite_store.Event(by, "apply", "Site", names[0], "the fleet"))
    finally:
        store.close()


def join_application(site: str) -> agent_model.JoinApplication:
    """A first join of ``site``'s agent with the harness's bootstrap token, beating every minute."""
    return agent_model.JoinApplication(
        site=site, bootstrap_token=BOOTSTRAP_TOKEN, credential=None, agent_id="", endpoint_url="http://127.0.0.1:9",
        location=agent_model.Location("FR", "eu-west", 48.8, 2.3), labels={}, agent_version="test", heartbeat_interval=60.0,
        capacity=agent_model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",)))


@dataclass
class AgentProcess:
    site: str
    data_dir: pathlib.Path
    process: subprocess.Popen[bytes]
    url: str
    log_path: pathlib.Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        return terminate(self.process, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def terminate(process: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM (a clean drain), SIGKILL if it takes longer than ``timeout``; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


#: How Python runs ``edgeplane-agent``.
AGENT_ENTRY = ("-m", "edge_agent.main")
#: As on a machine where onnxruntime-genai is not installed: its import fails.
WITHOUT_GENAI = ("-c", "import sys; sys.modules['onnxruntime_genai'] = None; from edge_agent import main; sys.exit(main.main())")


def under_memory_limit(headroom_bytes: int) -> tuple[str, ...]:
    """As an agent in a container that holds it to ``headroom_bytes`` over what it holds once
    started (onnxruntime imported): the memory it has free is that limit less its resident
    memory, read each time it is asked, as a cgroup's ``memory.max`` would make it."""
    script = (
        "import sys, pathlib, onnxruntime\n"
        "from edge_agent import capacity, main\n"
        "def rss():\n"
        "    for line in pathlib.Path('/proc/self/status').read_text().splitlines():\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "    return 0\n"
        f"LIMIT = rss() + {int(headroom_bytes)}\n"
        "capacity.CapacityProbe.memory_available = lambda self: max(0, LIMIT - rss())\n"
        "sys.exit(main.main())\n"
    )
    return ("-c", script)


def agent_command(
    control_plane: str, site: str, data_dir: pathlib.Path, *, token: str = BOOTSTRAP_TOKEN, country: str = "", region: str = "",
    lat: float | None = None, lon: float | None = None, heartbeat_interval: float = 0.5, listen: str = "127.0.0.1:0",
    extra: tuple[str, ...] = (), tls: tuple[pathlib.Path, str] | None = None, entry: tuple[str, ...] = AGENT_ENTRY,
) -> list[str]:
    """``tls`` = (the control plane's CA file, its join address) for mutual TLS; None = ``--insecure``.
    ``entry``: what Python runs, before the agent's flags (``WITHOUT_GENAI``: an agent without onnxruntime-genai)."""
    cmd = [sys.executable, *entry, "--control-plane", control_plane, "--site", site, "--token", token,
           "--data-dir", str(data_dir), "--listen", listen, "--heartbeat-interval", str(heartbeat_interval)]
    cmd += ["--ca-file", str(tls[0]), "--join-address", tls[1]] if tls else ["--insecure"]
    if country:
        cmd += ["--country", country]
    if region:
        cmd += ["--region", region]
    if lat is not None and lon is not None:
        cmd += ["--lat", str(lat), "--lon", str(lon)]
    return cmd + list(extra)


def gateway_command(control_planes: list[str], *, port: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    """``edgeplane gateway`` (standalone) following ``control_planes``, on loopback."""
    return [sys.executable, "-m", "orchestrator.cli.main", "gateway", "--control-plane", *control_planes,
            "--host", "127.0.0.1", "--port", str(port), *extra]


def spawn_gateway(control_planes: list[str], name: str, data_dir: pathlib.Path, *, extra: tuple[str, ...] = ()) -> AgentProcess:
    """Start a standalone gateway process and wait for its ``serving <url>`` line (its log
    goes to ``data_dir``/agent.log, as an agent's)."""
    proc, log_path = launch_agent(gateway_command(control_planes, extra=extra), data_dir)
    return AgentProcess(name, data_dir, proc, await_serving(proc, name, log_path), log_path)


async def spawn_gateway_async(control_planes: list[str], name: str, data_dir: pathlib.Path, *,
                              extra: tuple[str, ...] = ()) -> AgentProcess:
    """:func:`spawn_gateway` from a coroutine: the wait runs in a thread."""
    return await asyncio.to_thread(spawn_gateway, control_planes, name, data_dir, extra=extra)


def die_with_parent() -> None:
    """``preexec_fn`` making a child die with its parent (Linux PR_SET_PDEATHSIG).

    Only for processes that run no gRPC threads themselves (e.g. tests that run the
    control plane as a subprocess): ``preexec_fn`` forces a real fork().
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass  # not Linux


_LAUNCHED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    """A harness agent must not outlive its test run or demo, even after a crash."""
    for proc in _LAUNCHED:
        if proc.poll() is None:
            proc.kill()


def launch_agent(cmd: list[str], data_dir: pathlib.Path) -> tuple[subprocess.Popen[bytes], pathlib.Path]:
    """Start ``edgeplane-agent``. No ``preexec_fn``: it would force a fork() in a process that
    runs gRPC threads (the in-process control plane), which gRPC's fork handlers do not survive."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "agent.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("a") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=REPO)
    _LAUNCHED.append(proc)
    return proc, log_path


def await_serving(proc: subprocess.Popen[bytes], site: str, log_path: pathlib.Path, startup_timeout: float = 30.0) -> str:
    """Block until the agent prints ``serving <url>``; return the URL (kill it on failure)."""
    deadline = time.monotonic() + startup_timeout
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            buffer += os.read(fd, 4096)
        if b"serving " in buffer and b"\n" in buffer.split(b"serving ", 1)[1]:
            return buffer.split(b"serving ", 1)[1].split(b"\n", 1)[0].decode().strip()
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"agent {site} did not start: {log_path.read_text(errors='replace')[-2000:]}")


def spawn_agent(cmd: list[str], site: str, data_dir: pathlib.Path, startup_timeout: float = 30.0) -> AgentProcess:
    """Start ``edgeplane-agent`` and wait for its ``serving <url>`` line (blocking)."""
    proc, log_path = launch_agent(cmd, data_dir)
    return AgentProcess(site, data_dir, proc, await_serving(proc, site, log_path, startup_timeout), log_path)


async def spawn_agent_async(cmd: list[str], site: str, data_dir: pathlib.Path) -> AgentProcess:
    proc, log_path = launch_agent(cmd, data_dir)
    url = await asyncio.to_thread(await_serving, proc, site, log_path)
    return AgentProcess(site, data_dir, proc, url, log_path)


async def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy (bounded); raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Fleet:
    """A control plane plus agents, torn down together."""

    root: pathlib.Path
    cp: server.ControlPlane | None = None
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    async def start_control_plane(self, *, local_ray_endpoints: local_ray.LocalRayEndpoints | None = None, **overrides: Any) -> server.ControlPlane:
        settings: dict[str, Any] = dict(
            data_dir=self.root / "control-plane", port=0, agent_port=0, agent_join_port=0, heartbeat_interval_s=0.5, missed_heartbeats=3,
            resync_s=2.0, artifact_roots=(EXAMPLES, self.root / "artifacts"), bootstrap_tokens=(BOOTSTRAP_TOKEN,),
            local_ray=local_ray_endpoints,
        )
        config = server_config.ServerConfig(**{**settings, **overrides})
        self.cp = await server.ControlPlane(config).start()
        cp = self.cp  # ready as a gateway once its first pass has published the endpoint table
        await wait_until(lambda: cp.table.published, 60, what="the control plane's first pass")
        return self.cp

    async def start_agent(self, site: str, *, country: str = "", region: str = "", lat: float | None = None, lon: float | None = None,
                          wait_joined: bool = True, heartbeat_interval: float = 0.5, extra: tuple[str, ...] = (),
                          entry: tuple[str, ...] = AGENT_ENTRY) -> AgentProcess:
        assert self.cp is not None, "start the control plane first"
        data_dir = self.root / "agents" / site
        tls = (self.cp.ca_file, self.cp.agent_join_target) if self.cp.ca_file is not None else None
        cmd = agent_command(self.cp.agent_target, site, data_dir, country=country, region=region, lat=lat, lon=lon,
                            heartbeat_interval=heartbeat_interval, extra=extra, tls=tls, entry=entry)
        agent = await spawn_agent_async(cmd, site, data_dir)
        self.agents[site] = agent
        if wait_joined:
            cp = self.cp
            # Heard from, not just joined: a first join (bootstrap token + CSR) registers the
            # agent before it has saved its certificate; its first heartbeat comes after.
            await wait_until(lambda: (s := cp.hub.status(site)) is not None and s.healthy and s.reported,
                             30, what=f"agent {site} to join")
        return agent

    async def restart_agent(self, site: str) -> AgentProcess:
        old = self.agents[site]
        cmd = list(old.process.args)  # type: ignore[arg-type]
        agent = await spawn_agent_async(cmd, site, old.data_dir)
        self.agents[site] = agent
        return agent

    async def stop(self) -> None:
        for agent in self.agents.values():
            await asyncio.to_thread(agent.stop)
        if self.cp is not None:
            await self.cp.stop()
            self.cp = None


@contextlib.asynccontextmanager
async def leader_and_follower(root: pathlib.Path, store: str, both: Mapping[str, Any] | None = None,
                              **leader_config: Any) -> AsyncIterator[tuple[Fleet, Fleet]]:
    """Two control-plane replicas on one database (``store``), the first leading once this
    yields (with ``both`` over the defaults, and ``leader_config`` over those for the
    leader); they share one agent CA, so an agent joins either. Both torn down after."""
    leading, following = Fleet(root / "a"), Fleet(root / "b")
    try:
        leader = await leading.start_control_plane(store=store, **{**(both or {}), **leader_config})
        await wait_until(lambda: leader.elector is not None and leader.elector.leading, 30, what="a leader")
        shutil.copytree(root / "a" / "control-plane" / "ca", root / "b" / "control-plane" / "ca")
        await following.start_control_plane(store=store, **(both or {}))
        yield leading, following
    finally:
        await following.stop()
        await leading.stop()


@contextlib.asynccontextmanager
async def following_gateway(control_plane_url: str) -> AsyncIterator[gatewayd.StandaloneGateway]:
    """A standalone gateway in this process following ``control_plane_url``, yielded once it
    has the endpoint table; stopped on exit."""
    gw = await gatewayd.StandaloneGateway(gatewayd.GatewayConfig(control_planes=(control_plane_url,), port=0)).start()
    try:
        assert await gw.follower.wait_snapshot(0, 60), f"no endpoint table from the control plane: {gw.follower.status()}"
        yield gw
    finally:
        await gw.stop()


@contextlib.asynccontextmanager
async def serving_fleet(root: pathlib.Path, yaml_text: str, agents: Mapping[str, Mapping[str, Any]], *,
                        ready: Callable[[server.ControlPlane], Any] | None = None, what: str = "the fleet", timeout: float = 60.0,
                        interval: float = 0.05, local_ray_endpoints: local_ray.LocalRayEndpoints | None = None,
                        **overrides: Any) -> AsyncIterator[Fleet]:
    """A control plane with ``yaml_text`` applied and ``agents`` (site: ``start_agent``
    keywords) joined, yielded once ``ready(cp)`` holds (if given); torn down on exit, and with
    ``local_ray_endpoints`` no Serve application is left behind on that shared cluster."""
    f = Fleet(root)
    try:
        cp = await f.start_control_plane(local_ray_endpoints=local_ray_endpoints, **overrides)
        async with proxyenv.async_client(base_url=cp.http_url, timeout=30) as http:
            resp = await http.post("/v1/apply", content=yaml_text)
            assert resp.status_code == 200, resp.text
        for site, where in agents.items():
            await f.start_agent(site, **where)
        if ready is not None:
            await wait_until(lambda: ready(cp), timeout, interval=interval, what=what)
        yield f
    finally:
        await f.stop()
        if local_ray_endpoints is not None:
            actuator = local_ray_endpoints.actuator()
            try:
                await actuator.apply([])
            finally:
                await actuator.close()


def ray_free_examples(folder: pathlib.Path, ray_address: str) -> pathlib.Path:
    """Copy the examples with every ``ray: {address: local}`` pointed at ``ray_address``."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in EXAMPLES.glob("*.yaml"):
        (folder / f.name).write_text(f.read_text().replace("ray: {address: local}", f"ray: {{address: \"{ray_address}\"}}"))
    return folder
