"""``edgeplane status``: the control plane's health and a fleet summary in a few lines.

It gathers several views (health, sites, deployments, placements, the control plane's
replicas) into one answer, and says in words what is wrong or still waiting: a deployment
that cannot run as asked, a replica not ready yet, a replica without a leader.
"""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.cli import render
from orchestrator.cli.http import ApiClient


TROUBLED_PHASES = ("Invalid", "Unschedulable", "Degraded", "Failing")
CA_WARNING_DAYS = 30  # the agents' CA's end is warned of this long before


def cmd_status(api: ApiClient, args: argparse.Namespace) -> int:
    health = api.request("GET", "/healthz")
    sites = api.request_list("/v1/sites")["items"]
    deps = api.request_list("/v1/modeldeployments")["items"]
    placements = api.request_list("/v1/placements")
    data = {"server": api.server, "health": health, "sites": len(sites),
            "healthySites": sum(1 for s in sites if s.get("status", {}).get("health") == "Healthy"),
            # data centres another control plane owns (OwnedElsewhere), by the owner's id: held until taken over
            "ownedElsewhere": {s["metadata"]["name"]: s["status"].get("ownedBy", "") for s in sites
                               if s.get("status", {}).get("health") == "OwnedElsewhere"},
            "deployments": {d["metadata"]["name"]: d.get("status", {}).get("phase", "Pending") for d in deps},
            # what is wrong with a deployment that cannot run as asked (no fitting site, a failed replica...)
            "problems": {d["metadata"]["name"]: d["status"].get("reason", "") for d in deps
                         if d.get("status", {}).get("phase") in TROUBLED_PHASES},
            "replicas": sum(p["replicas"] for p in placements["items"]),
            # sites taken out for maintenance: cordoned, draining or drained
            "maintenance": {s["metadata"]["name"]: render.scheduling(s["status"]) for s in sites if s.get("status", {}).get("maintenance")},
            # the estimated draw of the sites with a power budget against it (facility watts)
            "power": {s["metadata"]["name"]: s["status"]["power"] for s in sites if s.get("status", {}).get("power")},
            # why a replica is not ready yet (waiting for a GPU, an agent...), by deployment
            "waiting": _waiting(placements["items"]),
            "controlPlane": api.request("GET", "/v1/controlplane")}
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    say(f"control plane {api.server}: {health.get('status')}")
    say(_leadership_line(data["controlPlane"]))
    if data["controlPlane"].get("agentCa"):  # absent with --insecure-agents
        say(*agent_ca_lines(data["controlPlane"]["agentCa"]))
    if data["controlPlane"].get("hold"):  # a stored object does not read: nothing is planned or sent until it does
        say(data["controlPlane"]["hold"])
    owned = data["ownedElsewhere"]
    say(f"sites: {data['sites']} ({data['healthySites']} healthy{f', {len(owned)} owned elsewhere' if owned else ''}), "
        f"replicas placed: {data['replicas']}")
    for name, owner in owned.items():  # the Site's spec.takeOverFrom: <owner> takes it over
        say(f"  {name}: owned by another control plane ({owner})")
    for name, state in data["maintenance"].items():
        say(f"  {name}: {state}")
    for name, power in data["power"].items():  # over: replicas moving off after the budget was lowered
        over = " (over budget)" if power.get("estimatedWatts", 0) > power.get("budgetWatts", 0) else ""
        say(f"  {name}: power {render.power({'power': power})} W{over}")
    for name, phase in data["deployments"].items():
        say(f"  {name}: {phase}" + (f": {data['problems'][name]}" if data["problems"].get(name) else ""))
        for reason in data["waiting"].get(name, []):
            say(f"    waiting: {reason}")
    return 0


def say(*lines: str) -> None:
    """Print ``lines``, one each: they hold what agents, Ray and the store said (an error, a
    reason), whose control characters are escaped (:func:`render.one_line`), so that each stays
    the one line it is and moves no terminal."""
    for line in lines:
        print(render.one_line(line))


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


def agent_ca_lines(ca: dict[str, Any]) -> list[str]:
    """When the agents' CA ends, and a warning from ``CA_WARNING_DAYS`` before: past it no agent
    can join or renew its certificate, and agents must join a new CA."""
    left_s, ends = ca["expiresInSeconds"], ca["notAfter"].replace("T", " ").replace("Z", " UTC")
    lines = [f"agents' CA (SHA-256 {ca['sha256'][:16]}...): valid until {ends}"]
    if left_s <= 0:
        lines.append(f"error: the agents' CA expired at {ends}: no agent can join or renew its certificate; agents must join a new CA")
    elif left_s < CA_WARNING_DAYS * 86400:
        left = f"{left_s // 86400} day(s)" if left_s >= 86400 else f"{left_s // 3600} hour(s)"
        lines.append(f"warning: the agents' CA ends in {left} ({ends}): from then on no agent can join or renew its certificate, "
                     "and agents must join a new CA (docs/security.md)")
    return lines


def _agents(n: int) -> str:
    return f"{n} agent" if n == 1 else f"{n} agents"


def _waiting(placements: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in placements:
        if p.get("reason") and p.get("ready", 0) < p["replicas"]:
            out.setdefault(p["deployment"], []).append(f"{p['site']}: {p['reason']}")
    return out
