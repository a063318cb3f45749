"""The Agent: wires cache, registry, HTTP server and uplink, and owns their life cycle.

Start order gives autonomy: the HTTP server and the models of the last saved assignment
set come up first, from the local cache, whether or not the control plane answers; the
uplink then connects in the background and keeps retrying. Stop order drains: readiness
turns 503, a final heartbeat says "draining" and is seen taken (the gateway routes
nothing here once it is), in-flight requests finish, then we exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

import edge_agent
from edge_agent import (artifacts, assignments, build, capacity, errors, http, httplistener, inflight, registry, runtime, serve_auth, state,
                        tls, uplink)
from edge_agent.retry import Jitter
from edge_agent.runtime import onnx
from edgeplane_proto import hostport, logformat

if TYPE_CHECKING:  # imported by the first generative model: an agent that serves none never holds them
    from edge_agent.runtime import genai

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    control_plane: str  # HOST:PORT, or several replicas' addresses separated by commas (tried in turn)
    site: str
    token: str
    data_dir: pathlib.Path
    listen_host: str = "127.0.0.1"
    listen_port: int = edge_agent.DEFAULT_LISTEN_PORT
    advertise_url: str | None = None
    heartbeat_interval: float | None = None  # None: the control plane's
    insecure: bool = False
    ca_file: pathlib.Path | None = None
    ca_sha256: str | None = None  # the CA's pin instead of its file
    join_address: str | None = None  # default: the host of the control-plane address in use, its port + 1
    allow_file_artifacts: bool = False
    max_artifact_bytes: int = edge_agent.DEFAULT_MAX_ARTIFACT_GIB << 30  # larger artifacts are refused, not downloaded
    max_downloads: int = 0  # http(s) downloads at once, the others waiting their turn (0: no limit)
    download_timeout: float = artifacts.DEFAULT_TIMEOUT_S  # a download's socket timeout
    # a download slower than this many bytes a second for download_speed_time is cut, to resume (0: never)
    download_speed_limit: int = int(artifacts.DEFAULT_SPEED_LIMIT)
    download_speed_time: float = artifacts.DEFAULT_SPEED_TIME_S
    country: str = ""
    region: str = ""
    lat: float | None = None
    lon: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    max_body_bytes: int = httplistener.DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = 30.0
    write_timeout: float = 60.0  # a client that reads nothing for this long is dropped
    max_connections: int = 0  # HTTP connections at once (0: half the open-file limit)
    max_queued_runs: int = 0  # inference runs waiting for a worker (0: 32 per worker); one more is refused
    # memory requests in flight may hold, all together (0: half of what the agent has free,
    # measured at the start and whenever the models served change); one more is refused
    max_inflight_bytes: int = 0
    workers: int = 0  # inference threads; 0 = one per core this process may use
    inline_max_ms: float = 20.0  # runs this short, alone in flight, stay on the event loop; 0 = never
    grpc_listen: tuple[str, int] | None = None  # also serve v2 over gRPC here
    intra_op_threads: int = 0  # onnxruntime threads per session; 0 = the probe's (capacity.CapacityProbe.session_threads)
    spin_between_runs: bool = False  # onnxruntime's idle threads spin-wait after a run (see runtime.onnx)
    spin_after_run_us: int = 0  # or only this long (0: they sleep when the run ends)
    runtimes: tuple[str, ...] | None = None  # the model runtimes offered (--runtimes); None: every one installed
    access_log: bool = False  # one line per request answered (HTTP and gRPC), on edgeplane.access (--access-log)
    serve_auth: str = "none"  # "token": the serving ports take API tokens, held to their scope (--serve-auth)

    @property
    def control_planes(self) -> list[str]:
        return [t.strip() for t in self.control_plane.split(",") if t.strip()]


def _bind(host: str, port: int) -> socket.socket:
    try:
        return _bind_socket(host, port)
    except OSError as exc:  # the bare errno says neither what nor where
        raise OSError(exc.errno, f"cannot listen on {hostport.address(host, port)} (v2 HTTP API, --listen): {exc.strerror or exc}") from exc


def _bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit TCP_NODELAY: a response is one write, and it should leave
    # at once rather than wait for the ACK of the previous one.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        probe: capacity.CapacityProbe | None = None,
        load_model: registry.Loader | None = None,
        model_retry: registry.RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        reconnect_rng: Jitter | None = None,
        state_store: state.StateStore | None = None,
        agent_tls: tls.AgentTls | None = None,
    ) -> None:
        """``clock``: this machine's wall clock, which the uplink reads (certificate dates,
        the times its heartbeats are sent). ``state_store``: what keeps the agent's state
        under its data dir (by default :class:`state.StateStore` on ``config.data_dir``);
        ``agent_tls``: its mutual-TLS material there (by default :class:`tls.AgentTls` from
        the config's flags; none with ``config.insecure``)."""
        self._agent_tls = agent_tls
        self.config = config
        self._clock = clock
        self._reconnect_rng = reconnect_rng  # the uplink's reconnect jitter (its own Random unless given)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self._probe = probe or capacity.CapacityProbe(onnx.available_providers)
        # reported with the capacity: the control plane assigns this agent no model of another runtime
        self.runtimes = config.runtimes if config.runtimes is not None else runtime.installed()
        # the cores this process may use (affinity, cgroup quota), which it reports too: a
        # container given 2 of a host's 64 would otherwise run 64 models at once on them
        self.workers = config.workers or self._probe.cpu_cores()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="infer")
        # onnxruntime's own default counts the host's cores, which a quota or a cpuset does not change
        self.intra_op_threads = config.intra_op_threads or self._probe.session_threads()
        self.store = state_store if state_store is not None else state.StateStore(config.data_dir)
        self.cache = artifacts.ArtifactCache(config.data_dir / "cache", allow_file_urls=config.allow_file_artifacts,
                                             max_bytes=config.max_artifact_bytes, unpack_root=self.models_dir,
                                             max_downloads=config.max_downloads, timeout=config.download_timeout,
                                             speed_limit=config.download_speed_limit,
                                             speed_time=config.download_speed_time)
        load_onnx = functools.partial(onnx.OnnxModel.load, intra_op_threads=self.intra_op_threads,
                                      spin_between_runs=config.spin_between_runs,
                                      spin_after_run_us=config.spin_after_run_us)
        self._wake = asyncio.Event()  # a new desired set, or a model's attempt ended
        self.registry = registry.ModelRegistry(
            self.cache,
            load_model or (lambda data: load_onnx(data, providers=onnx.choose_providers(self._probe.execution_providers))),
            on_change=self._models_changed,
            on_attempt_end=self._wake.set,
            retry=model_retry or registry.RetryPolicy(),
            load_package=self._load_package,
            load_onnx_package=lambda folder, sha256: self._load_onnx_package(
                folder, functools.partial(load_onnx, providers=onnx.choose_providers(self._probe.execution_providers))),
            folders=_Folders(self.models_dir),
            generative_on_gpu=self._probe.generative_on_cuda,
            memory_available=self._probe.memory_available,
            kept_for_requests=self._kept_for_requests,
            loading=self._loading,
            runtimes=self.runtimes,
            remember=self._remember_replacing,
        )
        self._replacing_saved = asyncio.Lock()  # the replacements' file is written in the order they change
        queued = config.max_queued_runs or http.QUEUED_RUNS_PER_WORKER * self.workers
        self.budget = inflight.Budget()  # the memory requests in flight may hold
        self._load_bytes = 0  # what the load under way needs (footprint), beside which the default budget is sized
        self.budget.resize(self._inflight_limit())
        self.server = http.InferenceServer(self.registry, self._executor, inline_max_s=config.inline_max_ms / 1000,
                                           max_inflight=self.workers + queued, budget=self.budget)
        self.server.max_body_bytes = config.max_body_bytes
        if config.serve_auth == "token":  # the list kept in the data dir binds at once, uplink or not
            self.server.auth = serve_auth.ServeAuth(config.data_dir, config.country, clock)
        self._desired = assignments.EMPTY
        # whether _desired is the control plane's word (or a set it sent before): until
        # then the cache and unpacked packages are kept, however many GB they hold
        self._told = False
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httplistener.HttpServer | None = None
        self._grpc: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.uplink: uplink.Uplink | None = None
        self.endpoint_url = ""
        self._owner: int | None = None  # the data dir's lock, held from start to stop

    @property
    def models_dir(self) -> pathlib.Path:
        """Unpacked generative-model packages, one folder per sha256."""
        return self.config.data_dir / "models"

    def _load_package(self, folder: pathlib.Path, sha256: str, cuda: bool) -> genai.GenAIModel:
        """A generative package, from the folder it was unpacked into."""
        from edge_agent.runtime import genai

        return genai.GenAIModel.load(folder, self.generative_options(cuda))

    @staticmethod
    def _load_onnx_package(folder: pathlib.Path, load: Callable[[pathlib.Path], onnx.OnnxModel]) -> onnx.OnnxModel:
        """An onnx package's graph, from the folder it was unpacked into (its external data beside it)."""
        from edge_agent import packages

        return load(packages.graph(folder))

    def generative_options(self, cuda: bool) -> genai.LoadOptions:
        """How this agent loads a generative package: on CUDA as the registry weighed its load
        (``cuda``: the probe's ``generative_on_cuda`` when the load began, asked once for both,
        since a capacity probe may find a GPU gone or come in between)."""
        from edge_agent.runtime import genai

        return genai.LoadOptions(cuda=cuda, spin_between_runs=self.config.spin_between_runs,
                                 spin_after_run_us=self.config.spin_after_run_us, intra_op_threads=self.intra_op_threads)

    # -- Reporter protocol for the uplink ---------------------------------------------

    def capacity(self) -> capacity.Capacity:
        return dataclasses.replace(self._probe.capacity(), runtimes=self.runtimes)

    def load(self) -> capacity.Load:
        return self._probe.load()

    def inflight(self) -> int:
        return self.server.inflight

    def model_statuses(self) -> tuple[registry.ModelStatus, ...]:
        return self.registry.statuses()

    def model_load(self) -> list[tuple[str, int, float]]:
        return self.server.metrics.model_load()

    def assignment_version(self) -> int:
        return self.registry.applied_version

    def draining(self) -> bool:
        return self.server.draining

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        started = time.time()
        try:  # one agent per data dir: two would share its state, identity and cache
            self._owner = state.hold(self.config.data_dir / "agent.owner")
        except state.Held as held:
            raise errors.StateError(f"another agent{f' ({held.holder})' if held.holder else ''} is using the data dir "
                                    f"{self.config.data_dir}: stop it first, or give this one another --data-dir") from None
        try:
            self.store.refuse_newer()  # before this agent writes or sets aside anything of the data dir
            if removed := state.remove_stale_temporaries(self.config.data_dir, started):
                log.info("removed %d temporary file(s) of writes a crash cut short: %s", len(removed), ", ".join(removed))
            await self._start()
        except BaseException:
            self._release_data_dir()
            raise

    def _release_data_dir(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            os.close(owner)  # the lock goes with it

    async def _start(self) -> None:
        cfg = self.config
        sock = _bind(cfg.listen_host, cfg.listen_port)
        port = sock.getsockname()[1]
        self.endpoint_url = cfg.advertise_url or _default_url(cfg.listen_host, port)
        access = logformat.access_log(cfg.access_log, self.registry.known)
        self._http = httplistener.HttpServer(
            self.server.handle, httplistener.Limits(max_body_bytes=cfg.max_body_bytes, write_timeout=cfg.write_timeout,
                                                    max_connections=cfg.max_connections), self.budget, access=access,
        )
        await self._http.start(sock)
        http_server = self._http
        self.server.received = lambda: http_server.pending
        self.server.metrics.connections = lambda: (len(http_server.connections), http_server.turned_away)
        if cfg.grpc_listen is not None:
            from edge_agent import grpc_inference  # only agents that serve gRPC load it

            self._grpc, self.grpc_port = await grpc_inference.start(
                *cfg.grpc_listen, self.server, cfg.max_body_bytes, access)
            log.info("serving v2 over gRPC on %s", hostport.address(cfg.grpc_listen[0], self.grpc_port))
        saved = self.store.load_assignments(cfg.site)
        if saved is not None and saved.assignments:
            log.info("serving %d saved assignment(s) from the local cache", len(saved.assignments))
        self._desired, self._told = saved or assignments.EMPTY, saved is not None
        replacing = self.store.load_replacing(cfg.site)  # replaceWhenFull: the versions unloaded for loads a stop cut short
        self.registry.recall(replacing)
        if self._told and self.models_dir.is_dir():  # before any unpack starts: leftovers of unpacks a stop or crash cut short go too
            keep = {a.sha256 for a in self._desired.assignments} | {e.replaced.sha256 for e in replacing.values()}
            await asyncio.to_thread(_prune_packages, self.models_dir, keep, set())
        self._wake.set()
        self._tasks.append(asyncio.create_task(self._reconcile(), name="reconcile"))
        self.uplink = uplink.Uplink(
            cfg.control_planes,
            uplink.JoinFacts(
                site=cfg.site,
                bootstrap_token=cfg.token,
                endpoint_url=self.endpoint_url,
                agent_version=build.describe(),
                heartbeat_interval=cfg.heartbeat_interval,
                country=cfg.country,
                region=cfg.region,
                lat=cfg.lat,
                lon=cfg.lon,
                labels=dict(cfg.labels),
                started_unix_ms=round(self._clock() * 1000),  # this agent's start, which each of its joins says
                checks_tokens=self.server.auth is not None,
            ),
            self.store,
            self,
            self._receive_assignments,
            on_serve_tokens=None if self.server.auth is None else self.server.auth.update,
            agent_tls=None if cfg.insecure else self._agent_tls or tls.AgentTls(
                cfg.data_dir, cfg.join_address, cfg.ca_file, cfg.ca_sha256),
            clock=self._clock,
            rng=self._reconnect_rng,
        )
        self.server.metrics.uplink = self.uplink.contact
        self.server.metrics.downloads = self.cache.downloads
        self._tasks.append(asyncio.create_task(self.uplink.run(), name="uplink"))
        log.info("agent for site %s serving v2 on %s (%d inference threads)", cfg.site, self.endpoint_url, self.workers)

    async def stop(self) -> None:
        """Drain: refuse readiness, tell the control plane, finish in-flight requests; all
        within ``drain_timeout`` (and the last heartbeat's few seconds): runs still going
        then are left to end on their own, and runs queued behind them are dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        self.server.draining = True
        log.info("draining (%d request(s) in flight)", self.server.inflight)
        if self.uplink is not None:
            await self.uplink.stop()
            await self._uplink_ended()
        await asyncio.gather(  # both drain within the one timeout
            *([self._http.shutdown(self.config.drain_timeout)] if self._http is not None else []),
            *([self._grpc.stop(self.config.drain_timeout)] if self._grpc is not None else []),
        )
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.registry.close()  # downloads under way: their children killed
        self.server.close()
        # Whoever asked for a queued run has been answered or cut off by now.
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self._runs_ended(max(0.0, deadline - loop.time()))
        self._release_data_dir()
        log.info("agent stopped")

    async def _uplink_ended(self) -> None:
        """Wait (2 s at most) for the uplink to end its session: its last heartbeat, marked
        draining, has then reached the control plane, which routes nothing more here. Only
        then may the listener close: a gateway still routing here would meet a refused
        connection, a 502 where no other replica answers, instead of this agent's 503."""
        for task in self._tasks:
            if task.get_name() == "uplink":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await asyncio.shield(task)

    async def _runs_ended(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the runs under way to end, without holding the event loop."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def wait() -> None:
            self._executor.shutdown(wait=True)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None))

        threading.Thread(target=wait, name="infer-stop", daemon=True).start()
        try:
            async with asyncio.timeout(timeout):
                await ended
        except TimeoutError:
            log.warning("stopping with %d inference run(s) unfinished after the drain timeout", self.server.inflight)

    async def _receive_assignments(self, desired: assignments.AssignmentSet) -> None:
        try:
            # intent first, then act; in a worker thread, since its fsync may take seconds on a slow
            # disk (an SD card, one busy with a download) and the loop serves inference meanwhile
            await asyncio.to_thread(self.store.save_assignments, self.config.site, desired)
        except OSError as exc:  # a full or failing disk: the control plane's word still holds
            log.error("cannot save assignment set v%d in %s: %s; acting on it anyway (a restart while the control plane "
                      "is unreachable would serve the last set saved)", desired.version, self.config.data_dir, exc.strerror or exc)
        self._desired, self._told = desired, True
        self._wake.set()

    async def _remember_replacing(self, replacing: dict[str, assignments.Replacement]) -> None:
        """Keep the replacements under way (replaceWhenFull) in the data dir, for a restart
        (a worker thread, as the assignment set's); a disk that fails is logged, the
        replacement goes on (a restart then forgets it, as agents did before they kept it)."""
        async with self._replacing_saved:
            try:
                await asyncio.to_thread(self.store.save_replacing, self.config.site, replacing)
            except OSError as exc:
                log.error("cannot save the replacement(s) under way in %s: %s; a restart would not report them",
                          self.config.data_dir, exc.strerror or exc)

    async def _reconcile(self) -> None:
        """Act on each new desired set at once, and again whenever a model's attempt ends or
        a failed model is due. Downloads and loads run as the registry's own tasks: this
        loop waits for none of them."""
        while True:
            retry_in = self.registry.retry_due_in()
            if retry_in is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(retry_in):
                        await self._wake.wait()
            self._wake.clear()
            try:
                self.registry.apply(self._desired)  # latest wins: read it now
                if self._told:
                    await self._prune()
            except Exception:  # the loop never dies
                log.exception("converging on assignment set v%d failed", self._desired.version)
            if not self.registry.busy():  # the saved set's models are loaded, or failed
                self.server.ready = True

    async def _prune(self) -> None:
        """Remove the cached and unpacked versions that neither serve nor are assigned."""
        keep = {m.sha256 for m in self.registry.serving()} | {a.sha256 for a in self._desired.assignments} | self.registry.kept_aside()
        await self.cache.prune(keep)  # a version no longer wanted is downloaded again if it ever is
        if self.models_dir.is_dir():  # a generative model was unpacked here once
            # versions no longer wanted; an unpack of a wanted one may be under way
            await asyncio.to_thread(_prune_packages, self.models_dir, keep, keep)

    def _inflight_limit(self) -> int | None:
        """The memory requests in flight may hold: ``--max-inflight-bytes``, or a share of what
        the agent has free now and what requests in flight hold (theirs to give back), less
        what the load under way needs."""
        if self.config.max_inflight_bytes:
            return self.config.max_inflight_bytes
        return inflight.limit(0, self._probe.memory_available() + self.budget.held, self._load_bytes)

    def _kept_for_requests(self, need: int, available: int) -> int:
        """What requests in flight may hold while a load of ``need`` bytes runs, with
        ``available`` free: what the budget will be then, and at least what they hold now."""
        return max(self.budget.held, inflight.limit(self.config.max_inflight_bytes, available + self.budget.held, need) or 0)

    def _loading(self, need: int) -> None:
        """A load of ``need`` bytes starts (0: it ended): the default budget makes room for it."""
        self._load_bytes = need
        if not self.config.max_inflight_bytes:
            self.budget.resize(self._inflight_limit())

    def _models_changed(self) -> None:
        if not self.config.max_inflight_bytes:  # a model loaded or let go of: what is free has changed
            self.budget.resize(self._inflight_limit())
        self.server.models_changed()
        if self.uplink is not None:
            self.uplink.nudge()


class _Folders:
    """The registry's packages, unpacked under ``<data-dir>/models`` (``edge_agent.packages``,
    with shutil, bz2 and lzma, imported only once a package is there or comes)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def reuse(self, sha256: str, runtime: str) -> pathlib.Path | None:
        if not os.path.lexists(self.root / sha256):  # (every onnx model asks: most are not packages)
            return None
        from edge_agent import packages

        try:
            return packages.reuse(self.root, sha256, runtime)
        except OSError as exc:  # a read-only disk: reported, retried, old version kept
            raise errors.ModelLoadError(f"cannot remove {self.root / sha256}, not unpacked whole: {exc.strerror or exc}") from exc

    def unpack(self, package: pathlib.Path, sha256: str, runtime: str) -> pathlib.Path:
        from edge_agent import packages

        try:
            return packages.unpack(package, sha256, self.root, runtime=runtime)
        except OSError as exc:  # a full or read-only disk: reported, retried, old version kept
            raise errors.ModelLoadError(f"cannot unpack package {sha256[:12]} into {self.root}: {exc.strerror or exc}") from exc

    def size(self, folder: pathlib.Path) -> int:
        from edge_agent import packages

        return packages.size(folder)

    def remove(self, sha256: str) -> None:
        from edge_agent import packages

        try:
            packages.remove(self.root, sha256)
        except OSError as exc:
            raise errors.ModelLoadError(f"cannot remove {self.root / sha256}: {exc.strerror or exc}") from exc


def _prune_packages(models_dir: pathlib.Path, keep: set[str], unpacking: set[str]) -> None:
    from edge_agent import packages  # with shutil, bz2 and lzma: only where generative models were unpacked

    packages.prune(models_dir, keep, unpacking)


def _default_url(host: str, port: int) -> str:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_unspecified:
            host = socket.getfqdn()
    return f"http://{hostport.address(host, port)}"


