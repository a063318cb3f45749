"""What ``edgeplane serve`` runs with: :class:`ServerConfig`, built from the command line
(:func:`config_from_args`) or in code by the test harness, the benchmarks and the demo, and
the names and addresses derived from it. The options themselves are in
:mod:`orchestrator.server_options`, which imports nothing heavy; :mod:`orchestrator.server`
is the control plane that runs with a config."""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import event_retention, server_options
from orchestrator.adapters import local_ray
from orchestrator.agents import admission as agent_admission
from orchestrator.gateway import options as gateway_options
from orchestrator.security import ca as ca_mod
from orchestrator.simulation import budget as sim_budget
from orchestrator.store import is_postgres_url
from orchestrator.store import threads as store_threads_mod

WILDCARDS = ("0.0.0.0", "::")  # listen addresses that name no host


class ConfigError(Exception):
    """The server was asked to start in an unsafe or impossible configuration."""


@dataclass(frozen=True)
class ServerConfig:
    data_dir: pathlib.Path = pathlib.Path(".edgeplane")
    host: str = "127.0.0.1"
    port: int = 8080
    agent_host: str | None = None  # default: host
    agent_port: int = 8081
    agent_join_port: int = 8082  # first joins (bootstrap token + CSR) over server-authenticated TLS
    insecure_agents: bool = False  # plaintext agent gRPC: only when explicitly asked for
    new_agent_ca: bool = False  # ca/'s CA (made if none) replaces the one the store's agents trust: they enrol again
    agent_cert_ttl_s: float = ca_mod.AGENT_DAYS * 86400.0  # agents renew theirs two thirds in
    auth: str = "none"  # "none" (loopback only) | "token"
    position: tuple[float, float] | None = None  # the gateway's own location
    heartbeat_interval_s: float = 5.0
    missed_heartbeats: int = 3
    failback_after_s: float = server_options.FAILBACK_AFTER_S  # a lost site back this long gets its replicas back; 0: never
    max_joins: int = agent_admission.MAX_JOINS  # agent joins worked on at once; one more: RESOURCE_EXHAUSTED with when to retry
    join_failure_rate: float = agent_admission.JOIN_FAILURE_RATE  # failed joins/s a peer earns; 0 = no limit
    join_failure_burst: float = agent_admission.JOIN_FAILURE_BURST  # failed joins a peer may make at once; over: RESOURCE_EXHAUSTED
    resync_s: float = 5.0
    artifact_roots: tuple[pathlib.Path, ...] = ()
    artifact_hosts: tuple[str, ...] = ()  # allowed hosts of remote artifact URLs; empty = any
    public_url: str | None = None  # how agents and Ray replicas reach this server
    allowed_hosts: tuple[str, ...] = ()  # names callers reach this server by besides loopback ones and public_url's (api/origins.py)
    agent_tls_names: tuple[str, ...] = ()  # more names (DNS or IP) agents may dial; the agent certificate names them
    local_ray: local_ray.LocalRayEndpoints | None = None  # use this cluster for ray.address: local
    local_ray_cpus: int | None = None
    local_ray_gpus: int | None = None
    local_ray_executable: pathlib.Path | None = None  # the `ray` command the embedded cluster runs; default: beside this Python, else on PATH
    bootstrap_tokens: tuple[str, ...] = ()  # static agent bootstrap tokens (besides `token create`)
    kube_factory: Any = None
    gateway_auth: str = "none"  # "none" (open) | "token" (any valid API token)
    gateway_rate: float = 0.0  # requests/s per client (token, else address); 0 = no limit
    gateway_burst: float = 0.0  # bucket size; default max(rate, 1)
    gateway_max_body: int = gateway_options.MAX_BODY
    cold_start_timeout_s: float = gateway_options.COLD_START_S
    first_token_timeout_s: float = gateway_options.FIRST_TOKEN_S  # streamed generations: see gateway.options
    access_log: bool = False  # one line per HTTP request answered, on edgeplane.access (--access-log)
    store: str | None = None  # postgresql://… for a shared database; default: <data_dir>/state.db (SQLite)
    leader_lease_s: float = 3.0  # shared database: the leader lease's time to live (renewed every third of it)
    store_poll_s: float = 1.0  # shared database: read what other replicas wrote at least this often (notifications come sooner)
    store_threads: int = store_threads_mod.DEFAULT_THREADS  # the store's calls from the event loop run on these, never the default pool
    peer_address: str | None = None  # host:port other replicas dial to relay agents here; default: the agent listener
    simulation_slots: int = 1  # what-ifs planned at once (POST /v1/simulate); one more is answered 429
    simulation_budget: int = sim_budget.DEFAULT_BUDGET  # units of planning one what-if may take (simulation/budget.py)
    events_retention_s: float = event_retention.EVENTS_S  # the fleet's own events are deleted past it; 0 keeps them all
    audit_retention_s: float = event_retention.AUDIT_S  # what callers did (the audit trail), likewise
    # this machine's clock (a test's, hours off): the store learns its own time against it (StateStore.now)
    wall: Callable[[], float] = time.time


def peer_host(cfg: ServerConfig) -> str:
    """The host other replicas dial to relay their agents here: ``--peer-address``'s, else the
    agent listener's, or this host's name when the listener is bound to all addresses."""
    if cfg.peer_address:
        return urllib.parse.urlsplit(f"//{cfg.peer_address}").hostname or ""
    host = cfg.agent_host or cfg.host
    return socket.gethostname() if host in WILDCARDS else host


def agent_tls_hosts(cfg: ServerConfig) -> list[str]:
    """The names the agent listener's certificate carries: where it listens (unless that is a
    wildcard address), the host of ``--public-url``, and each ``--agent-tls-name``."""
    names = [cfg.agent_host or cfg.host, *cfg.agent_tls_names]
    if cfg.peer_address or (cfg.store and is_postgres_url(cfg.store)):  # replicas relay agents to it
        names.append(peer_host(cfg))
    if cfg.public_url:
        names.append(urllib.parse.urlsplit(cfg.public_url).hostname or "")
    return sorted({n for n in names if n and n not in WILDCARDS} | {"127.0.0.1", "localhost"})


def join_port(agent_port: int, given: int | None) -> int:
    """``--agent-join-port``, by default the agent port + 1: where an agent without
    ``--join-address`` looks for it (a fixed 8082 beside ``--agent-port 9000`` failed every
    first join); any free port when the agent port is one too (0)."""
    if given is not None:
        return given
    if agent_port == 0:
        return 0
    if agent_port == 65535:
        raise ConfigError("--agent-port 65535 leaves no port + 1 for first joins: give --agent-join-port")
    return agent_port + 1


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    try:
        position = gateway_options.position(args.location)
    except gateway_options.OptionError as exc:
        raise ConfigError(str(exc)) from None
    tokens = tuple(args.bootstrap_token) + ((os.environ["EDGEPLANE_BOOTSTRAP_TOKEN"],) if os.environ.get("EDGEPLANE_BOOTSTRAP_TOKEN") else ())
    return ServerConfig(
        data_dir=pathlib.Path(args.data_dir), host=args.host, port=args.port, agent_host=args.agent_host, agent_port=args.agent_port,
        agent_join_port=join_port(args.agent_port, args.agent_join_port), insecure_agents=args.insecure_agents,
        new_agent_ca=args.new_agent_ca,
        agent_cert_ttl_s=args.agent_cert_days * 86400.0,
        auth=args.auth, position=position, heartbeat_interval_s=args.heartbeat_interval, missed_heartbeats=args.missed_heartbeats,
        failback_after_s=args.failback_after,
        max_joins=args.max_joins, join_failure_rate=args.join_failure_rate, join_failure_burst=args.join_failure_burst,
        artifact_roots=tuple(pathlib.Path(r) for r in args.artifact_root), artifact_hosts=tuple(args.artifact_host), public_url=args.public_url, bootstrap_tokens=tokens,
        allowed_hosts=tuple(args.allowed_host),
        agent_tls_names=tuple(args.agent_tls_name),
        gateway_auth=args.gateway_auth, gateway_rate=args.gateway_rate, gateway_burst=args.gateway_burst,
        gateway_max_body=args.gateway_max_body,
        cold_start_timeout_s=args.cold_start_timeout, first_token_timeout_s=args.first_token_timeout, access_log=args.access_log,
        local_ray_cpus=args.local_ray_cpus, local_ray_gpus=args.local_ray_gpus,
        store=args.store, leader_lease_s=args.leader_lease, store_poll_s=args.store_poll, store_threads=args.store_threads,
        peer_address=args.peer_address, simulation_slots=args.simulations, events_retention_s=args.events_retention,
        audit_retention_s=args.audit_retention,
        simulation_budget=args.simulate_budget if args.simulate_budget is not None else sim_budget.DEFAULT_BUDGET,
    )

