"""``edgeplane distill DEPLOYMENT`` and ``edgeplane captures ZONE``: the distillation loop from the shell.

``distill`` streams the run's progress (one line per epoch) and ends with the gate's
report: agreement with the teacher and escalation rate of the serving and the new
student on held-out captured data, their latency, and whether a new artifact was
published. Exit status 0 when published, 1 when not (a run that published nothing is
not an error of the tool, but a script must be able to tell). Under ``-o json|yaml`` the
progress lines go to stderr, so that stdout is the report alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from orchestrator import argtypes
from orchestrator.cli import render
from orchestrator.cli.http import ApiClient, CliError, json_of, unreached
from orchestrator.urlpath import path_segment


def cmd_distill(api: ApiClient, args: argparse.Namespace) -> int:
    if not args.deployment:
        raise CliError("DEPLOYMENT is empty: name a deployment with spec.cascade.capture (edgeplane get cascades)", 2)
    options: dict[str, Any] = {"epochs": args.epochs, "minGain": args.min_gain}
    if args.zone is not None:
        options["zone"] = _zone(args.zone, "--zone")
    result: dict[str, Any] | None = None
    # Progress is for people: on stdout with the table, on stderr under -o json|yaml, whose
    # stdout is the report alone.
    progress_to = sys.stdout if args.output == "table" else sys.stderr
    answered = False
    try:
        # No read timeout: a run trains for as long as it takes, and says so one line per epoch.
        with api._http.stream("POST", f"/v1/distill/{path_segment(args.deployment)}", json=options,
                              timeout=httpx.Timeout(None, connect=10.0)) as resp:
            answered = True
            if resp.status_code >= 400:
                resp.read()
                raise CliError(_refusal(resp))
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    raise CliError(f"the control plane answered HTTP {resp.status_code} with something else than the run's "
                                   f"NDJSON lines: {line[:200]!r}") from None
                if not isinstance(item, dict):
                    continue
                if isinstance(item.get("progress"), dict):
                    print(_progress_line(item["progress"]), file=progress_to, flush=True)
                elif isinstance(item.get("result"), dict):
                    result = item["result"]
    except httpx.TransportError as exc:
        if not answered:
            raise CliError(unreached(api.server, exc), 3) from exc
        raise CliError(f"the connection to the control plane broke during the run at {api.server}: {exc.__class__.__name__} ({exc}); "
                       "is 'edgeplane serve' running? (--server / EDGEPLANE_SERVER)", 3) from exc
    if result is None:
        raise CliError("the control plane ended the run without a result")
    if args.output != "table":
        render.dump(result, args.output)
    else:
        gate = result.get("gate") or {}
        cur, cand = gate.get("current") or {}, gate.get("candidate") or {}
        if cur:
            render.table(f"held-out captured data, zone {result.get('zone')}", ["STUDENT", "AGREEMENT", "ESCALATION", "LATENCY-MS"],
                         [[name, e.get("agreement"), e.get("escalation"), e.get("latency_ms")] for name, e in
                          (("serving", cur), ("candidate", cand))])
        if result.get("published"):
            print(f"published {result['variant']} {result['artifact']['uri']} (sha256 {result['artifact']['sha256'][:12]}…); "
                  f"the deployment's rollout takes it")
        else:
            reasons = result.get("error") or "; ".join(gate.get("reasons") or [])
            print(f"not published: {reasons}")
    return 0 if result.get("published") else 1


def _progress_line(p: dict[str, Any]) -> str:
    if "epoch" in p:
        return f"train: epoch {p['epoch']}/{p.get('epochs')}  loss {p.get('loss')}"
    return f"{p.get('phase')}: " + ", ".join(f"{k} {v}" for k, v in p.items() if k != "phase")


def _zone(text: str, name: str) -> str:
    """A residency zone as the stores name it: EU, or a country code (any case)."""
    zone = text.strip().upper()
    if not zone:
        raise CliError(f"{name} is empty: give a residency zone, EU or a country code such as CH", 2)
    return zone


def _refusal(resp: httpx.Response) -> str:
    body = json_of(resp)
    error = body.get("error") if isinstance(body, dict) else None
    return str(error) if error else f"HTTP {resp.status_code}: {resp.text[:200] or resp.reason_phrase}"


def cmd_captures(api: ApiClient, args: argparse.Namespace) -> int:
    zone = _zone(args.zone, "ZONE")
    if args.delete is not None and not args.delete.strip():
        raise CliError("--delete is empty: give the ID of the record to erase (edgeplane captures ZONE lists them)", 2)
    if args.deployment is not None and not args.deployment.strip():
        raise CliError("--deployment is empty: give a cascade deployment's name, or leave the option out", 2)
    if args.delete:
        api.request("DELETE", f"/v1/captures/{path_segment(zone)}/{path_segment(args.delete)}")
        print(f"record {args.delete} deleted from zone {zone}")
        return 0
    params = {"limit": str(args.limit), **({"deployment": args.deployment} if args.deployment else {})}
    body = api.request("GET", f"/v1/captures/{path_segment(zone)}", params=params)
    if args.output != "table":
        render.dump(body, args.output)
        return 0
    keys = ["id", "deployment", "site", "stage", "firstConfidence", "capturedAt", "expiresAt"]
    items = body.get("items")
    render.table(f"zone {zone}", [k.upper() for k in keys],
                 [[i.get(k) for k in keys] for i in items if isinstance(i, dict)] if isinstance(items, list) else [])
    return 0


def add_parsers(client_parser: Any, with_output: Any) -> None:
    sp = with_output(client_parser("distill", help="train a new edge student from captured traffic, verify it, publish it"))
    sp.add_argument("deployment", help="a deployment with spec.cascade.capture")
    sp.add_argument("--zone", help="whose records to train on (default: the only zone with records)")
    sp.add_argument("--epochs", type=argtypes.whole_number(1, 1000), default=60, help="training passes over the records, 1 to 1000 (default 60)")
    sp.add_argument("--min-gain", type=argtypes.number(0, 1, below=True), default=0.005,
                    help="agreement the new student must add, from 0 to less than 1 (default 0.005)")
    sp = with_output(client_parser("captures", help="captured cascade records of one residency zone (admin; audited)"))
    sp.add_argument("zone", help="the residency zone the records are kept in: EU, or a country code such as CH")
    sp.add_argument("--deployment", help="only records of this cascade deployment")
    sp.add_argument("--limit", type=argtypes.item_count, default=100, help="how many of the newest records, 1 to 10000 (default 100)")
    sp.add_argument("--delete", metavar="ID", help="erase one record")
