"""The object commands: ``apply``, ``plan``, ``get``, ``describe`` and ``delete``.

They read and write the control plane's objects (sites, models, deployments...) and its
views of them (placements, events, cascades). Manifests given with ``-f`` travel as one
bundle, applied or deleted all at once or not at all; ``apply --dry-run`` and ``plan``
print what the planner would change per site before anything does; ``apply --wait`` then
follows the deployments it created or changed until they serve (``rollouts``).
"""

from __future__ import annotations

import argparse
import pathlib
import types
from typing import Any

from orchestrator import reasons
from orchestrator.cli import events, render, rollouts, textfile
from orchestrator.cli.http import ApiClient, CliError, NoRoute
from orchestrator.manifests.errors import ManifestError
from orchestrator.urlpath import path_segment

FILE_HELP = "file, directory or - for stdin; repeat -f for more (one atomic bundle)"
#: ``plan --exit-code`` (and ``apply --dry-run --exit-code``): the plan shows a change; 0, it shows none
EXIT_CHANGES = 4
EXIT_CODE_HELP = (f"exit {EXIT_CHANGES} when the plan shows a change (an object created or configured, a replica added, "
                  "removed or moved), 0 when it shows none; errors keep their codes")


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
                       headers=with_reason({"content-type": "application/yaml"}, args))


def cmd_apply(api: ApiClient, args: argparse.Namespace) -> int:
    if args.exit_code and not args.dry_run:  # a real apply changes what it changes: nothing to tell apart
        raise CliError("--exit-code goes with --dry-run (or plan)", 2)
    if args.wait and args.dry_run:
        raise CliError("--dry-run changes nothing, so there is nothing to --wait for", 2)
    result = _post_apply(api, args, args.dry_run)
    code = dry_run_exit_code(result, args.exit_code)
    if args.output not in ("json", "yaml"):
        suffix = " (dry run)" if args.dry_run else ""
        for r in result["results"]:
            print(f"{r['kind'].lower()}/{r['name']} {r['action']}{suffix}", flush=True)
        if args.dry_run and "plan" in result:
            _print_plan(result["plan"])
    if args.wait:  # -o json/yaml: one document, the apply's answer and how the wait ended
        code, result["wait"] = rollouts.follow_apply(api, args, result["results"])
    if args.output in ("json", "yaml"):
        render.dump(result, args.output)
    return code


def cmd_plan(api: ApiClient, args: argparse.Namespace) -> int:
    result = _post_apply(api, args, dry_run=True)
    if args.output in ("json", "yaml"):
        # what the table says, whole: each object's would-be action, then the replica plan
        render.dump({"results": result["results"], **result["plan"]}, args.output)
    else:
        for r in result["results"]:
            print(f"{r['kind'].lower()}/{r['name']} would be {r['action']}")
        _print_plan(result["plan"])
    return dry_run_exit_code(result, args.exit_code)


def dry_run_exit_code(dry_run: dict[str, Any], asked: bool) -> int:
    """A dry run's exit code: with ``--exit-code`` (``asked``), :data:`EXIT_CHANGES` when
    its answer shows a change, as its table would: an object that would be created or
    configured, or a replica that would be added, removed or moved; 0 otherwise."""
    if not asked:
        return 0
    objects = any(r["action"] != "unchanged" for r in dry_run.get("results", []))
    replicas = any(c["change"] != "unchanged" for c in (dry_run.get("plan") or {}).get("changes", []))
    return EXIT_CHANGES if objects or replicas else 0


def _print_plan(plan: dict[str, Any]) -> None:
    changes = [c for c in plan.get("changes", []) if c["change"] != "unchanged"]
    print()
    if changes:
        render.table("Replica changes per site", ["SITE", "DEPLOYMENT", "VARIANT", "BEFORE", "AFTER", "GPUS PER REPLICA", "CHANGE"],
                     [[c["site"], c["deployment"], c["variant"], c["before"], c["after"], _gpus(c), _change(c)] for c in changes])
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
    if plan.get("hold"):  # nothing planned takes effect until the hold ends
        print(f"\n{plan['hold']}")


def _change(change: dict[str, Any]) -> str:
    """The CHANGE column: a Ray Serve update names what changed (``updated: importPath``,
    after the count's change where there is one: ``added, updated: importPath``); a
    version roll says from which version to which (``model@version`` where the deployment
    names another Model) and the rollout's strategy where it is not the default, after the
    count's change where there is one (``added, new version a -> b``)."""
    if "updated" in change:
        update = f"updated: {', '.join(change['updated'])}"
        return update if change["change"] == "updated" else f"{change['change']}, {update}"
    if "version" not in change:
        return change["change"]
    strategy = f" ({change['strategy']})" if "strategy" in change else ""
    if "model" in change:
        roll = f"new version {change['previousModel']}@{change['previousVersion']} -> {change['model']}@{change['version']}{strategy}"
    else:
        roll = f"new version {change['previousVersion']} -> {change['version']}{strategy}"
    return roll if change["change"] == "new version" else f"{change['change']}, {roll}"


def _gpus(change: dict[str, Any]) -> str:
    n = change.get("gpusPerReplica")
    if not n:
        return "-"
    model = f"{change['gpuModel']} " if change.get("gpuModel") else ""
    return f"{n}×{model}{change['gpuMemoryGiBPerGpu']:g} GiB"


GET_KINDS = "sites, models, modeldeployments, placements, events, cascades"
#: The kinds whose lists page (``limit`` and ``continue``), as the control plane names them
#: (``catalog.KIND_ALIASES``, not imported: it loads the store). Any other view (tokens,
#: the control plane) is one answer, and refuses ``limit``.
PAGED_KINDS = frozenset({"site", "sites", "model", "models", "modeldeployment", "modeldeployments", "deployment", "deployments", "md"})


def cmd_get(api: ApiClient, args: argparse.Namespace) -> int:
    if args.kind in ("placements", "placement"):
        data = api.request_list("/v1/placements")
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
        return events.show_events(api, args.output, name=args.name)  # NAME: the events about objects of that name
    if args.kind in ("cascades", "cascade"):
        from orchestrator.cli import cascade as cascade_cli  # numpy and the cascade rules: only for this command

        return cascade_cli.cmd_get(api, args)
    path = f"/v1/{path_segment(args.kind)}" + (f"/{path_segment(args.name)}" if args.name else "")
    try:
        data = api.request_list(path) if not args.name and args.kind.lower() in PAGED_KINDS else api.request("GET", path)
    except CliError as exc:  # the control plane knows its object kinds; `get` reads three more views
        if str(exc).startswith("unknown kind"):
            raise CliError(f"unknown kind {args.kind!r}; use one of: {GET_KINDS}", reason=exc.reason, said=exc.said) from None
        raise
    if args.output in ("json", "yaml") or data.get("kind") not in render.COLUMNS:  # a view with no table: as YAML
        render.dump(data, args.output if args.output in ("json", "yaml") else "yaml")
        return 0
    items = data["items"] if "items" in data else [data]
    render.objects(data["kind"], items)
    return 0


def cmd_describe(api: ApiClient, args: argparse.Namespace) -> int:
    data = api.request("GET", f"/v1/{path_segment(args.kind)}/{path_segment(args.name)}", params={"describe": "true"})
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    described_events = data.pop("events", [])
    render.dump({k: v for k, v in data.items()}, "yaml")
    cascade = data.get("cascade")
    if isinstance(cascade, dict) and cascade.get("capture") is not None:  # as get cascades shows it
        from orchestrator.cli import cascade as cascade_cli  # numpy and the cascade rules: for a cascade only

        print(f"Captured today: {cascade_cli.captured_today(cascade['capture'])}")
        if (said := cascade_cli.capture_stopped(cascade["name"], cascade["capture"])) is not None:
            print(said)
    if described_events:
        print("Events:")
        metadata = data.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        render.table(None, *events.described_events(data.get("kind"), name, described_events))
    return 0


def with_reason(headers: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    """``--reason`` travels as X-Edgeplane-Reason (percent-encoded when it is not ASCII) and lands in the event log."""
    reason = getattr(args, "reason", None)
    return {**headers, reasons.HEADER: reasons.to_header(reason)} if reason else headers


def cmd_delete(api: ApiClient, args: argparse.Namespace) -> int:
    if args.file:  # one bundle, deleted in one transaction: all of it or nothing
        params = {"ignoreNotFound": "true"} if args.ignore_not_found else {}
        data = api.request("POST", "/v1/delete", content=_read_manifests(args.file).encode(), params=params,
                           headers=with_reason({"content-type": "application/yaml"}, args))
        if args.output in ("json", "yaml"):
            render.dump(data, args.output)
            return 0
        for result in data["results"]:
            print(f"{result['kind'].lower()}/{result['name']} deleted")
        if not data["results"]:
            print("Nothing to delete.")
        return 0
    if not (args.kind and args.name):
        raise CliError("give -f FILE or KIND NAME", 2)
    if args.keep_site and not args.abandon_applications:
        raise CliError("--keep-site goes with --abandon-applications", 2)
    path = f"/v1/{path_segment(args.kind)}/{path_segment(args.name)}"
    if args.keep_site:
        data = _abandon_keeping_site(api, path, args)
    else:
        params = {"abandonApplications": "true"} if args.abandon_applications else {}
        data = api.request("DELETE", path, params=params, headers=with_reason({}, args))
    if args.output in ("json", "yaml"):
        render.dump(data, args.output)
        return 0
    print(f"{args.kind.lower()}/{args.name} {'deleted' if data.get('action') == 'deleted' else data['action']}")
    return 0


def _abandon_keeping_site(api: ApiClient, path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Keeping the Site is its own route, never a flag of DELETE: a control plane of an
    earlier release, which does not read the flag, would delete the Site; it refuses the route."""
    try:
        return api.request("POST", f"{path}/abandon-applications", headers=with_reason({}, args))
    except NoRoute as exc:
        raise CliError(f"the control plane is of an earlier release than this CLI and cannot keep the Site "
                       f"({exc}): nothing was deleted; upgrade it, or run delete without --keep-site to delete the Site too") from None


def _loader() -> types.ModuleType:
    """The manifest loader (and its schema, ~0.2 s to import): only for commands that read files."""
    from orchestrator.manifests import loader

    return loader

