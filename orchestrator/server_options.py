"""The options of ``edgeplane serve`` and ``edgeplane gateway``, apart from the servers
themselves: building the parser imports neither, so ``--help`` and a usage error answer
at once instead of after the control plane's imports (about two seconds)."""

from __future__ import annotations

import argparse
import os

from edgeplane_proto import logformat
from orchestrator import argtypes, event_retention
from orchestrator.agents.admission import JOIN_FAILURE_BURST, JOIN_FAILURE_RATE, MAX_JOINS
from orchestrator.gateway import options as gateway_options
from orchestrator.security.ca import AGENT_DAYS
from orchestrator.store import threads as store_threads

#: ``--failback-after``'s default, in seconds: five minutes (orchestrator.reconciler.failback).
#: An edge site's agent is declared lost after three missed heartbeats (15 s by default); a
#: site that comes back and goes again (a rebooting box, a flaky backhaul) does so within
#: minutes, and moving replicas onto it each time would take their traffic down with it.
#: Outages worth failing back from last far longer than the minutes the stand-ins serve on.
FAILBACK_AFTER_S = 300.0


#: The ranges the server's timing options take (``ControlPlane.start`` checks a config built
#: in code against the same ones).
LEADER_LEASE_S = (1.0, 300.0)
STORE_POLL_S = (0.1, 600.0)


def store_url(text: str) -> str:
    """argparse type of ``--store`` (and ``$EDGEPLANE_STORE``, its default): only the two URL
    forms, so that a typo such as ``--store garbage`` stops here instead of becoming a new,
    empty SQLite file named ``garbage`` in the working directory."""
    if text.startswith(("postgresql://", "postgres://")) or (text[:9].lower() == "sqlite://" and len(text) > 9):
        return text
    source = " (from $EDGEPLANE_STORE)" if text == os.environ.get("EDGEPLANE_STORE") else ""
    raise argparse.ArgumentTypeError(f"{text!r}{source} is not a store URL: give postgresql://user@host/db (PostgreSQL, "
                                     "shared by replicas) or sqlite:///path/state.db (a file)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=os.environ.get("EDGEPLANE_DATA_DIR", ".edgeplane"), help="state directory (SQLite file, admin token)")
    p.add_argument("--store", type=store_url, default=os.environ.get("EDGEPLANE_STORE") or None, metavar="URL",
                   help="postgresql://user@host/db to keep state in PostgreSQL (shared by replicas), or sqlite:///path (a file); "
                        "default: $EDGEPLANE_STORE, else SQLite in --data-dir")
    p.add_argument("--leader-lease", type=argtypes.number(*LEADER_LEASE_S), default=3.0, metavar="SECONDS",
                   help="with a PostgreSQL store: time to live of the leader lease (renewed every third of it); "
                        "a leader that died is replaced within 4/3 of it")
    p.add_argument("--store-poll", type=argtypes.number(*STORE_POLL_S), default=1.0, metavar="SECONDS",
                   help="with a PostgreSQL store: read what other replicas wrote (the leader's endpoint table, applies, "
                        "wakes) at least this often; the database's notifications bring each change sooner")
    p.add_argument("--store-threads", type=argtypes.whole_number(*store_threads.THREADS), default=store_threads.DEFAULT_THREADS,
                   metavar="N", help="threads the store's calls run on (joins, API reads and writes, the reconciler's), apart from "
                                     "every other worker thread, so a stalled database holds up only what waits on it; the store "
                                     "has one connection, so more threads only wait on it")
    p.add_argument("--peer-address", type=argtypes.dial_address, metavar="HOST:PORT",
                   help="with a PostgreSQL store: where the other replicas reach this one's agent port to relay their "
                        "agents while it leads [the agent listener; this host's name when it listens on all addresses]")
    p.add_argument("--events-retention", type=argtypes.duration(event_retention.MIN_S), default=event_retention.EVENTS_S,
                   metavar="DURATION", help="the leader deletes the fleet's own events (placements, agents lost and back, "
                                            "data centres' applies, elections) older than this: 30d, 12h, 90m or seconds; "
                                            "0 or off keeps all; at least 1h [30d]")
    p.add_argument("--audit-retention", type=argtypes.duration(event_retention.MIN_S), default=event_retention.AUDIT_S,
                   metavar="DURATION", help="the same for the audit trail, what callers did (applies, deletes, tokens, "
                                            "captures read); a site's revocation is kept for good [365d]")
    p.add_argument("--host", type=argtypes.listen_host, default="127.0.0.1", help="HTTP address for the API and gateway")
    p.add_argument("--port", type=argtypes.port_number, default=8080, help="HTTP port for the API, the gateway and the console")
    p.add_argument("--agent-host", type=argtypes.listen_host, help="gRPC address for agents (default: --host)")
    p.add_argument("--agent-port", type=argtypes.port_number, default=8081, help="agents' gRPC port (mutual TLS)")
    p.add_argument("--agent-join-port", type=argtypes.port_number, metavar="PORT",
                   help="first joins: bootstrap token + CSR over TLS (default: --agent-port + 1, where agents look for it; 8082)")
    p.add_argument("--insecure-agents", action="store_true",
                   help="plaintext agent gRPC with bearer credentials instead of mutual TLS (agents then need --insecure)")
    p.add_argument("--new-agent-ca", action="store_true",
                   help="make the CA in <data-dir>/ca (a new one where it holds none) the one the store's agents trust, in place of the "
                        "one they trusted: every agent must enrol again")
    p.add_argument("--agent-cert-days", type=argtypes.number(0, 3650, above=True), default=float(AGENT_DAYS), metavar="DAYS",
                   help="lifetime of the client certificates agents receive; agents renew theirs two thirds in")
    p.add_argument("--auth", choices=["none", "token"], default="none",
                   help="'token' requires bearer tokens on the API; 'none' is allowed on loopback only")
    p.add_argument("--heartbeat-interval", type=argtypes.number(0.05, 300), default=5.0, metavar="SECONDS",
                   help="how often agents report, unless one asks for its own (edgeplane-agent --heartbeat-interval); "
                        "0.05 to 300; default 5")
    p.add_argument("--missed-heartbeats", type=argtypes.whole_number(1, 100), default=3,
                   help="an agent is unhealthy after this many missed heartbeats (1 to 100; default 3)")
    p.add_argument("--failback-after", type=argtypes.number(0), default=FAILBACK_AFTER_S, metavar="SECONDS",
                   help="replicas moved off a lost site may move back once it has been healthy again this long "
                        f"(docs/scheduler.md, \"Failback\"); 0 = never; default {FAILBACK_AFTER_S:g}")
    p.add_argument("--max-joins", type=argtypes.whole_number(1, 100_000), default=MAX_JOINS, metavar="N",
                   help="agent joins worked on at once; one more is refused at once (RESOURCE_EXHAUSTED) with when to "
                        f"join again, which agents wait for (docs/agent.md; default {MAX_JOINS})")
    p.add_argument("--join-failure-rate", type=argtypes.number(0), default=JOIN_FAILURE_RATE, metavar="PER_S",
                   help="failed agent joins (a wrong bootstrap token, credential or certificate) an address earns per second; "
                        "one over its budget is refused at once (RESOURCE_EXHAUSTED) with when to join again; 0 = no limit "
                        f"(docs/security.md; default {JOIN_FAILURE_RATE:g})")
    p.add_argument("--join-failure-burst", type=argtypes.number(0), default=JOIN_FAILURE_BURST, metavar="N",
                   help=f"failed agent joins an address may make at once (default {JOIN_FAILURE_BURST:g}); joins that succeed spend none")
    p.add_argument("--artifact-root", action="append", default=[], help="folder local artifact URIs may read from (repeatable)")
    p.add_argument("--artifact-host", action="append", default=[],
                   help="allowed host for http(s) artifact URIs, exact or .domain for subdomains (repeatable; default: any)")
    p.add_argument("--public-url", type=argtypes.reachable_url, metavar="URL",
                   help="http(s) URL agents and Ray replicas use to reach this server")
    p.add_argument("--allowed-host", action="append", default=[], type=argtypes.host_name, metavar="NAME",
                   help="a name browsers and clients reach this server by, besides loopback ones and the --public-url host "
                        "(repeatable): with --auth none only those are answered (docs/security.md)")
    p.add_argument("--agent-tls-name", action="append", default=[], metavar="NAME",
                   help="a DNS name or address agents dial (repeatable): the agent listener's certificate names it, "
                        "as it names --agent-host and the --public-url host")
    p.add_argument("--bootstrap-token", action="append", default=[], help="a static agent bootstrap token (repeatable; also $EDGEPLANE_BOOTSTRAP_TOKEN): it never expires "
                        "and has no ID to revoke; prefer 'edgeplane token create --role agent' (docs/security.md)")
    gateway_options.add_arguments(p)
    p.add_argument("--simulations", type=argtypes.whole_number(1, 64), default=1, metavar="N",
                   help="what-ifs (POST /v1/simulate) planned at once; one more is answered 429 (default 1)")
    p.add_argument("--simulate-budget", type=argtypes.whole_number(1), metavar="UNITS",
                   help="planning one what-if may take, in sites visited by planner runs (docs/simulation.md); a larger "
                        "one is refused before it starts [300,000,000: a region sweep of 10,000 sites, about a minute of one core]")
    p.add_argument("--local-ray-cpus", type=argtypes.whole_number(1), metavar="N", help="CPUs the embedded Ray (sites with ray.address: local) offers [all]")
    p.add_argument("--local-ray-gpus", type=argtypes.whole_number(0), metavar="N",
                   help="GPUs the embedded Ray declares [those it finds]; on a machine without any, a number lets replicas "
                        "that ask for a GPU run there anyway (a stand-in, as the demo does)")
    p.add_argument("--log-level", default="info", type=str.lower, choices=argtypes.LOG_LEVELS, help="log verbosity")
    p.add_argument("--log-format", default="text", type=str.lower, choices=logformat.FORMATS,
                   help="text: a line for people; json: one JSON object a line, for a log shipper (docs/deploy.md)")


def add_gateway_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control-plane", nargs="+", required=True, metavar="URL",
                   help="the control plane's URL; several (replicas of it) are tried in turn when one fails")
    p.add_argument("--host", type=argtypes.listen_host, default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=argtypes.port_number, default=8088, help="port to serve on")
    p.add_argument("--token", default=argparse.SUPPRESS,
                   help="API token (any role) to read the control plane's endpoint table "
                        "(default: $EDGEPLANE_TOKEN or the file named by $EDGEPLANE_TOKEN_FILE)")
    gateway_options.add_arguments(p)
    p.add_argument("--log-level", default="info", type=str.lower, choices=argtypes.LOG_LEVELS, help="log verbosity")
    p.add_argument("--log-format", default="text", type=str.lower, choices=logformat.FORMATS,
                   help="text: a line for people; json: one JSON object a line, for a log shipper (docs/deploy.md)")
