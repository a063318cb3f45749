"""``edgeplane simulate``: what-if drills from the command line.

Without ``-f`` the scenario goes to the control plane (``POST /v1/simulate``), which runs
it against the live fleet. With ``-f`` the fleet is the one those manifests describe (every
site healthy, today's plan planned from scratch) and everything runs here, with no control
plane: for drills in CI and for fleets too large to send.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import Any

import httpx

from orchestrator.cli import render, textfile
from orchestrator.cli.http import ApiClient, CliError
from orchestrator.manifests import loader, references, schema
from orchestrator.manifests.errors import ManifestError
from orchestrator.reconciler import inventory
from orchestrator.reconciler import snapshot as snap
from orchestrator.reconciler.autoscaler import Autoscaler
from orchestrator.simulation import report, scenario, sweep, whatif


def _pair(text: str, flag: str) -> tuple[str, float]:
    where, sep, value = text.rpartition("=")
    try:
        if not sep or not where:
            raise ValueError
        number = float(value)
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected NAME=NUMBER", 2) from None
    if not 0 <= number < math.inf:  # NaN fails too; each of these flags scales or sets a non-negative figure
        raise CliError(f"{flag} {text!r}: the number must be 0 or more", 2)
    return where, number


def scenario_document(args: argparse.Namespace) -> dict[str, Any]:
    """The scenario file with the command-line changes added to it."""
    doc: dict[str, Any] = {"apiVersion": schema.API_VERSION, "kind": "Scenario", "metadata": {"name": "cli"}, "spec": {}}
    if args.scenario:
        path = pathlib.Path(args.scenario)
        try:
            text = textfile.read(path)
        except OSError as exc:
            raise CliError(f"{args.scenario}: {exc.strerror or exc}", 2) from None
        data = scenario.load_data(text, args.scenario)
        scenario.parse(data, args.scenario)  # one-line error naming the field before anything else
        doc = data if scenario.is_document(data) else {**doc, "spec": data}
    flags = _flag_changes(args)
    _check_flags(flags, args)
    spec = doc.setdefault("spec", {}) or {}
    doc["spec"] = spec
    if flags.get("fail"):
        fail = spec.setdefault("fail", {})
        for key, values in flags["fail"].items():
            fail[key] = list(fail.get(key, [])) + values
    if flags.get("demand"):
        spec["demand"] = list(spec.get("demand", [])) + flags["demand"]
    for site, change in flags.get("sites", {}).items():
        spec.setdefault("sites", {}).setdefault(site, {}).update(change)
    return doc


#: Which option set each field of a scenario's spec.fail.
#: A control plane plans one what-if at a time: another caller's is waited out this long
#: (a 429 says when to ask again) before the command gives up.
BUSY_WAIT_S = 120.0
#: The planning of a what-if within the control plane's budget takes up to about a minute
#: on a quiet machine (docs/simulation.md); a loaded one may take several.
ANSWER_TIMEOUT = httpx.Timeout(30.0, read=600.0)

FAIL_FLAGS = {"sites": "--fail-site", "regions": "--fail-region", "countries": "--fail-country", "tiers": "--fail-tier"}
#: Which option set each field of a site's change.
SITE_FLAGS = {"carbonGramsPerKWh": ("--carbon", "carbon"), "capacityFactor": ("--capacity", "capacity"),
              "powerBudgetWatts": ("--power-budget", "power_budget")}


def _flag_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The scenario spec the command-line options alone describe."""
    spec: dict[str, Any] = {}
    fail = {key: list(values) for key, values in (("sites", args.fail_site), ("regions", args.fail_region),
                                                 ("countries", args.fail_country), ("tiers", args.fail_tier)) if values}
    if fail:
        spec["fail"] = fail
    for text in args.demand:
        where, factor = _pair(text, "--demand")
        change: dict[str, Any] = {"factor": factor}
        if where != "*":
            lat, comma, lon = where.partition(",")
            try:
                change.update(lat=float(lat), lon=float(lon)) if comma else change.update(region=where)
            except ValueError:
                change["region"] = where
        spec.setdefault("demand", []).append(change)
    for text in args.carbon:
        site, value = _pair(text, "--carbon")
        spec.setdefault("sites", {}).setdefault(site, {})["carbonGramsPerKWh"] = value
    for text in args.capacity:
        site, value = _pair(text, "--capacity")
        spec.setdefault("sites", {}).setdefault(site, {})["capacityFactor"] = value
    for text in args.power_budget:
        site, value = _pair(text, "--power-budget")
        spec.setdefault("sites", {}).setdefault(site, {})["powerBudgetWatts"] = value
    return spec


def _check_flags(spec: dict[str, Any], args: argparse.Namespace) -> None:
    """Refuse an option whose value the scenario cannot take (a usage error, exit 2), named
    as it was typed: ``--demand '*=2000': factor: ...``, not a path in a document the user
    never wrote."""
    try:
        scenario.parse({"spec": spec}, "<flags>")
    except scenario.ScenarioError as exc:
        raise CliError(_flag_problem(exc.field, exc.reason, args) or str(exc), 2) from None


def _flag_problem(field: tuple[str | int, ...], reason: str, args: argparse.Namespace) -> str | None:
    if field[:2] == ("spec", "fail") and len(field) > 2 and field[2] in FAIL_FLAGS:
        flag = FAIL_FLAGS[str(field[2])]
        values = getattr(args, flag[2:].replace("-", "_"))
        index = field[3] if len(field) > 3 and isinstance(field[3], int) else None
        return f"{flag} {values[index]!r}: {reason}" if index is not None and index < len(values) else f"{flag}: {reason}"
    if field[:2] == ("spec", "demand") and len(field) > 2 and isinstance(field[2], int) and field[2] < len(args.demand):
        part = f"{field[3]}: " if len(field) > 3 else ""
        return f"--demand {args.demand[field[2]]!r}: {part}{reason}"
    if field[:2] == ("spec", "sites") and len(field) > 3 and field[3] in SITE_FLAGS:
        flag, attr = SITE_FLAGS[str(field[3])]
        typed = [t for t in getattr(args, attr) if t.rpartition("=")[0] == field[2]]
        return f"{flag} {typed[-1]!r}: {reason}" if typed else f"{flag}: {reason}"
    return None


def _load(paths: list[str]) -> list[loader.LoadedDocument]:
    """Every document of every file (each file read on its own, so a fleet may span many)."""
    docs: list[loader.LoadedDocument] = []
    for path in paths:
        for name, text in textfile.manifest_texts(path):
            docs.extend(loader.load_text(text, name))
    seen: dict[tuple[str, str], str] = {}
    for d in docs:
        if (d.kind, d.name) in seen:
            raise CliError(f"{d.file}: {d.kind} {d.name!r} is also declared in {seen[(d.kind, d.name)]}", 1)
        seen[(d.kind, d.name)] = d.file
    return docs


def local_state(paths: list[str]) -> whatif.State:
    """The fleet of the manifests at ``paths``: every site healthy, today's plan planned from
    scratch as the control plane's first pass after applying them would plan it."""
    docs = _load(paths)
    issues = references.check_references(docs, {})
    if issues:
        raise ManifestError(issues)
    models = {d.name: d.doc.spec for d in docs if isinstance(d.doc, schema.ModelDoc)}
    sites = [scenario.site_from_spec(d.name, d.doc.metadata.labels, d.doc.spec) for d in docs if isinstance(d.doc, schema.SiteDoc)]
    specs = [(d.name, d.doc.spec) for d in docs if isinstance(d.doc, schema.ModelDeploymentDoc)]
    # The count the autoscaler gives each deployment on the control plane's first pass after
    # the apply (nothing placed, no load, no request yet): one scaled to zero starts at zero.
    first = Autoscaler().evaluate(specs, (), {})
    deployments = [inventory.to_deployment(snap.DeploymentRecord(name, 1, spec), models[spec.model],
                                           first[name].replicas if name in first else None)
                   for name, spec in specs]
    return whatif.today(sites, deployments)


def run(api: ApiClient, args: argparse.Namespace) -> int:
    each = "site" if args.each_site else "region" if args.each_region else None
    source = args.scenario or "<flags>"
    started = time.perf_counter()
    loading = 0.0
    try:
        doc = scenario_document(args)  # a scenario file that is not a Scenario is refused here
        if args.file:
            state = local_state(args.file)
            loading = time.perf_counter() - started
            started = time.perf_counter()
            changes = scenario.parse(doc, source)
            data = (report.sweep_result(_sweep_with_progress(state, each, changes), args.top) if each
                    else report.report(whatif.simulate(state, changes)))
        else:
            scenario.parse(doc, source)  # refused here, as a local run would refuse it
            params = {k: v for k, v in (("each", each), ("top", str(args.top) if args.top else None)) if v}
            data = api.request("POST", "/v1/simulate", params=params, json=doc, busy_wait_s=BUSY_WAIT_S, timeout=ANSWER_TIMEOUT)
    except scenario.ScenarioError as exc:
        raise CliError(str(exc), 1) from None
    elapsed = time.perf_counter() - started
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
    elif each:
        print_sweep(data, args.top or SWEEP_ROWS, chosen=args.top is not None)
    else:
        print_report(data)
    if args.output not in ("json", "yaml") and data.get("hold"):  # the fleet as it is, which changes on hold keep
        print(f"\n{data['hold']}")
    read = f" (reading the manifests and planning today: {loading:.2f} s)" if args.file else ""
    print(f"\nsimulated in {elapsed:.2f} s{read}; nothing was changed", file=sys.stderr)
    return 0


def _sweep_with_progress(state: whatif.State, by: str, changes: scenario.Changes) -> sweep.SweepResult:
    """A sweep, with a progress bar on a terminal (a 10,000-site sweep takes a while)."""
    if not sys.stderr.isatty():
        return sweep.sweep_under(state, by, changes)  # type: ignore[arg-type]
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"losing each {by}", total=None)
        return sweep.sweep_under(state, by, changes,  # type: ignore[arg-type]
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))


def _ms(x: float | None, metrics: dict[str, Any] | None = None) -> str:
    if metrics is not None and not metrics["demand"]:
        return "no demand"
    return "unserved" if x is None else f"{x:.1f}"


def _rps(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"  # "-": a control plane before per-point unserved demand


def _unserved(metrics: dict[str, Any]) -> str:
    """Unserved demand and its share of all demand: '180 of 854 (21%)'."""
    unserved, total = metrics["unservedRps"], metrics.get("demandRps")
    if total is None:  # a control plane before demandRps
        return f"{unserved:g}"
    return f"{unserved:g} of {total:g} ({100 * unserved / total:.0f}%)" if total else f"{unserved:g}"


def print_report(r: dict[str, Any]) -> None:
    s = r["summary"]
    print(f"Scenario {r['name']}: {r['scenario']}")
    print(f"  {s['moved']} replica(s) moved, {s['added']} added, {s['removed']} removed, "
          f"{s['unschedulableReplicas']} no longer fit; residency crossings: {s['residencyCrossings']}")
    if r.get("method") in METHODS:  # a control plane before 'method' says nothing of it
        print(f"  {METHODS[r['method']]}")
    print()
    b, a = r["before"], r["after"]
    render.table("Today vs the scenario", ["", "TODAY", "SCENARIO"], [
        ["replicas", b["replicas"], a["replicas"]],
        ["latency p50 ms, unserved as slowest", _ms(b["latencyP50Ms"], b), _ms(a["latencyP50Ms"], a)],
        ["latency p95 ms, unserved as slowest", _ms(b["latencyP95Ms"], b), _ms(a["latencyP95Ms"], a)],
        ["unserved rps (share of demand)", _unserved(b), _unserved(a)],
        ["power W", f"{b['watts']:.0f}", f"{a['watts']:.0f}"],
        ["gCO2/h", f"{b['gramsCO2PerHour']:.0f}", f"{a['gramsCO2PerHour']:.0f}"],
    ])
    if r["moves"]:
        print()
        render.table("Replicas moved", ["DEPLOYMENT", "FROM", "TO", "VARIANT"],
                     [[m["deployment"], m["from"], m["to"], m["variant"]] for m in r["moves"][:50]])
        _more(len(r["moves"]), "")
    if r["unschedulable"]:
        print()
        render.table("Deployments short of replicas", ["DEPLOYMENT", "PHASE", "PLACED/WANTED", "NEW", "REASON"],
                     [[u["deployment"], u["phase"], f"{u['placed']}/{u['wanted']}", u["newlyShort"], u["reason"]] for u in r["unschedulable"][:50]])
        _more(len(r["unschedulable"]), " deployments short")
    before = {p["point"]: p for p in b["demand"]}
    rows = [[p["point"], f"{p['rps']:g}", _ms(before.get(p["point"], {}).get("p50Ms")), _ms(before.get(p["point"], {}).get("p95Ms")),
             _rps(before.get(p["point"], {}).get("unservedRps")), _ms(p["p50Ms"]), _ms(p["p95Ms"]), _rps(p.get("unservedRps"))]
            for p in a["demand"]]
    if rows:
        print()
        render.table("Predicted latency per demand point (ms; demand no replica serves counts as slowest)",
                     ["DEMAND", "RPS", "P50 TODAY", "P95 TODAY", "UNSERVED RPS TODAY", "P50", "P95", "UNSERVED RPS"], rows[:50])
        _more(len(rows), " demand points")
    crossings = r["residency"]["crossings"]
    print(f"\nResidency audit: {len(crossings)} crossing(s)" + ("" if not crossings else ": " + ", ".join(f"{c['deployment']}@{c['site']}" for c in crossings[:10])))


#: How a what-if was planned (``whatif.Planned.method``), as the report says it.
METHODS = {
    "repair": "planned by repair: the plan in force repaired, as the next pass would, only the lost replicas moving",
    "full": "planned in full: every deployment planned again (planner.plan), other replicas may move too",
}


def _more(count: int, what: str, shown: int = 50) -> None:
    """Say that a table shows only the first ``shown`` of ``count`` rows."""
    if count > shown:
        print(f"... and {count - shown} more{what} (-o json for all)")


def _names(names: list[str], shown: int = 2) -> str:
    """The first ``shown`` names and how many more: 'd03, d07 +1' ('-' for none)."""
    if not names:
        return "-"
    more = f" +{len(names) - shown}" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


#: The rows of a sweep's text table without --top.
SWEEP_ROWS = 15


def print_sweep(r: dict[str, Any], top: int, chosen: bool = False) -> None:
    """The sweep's first ``top`` rows, and how many it leaves out (``chosen``: --top gave
    ``top``, and the control plane sent only that many, -o json too)."""
    under = f" after the scenario ({r['scenario']})" if r.get("scenario", "no change") != "no change" else ""
    print(f"N-1 sweep by {r['by']}{under}: {r['swept']} lost one at a time; most harmful first\n")
    render.table(None, ["RANK", r["by"].upper(), "SITES", "REPLICAS LOST", "MOVED", "NO LONGER FIT", "DEPLOYMENTS SHORT",
                        "UNSERVED RPS", "P95 ms (Δ)", "gCO2/h"], [
        [i["rank"], i["target"], i["sites"], i["replicasLost"], i["moved"], i["unschedulableReplicas"],
         _names(i.get("deploymentsShort", [])), f"{i['unservedRps']:g}",
         f"{_ms(i['latencyP95Ms'])} ({i['latencyP95DeltaMs']:+.1f})" if i["latencyP95DeltaMs"] is not None
         else _ms(i["latencyP95Ms"], r["before"]),  # a loss changes no declared demand: today's says whether there is any
         f"{i['gramsCO2PerHour']:.0f}"]
        for i in r["ranked"][:top]
    ])
    left = r["swept"] - len(r["ranked"][:top])
    if left > 0:
        print(f"... and {left} more ({'a larger --top for more' if chosen else '--top N or -o json for all'})")
