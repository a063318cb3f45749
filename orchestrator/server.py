"""``edgeplane serve``: one process, one event loop, every control-plane part.

The HTTP API and the gateway share a uvicorn server; agents talk to the gRPC listener;
the reconcile loop runs beside them. This module wires and runs them; what the API reads of
them is :mod:`orchestrator.server_views`. :class:`ControlPlane` is also what the test harness,
the benchmarks and the demo start in-process, so all of them run the same wiring.

On a PostgreSQL store several of these processes may share one database: each serves the
API, the gateway (routing from the table the leader publishes) and agents, and only the
holder of the leader lease (:mod:`orchestrator.leadership`) reconciles; the others relay
their agents to it (:mod:`orchestrator.agents.relay`); each acts on what the others
write (:mod:`orchestrator.following`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import secrets
import pathlib
import socket
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from orchestrator import capture_counts, capture_retention, catalog, console, event_retention, following, leadership
from orchestrator.agents import admission as agent_admission
from orchestrator.agents import auth as agent_auth
from orchestrator.agents import errors as agent_errors
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.agents import backlog, relay, relay_leader, serve_tokens
from orchestrator.agents import service as agent_service
from orchestrator.api import app as api_app
from orchestrator.api import artifacts as artifacts_api
from orchestrator.api import auth
from orchestrator.api import captures as captures_api
from orchestrator.api import distill as distill_api
from orchestrator.api import origins
from orchestrator.api import simulate as simulate_api
from orchestrator.api import watch as watch_api
from orchestrator.artifacts import catalog as artifacts
from orchestrator.distill import store as capture_store
from orchestrator import fleet_metrics, runloop, server_config, server_options, server_views
from edgeplane_proto import hostport, identity, logformat, reconnect
from orchestrator.gateway import cascade as cascade_mod
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import correlation, openai_routes, proxy, upstream, wire
from orchestrator.gateway import options as gateway_options
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import observed
from orchestrator.security import ca as ca_mod
from orchestrator.reconciler.loop import Reconciler
from orchestrator.security import admission, ratelimit
from orchestrator.store import is_postgres_url, open_store
from orchestrator.store import threads as store_threads
from orchestrator.store import sqlite as store_mod

log = logging.getLogger("edgeplane")


WAKE_EVERY_S = 1.0  # a follower logs at most one wake a second per model
#: The agents' events logged (by the replica the agent is connected to).
LOGGED_AGENT_EVENTS = frozenset({agent_model.AgentEventKind.JOINED, agent_model.AgentEventKind.LOST, agent_model.AgentEventKind.RECOVERED})
API_READ_S = server_views.API_READ_S
#: The most agents' events logged in one transaction (what waits after a fleet rejoined).
LOG_BATCH = 500
AGENT_CA_KEY = "agent-ca"  # published: the SHA-256 of the CA the store's agents trust
RELAY_IDENTITY = "control-plane-relay"  # the name in a relaying replica's client certificate (mutual TLS)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """From another thread: ``fn(*args)`` on ``loop``, unless that loop has closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _log_failed_wake(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not pass a wake on to the leader: %s", task.exception())


@dataclass
class ControlPlane(server_views.ServerViews):
    config: server_config.ServerConfig
    store: store_mod.Store = field(init=False)
    authenticator: auth.Authenticator = field(init=False)
    registry: CollectorRegistry = field(init=False)
    simulations: simulate_api.Simulations = field(init=False)
    hub: hub_mod.AgentHub = field(init=False)
    table: endpoints_mod.EndpointTable = field(init=False)
    reconciler: Reconciler = field(init=False)
    app: Starlette = field(init=False)  # every route this process serves over HTTP (docs/api.md lists them)
    http_url: str = ""
    agent_target: str = ""
    admin_token: str | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)  # end on their own once told to stop
    _background: list[asyncio.Task[Any]] = field(default_factory=list)  # run until cancelled
    _started: bool = False
    _wakes_left: dict[str, float] = field(default_factory=dict)  # a follower: when it last logged a wake, by model
    _wake_writes: set[asyncio.Task[None]] = field(default_factory=set)
    replica_id: str = ""
    elector: leadership.Elector | None = None  # shared database only; None: this process always leads
    _reconciling: asyncio.Task[Any] | None = None
    _election: asyncio.Task[Any] | None = None
    relay_client: relay.RelayClient | None = None  # shared database only: relays this replica's agents while it follows
    _relay_secret: str | None = None  # set while leading: what relaying replicas must present
    _leader_published: int | None = None  # the fencing token under which this replica's relay address was published
    _reads: dict[str, asyncio.Future[Any]] = field(default_factory=dict)  # the store reads in flight that callers share, by name
    _leaders_view: tuple[int, observed.Observed] | None = None  # a follower: the leader's observed fleet last read, with its version
    _leaders_unreadable: int = 0  # a follower: the version of the last one it could not read (0: none)
    _change_feed: Any = None  # shared database only: tells of other replicas' writes as they commit
    _agent_events: backlog.EventBacklog = field(default_factory=backlog.EventBacklog)  # to log, in order
    distills: distill_api.Runs = field(default_factory=distill_api.Runs)  # the distillation runs under way, stopped first

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> ControlPlane:
        """Start everything, or nothing: a start that fails closes the store it opened (an
        SQLite file is held by one control plane at a time)."""
        try:
            return await self._start()
        except BaseException:
            if "store" in self.__dict__:
                self.store.close()
            raise

    async def _start(self) -> ControlPlane:
        cfg = self.config
        if cfg.auth not in ("none", "token"):
            raise server_config.ConfigError("--auth must be 'none' or 'token'")
        if cfg.simulation_slots < 1 or cfg.simulation_budget < 1:
            raise server_config.ConfigError("--simulations and --simulate-budget must be 1 or more")
        retention = event_retention.Retention(cfg.events_retention_s, cfg.audit_retention_s)
        wrong = (gateway_options.problem(cfg.gateway_auth, cfg.gateway_rate, cfg.gateway_burst, cfg.gateway_max_body,
                                         cfg.cold_start_timeout_s, cfg.first_token_timeout_s)
                 or retention.problem() or agent_admission.failure_limit_problem(cfg.join_failure_rate, cfg.join_failure_burst))
        if wrong:
            raise server_config.ConfigError(wrong)
        for flag, value, (low, high) in (("--leader-lease", cfg.leader_lease_s, server_options.LEADER_LEASE_S),
                                         ("--store-poll", cfg.store_poll_s, server_options.STORE_POLL_S)):
            if not low <= value <= high:
                raise server_config.ConfigError(f"{flag} must be from {low:g} to {high:g} seconds")
        if not store_threads.THREADS[0] <= cfg.store_threads <= store_threads.THREADS[1]:
            raise server_config.ConfigError(f"--store-threads must be from {store_threads.THREADS[0]} to {store_threads.THREADS[1]}")
        if cfg.auth == "none" and not (auth.is_loopback(cfg.host) and auth.is_loopback(cfg.agent_host or cfg.host)):
            raise server_config.ConfigError(
                f"refusing to serve the admin API on {cfg.host} without authentication: "
                "bind 127.0.0.1, or start with --auth token (an admin token is written to <data-dir>/admin.token)"
            )
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.store = open_store(cfg.store or cfg.data_dir / "state.db", exclusive=True, threads=cfg.store_threads,  # type: ignore[assignment]
                                    wall=cfg.wall)
        except store_mod.StoreError as e:
            raise server_config.ConfigError(str(e)) from e
        self.authenticator = auth.Authenticator(self.store, required=cfg.auth == "token", wall=self.store.now)
        self.registry = CollectorRegistry()
        self.fleet = fleet_metrics.FleetCollector(self)
        self.registry.register(self.fleet)
        self.simulations = simulate_api.Simulations(cfg.simulation_slots, cfg.simulation_budget, self.registry)
        self.table = endpoints_mod.EndpointTable()
        self.hub = hub_mod.AgentHub(
            agent_auth.StoreJoinAuthenticator(self.store, cfg.bootstrap_tokens),
            on_change=self._agent_event,
            heartbeat_interval=cfg.heartbeat_interval_s,
            missed_heartbeats=cfg.missed_heartbeats,
        )
        self.joins = agent_admission.JoinGate(cfg.max_joins)  # a fleet rejoining at once is taken in turns
        self.failed_joins = agent_admission.failed_joins(cfg.join_failure_rate, cfg.join_failure_burst)  # a flood of made-up tokens slowed
        agent_host = cfg.agent_host or cfg.host
        mtls = None
        if not cfg.insecure_agents:
            # The store keeps which CA its agents trust: a ca/ folder lost (a backup of the store
            # alone, a new disk) or swapped is refused, not silently replaced by a new CA.
            recorded = await self.store.run(self.store.published, AGENT_CA_KEY)
            trusted = recorded[1] if recorded is not None else None
            try:
                loaded = ca_mod.CertificateAuthority.load_or_create(cfg.data_dir / "ca", trusted=trusted, replace=cfg.new_agent_ca)
            except ca_mod.CertificateError as exc:
                raise server_config.ConfigError(f"the agents' CA: {exc}") from None
            if trusted is None or (cfg.new_agent_ca and loaded.fingerprint != trusted):
                await self.store.run(self.store.publish, AGENT_CA_KEY, loaded.fingerprint)
                if trusted is not None:
                    log.warning("the agents' CA is now the one in %s (SHA-256 %s), in place of %s (--new-agent-ca): every "
                                "agent must enrol again", cfg.data_dir / "ca", loaded.fingerprint, trusted)
            elif loaded.fingerprint != trusted:
                # Not refused: replicas that hold different CAs also say so through the relay
                # (relay.Leader.unlike), and a CA made again on purpose is taken with --new-agent-ca.
                log.warning("the CA in %s (SHA-256 %s) is not the one the store's agents trust (%s): they are refused here; "
                            "give every replica the CA they trust, or start with --new-agent-ca to make this one theirs "
                            "(every agent must then enrol again)", cfg.data_dir / "ca", loaded.fingerprint, trusted)
            self.ca = dataclasses.replace(loaded, agent_ttl=datetime.timedelta(seconds=cfg.agent_cert_ttl_s))
            try:
                server_certificate = ca_mod.ServerCertificate(self.ca, server_config.agent_tls_hosts(cfg))
            except ca_mod.CertificateError as exc:  # the CA expired
                raise server_config.ConfigError(str(exc)) from None
            mtls = agent_service.MutualTls(self.ca, server_certificate.current, cfg.agent_join_port)
        # bound first: a port in use stops the start before anything else listens
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # uvicorn writes a response's head and body separately; without TCP_NODELAY (which
        # accepted sockets inherit) Nagle holds the body for the client's delayed ACK: ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((cfg.host, cfg.port))
            sock.listen(2048)  # now, not when uvicorn starts: the agents' listener must not bind the same port
        except OSError as exc:  # the bare errno says neither what nor where
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {hostport.address(cfg.host, cfg.port)} (HTTP API and gateway, --host/--port): "
                                     f"{exc.strerror or exc}") from exc
        port = sock.getsockname()[1]
        self.http_url = f"http://{hostport.address(cfg.host, port)}"
        roots = cfg.artifact_roots or (cfg.data_dir / "artifacts",)
        self.artifacts = artifacts.ArtifactCatalog(tuple(pathlib.Path(r).resolve() for r in roots), cfg.public_url or self.http_url,
                                                  allowed_hosts=cfg.artifact_hosts)
        self.datacentres = dc_mod.DataCentres(dc_mod.LocalRay(endpoints=cfg.local_ray, num_cpus=cfg.local_ray_cpus, num_gpus=cfg.local_ray_gpus,
                                                             record_file=cfg.data_dir / "local-ray.json", ray_executable=cfg.local_ray_executable),
                                              kube_factory=cfg.kube_factory, owner=await self.store.run(self.store.store_id))
        # Made before the agent listener starts: an agent may rejoin while the start below is
        # still stopping a Ray cluster a killed control plane left; its events trigger this
        # reconciler, whose first pass (once started) sees every agent joined by then.
        self.reconciler = Reconciler(self.store, self.hub, self.datacentres, self.artifacts, self.table, resync_s=cfg.resync_s,
                                     datacentre_lost_after_s=cfg.missed_heartbeats * cfg.heartbeat_interval_s,
                                     failback_after_s=cfg.failback_after_s)
        self.relay_servicer = relay_leader.RelayServicer(self.hub, lambda: self._relay_secret)
        self._background.append(asyncio.create_task(self._log_agent_events(), name="agent-events"))
        # the tokens agents check at their serving ports (--serve-auth token) go with their first set
        self.hub.set_serve_tokens(serve_tokens.to_proto(await self.store.run(self.store.serve_tokens)))
        self._background.append(asyncio.create_task(serve_tokens.run_refresh(self.store, self.hub), name="serve-tokens"))
        try:
            self._agent_server = await agent_service.start_agent_server(self.hub, agent_host, cfg.agent_port, mtls=mtls,
                                                                        more=(self.relay_servicer.handler(),), joins=self.joins,
                                                                        failures=self.failed_joins)
        except OSError:
            sock.close()
            raise
        # as agents take it (--control-plane, --join-address): an IPv6 host in brackets
        self.agent_target = hostport.address(agent_host, self._agent_server.port)
        join_port = self._agent_server.join_port
        self.agent_join_target = hostport.address(agent_host, join_port) if join_port else None
        self.ca_file = cfg.data_dir / "ca" / "ca.crt" if mtls else None

        self._http = upstream.UpstreamPool(connect_timeout=2.0, timeout=30.0)
        self.admission = admission.GatewayAdmission(
            ratelimit.RateLimiter(ratelimit.RateLimit(cfg.gateway_rate, cfg.gateway_burst)),
            self._verify_gateway_token if cfg.gateway_auth == "token" else None,
            self.authenticator.tokens.known,
        )
        self.captures = capture_store.ZoneStores(cfg.data_dir / "captures")  # one SQLite file per residency zone
        self.capture_writer = capture_store.CaptureWriter(self.captures, self.registry, counts=capture_counts.StoreCounts(self.store))
        self.capture_writer.start()
        self._background.append(asyncio.create_task(capture_retention.run(self.store, self.captures), name="capture-retention"))
        self.cascades = cascade_mod.CascadeHandler(self.table, self._http, cascade_mod.CascadeMetrics.create(self.registry),
                                                   position=cfg.position, capture=self.capture_writer.offer, max_body=cfg.gateway_max_body)
        self.gateway = proxy.Gateway(self.table, self._http, proxy.GatewayMetrics.create(self.registry),
                                     position=cfg.position, ready=lambda: self._started and self.table.published, max_body=cfg.gateway_max_body,
                                     cold_start_s=cfg.cold_start_timeout_s, cascade=self.cascades,
                                     admit=self.admission.check if (cfg.gateway_auth == "token" or cfg.gateway_rate > 0) else None)
        await self.datacentres.local.reclaim()  # a control plane killed with -9 on this data dir left its Ray running

        self.openai_gateway = openai_routes.OpenAIGateway(self.gateway, registry=self.registry, first_token_timeout=cfg.first_token_timeout_s)
        self.publisher = watch_api.TablePublisher(self.table)  # standalone gateways follow the table (GET /v1/endpoints?watch=1)
        self.table.on_change = self.publisher.publish
        shared = bool(cfg.store and is_postgres_url(cfg.store))  # replicas may share the database
        if not shared:  # the only process on this database: it routes from the table its last run left until its first pass
            await self._inherit_table()
        self.app = app = api_app.build_app(self, self.gateway.routes() + self.openai_gateway.routes() + [artifacts_api.route(self.artifacts)] + console.routes()
                                + watch_api.routes(self.authenticator, self.store, self.publisher)
                                + captures_api.routes(self.authenticator, self.store, self.captures)
                                + distill_api.routes(self.authenticator, self.store, self.captures, self.artifacts, self.changed,
                                                     self.cascades_view, runs=self.distills))
        # another web site's page, through the operator's browser, is refused (api/origins.py);
        # every answer, that refusal included, carries its request's id (gateway/correlation.py)
        guard = origins.guard_for(cfg.auth != "token", cfg.allowed_hosts, cfg.public_url)
        self._uvicorn = runloop.http_server(correlation.Correlated(origins.OriginGuard(app, guard), logformat.access_log(cfg.access_log, self.table.knows)))
        self._tasks.append(asyncio.create_task(self._uvicorn.serve(sockets=[sock]), name="http"))
        for _ in range(500):
            if self._uvicorn.started:
                break
            await asyncio.sleep(0.01)
        self.replica_id = f"{socket.gethostname()}:{port}-{secrets.token_hex(3)}"  # a new holder each start
        if shared:  # lead by the lease
            self.elector = leadership.Elector(self.store, self.replica_id, cfg.leader_lease_s, self._gain_lead, self._lose_lead)
            self.relay_client = relay.RelayClient(self.hub, self.replica_id, tls=self._relay_tls if mtls is not None else None,
                                                  agent_ca=self.agent_ca_sha256)
            self._background.append(asyncio.create_task(self.relay_client.run(), name="agent-relay"))
            self.table.on_wake = self._on_wake
            follower = following.StoreFollower(self.store, self.elector, self.hub, self.table, self.reconciler, self.relay_client,
                                               self._publish_leader, lambda: self._leader_published)
            loop = asyncio.get_running_loop()
            read = {"*", *following.LEADER_READS, *following.FOLLOWER_READS}

            def told(what: str) -> None:  # in the feed's thread: the rest (agents' joins, ...) never reaches the loop
                if what in read:
                    _call_soon(loop, follower.told, what)

            self._change_feed = self.store.follow_changes(told)
            self._election = asyncio.create_task(self.elector.run(), name="leader-election")
            self._background.append(self._election)
            self._background.append(asyncio.create_task(follower.run(cfg.store_poll_s), name="store-changes"))
        else:  # one process owns the SQLite file: it always leads (after a restart, keeping its agents' replicas until they are back)
            self.reconciler.resume(rejoin_s=self.rejoin_s)
            self._reconciling = asyncio.create_task(self.reconciler.run(), name="reconciler")
        self.events_pruner = event_retention.EventPruner(self.store, retention, self.elector, self.registry)  # prunes while leading
        self._background.append(asyncio.create_task(self.events_pruner.run(), name="event-retention"))
        self.admin_token = await self.store.run(auth.ensure_admin_token, self.store, cfg.data_dir)  # the last step of a start
        self._started = True
        log.info("control plane: API and gateway %s, agents %s, state %s", self.http_url, self.agent_target, self.store.path)
        return self

    async def stop(self) -> None:
        self._started = False
        # first, while the store and the HTTP server are up: a run records that it stopped,
        # and its caller reads that as its result
        await self.distills.stop(runloop.DRAIN_GRACE_S)
        self.reconciler.stop()
        self.artifacts.close()  # a pass hashing a large artifact ends now, not when the file is read
        self.publisher.close()  # watching gateways see the stream end now, not at uvicorn's grace timeout
        if self.elector is not None:  # step down first: another replica takes over while this one closes
            # within a lease in all: the pass's writes still on their way (the endpoint table),
            # then the release. Past it the lease has run out anyway (a write fenced by it is
            # refused), and on a stalled database each waits for a call that may never end.
            within = asyncio.get_running_loop().time() + self.elector.ttl_s
            for t in (self._election, self._reconciling):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                        async with asyncio.timeout_at(within):
                            await t
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout_at(within):
                    await self.store.run_first(self.elector.release)
        await self._agent_server.stop(grace=1.0)
        self._uvicorn.should_exit = True
        for t in self._background:
            t.cancel()
        reconciling = [self._reconciling] if self._reconciling is not None else []
        for t in self._tasks + self._background + reconciling:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                async with asyncio.timeout(10):
                    await t
        await self._http.close()
        await self.datacentres.close()
        await self.capture_writer.stop()
        self.captures.close()
        if self._change_feed is not None:
            await asyncio.to_thread(self._change_feed.close)
        await asyncio.to_thread(self.store.close)  # on PostgreSQL a second or so at most, even on a stalled database

    # -- leadership (shared database) -----------------------------------------------------

    @property
    def takeover_s(self) -> float:
        """How long a new leader waits for the serving edge sites to join it before its first
        pass: the time in which an agent is declared lost, plus two leases for the agents'
        reconnects (they learn of an election by being refused, see the agent's uplink, or
        move to the next address at once). A restart keeps their sites longer: ``rejoin_s``."""
        return self.config.missed_heartbeats * self.config.heartbeat_interval_s + 2 * self.config.leader_lease_s

    @property
    def rejoin_s(self) -> float:
        """How long a control plane restarted on its own database keeps the edge sites that
        served while their agents rejoin, from when it listens for them: the longest an agent
        waits between two reconnects (its backoff's cap, ``edgeplane_proto.reconnect``; the
        attempt before may have failed just before the listener was up), plus the
        ``takeover_s`` a new leader gives its agents, for the join itself on a control plane
        still busy starting. The window closes as soon as every awaited site is back."""
        return reconnect.RECONNECT_MAX_S + self.takeover_s

    def _on_wake(self, model: str) -> None:
        """A request found ``model`` scaled to zero. The leader's reconciler starts a replica;
        a follower's is not running, so it leaves the wake in the event log, where the leader
        finds it within a second (:class:`following.StoreFollower`); at most one a second per model."""
        if self.elector is None or self.elector.leading:
            self.reconciler.trigger(f"request for {model}, scaled to zero")
            return
        now = time.monotonic()
        if now - self._wakes_left.get(model, -WAKE_EVERY_S) < WAKE_EVERY_S:
            return
        self._wakes_left[model] = now
        event = store_mod.Event(self.replica_id, following.WAKE_ACTION, "Model", model,
                                f"a request through replica {self.replica_id} found {model} scaled to zero")
        task = asyncio.get_running_loop().create_task(self.store.run(self.store.record, event))
        self._wake_writes.add(task)
        task.add_done_callback(self._wake_writes.discard)
        task.add_done_callback(_log_failed_wake)

    def _gain_lead(self, lease: store_mod.Lease) -> None:
        self.table.wakes.clear()  # counted while following; the new autoscaler starts from none
        if self.relay_client is not None:
            self.relay_client.point(None)  # its agents are the leader's own now
        self._relay_secret = secrets.token_urlsafe(32)
        self._reconciling = asyncio.create_task(self._lead(lease), name="reconciler")

    async def _lead(self, lease: store_mod.Lease) -> None:
        """Take up the lead, then reconcile until cancelled (``_lose_lead``, ``stop``). Its
        writes go to the database from a worker thread: on the event loop, a database that
        stalls just after granting the lease would hold the whole replica, and this task
        cancelled meanwhile leaves them fenced by ``lease``."""
        if not self.table.all_endpoints():  # just started (a restart): inherit what the last leader published
            await self._inherit_table()
        await self.store.run(self._publish_leader, lease)
        self.reconciler.lead(lease, takeover_s=self.takeover_s)
        with contextlib.suppress(store_mod.StoreError):
            await self.store.run(self.store.record, store_mod.Event(
                self.replica_id, "leader-elected", "ControlPlane", "leader",
                f"replica {self.replica_id} leads with fencing token {lease.token}", {"fencingToken": lease.token}), lease=lease)
        await self.reconciler.run()

    async def _inherit_table(self) -> None:
        """Take the endpoint table last published to the store (a new leader's, or this
        process's own after a restart): the gateway routes with it until the first pass, and
        a restart keeps its rejoining sites' endpoints from it (``Reconciler.resume``)."""
        with contextlib.suppress(store_mod.StoreError, ValueError):
            if (got := await self.store.run(self.store.published, wire.PUBLISHED_KEY, 0)) is not None:
                wire.apply_json(self.table, json.loads(got[1]))

    def _lose_lead(self, reason: str) -> None:
        """Stop reconciling at once: a pass in flight is cancelled, and its writes still on
        their way are fenced by the lease it was made under."""
        self.reconciler.step_down()
        if self._reconciling is not None:
            self._reconciling.cancel()
            self._reconciling = None
        self._relay_secret = None
        self.relay_servicer.close_all()  # the relaying replicas move to the new leader
        self.hub.drop_relayed()  # and its own agents are relayed to it (see following.StoreFollower)

    @property
    def peer_address(self) -> str:
        """Where other replicas dial this one to relay their agents while it leads."""
        return self.config.peer_address or hostport.address(server_config.peer_host(self.config), self._agent_server.port)

    def _publish_leader(self, lease: store_mod.Lease) -> None:
        """Tell the followers where to relay their agents, under this lease's fencing token."""
        doc = {"replica": self.replica_id, "address": self.peer_address, "secret": self._relay_secret, "fencingToken": lease.token,
               "agentCa": self.agent_ca_sha256, "answersClaims": True}
        try:
            self.store.publish(following.LEADER_KEY, json.dumps(doc), lease=lease)
            self._leader_published = lease.token
        except store_mod.StoreError as exc:  # again at the next second (following.StoreFollower)
            log.warning("cannot publish the relay address: %s", exc)

    @property
    def gateway_checks_tokens(self) -> bool:
        """Whether this replica's gateway reads tokens (``--gateway-auth token``), which a
        token's scope needs to bind here."""
        return self.config.gateway_auth == "token"

    @property
    def agent_ca_sha256(self) -> str | None:
        """The agents' CA's SHA-256 (None: agents join over plaintext): what an agent pins to
        trust this control plane (``edgeplane-agent --ca-sha256``) and what replicas compare."""
        return self.ca.fingerprint if self.ca_file is not None else None

    def _relay_tls(self) -> relay.ClientTls:
        """A client certificate from the shared agent CA for the relay stream; past the CA's
        end none is signed (the leader would not trust it anyway), which the relay says."""
        key, csr = identity.new_key_and_csr(RELAY_IDENTITY)
        try:
            certificate = self.ca.issue_agent(RELAY_IDENTITY, csr)
        except ca_mod.CertificateError as exc:
            raise agent_errors.NoRelayCertificate(f"no client certificate to relay this replica's agents with: {exc}") from None
        return relay.ClientTls(self.ca.certificate_pem, key, certificate)

    # -- agent events ------------------------------------------------------------------

    def _agent_event(self, event: agent_model.AgentEvent) -> None:
        """The replica an agent is connected to logs its joins, losses and recoveries (once,
        whether or not it leads); the leader plans with every agent, relayed ones too."""
        leading = self.elector is None or self.elector.leading
        if event.kind is agent_model.AgentEventKind.LOST:
            # At once, not after the event is logged and a pass has run: a draining agent
            # closes its listener once this heartbeat is in, and the gateway would meet a
            # refused connection (502) meanwhile, where callers should get 503 or another replica.
            if leading:  # its table, and the one the other replicas' gateways follow
                self.reconciler.mark_down(event.status.endpoint_url)
            elif event.status.via is None:  # a follower's own agent: its gateway, before the leader hears
                self.table.mark_down(event.status.endpoint_url)
        elif event.kind in (agent_model.AgentEventKind.RECOVERED, agent_model.AgentEventKind.JOINED):
            self.table.mark_up(event.status.endpoint_url)
        logged = event.status.via is None and event.kind in LOGGED_AGENT_EVENTS
        if not (logged and self._agent_events.put(event)):  # the pass it triggers comes once it is logged, unless many wait
            self._trigger_for(event)

    def _trigger_for(self, event: agent_model.AgentEvent) -> None:
        if self.elector is None or self.elector.leading:
            self.reconciler.trigger(f"agent {event.site} {event.kind.value}")

    async def _log_agent_events(self) -> None:
        """Agents' events are logged (and a joining agent's Site registered) in a worker
        thread, in the order they came: the hub calls :meth:`_agent_event` inside its join
        and liveness paths on the event loop, which a stalled database must not hold. What
        waits is logged together, one transaction for up to ``LOG_BATCH`` events: a fleet
        rejoining a restarted control plane logged one at a time, each with the pass it
        called for, took minutes for a few thousand agents. The pass comes after each batch,
        and sees what it logged."""
        while True:
            events = await self._agent_events.get_batch(LOG_BATCH)
            try:
                await self.store.run(self._log_agent_event, events)
            except store_mod.StoreError as exc:  # the log goes on with the next events
                log.warning("cannot log %s: %s", _what_happened(events), exc)
            except Exception:  # not the store's: a fault here, with its traceback
                log.exception("logging %s failed", _what_happened(events))
            self._trigger_for_all(events)
            if dropped := self._agent_events.take_dropped():
                log.warning("%d agent losses and recoveries were not logged: more than %d waited on the store, and each "
                            "agent's latest took the place of the one before it", dropped, self._agent_events.limit)

    def _trigger_for_all(self, events: Sequence[agent_model.AgentEvent]) -> None:
        if len(events) == 1:
            self._trigger_for(events[0])
        elif self.elector is None or self.elector.leading:
            self.reconciler.trigger(f"{len(events)} agents' joins, losses and recoveries")

    def _log_agent_event(self, events: Sequence[agent_model.AgentEvent]) -> None:
        """Log ``events`` in one transaction, then register the Site of each agent that joined
        one nobody declared (each a write of its own: it may meet an operator's declaration)."""
        self.store.record(*(store_mod.Event(f"agent:{e.agent_id}", f"agent-{e.kind.value.lower()}", "Site", e.site, e.reason,
                                            {"agentId": e.agent_id}) for e in events))
        for event in events:
            if event.kind is agent_model.AgentEventKind.JOINED and self.store.get("Site", event.site) is None:
                catalog.register_agent_site(self.store, event.site, event.agent_id, event.status.location, event.status.labels)

    # -- api.Services ------------------------------------------------------------------

    async def _verify_gateway_token(self, secret: str) -> store_mod.TokenInfo | None:
        try:  # the control API's verdicts: off the event loop, kept a few seconds, forgotten on a revocation
            return await self.authenticator.verify(secret)
        except store_mod.StoreError as exc:  # the gateway answers 503, as the control API does; verify logged what the store said
            raise admission.TokenCheckUnavailable("the store that holds the tokens does not answer") from exc

    def ready(self) -> bool:
        return self._started

    def changed(self, reason: str) -> None:
        self.reconciler.applied(reason)

    def agent_revoked(self, site: str) -> None:
        """Drop the agent now: its streams end and it cannot rejoin on its credential. Other
        replicas drop it when they read the revocation from the store (``following.StoreFollower``)."""
        self.hub.revoke(site)


def _what_happened(events: Sequence[agent_model.AgentEvent]) -> str:
    if len(events) == 1:
        e = events[0]
        return f"that agent {e.agent_id} of site {e.site} {e.kind.value.lower()}"
    return f"{len(events)} agents' joins, losses and recoveries (sites {', '.join(e.site for e in events[:3])}, ...)"


def banner(cp: ControlPlane) -> list[str]:
    """What ``edgeplane serve`` prints once it serves (its first line is what scripts wait for)."""
    lines = [f"edgeplane control plane: API/gateway {cp.http_url}  agents {cp.agent_target}  state {cp.store.path}"]
    if cp.ca_file is not None:
        lines.append(f"agents: mutual TLS; first joins on {cp.agent_join_target}; give agents --ca-file {cp.ca_file}")
    else:
        lines.append("agents: PLAINTEXT gRPC (--insecure-agents); agents need --insecure")
    if cp.elector is not None:
        lines.append(f"replica {cp.replica_id}: shared store; the holder of the leader lease ({cp.config.leader_lease_s:g}s) reconciles")
    if cp.admin_token:
        lines.append(f"initial admin token written to {cp.config.data_dir / 'admin.token'}")
    return lines


def main(args: argparse.Namespace) -> int:
    return runloop.main(args.log_level, lambda: ControlPlane(server_config.config_from_args(args)).start(), banner,
                        (server_config.ConfigError,), log_format=args.log_format)
