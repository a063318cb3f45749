"""Fixtures for the agent tests: real gRPC on loopback, a real HTTP artifact server with
Range support, real ONNX models built on the spot, an awaitable log of hub events, and a
leader and a follower replica for the relay tests (their helpers are ``relaying``'s), and a
hub on an injected clock for the hub tests (what they hand it is ``hub_support``'s)."""

from __future__ import annotations

import asyncio
import http.server
import pathlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from edge_agent import capacity, daemon, httplistener, httpmessages, registry, retry, state
from orchestrator.agents import auth, hub, model, relay, relay_leader, service
from orchestrator.testing import loopback, onnx_models

from . import hub_support

if TYPE_CHECKING:
    from tests.agent import genai_serving

TOKEN = "bootstrap-token-for-tests"
SITE = "edge-paris-1"
MakeAgent = Callable[..., Awaitable[daemon.Agent]]


async def serve_http(handler: httpmessages.Handler, limits: httplistener.Limits | None = None) -> tuple[httplistener.HttpServer, int]:
    """The agent's HTTP server answering with ``handler`` on a free loopback port: (server, port)."""
    server = httplistener.HttpServer(handler, limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock)
    return server, sock.getsockname()[1]


async def slow_reader(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with a small receive buffer, so that a client that does not read is felt soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


class _ArtifactHandler(http.server.BaseHTTPRequestHandler):
    root: pathlib.Path
    ranges: list[str]
    hits: list[str]
    scripted: dict[str, list[int]]

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.hits.append(name)
        queued = self.scripted.get(name)
        if queued:
            self.send_error(queued.pop(0))
            return
        path = self.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range")
        if header:
            self.ranges.append(header)
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@dataclass
class ArtifactServer:
    root: pathlib.Path
    base_url: str
    ranges: list[str]
    hits: list[str]  # names of every GET, in order
    scripted: dict[str, list[int]]

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def fail_next(self, name: str, *statuses: int) -> None:
        """Answer the next GETs of ``name`` with these HTTP error statuses, then serve it."""
        self.scripted[name] = list(statuses)

    def attempts(self, name: str) -> int:
        return self.hits.count(name)


@pytest.fixture(scope="session")
def artifact_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArtifactServer]:
    root = tmp_path_factory.mktemp("artifacts")
    ranges: list[str] = []
    hits: list[str] = []
    scripted: dict[str, list[int]] = {}
    handler = type(
        "Handler",
        (_ArtifactHandler,),
        {"root": root, "ranges": ranges, "hits": hits, "scripted": scripted},
    )
    with loopback.http_server(handler) as url:
        yield ArtifactServer(root, url, ranges, hits, scripted)


@pytest.fixture(scope="session")
def packages(artifact_server: ArtifactServer) -> genai_serving.Packages:
    """The generative tests' two chat packages, built once for the session."""
    from tests.agent import genai_serving as serving  # here: that module takes this one's names

    return serving.build_packages(artifact_server)


@pytest.fixture
async def small(control_plane: ControlPlane, make_agent: MakeAgent, packages: genai_serving.Packages) -> AsyncIterator[genai_serving.Serving]:
    """An agent serving the fast chat package."""
    from tests.agent import genai_serving as serving

    async for s in serving.serve(control_plane, make_agent, packages.small_url, packages.small.sha256):
        yield s


@dataclass(frozen=True)
class Models:
    v1: onnx_models.BuiltModel
    v2: onnx_models.BuiltModel
    corrupt_url: str
    v1_url: str
    v2_url: str


@pytest.fixture(scope="session")
def models(artifact_server: ArtifactServer) -> Models:
    v1 = onnx_models.build_mlp(artifact_server.root / "mlp-v1.onnx", seed=0)
    v2 = onnx_models.build_mlp(artifact_server.root / "mlp-v2.onnx", seed=1)
    corrupt = bytearray(v2.path.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (artifact_server.root / "mlp-corrupt.onnx").write_bytes(bytes(corrupt))
    return Models(
        v1,
        v2,
        artifact_server.url("mlp-corrupt.onnx"),
        artifact_server.url("mlp-v1.onnx"),
        artifact_server.url("mlp-v2.onnx"),
    )


class EventLog:
    """Hub events, awaitable: ``await events.wait_for(pred)`` instead of sleeping."""

    def __init__(self) -> None:
        self.events: list[model.AgentEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: model.AgentEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(
        self, predicate: Callable[[model.AgentEvent], bool], timeout: float = 10.0
    ) -> model.AgentEvent:
        async def scan() -> model.AgentEvent:
            seen = 0
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(scan(), timeout)

    def kinds(self, site: str) -> list[model.AgentEventKind]:
        return [e.kind for e in self.events if e.site == site]


@dataclass
class ControlPlane:
    hub: hub.AgentHub
    server: service.AgentServer
    events: EventLog

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def start_control_plane(port: int = 0, missed: int = 3, reconnect_grace: float = hub.RECONNECT_GRACE_S,
                              heartbeat_interval: float = 0.2) -> ControlPlane:
    events = EventLog()
    agent_hub = hub.AgentHub(
        auth.InMemoryJoinAuthenticator([TOKEN]),
        on_change=events,
        heartbeat_interval=heartbeat_interval,
        missed_heartbeats=missed,
        reconnect_grace=reconnect_grace,
    )
    server = await service.start_agent_server(agent_hub, "127.0.0.1", port)
    return ControlPlane(agent_hub, server, events)


@pytest.fixture
async def control_plane() -> AsyncIterator[ControlPlane]:
    cp = await start_control_plane()
    yield cp
    await cp.server.stop(grace=None)


@pytest.fixture
async def make_agent(tmp_path: pathlib.Path) -> AsyncIterator[MakeAgent]:
    started: list[daemon.Agent] = []

    async def make(
        cp: ControlPlane,
        site: str = SITE,
        model_retry: registry.RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        reconnect_rng: retry.Jitter | None = None,
        probe: capacity.CapacityProbe | None = None,
        load_model: registry.Loader | None = None,
        state_store: state.StateStore | None = None,
        **overrides: object,
    ) -> daemon.Agent:
        config = daemon.AgentConfig(
            control_plane=str(overrides.pop("control_plane", cp.target)),
            site=site,
            token=TOKEN,
            data_dir=overrides.pop("data_dir", tmp_path / site),
            listen_port=0,
            heartbeat_interval=overrides.pop("heartbeat_interval", 0.2),
            insecure=True,
            drain_timeout=2,
            workers=2,
            country="FR",
            region="eu-west",
            lat=48.85,
            lon=2.35,
            labels={"tier": "edge"},
            **overrides,  # type: ignore[arg-type]
        )
        agent = daemon.Agent(config, probe=probe, load_model=load_model, model_retry=model_retry or registry.RetryPolicy(),
                             clock=clock, reconnect_rng=reconnect_rng, state_store=state_store)
        await agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        if not agent.server.draining:
            await agent.stop()


# --- a replica that does not lead, relaying its agents to the leader -------------------------

SECRET = "relay-secret-for-tests"


@dataclass
class Leader:
    cp: ControlPlane
    servicer: relay_leader.RelayServicer
    secret: str | None = SECRET

    def named(self, secret: str = SECRET) -> relay.Leader:
        return relay.Leader("cp-leader", self.cp.target, secret, answers_claims=True)


@pytest.fixture
async def leader() -> AsyncIterator[Leader]:
    events = EventLog()
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), on_change=events, heartbeat_interval=0.2, missed_heartbeats=3)
    holder: list[Leader] = []
    servicer = relay_leader.RelayServicer(agent_hub, lambda: holder[0].secret)
    server = await service.start_agent_server(agent_hub, "127.0.0.1", 0, more=(servicer.handler(),))
    holder.append(Leader(ControlPlane(agent_hub, server, events), servicer))
    yield holder[0]
    await server.stop(grace=None)


@pytest.fixture
async def follower() -> AsyncIterator[tuple[ControlPlane, relay.RelayClient]]:
    cp = await start_control_plane()
    client = relay.RelayClient(cp.hub, "cp-follower", flush_s=0.05)
    task = asyncio.create_task(client.run())
    yield cp, client
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await cp.server.stop(grace=None)


# --- a hub on an injected clock, no network (the hub tests) ---------------------------------


@pytest.fixture
def clock() -> hub_support.FakeClock:
    return hub_support.FakeClock()


@pytest.fixture
def events() -> list[model.AgentEvent]:
    return []


@pytest.fixture
def agent_hub(clock: hub_support.FakeClock, events: list[model.AgentEvent]) -> hub.AgentHub:
    return hub.AgentHub(
        auth.InMemoryJoinAuthenticator([hub_support.TOKEN]),
        on_change=events.append,
        clock=clock,
        missed_heartbeats=3,
    )
