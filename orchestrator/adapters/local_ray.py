"""A Ray head on this machine that edgeplane starts, owns and stops (``spec.ray.address: local``).

The newcomer's one-machine setup needs a real data-centre site without installing anything,
and the test suite needs one Ray cluster for the whole session; both use this. The cluster is
made private to its owner so it can share a machine with other Ray clusters:

- its own temp dir (sessions, sockets, logs) and free ports for everything Ray binds;
- its own auth token, generated here, kept in a 0600 file and handed to Ray through
  ``RAY_AUTH_TOKEN_PATH`` (``~/.ray/auth_token`` is never read or written);
- ``ray start --head --block`` runs as our child in its own session, and stopping it sends
  SIGTERM to that process only: Ray tears down the processes of *this* node. ``ray stop`` is
  never used, because it stops every Ray process of the user on the machine. Processes that
  outlive the head are found by a marker in their environment and ended by pid.

An owner that can die without stopping its cluster (kill -9 of ``edgeplane serve``) gives a
``record_file`` in its own state dir: the head's pid, the marker and the base dir are written
there before the head starts. The next owner on that state dir calls :func:`reclaim` first,
which stops whatever of the recorded cluster still runs, so a restart never leaves an orphan
next to the cluster it starts. (Stopping rather than adopting: the owner re-creates its Serve
applications from its own store anyway, and a head that is not our child cannot be waited on.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from orchestrator import ports as ports_mod
from orchestrator import proxyenv
from orchestrator.adapters import ray_serve

log = logging.getLogger(__name__)

MARKER_ENV = "EDGEPLANE_RAY_CLUSTER"
_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


class LocalRayError(RuntimeError):
    """The local Ray head could not be started (the message carries its log's tail)."""


@dataclass(frozen=True)
class LocalRayEndpoints:
    """Where a started local cluster answers. The token itself stays in ``token_file``."""

    dashboard_url: str
    serve_url: str
    serve_port: int
    gcs_address: str
    token_file: pathlib.Path
    temp_dir: pathlib.Path

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def token_provider(self) -> ray_serve.TokenProvider:
        return ray_serve.token_from_file(self.token_file)

    def http_options(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.serve_port}

    def actuator(self, **kwargs: Any) -> ray_serve.RayServeActuator:
        """A :class:`~orchestrator.adapters.ray_serve.RayServeActuator` for this cluster."""
        return ray_serve.RayServeActuator(
            self.dashboard_url,
            token_provider=self.token_provider(),
            serve_url=self.serve_url,
            http_options=self.http_options(),
            **kwargs,
        )

    def client_env(self) -> dict[str, str]:
        """Environment a Ray driver (``ray.init(address=...)``, ``serve`` CLI) needs."""
        return {
            "RAY_ADDRESS": self.gcs_address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_file),
        }


def project_root() -> pathlib.Path:
    """The folder holding the ``orchestrator`` package, for Ray workers' ``PYTHONPATH``."""
    return pathlib.Path(__file__).resolve().parents[2]


class LocalRayCluster:
    """Start, own and stop one Ray head node on loopback.

    ``base_dir`` holds everything of this cluster (a fresh short temp dir by default, as
    Ray's socket paths must stay short). ``startup_timeout_s`` bounds :meth:`start`.
    Usable as a context manager; :meth:`start` and :meth:`stop` block, the ``*_async``
    variants run them in a thread for the control plane's event loop.
    """

    def __init__(
        self,
        *,
        base_dir: pathlib.Path | None = None,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        object_store_mib: int = 256,
        startup_timeout_s: float = 90.0,
        stop_timeout_s: float = 30.0,
        python_path: Sequence[pathlib.Path] = (),
        extra_env: Mapping[str, str] | None = None,
        ray_executable: pathlib.Path | None = None,
        record_file: pathlib.Path | None = None,
    ) -> None:
        self._owns_base_dir = base_dir is None
        self._base_dir = base_dir
        self._num_cpus = num_cpus
        self._num_gpus = num_gpus
        self._object_store_mib = object_store_mib
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._python_path = [project_root(), *python_path]
        self._extra_env = dict(extra_env or {})
        self._ray = ray_executable or _find_ray()
        self._process: subprocess.Popen[bytes] | None = None
        self._endpoints: LocalRayEndpoints | None = None
        self._cluster_id = secrets.token_hex(8)
        self._record_file = record_file

    @property
    def endpoints(self) -> LocalRayEndpoints:
        if self._endpoints is None:
            raise LocalRayError("the local Ray cluster is not started")
        return self._endpoints

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exited(self) -> str | None:
        """How a started head is gone ("killed by SIGKILL", "exit code 1: <its log's last
        line>"), its whole node with it; None while it runs, or before it is started. A head
        ended by a signal, or one of its processes failing (``ray start --block`` then stops
        them all), takes every Serve application of the cluster along."""
        if self._process is None or (code := self._process.poll()) is None:
            return None
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        last = _tail(self._base_dir / "ray-start.log", 1).strip() if self._base_dir is not None else ""
        return f"exit code {code}" + (f": {last}" if last and last != "(no log)" else "")

    def start(self) -> LocalRayEndpoints:
        """Start the head and wait until its dashboard answers. A start that fails at any
        step (a full disk, ports, Ray's own errors) leaves nothing behind: no process, no
        temporary folder, no record."""
        if self._endpoints is not None:
            return self._endpoints
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalRayEndpoints:
        base = self._base_dir or pathlib.Path(tempfile.mkdtemp(prefix="epray-", dir="/tmp"))
        self._base_dir = base
        base.mkdir(parents=True, exist_ok=True)
        token_file = base / "auth_token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
        temp_dir = base / "ray"
        ports = ports_mod.free_ports(len(_PORT_FLAGS) + 1)
        port_args = dict(zip(_PORT_FLAGS, ports))
        serve_port = ports[-1]
        command = [
            str(self._ray), "start", "--head", "--block",
            "--temp-dir", str(temp_dir),
            "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1",
            "--include-dashboard", "true",
            "--disable-usage-stats",
            "--object-store-memory", str(self._object_store_mib * 1024 * 1024),
        ]  # fmt: skip
        for flag, port in port_args.items():
            command += [flag, str(port)]
        if self._num_cpus is not None:
            command += ["--num-cpus", str(self._num_cpus)]
        if self._num_gpus is not None:
            command += ["--num-gpus", str(self._num_gpus)]
        log_path = base / "ray-start.log"
        log.info("starting a local Ray head in %s", temp_dir)
        self._write_record(None)  # before the head exists: an owner killed from here on leaves a trace
        with log_path.open("wb") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._environment(token_file),
                start_new_session=True,
            )
        self._write_record(self._process.pid)
        endpoints = LocalRayEndpoints(
            dashboard_url=f"http://127.0.0.1:{port_args['--dashboard-port']}",
            serve_url=f"http://127.0.0.1:{serve_port}",
            serve_port=serve_port,
            gcs_address=f"127.0.0.1:{port_args['--port']}",
            token_file=token_file,
            temp_dir=temp_dir,
        )
        self._wait_ready(endpoints, log_path)
        self._endpoints = endpoints
        return endpoints

    def stop(self) -> None:
        """Stop this cluster's processes (and only them); idempotent."""
        process, self._process = self._process, None
        self._endpoints = None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("local Ray head did not stop in %ss; killing it", self._stop_timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        _end_stragglers(self._cluster_id)
        if self._owns_base_dir and self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None
        if self._record_file is not None:
            self._record_file.unlink(missing_ok=True)

    def leftover_pids(self) -> list[int]:
        """Pids of live processes started for this cluster (empty once stopped)."""
        return marked_pids(self._cluster_id)

    async def start_async(self) -> LocalRayEndpoints:
        return await asyncio.to_thread(self.start)

    async def stop_async(self) -> None:
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> LocalRayEndpoints:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------

    def _environment(self, token_file: pathlib.Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token_file),
                "RAY_USAGE_STATS_ENABLED": "0",
                # One node: draining on SIGTERM has nowhere to move replicas to.
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                MARKER_ENV: self._cluster_id,
            }
        )
        paths = [str(p) for p in self._python_path]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.update(self._extra_env)
        return env

    def _wait_ready(self, endpoints: LocalRayEndpoints, log_path: pathlib.Path) -> None:
        """Poll the dashboard until the Serve REST API answers with our token (bounded)."""
        deadline = time.monotonic() + self._startup_timeout_s
        interval = 0.2
        headers = {"Authorization": f"Bearer {endpoints.token()}"}
        url = endpoints.dashboard_url + ray_serve.APPLICATIONS_PATH
        with proxyenv.client(timeout=5.0) as client:  # the dashboard as the Ray Serve adapter calls it
            for _ in range(int(self._startup_timeout_s / interval) + 1):
                if self._process is None or self._process.poll() is not None:
                    raise LocalRayError(f"ray start exited early:\n{_tail(log_path)}")
                try:
                    if client.get(url, headers=headers).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() >= deadline:
                    break
                time.sleep(interval)
        raise LocalRayError(
            f"the local Ray dashboard did not answer within {self._startup_timeout_s}s:\n"
            f"{_tail(log_path)}"
        )

    def _write_record(self, pid: int | None) -> None:
        if self._record_file is None:
            return
        record = {"clusterId": self._cluster_id, "pid": pid, "baseDir": str(self._base_dir) if self._owns_base_dir else None,
                  "owner": {"pid": os.getpid(), "started": _start_time(os.getpid())}}
        self._record_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self._record_file.with_suffix(".partial")
        try:
            partial.write_text(json.dumps(record))
            partial.replace(self._record_file)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def marked_pids(cluster_id: str) -> list[int]:
    """Pids of live (not zombie) processes carrying the marker of cluster ``cluster_id``."""
    marker = f"{MARKER_ENV}={cluster_id}".encode()
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def reclaim(record_file: pathlib.Path, stop_timeout_s: float = 10.0) -> list[int]:
    """Stop the cluster a previous owner recorded in ``record_file`` and left running;
    returns the pids that were still alive (empty: nothing was left)."""
    try:
        record = json.loads(record_file.read_text())
        cluster_id = str(record["clusterId"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring an unreadable local Ray record %s: %s", record_file, exc)
        record_file.unlink(missing_ok=True)
        return []
    owner = record.get("owner") or {}
    if owner.get("pid") not in (None, os.getpid()) and _start_time(owner["pid"]) == owner.get("started"):
        log.warning("the local Ray cluster recorded in %s belongs to a control plane that still runs (pid %s); leaving it",
                    record_file, owner["pid"])
        return []
    pids = marked_pids(cluster_id)
    head = record.get("pid")
    if pids:
        log.warning("stopping the local Ray cluster a previous control plane left running (pids %s)", ", ".join(map(str, pids)))
        if head in pids:  # the head tears its node down on SIGTERM, as at a clean stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(head, signal.SIGTERM)
        for _ in range(int(stop_timeout_s / 0.1)):
            if not marked_pids(cluster_id):
                break
            time.sleep(0.1)
        _end_stragglers(cluster_id)
    base = record.get("baseDir")
    if base and pathlib.Path(base).name.startswith("epray-"):  # only a dir this module created
        shutil.rmtree(base, ignore_errors=True)
    record_file.unlink(missing_ok=True)
    return pids


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), which tells a reused pid apart."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _end_stragglers(cluster_id: str) -> None:
    """Give worker processes 2 s to follow their raylet out, then end them by pid."""
    for attempt in range(50):
        pids = marked_pids(cluster_id)
        if not pids:
            return
        if attempt >= 20:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    log.warning("processes of the local Ray cluster survive: %s", marked_pids(cluster_id))


def _find_ray() -> pathlib.Path:
    beside = pathlib.Path(sys.executable).with_name("ray")
    if beside.exists():
        return beside
    found = shutil.which("ray")
    if found is None:
        raise LocalRayError("the `ray` command is not installed (pip install 'ray[serve]')")
    return pathlib.Path(found)


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
