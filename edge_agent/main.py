"""``edgeplane-agent``: the command an edge site operator runs.

Parses flags into an :class:`edge_agent.daemon.AgentConfig`, runs the agent until SIGTERM
or SIGINT, drains, and exits 0. SIGHUP (logrotate's habit, a closed terminal) leaves it
serving: it has nothing to reload (see :data:`HANGUP`). The one line on stdout, ``serving
<url>``, tells scripts (and tests) where the v2 API listens when ``--listen`` asked for port 0.
"""

from __future__ import annotations

import sys

if "asyncio" not in sys.modules:  # this process is the agent, not a program that imported this module
    # asyncio imports Python's ssl module to offer TLS on its streams, which the agent never
    # asks of it: gRPC brings its own TLS, downloads run in a child process (edge_agent.fetch).
    # ssl maps libssl and builds its tables for nothing: 1.1-1.7 MB of the idle agent's memory.
    # asyncio takes a missing ssl module as it is meant to (no TLS on its streams); the
    # agent imports ssl itself where it needs it (a pinned CA's first read, a diagnosis).
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio
    finally:
        del sys.modules["ssl"]

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import os
import pathlib
import re
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

import edge_agent
from edge_agent import artifacts, build, errors, runtime
from edgeplane_proto import endpoint_url, logformat, lookalike, site_name

if TYPE_CHECKING:
    from edge_agent import daemon

log = logging.getLogger("edge_agent")

#: What ends the agent (a drain, exit code 0), whenever it comes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: What a SIGHUP does: nothing but say so. Its default action would end the agent without a
#: drain. There is nothing to re-read: the log goes to stderr (whoever collects it rotates
#: it), and the TLS key, certificate and CA are read from the data dir at each connection.
HANGUP = "SIGHUP: nothing to reload (the log goes to stderr; TLS files are read at each connection); still serving"


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not host:
        raise argparse.ArgumentTypeError(f"{value!r} must be HOST:PORT")
    if int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: {port} is not a port (0-65535)")
    return host.strip("[]"), int(port)


def _dial_address(value: str) -> str:
    """A HOST:PORT the agent dials, kept as written: gRPC takes an IPv6 host only in brackets."""
    host, port = _host_port(value)
    if port == 0:
        raise argparse.ArgumentTypeError(f"{value!r}: 0 is not a port to dial (1-65535)")
    if ":" in host and not (value.startswith("[") and value.rpartition(":")[0].endswith("]")):
        raise argparse.ArgumentTypeError(f"{value!r}: an IPv6 address goes in brackets, e.g. [::1]:{port}")
    return value


def _control_planes(value: str) -> str:
    """Each of the comma-separated addresses: a bad one would otherwise fail every session, forever."""
    targets = [t.strip() for t in value.split(",") if t.strip()]
    if not targets:
        raise argparse.ArgumentTypeError("needs at least one HOST:PORT")
    return ",".join(_dial_address(t) for t in targets)


#: A manifest's label rules, which the control plane holds a join's labels to (compiled
#: only for an agent given labels: the idle agent's memory has no room to spare).
LABEL_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]{0,251}[A-Za-z0-9])?"
LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"


def _label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {value!r} must be key=value")
    if not re.fullmatch(LABEL_KEY, key):
        raise argparse.ArgumentTypeError(f"label key {key!r} must be letters, digits and '-_./', starting and ending with a "
                                         f"letter or digit, at most 253 characters{lookalike.explain(key)}")
    if not re.fullmatch(LABEL_VALUE, val):
        raise argparse.ArgumentTypeError(f"label {key}={val!r}: a value is empty or letters, digits and '-_.', starting and "
                                         f"ending with a letter or digit, at most 63 characters{lookalike.explain(val)}")
    return key, val


def _site(value: str) -> str:
    """The control plane refuses any other name at the join: say so before starting."""
    refused = site_name.refusal(value)
    if refused is not None:
        raise argparse.ArgumentTypeError(refused)
    return value


def _advertise_url(value: str) -> str:
    """The control plane refuses any other URL at every join: say so before starting."""
    refused = endpoint_url.refusal(value)
    if refused is not None:
        raise argparse.ArgumentTypeError(refused)
    return value


def _iso_countries() -> frozenset[str]:
    """The ISO 3166-1 alpha-2 codes of pycountry's database, which the manifests check a
    site's country against. Read as data: importing pycountry would bring email, zipfile
    and tempfile into the daemon for one look-up."""
    spec = importlib.util.find_spec("pycountry")
    if spec is None or spec.origin is None:
        raise argparse.ArgumentTypeError("cannot check it: pycountry, which holds the ISO 3166 list, is not installed")
    database = pathlib.Path(spec.origin).parent / "databases" / "iso3166-1.json"
    try:
        return frozenset(country["alpha_2"] for country in json.loads(database.read_bytes())["3166-1"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot check it: cannot read the ISO 3166 list {database}: {exc}") from None


def _country(value: str) -> str:
    """The control plane takes any two letters and then places the site nowhere: refuse the rest here."""
    code = value.upper()
    if code and code not in _iso_countries():
        raise argparse.ArgumentTypeError(f"{value!r} must be an ISO 3166 alpha-2 code such as FR")
    return code


def _sha256(value: str) -> str:
    digest = value.lower().removeprefix("sha256:").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise argparse.ArgumentTypeError(f"{value!r} is not a SHA-256 (64 hex digits, as 'edgeplane token create' prints it)")
    return digest


def _runtimes(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"needs at least one of {', '.join(runtime.KNOWN)}")
    for name in names:
        if name not in runtime.KNOWN:
            raise argparse.ArgumentTypeError(f"{name!r} is not a runtime an agent runs ({', '.join(runtime.KNOWN)})")
    return names


def _check_runtimes(offered: tuple[str, ...]) -> None:
    """Offered runtimes are installed here: the control plane would assign models that fail to load."""
    missing = [name for name in offered if name not in runtime.installed()]
    if missing:
        raise SystemExit(f"edgeplane-agent: --runtimes {','.join(offered)}: {', '.join(missing)} is not installed here "
                         "(onnx-genai needs onnxruntime-genai with its library: pip install 'edgeplane[cpu]' or 'edgeplane[gpu]')")


def _check_ca_file(path: pathlib.Path) -> None:
    """A readable PEM certificate: a wrong path would otherwise show only at the first join.
    Checked when the agent starts, not when the flags are parsed (a manifest's flags name
    files of the machine the agent will run on)."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"edgeplane-agent: --ca-file {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SystemExit(f"edgeplane-agent: --ca-file {path}: not a PEM certificate (give <control-plane data dir>/ca/ca.crt)")


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return number


def _positive(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return number


def _between(low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = _number(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low:g} to {high:g}")
        return number
    return parse


def _not_negative(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


#: The longest spin ``--spin-after-run-us`` takes: 0.1 s (``--spin-between-runs`` is longer still).
MAX_SPIN_AFTER_RUN_US = 100_000


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{n} is not from {low} to {high}")
        return n
    return parse


class _Parser(argparse.ArgumentParser):
    """An error about one flag is one line, as the agent's other errors are (its long usage
    would bury it); other usage errors (a missing flag) keep the usage before them."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):
            self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if (parsed.lat is None) != (parsed.lon is None):
            self.error(f"argument {'--lat' if parsed.lon is None else '--lon'}: --lat and --lon go together")
        if not parsed.insecure and parsed.join_address is None:  # the first join dials the port after the agent port
            for target in parsed.control_plane.split(","):
                if _host_port(target)[1] == 65535:
                    self.error(f"argument --control-plane: {target!r}: the join listener is looked for at the next port, "
                               "and 65535 has none: give --join-address HOST:PORT")
        return parsed, extras


def _help_width() -> int:
    """The width argparse's help takes by default (``COLUMNS``, else the terminal's, else 80;
    less 2), found without ``shutil``: argparse imports it for this alone, at every
    ``add_argument``, and with it ``bz2`` and ``lzma``, 0.5 MB of the daemon's memory for good."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
            columns = 0
    return (columns or 80) - 2


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="edgeplane-agent",
        description="Join an edgeplane control plane and serve its models at this edge site.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=_help_width()),
    )
    p.add_argument("--version", action="version", version=f"edgeplane-agent {build.describe()}")
    p.add_argument("--control-plane", required=True, type=_control_planes, metavar="HOST:PORT[,HOST:PORT...]",
                   help="control plane gRPC address; several replicas' addresses separated by commas are tried in turn "
                        "(the next one when a session cannot be had)")
    p.add_argument("--site", required=True, type=_site, help="site name (DNS label), one agent per site")
    p.add_argument("--token", default=os.environ.get("EDGEPLANE_TOKEN", ""),
                   help="bootstrap token (or EDGEPLANE_TOKEN); unused once a credential is saved")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", edge_agent.DEFAULT_LISTEN_PORT), metavar="HOST:PORT",
                   help=f"v2 HTTP listen address (port 0 = any free port) [127.0.0.1:{edge_agent.DEFAULT_LISTEN_PORT}]")
    p.add_argument("--grpc-listen", type=_host_port, default=None, metavar="HOST:PORT",
                   help="also serve the v2 protocol over gRPC (inference.GRPCInferenceService) here")
    p.add_argument("--serve-auth", default="none", choices=("none", "token"),
                   help="token: the serving ports (--listen, --grpc-listen) take only the control plane's API tokens "
                        "(Authorization: Bearer), held to their models and residency, checked here even without uplink; "
                        "none: any caller that reaches them (docs/agent.md, docs/security.md) [none]")
    p.add_argument("--advertise-url", type=_advertise_url, metavar="URL",
                   help="http(s) URL the control plane should route to (default: from --listen)")
    p.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("/var/lib/edgeplane-agent"),
                   help="cache, saved assignments and identity [/var/lib/edgeplane-agent]")
    p.add_argument("--country", default="", type=_country, help="ISO 3166 alpha-2 country code, e.g. FR")
    p.add_argument("--region", default="", help="region name, e.g. eu-west")
    p.add_argument("--lat", type=_between(-90, 90), help="the site's latitude (with --lon), for nearest-replica routing")
    p.add_argument("--lon", type=_between(-180, 180), help="the site's longitude")
    p.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE",
                   help="a site label the manifests' selectors can match (repeatable)")
    p.add_argument("--heartbeat-interval", type=_between(edge_agent.MIN_HEARTBEAT_S, edge_agent.MAX_HEARTBEAT_S),
                   metavar="SECONDS", help=f"how often to report, {edge_agent.MIN_HEARTBEAT_S:g} to "
                   f"{edge_agent.MAX_HEARTBEAT_S:g} [the control plane's: 'edgeplane serve --heartbeat-interval', "
                   "5 s by default]")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC with a bearer credential instead of mutual TLS (only with 'edgeplane serve --insecure-agents')")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--ca-file", type=pathlib.Path,
                       help="the control plane's CA certificate (<control-plane data dir>/ca/ca.crt), trusted for the first join")
    trust.add_argument("--ca-sha256", type=_sha256, metavar="HEX",
                       help="instead of --ca-file: the SHA-256 of the control plane's CA certificate ('edgeplane token create' "
                            "prints it); the agent takes the CA from the join listener only if it matches, and keeps it")
    p.add_argument("--join-address", type=_dial_address, metavar="HOST:PORT",
                   help="the control plane's join listener for the first join (default: the --control-plane address in use, port + 1)")
    p.add_argument("--allow-file-artifacts", action="store_true", help="accept file:// artifact URLs")
    p.add_argument("--max-artifact-gb", type=_positive, default=float(edge_agent.DEFAULT_MAX_ARTIFACT_GIB), metavar="GIB",
                   help="largest model artifact downloaded, in GiB; a larger one is refused before its download "
                        f"starts, when the server says its size [{edge_agent.DEFAULT_MAX_ARTIFACT_GIB}]")
    p.add_argument("--max-downloads", type=_count(0, 64), default=0, metavar="N",
                   help="model downloads run at once, the others waiting their turn in the order they were "
                        "assigned (1 on a thin uplink: the first model serves sooner); 0: no limit [0]")
    p.add_argument("--download-timeout", type=_positive, default=artifacts.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="a model download's socket timeout: a stall this long ends the attempt, resumed within a "
                        f"second [{artifacts.DEFAULT_TIMEOUT_S:g}]")
    p.add_argument("--download-speed-limit", type=_count(0, 2**40), default=int(artifacts.DEFAULT_SPEED_LIMIT),
                   metavar="BYTES", help="as curl's --speed-limit: a model download slower than BYTES a second for "
                   "--download-speed-time ends the attempt, resumed within a second (a trickle never reaches the "
                   f"socket timeout); 0: never [{artifacts.DEFAULT_SPEED_LIMIT:g}]")
    p.add_argument("--download-speed-time", type=_positive, default=artifacts.DEFAULT_SPEED_TIME_S, metavar="SECONDS",
                   help=f"see --download-speed-limit [{artifacts.DEFAULT_SPEED_TIME_S:g}]")
    p.add_argument("--max-request-bytes", type=_count(1, 2**40), default=edge_agent.DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body (over gRPC at most 2 GiB less a byte, gRPC's own ceiling) "
                        f"[{edge_agent.DEFAULT_MAX_REQUEST_BYTES}]")
    p.add_argument("--max-inflight-bytes", type=_count(0, 2**50), default=0, metavar="N",
                   help="memory all requests in flight may hold together (their bodies, and what decoding their JSON "
                        "takes); one more is answered 503 with Retry-After (RESOURCE_EXHAUSTED over "
                        "gRPC), one larger than N 413 (0 = half the memory the agent has free, measured at the start "
                        "and whenever the models it serves change; while a model loads, half of what its load "
                        "leaves). A model's load must fit beside it [0]")
    p.add_argument("--drain-timeout", type=_positive, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish [30]")
    p.add_argument("--write-timeout", type=_positive, default=60.0, metavar="SECONDS",
                   help="drop a client that reads nothing of its answer for this long (a stalled stream frees its slot) [60]")
    p.add_argument("--max-connections", type=_count(0, 1 << 20), default=0, metavar="N",
                   help="HTTP connections served at once; one more is answered 503 and closed "
                        "(0 = half the open-file limit, so a flood leaves descriptors for models and downloads) [0]")
    p.add_argument("--max-queued-runs", type=_count(0, 1 << 20), default=0, metavar="N",
                   help="inference runs (HTTP and gRPC) waiting for a worker thread; one more is answered 503 with "
                        "Retry-After, RESOURCE_EXHAUSTED over gRPC (0 = 32 per worker) [0]")
    p.add_argument("--workers", type=_count(0, 1024), default=0, help="inference threads (0 = one per core this agent may use: its CPU affinity, capped by its cgroup's quota) [0]")
    p.add_argument("--inline-max-ms", type=_not_negative, default=20.0, metavar="MS",
                   help="a request alone in flight whose model runs in at most this long is computed on the "
                        "event loop instead of a worker thread (0 = always a worker thread) [20]")
    spin = p.add_mutually_exclusive_group()
    spin.add_argument("--spin-after-run-us", type=_count(0, MAX_SPIN_AFTER_RUN_US), default=0, metavar="US",
                      help="let onnxruntime's idle threads spin this long after a run before they sleep: a request "
                           "that follows within it skips their wake-up (faster answers to back-to-back requests), "
                           "for up to about twice US of CPU per thread after a request nobody follows "
                           "(0 = they sleep when the run ends; docs/agent.md) [0]")
    spin.add_argument("--spin-between-runs", action="store_true",
                      help="let onnxruntime's idle threads spin-wait after each run as long as its default does "
                           "(milliseconds): cores kept busy between requests (docs/agent.md)")
    p.add_argument("--runtimes", type=_runtimes, default=None, metavar="RUNTIME[,RUNTIME...]",
                   help="the model runtimes this agent offers, of onnx and onnx-genai; the control plane assigns it no "
                        "model of another [every one installed here: onnx, and onnx-genai with onnxruntime-genai]")
    p.add_argument("--log-level", default="info", type=str.lower, choices=logformat.LEVELS, help="log verbosity [info]")
    p.add_argument("--log-format", default="text", type=str.lower, choices=logformat.FORMATS,
                   help="text: a line for people; json: one JSON object a line, for a log shipper (docs/agent.md) [text]")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per request answered (edgeplane.access): its id, route, model, status, bytes and "
                        "duration; never the caller's address, token, query or body (docs/security.md) [off]")
    return p


def config_from_args(args: argparse.Namespace) -> daemon.AgentConfig:
    from edge_agent import daemon  # imported by main() once unused modules are refused

    if args.ca_file is not None:
        _check_ca_file(args.ca_file)
    if args.runtimes is not None:
        _check_runtimes(args.runtimes)
    return daemon.AgentConfig(
        control_plane=args.control_plane,
        site=args.site,
        token=args.token,
        data_dir=args.data_dir,
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        advertise_url=args.advertise_url,
        heartbeat_interval=args.heartbeat_interval,
        insecure=args.insecure,
        ca_file=args.ca_file,
        ca_sha256=args.ca_sha256,
        join_address=args.join_address,
        allow_file_artifacts=args.allow_file_artifacts,
        max_artifact_bytes=int(args.max_artifact_gb * (1 << 30)),
        max_downloads=args.max_downloads,
        download_timeout=args.download_timeout,
        download_speed_limit=args.download_speed_limit,
        download_speed_time=args.download_speed_time,
        country=args.country,
        region=args.region,
        lat=args.lat,
        lon=args.lon,
        labels=dict(args.label),
        max_body_bytes=args.max_request_bytes,
        drain_timeout=args.drain_timeout,
        write_timeout=args.write_timeout,
        max_connections=args.max_connections,
        max_queued_runs=args.max_queued_runs,
        max_inflight_bytes=args.max_inflight_bytes,
        workers=args.workers,
        inline_max_ms=max(0.0, args.inline_max_ms),
        grpc_listen=args.grpc_listen,
        spin_between_runs=args.spin_between_runs,
        spin_after_run_us=args.spin_after_run_us,
        runtimes=args.runtimes,
        access_log=args.access_log,
        serve_auth=args.serve_auth,
    )


async def run(config: daemon.AgentConfig, early: Sequence[int] = ()) -> None:
    """``early``: stop signals that came before the event loop took them over."""
    from edge_agent import daemon

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, log.info, HANGUP)
    if early:
        log.info("agent stopped (%s came before it started)", signal.Signals(early[0]).name)
        return
    agent = daemon.Agent(config)
    await agent.start()
    print(f"serving {agent.endpoint_url}", flush=True)
    await stop.wait()
    await agent.stop()
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    """End the process once the agent has stopped (its state saved, its data dir released).
    Python's own exit would first wait, with no bound, for every executor thread still at
    work: a model load the stop cut short, a run the drain gave up on."""
    logging.shutdown()  # flushes the log
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    early: list[int] = []  # until run() hands them to the event loop: kept, so that the agent stops as it would later
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    # Not SIG_IGN, which the agent's child processes would inherit through exec.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: None)
    args = parser().parse_args(argv)
    logformat.configure(args.log_level, args.log_format)
    # Before gRPC is imported: its core would log each failed TLS handshake again, at INFO,
    # in a line of its own beside the uplink's (which says what to change); errors still show.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # Before onnxruntime is imported: its Linux builds since 1.29 start a telemetry client at
    # import (1DS: a SQLite store under ~/.cache, libcurl, a thread that wakes to upload) that
    # sends Microsoft each session's model names and hashes. An edge site's agent has no
    # business phoning home, and the client cost the idle agent 2.6 MB and two threads
    # (docs/agent.md). An operator's own ORT_DISABLE_TELEMETRY is kept.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        if not args.token and not (args.data_dir / "identity.json").exists():
            log.error("a bootstrap token is needed for the first join (--token or EDGEPLANE_TOKEN)")
            return 2
        asyncio.run(run(config_from_args(args), early))
    except errors.NewerState as exc:  # as a usage error: starting again changes nothing
        log.error("%s", exc)
        return 2
    except (errors.AgentError, OSError) as exc:
        log.error("%s", exc)
        return 1
    except ModuleNotFoundError as exc:  # the package leaves onnxruntime to its extras: its CPU and CUDA builds share a folder
        if exc.name != "onnxruntime":
            raise
        log.error("onnxruntime is not installed, which the agent runs its models with: pip install 'edgeplane[cpu]', "
                  "or 'edgeplane[gpu]' for its CUDA build (one of the two)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
