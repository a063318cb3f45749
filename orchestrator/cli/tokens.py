"""``edgeplane token create|list`` and ``edgeplane revoke``: the credentials of agents and users.

A bootstrap token is what an agent joins with (one an agent); an API token is a user's or a
script's, with a role. A token's secret is printed once, when it is created (stdout is the
token alone, for scripts), and never shown again; a revocation takes effect at once.
"""

from __future__ import annotations

import argparse
import math
import sys

from orchestrator import reasons
from orchestrator.cli import objects, render
from orchestrator.cli.http import ApiClient, CliError
from orchestrator.urlpath import path_segment


def cmd_token(api: ApiClient, args: argparse.Namespace) -> int:
    if args.token_command == "list":
        return _list_tokens(api, args)
    if (args.model or args.residency) and args.role != "read":  # the control plane would refuse it: say so before asking
        raise CliError("--model and --residency scope a read token: add --role read", 2)
    body = {"purpose": "api" if args.role in ("read", "admin") else "bootstrap", "role": args.role, "description": args.description or ""}
    if args.ttl:
        body["ttlSeconds"] = _parse_ttl(args.ttl)
    if args.model:
        body["models"] = args.model
    if args.residency:
        body["residency"] = [c.strip() for c in args.residency.split(",") if c.strip()] or [args.residency]
    data = api.request("POST", "/v1/tokens", json=body)
    if ("models" in body or "residency" in body) and "models" not in data:
        _unscoped(api, data)
    if data.get("warning"):  # stderr: stdout stays the token alone, or the one document
        print(f"warning: {data['warning']}", file=sys.stderr)
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
    else:
        print(data["token"])
        if data.get("caSha256"):  # stdout stays the token alone, for scripts
            print(f"an agent trusts this control plane with: --ca-sha256 {data['caSha256']} (or --ca-file <data-dir>/ca/ca.crt)",
                  file=sys.stderr)
    return 0


def _unscoped(api: ApiClient, data: dict[str, object]) -> None:
    """A control plane of a release before tokens were scoped made the token, read its scope
    as nothing (its answer names none), and so made a token of every model: revoked at once,
    never printed."""
    api.request("POST", f"/v1/revoke/tokens/{path_segment(str(data['id']))}",
                headers={reasons.HEADER: "made unscoped by a control plane of an earlier release"})
    raise CliError("the control plane is of an earlier release than this CLI and made a token without its scope "
                   "(--model, --residency), one that calls every model; it was revoked at once. "
                   "Make the token again once the control plane (every replica) is upgraded")


def _list_tokens(api: ApiClient, args: argparse.Namespace) -> int:
    data = api.request("GET", "/v1/tokens")
    if not args.all:  # bootstrap tokens pile up, one an agent: the ones that still work unless asked
        data["items"] = [t for t in data["items"] if t["state"] == "active"]
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    render.table(None, ["ID", "PURPOSE", "ROLE", "STATE", "CREATED", "EXPIRES", "MODELS", "RESIDENCY", "DESCRIPTION"],
                 [[t["id"], t["purpose"], t["role"], t["state"], t["createdAt"], t["expiresAt"] or "never",
                   ",".join(t.get("models") or ()) or "any", ",".join(t.get("residency") or ()) or "-", t["description"]]
                  for t in data["items"]])
    return 0


def cmd_revoke(api: ApiClient, args: argparse.Namespace) -> int:
    """A token stops working at once; an agent's streams end now and it cannot rejoin on
    any bootstrap token that existed before the revocation."""
    data = api.request("POST", f"/v1/revoke/{args.what}s/{path_segment(args.name)}", headers=objects.with_reason({}, args))
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
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
