"""``edgeplane cordon|drain|uncordon site NAME``: take a site out for maintenance and back.

``cordon``: no new replicas there, what runs keeps running. ``drain``: cordon, then move
its replicas to other allowed sites, each leaving only once its replacement serves;
``--dry-run`` shows where they would go, ``--wait`` follows the drain until the site
serves nothing (or ``--timeout``: exit 1, saying what is left), through a control plane
that restarts meanwhile, saying when it holds every change (:mod:`orchestrator.cli.hold`,
as ``apply --wait`` says it). ``uncordon``: schedulable
again; nothing is moved back by force.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from orchestrator import reasons
from orchestrator.cli import events, hold, render
from orchestrator.cli.http import ApiClient, CliError, RetryLater
from orchestrator.cli.objects import with_reason
from orchestrator.urlpath import path_segment

DEFAULT_WAIT_S = 600.0


def add_parsers(client_parser: Callable[..., argparse.ArgumentParser],
                with_output: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
                duration: Callable[[str], float]) -> None:
    sp = with_output(client_parser("cordon", help="maintenance: a site takes no new replicas; what it runs keeps running"))
    _site_args(sp)
    sp = with_output(client_parser("drain", help="maintenance: cordon a site and move its replicas elsewhere, each once its "
                                                 "replacement serves"))
    _site_args(sp)
    sp.add_argument("--dry-run", action="store_true", help="show where each replica would go, and which would stay; change nothing")
    sp.add_argument("--force", action="store_true",
                    help="also remove replicas that have no other allowed site (their deployments run short; residency still holds)")
    sp.add_argument("--wait", action="store_true", help="follow the drain until the site serves nothing, printing progress on stderr "
                                                    "(changes on hold included, said once as apply --wait says them)")
    sp.add_argument("--timeout", type=duration, default=DEFAULT_WAIT_S, metavar="DURATION",
                    help="with --wait: give up after this long (e.g. 90s, 10m; default 10m), exit 1 and say what is left")
    sp.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)  # how often --wait looks
    sp = with_output(client_parser("uncordon", help="maintenance over: the site is schedulable again (nothing is moved back by force)"))
    _site_args(sp)


def _site_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("what", choices=["site"], help="what to take out: a site")
    sp.add_argument("name", help="the Site's name")
    sp.add_argument("--reason", type=reasons.cleaned, help="why (recorded in the event log with your identity)")


def _path(args: argparse.Namespace, action: str) -> str:
    return f"/v1/sites/{path_segment(args.name)}/{action}"


def _said(data: dict[str, Any], args: argparse.Namespace) -> None:
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return
    word = data["action"]
    print(f"site {data['name']} {word}" if word != "unchanged" else f"site {data['name']} unchanged (already so)")
    if data.get("note"):
        print(data["note"])


def cmd_cordon(api: ApiClient, args: argparse.Namespace) -> int:
    _said(api.request("POST", _path(args, "cordon"), headers=with_reason({}, args)), args)
    return 0


def cmd_uncordon(api: ApiClient, args: argparse.Namespace) -> int:
    _said(api.request("POST", _path(args, "uncordon"), headers=with_reason({}, args)), args)
    return 0


def cmd_drain(api: ApiClient, args: argparse.Namespace) -> int:
    if args.dry_run:
        if args.wait or args.force:
            raise CliError("--dry-run changes nothing: it takes neither --wait nor --force", 2)
        plan = api.request("POST", _path(args, "drain"), params={"dryRun": "true"})["plan"]
        if args.output in ("json", "yaml"):
            render.dump(plan, args.output)
        else:
            _print_preview(plan)
        return 0
    params = {"force": "true"} if args.force else {}
    data = api.request("POST", _path(args, "drain"), params=params, headers=with_reason({}, args))
    if not args.wait:
        _said(data, args)
        return 0
    if args.output not in ("json", "yaml"):
        _said(data, args)
    return follow_drain(api, args)


def _print_preview(plan: dict[str, Any]) -> None:
    print(f"site {plan['site']}: {plan['replicas']} replica(s); draining it would (dry run, nothing changed):")
    if plan["moves"]:
        render.table("Moves", ["DEPLOYMENT", "VARIANT", "TO SITE", "AS"],
                     [[m["deployment"], m["variant"], m["to"], m["toVariant"]] for m in plan["moves"]])
    if plan["stays"]:
        render.table("Stay (no other allowed site; --force removes them)", ["DEPLOYMENT", "REPLICAS", "REASON"],
                     [[x["deployment"], x["replicas"], x["reason"]] for x in plan["stays"]])
    if plan["removed"]:
        render.table("Removed (no longer wanted)", ["DEPLOYMENT", "VARIANT", "REASON"],
                     [[r["deployment"], r["variant"], r["reason"]] for r in plan["removed"]])
    if not (plan["moves"] or plan["stays"] or plan["removed"]):
        print("  nothing to move: it runs no replica")


def progress_line(name: str, m: dict[str, Any]) -> str:
    """One line of a drain's progress, as ``--wait`` prints it."""
    state = m.get("state", "Pending")
    if state == "Pending":
        return f"site {name}: Pending (the control plane has not planned the drain yet)"
    if state != "Draining":
        return f"site {name}: {state}"
    left = m.get("replicasLeft", 0)
    out = f"site {name}: Draining, {left} replica{'' if left == 1 else 's'} left"
    if m.get("waitingFor"):
        out += f"; waiting for replacements of {', '.join(m['waitingFor'])} to serve"
    for x in m.get("stuck", []):
        out += f"; {x['deployment']} stays ({x['replicas']}): {x['reason']}"
    if m.get("note"):
        out += f"; {m['note']}"
    return out


def follow_drain(api: ApiClient, args: argparse.Namespace) -> int:
    """Follow the drain until it is done or ``--timeout``, a progress line on stderr each
    time it changes (stdout keeps the answer, as ``apply --wait``). A control plane that cannot be
    reached or says to retry later (restarted or upgraded during the window, as it often
    is) is said once and asked again until the deadline: the drain is stored and goes on
    without it. A control plane that holds every change plans no drain: that is said once,
    and again when it gives up."""
    deadline = time.monotonic() + args.timeout
    last = ""
    m: dict[str, Any] = {"state": "Pending"}
    away = False
    held = ""  # why the control plane holds every change (a stored object it cannot read), said once
    while True:
        try:
            site = api.request("GET", f"/v1/sites/{path_segment(args.name)}")
            if ((site.get("status") or {}).get("maintenance") or {}).get("state") != "Drained":
                held = hold.noticed(api, held, _progress)
        except CliError as exc:
            wait = events.wait_to_ask_again(exc, args.interval)
            if wait is None:  # refused, not away: asking again would be refused again
                raise
            if not away:
                problem = f"{exc} (HTTP {exc.status})" if isinstance(exc, RetryLater) else str(exc)
                print(f"warning: control plane unreachable, retrying: {problem}", file=sys.stderr, flush=True)
            away = True
            if time.monotonic() >= deadline:
                return _gave_up(args, m, f"{last.split(': ', 1)[1] if last else 'Pending'} (the control plane did not answer)", held)
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            continue
        if away:
            print("the control plane answers again; following", file=sys.stderr, flush=True)
            away = False
        m = site.get("status", {}).get("maintenance") or {}
        # a status the pass has not written yet (just drained) reads as pending, never as done
        m = m if m.get("mode") == "drain" else {"state": "Pending"}
        line = progress_line(args.name, m)
        if line != last:  # progress on stderr, as apply --wait: stdout keeps the answer (-o json: one document)
            print(line, file=sys.stderr, flush=True)
        last = line
        if m.get("state") == "Drained":
            if args.output in ("json", "yaml"):
                render.dump({"name": args.name, "drained": True, "maintenance": m}, args.output)
            return 0
        if time.monotonic() >= deadline:
            return _gave_up(args, m, line.split(': ', 1)[1] + hold.suffix(held), held)
        time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _gave_up(args: argparse.Namespace, m: dict[str, Any], left: str, held: str) -> int:
    if args.output in ("json", "yaml"):
        render.dump({"name": args.name, "drained": False, "maintenance": m, **({"hold": held} if held else {})}, args.output)
    print(f"error: site {args.name} not drained within {args.timeout:g} s: {left}", file=sys.stderr)
    return 1
