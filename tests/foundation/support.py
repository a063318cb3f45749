"""Helpers for the foundation tests: manifest text, a control plane in a thread, the CLI.

The control plane runs for real (``ControlPlane`` on loopback, or ``edgeplane serve`` as a
subprocess); data-centre sites point Ray at a closed port (``UNREACHABLE_RAY``) so the
reconciler reports them Unreachable instead of starting a local Ray cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import yaml

from orchestrator import server, server_config
from orchestrator.store import sqlite as sqlite_store
from orchestrator.store.sqlite import Event, ObjectWrite
from orchestrator.testing import harness
from orchestrator.ports import free_port
from orchestrator.testing.manifests import API_VERSION, doc  # noqa: F401 (the foundation tests' manifest text)
from orchestrator.testing.manifests import bundle as join  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"
EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"
UNREACHABLE_RAY = "http://127.0.0.1:9"


# --- manifests ---------------------------------------------------------------------------


def edge_site_spec(country: str = "FR", lat: float = 45.76, lon: float = 4.83, region: str = "eu-west") -> dict[str, Any]:
    return {
        "tier": "edge",
        "location": {"country": country, "region": region, "lat": lat, "lon": lon},
        "capacity": {"cpu": 8, "memoryGiB": 32},
        "energy": {"carbonGramsPerKWh": 56},
    }


def dc_site_spec() -> dict[str, Any]:
    return {
        "tier": "datacenter",
        "location": {"country": "FR", "region": "eu-west", "lat": 48.85, "lon": 2.35},
        "capacity": {"cpu": 64, "memoryGiB": 256},
        "ray": {"address": UNREACHABLE_RAY},
    }


SHA = "0" * 64


def model_spec() -> dict[str, Any]:
    return {
        "variants": [
            {"name": "small", "runtime": "onnx", "artifact": {"uri": "artifacts/intent-distilled.onnx", "sha256": SHA}},
            {"name": "big", "runtime": "ray-serve", "importPath": "pkg.mod:app"},
        ]
    }


def deployment_spec(model: str = "m") -> dict[str, Any]:
    return {"model": model, "variant": "small", "replicas": {"min": 1, "max": 2}, "placement": {"residency": ["FR"]}}


def lines_run(module: types.ModuleType, call: Callable[[], object]) -> int:
    """How many lines of ``module`` ``call`` runs: a count of work that grows with its input
    the way the code does (linear, quadratic), which no machine's speed changes."""
    count = 0

    def line(frame: types.FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal count
        count += event == "line"
        return line

    sys.settrace(lambda frame, event, arg: line if frame.f_code.co_filename == module.__file__ else None)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line containing ``needle`` (the test's own expectation)."""
    seen = 0
    for i, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == nth:
                return i
    raise AssertionError(f"{needle!r} (#{nth}) not in the text")


def offline_examples(dest: pathlib.Path) -> pathlib.Path:
    """A copy of manifests/examples whose data centres point Ray at a closed port."""
    shutil.copytree(EXAMPLES, dest)
    sites = dest / "sites.yaml"
    text = sites.read_text()
    assert text.count("ray: {address: local}") == 2, "the example fleet changed; update this helper"
    sites.write_text(text.replace("ray: {address: local}", f'ray: {{address: "{UNREACHABLE_RAY}"}}'))
    return dest


def example_names() -> dict[str, set[str]]:
    """Kind -> names declared in the committed examples (read with plain YAML, not the loader)."""
    out: dict[str, set[str]] = {}
    for path in EXAMPLES.glob("*.yaml"):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                out.setdefault(d["kind"], set()).add(d["metadata"]["name"])
    return out


# --- processes and servers ---------------------------------------------------------------



def closed_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    return free_port()


class ServerThread:
    """A real ``ControlPlane`` on its own event loop in a thread, for sync and async tests alike."""

    def __init__(self, config: server_config.ServerConfig):
        self.config = config
        self.cp: server.ControlPlane | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the control plane's, once it runs
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="control-plane", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self.cp = await server.ControlPlane(self.config).start()
            except BaseException as exc:  # reported to the starting thread
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.cp.stop()

        asyncio.run(main())

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the control plane did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self) -> str:
        assert self.cp is not None
        return self.cp.http_url

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the control plane did not stop"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPLANE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def shared_agent_ca(*data_dirs: pathlib.Path) -> None:
    """Give control-plane replicas one agents' CA, as docs/deploy.md has an operator do
    (``edgeplane ca init`` once, the folder copied to each): a replica started with none
    while the store knows one is refused."""
    made = cli("ca", "init", str(data_dirs[0] / "ca"))
    assert made.returncode == 0, made.stderr
    for other in data_dirs[1:]:
        shutil.copytree(data_dirs[0] / "ca", other / "ca")


def cli(*args: str, server_url: str | None = None, env: dict[str, str] | None = None, stdin: str | None = None,
        timeout: float = 60.0, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``edgeplane`` command."""
    environment = clean_env(**(env or {}))
    if server_url is not None:
        environment["EDGEPLANE_SERVER"] = server_url
    return subprocess.run([str(EDGEPLANE), *args], capture_output=True, text=True, env=environment, input=stdin,
                          timeout=timeout, cwd=cwd or REPO)


def ok(*args: str, server: ServeProcess, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """``cli`` against ``server``, which must succeed: its stdout."""
    proc = cli(*args, server_url=server.url, **kwargs)
    assert proc.returncode == 0, f"edgeplane {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def follow_events(server_url: str, *args: str) -> subprocess.Popen[str]:
    """``edgeplane events --follow -o json *args`` against ``server_url``, left running: its
    output is read line by line, and it is ended with :func:`interrupt`."""
    return subprocess.Popen([str(EDGEPLANE), "events", "--follow", "-o", "json", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(EDGEPLANE_SERVER=server_url), cwd=REPO)


def interrupt(follower: subprocess.Popen[str]) -> str:
    """Ctrl-C to ``follower``, which must then exit: what it wrote on stderr."""
    follower.send_signal(signal.SIGINT)
    return follower.communicate(timeout=30)[1]


#: ``edgeplane serve`` options that keep the example fleet's data centres (their Ray at a closed
#: port) out of reach, not lost, for as long as a test module runs: declared lost after the
#: default 3 x 5 s, every deployment's status changes its reason in the middle of the module,
#: and two reads that a pass falls between disagree.
DATA_CENTRES_NEVER_LOST = ("--heartbeat-interval", "300", "--missed-heartbeats", "100")


class ServeProcess:
    """``edgeplane serve`` as an operator starts it, on free loopback ports."""

    def __init__(self, data_dir: pathlib.Path, *extra: str, artifact_root: pathlib.Path = EXAMPLES,
                 ports: tuple[int, int, int] | None = None):
        """``ports``: (HTTP, agents, joins) of a control plane started again; free ones by default
        (read them after :meth:`wait_ready`: a free port taken by another process before
        ``serve`` binds it means new ones)."""
        self.data_dir = data_dir
        self.ca_file = data_dir / "ca" / "ca.crt"
        self.log_path = data_dir.parent / f"{data_dir.name}-serve{'-again' if ports else ''}.log"
        self._args = (*extra, "--artifact-root", str(artifact_root))
        self._fixed = ports is not None
        self._launch(ports or (free_port(), free_port(), free_port()))

    def _launch(self, ports: tuple[int, int, int]) -> None:
        self.port, self.agent_port, self.join_port = ports
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [str(EDGEPLANE), "serve", "--data-dir", str(self.data_dir), "--port", str(self.port), "--agent-port", str(self.agent_port),
             "--agent-join-port", str(self.join_port), "--log-level", "warning", *self._args],
            stdout=self._log, stderr=subprocess.STDOUT, env=clean_env(), cwd=REPO, start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        relaunches = 3  # bounded: a port found free, then taken by another process before serve bound it
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self.process.returncode == 1 and "cannot listen on" in self.log() and not self._fixed and relaunches:
                    relaunches -= 1
                    self._log.close()
                    self._launch((free_port(), free_port(), free_port()))
                    continue
                raise AssertionError(f"edgeplane serve exited with {self.process.returncode}:\n{self.log()}")
            if "edgeplane control plane:" in self.log():
                return self
            time.sleep(0.05)
        raise AssertionError(f"edgeplane serve did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_data_centres_observed(self) -> dict[str, str]:
        """Wait until a pass has found each data centre of the applied fleet out of reach (not
        ``Waiting`` for its first answer): what is read from then on stays as it is while
        nothing is applied (with :data:`DATA_CENTRES_NEVER_LOST`). Their health, by name."""
        for _ in range(120):  # a pass or two after the apply
            sites = json.loads(ok("get", "sites", "-o", "json", server=self))["items"]
            health = {s["metadata"]["name"]: s.get("status", {}).get("health") for s in sites if s["spec"]["tier"] == "datacenter"}
            if health and set(health.values()) == {"Unreachable"}:
                break
            time.sleep(0.25)
        return health

    def cli_ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``edgeplane ARGS`` against this control plane, which must succeed; a failure says
        what the command printed and what the control plane logged (and whether it still runs)."""
        done = cli(*args, server_url=self.url)
        if done.returncode != 0:
            state = "running" if self.process.poll() is None else f"exited with {self.process.returncode}"
            raise AssertionError(f"edgeplane {' '.join(args)} exited with {done.returncode}: {done.stderr}\n"
                                 f"the control plane ({state}) logged:\n{self.log()[-4000:]}")
        return done

    def stop(self, timeout: float = 20.0) -> int:
        harness.terminate(self.process, timeout)
        self._log.close()
        return self.process.returncode


# --- what a user changed, ignoring the control plane's own background writes ----------------


def desired_state(store: Any) -> list[tuple[Any, ...]]:
    """Every object without its status (the reconciler updates status in the background)."""
    return [(o.kind, o.name, dict(o.labels), dict(o.spec), o.generation, o.resource_version) for o in store.list()]


def user_events(store: Any) -> list[Any]:
    """The event log without the reconciler's own entries, which may land at any time."""
    return [e for e in store.events(limit=100_000) if e.actor != "reconciler"]


# --- the state store's tests (both backends; their fixtures are conftest.py's) -------------


# The stores keep their connections to themselves: every use goes through the store's lock
# and its retries. The tests below need one for what only the connection itself shows or
# holds, and read it through these helpers, the one place they do.
def sqlite_connection(store: Any) -> sqlite3.Connection:
    """The SQLite store's own connection, for what holds per connection only: ``PRAGMA
    max_page_count`` (SQLite's page limit stands in for a full disk) and
    ``set_trace_callback`` (the statements a call runs). A second connection to the file
    would not do."""
    assert isinstance(store, sqlite_store.Store), store
    return store._db


def postgres_dsn(store: Any) -> str:
    """The connection string the PostgreSQL store's connection was opened with, as psycopg
    reports it: the options the store added to its URL, and those the URL set itself."""
    return str(store._connection().info.dsn)


def postgres_transaction(store: Any) -> contextlib.AbstractContextManager[Any]:
    """A write transaction of the PostgreSQL store, held open by the test as a writer
    paused inside one would (its write lock taken)."""
    return store._tx()


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def stored_bytes(location: str) -> bytes:
    """Everything the backend keeps on disk or in its tables, as bytes."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            return b"".join(str(conn.execute(f"SELECT * FROM {t}").fetchall()).encode() for t in tables)
    folder = pathlib.Path(location).parent
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.name.startswith(pathlib.Path(location).name))


def write(name: str, spec: dict, labels: dict | None = None, expected: int | None = None, kind: str = "Site") -> ObjectWrite:
    return ObjectWrite(kind, name, labels or {}, spec, expected)


WHO = Event("alice", "apply", "", "", "rollout ticket 42")
