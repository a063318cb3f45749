"""``edgeplane apply --wait``: follow the deployments an apply created or changed until they serve.

An apply returns once the control plane stored the manifests; a GitOps job or a script
wants to know when the rollout it started is over. :func:`judge` reads one deployment's
status against the generation the apply gave it (pure: the phases that mean done, failed
or still going are decided there, as docs/api.md, "Waiting for a deployment", describes);
:func:`follow` asks the control plane until every one is judged, or ``--timeout``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.cli import events
from orchestrator.cli.http import ApiClient, CliError, RetryLater
from orchestrator.urlpath import path_segment

DEFAULT_WAIT_S = 600.0
#: every wanted replica placed and answering (ScaledToZero: placed on demand, by design)
DONE_PHASES = ("Running", "ScaledToZero")
#: the control plane has stopped short: no fitting site, fewer than wanted, a halted
#: rollout or a replica that fails, a Model that does not exist; waiting more mends none
FAILED_PHASES = ("Unschedulable", "Degraded", "Failing", "Invalid")

WAITING, DONE, FAILED = "waiting", "done", "failed"


@dataclass(frozen=True)
class Verdict:
    state: str  # WAITING, DONE or FAILED
    said: str  # the deployment's state in words, as a progress line ends


def judge(status: dict[str, Any], generation: int) -> Verdict:
    """Where a deployment stands: ``status`` as ``GET /v1/modeldeployments/NAME`` answers it,
    ``generation`` the one the apply gave its spec. A status of an older generation (or
    none yet) describes another spec: still waiting, whatever its phase."""
    observed = status.get("observedGeneration")
    if not isinstance(observed, int) or observed < generation:
        return Verdict(WAITING, f"waiting for the control plane to plan generation {generation}")
    phase = str(status.get("phase", "Pending"))
    said = f"{phase}, {status.get('readyReplicas', 0)}/{status.get('wantedReplicas', 0)} ready"
    rollout = status.get("rollout")
    if rollout:
        total = rollout.get("upgraded", 0) + rollout.get("switching", 0) + rollout.get("waiting", 0)
        said += f", rollout {rollout.get('upgraded', 0)}/{total}" + (" halted" if "halted" in rollout else "")
    if status.get("reason"):
        said += f": {status['reason']}"
    if phase in DONE_PHASES:
        return Verdict(DONE, said)
    return Verdict(FAILED if phase in FAILED_PHASES else WAITING, said)


def followed(results: list[dict[str, Any]]) -> dict[str, int]:
    """The deployments an apply's ``results`` created or changed, with the generation each got."""
    return {r["name"]: int(r.get("generation", 1)) for r in results
            if r["kind"] == "ModelDeployment" and r["action"] in ("created", "configured")}


def changed_models(results: list[dict[str, Any]]) -> list[str]:
    """The Models an apply's ``results`` changed: a new version rolls out to the
    deployments that use it without changing their spec, so no generation tells its
    status apart from the one before the apply, and ``--wait`` cannot follow it."""
    return [r["name"] for r in results if r["kind"] == "Model" and r["action"] == "configured"]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def follow_apply(api: ApiClient, args: argparse.Namespace, results: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """:func:`follow` the deployments an apply's ``results`` created or changed."""
    for model in changed_models(results):
        say(f"note: model/{model} changed: --wait does not follow a new version's rollout to the deployments that already "
            "use it ('edgeplane get modeldeployments' shows it)")
    return follow(api, args, followed(results))


def follow(api: ApiClient, args: argparse.Namespace, wanted: dict[str, int]) -> tuple[int, dict[str, Any]]:
    """Follow ``wanted`` (name -> generation) until each is done or failed, or ``--timeout``:
    a progress line on stderr each time a deployment's state changes, then one line each
    for those that failed or are still going. Returns the exit code and what ``-o json``
    adds to the apply's answer. A control plane away (restarting) is said once and asked
    again until the deadline; Ctrl-C stops following, and the apply stands."""
    if not wanted:
        say("nothing to wait for: the apply created or changed no deployment")
        return 0, _summary(wanted, {}, {})
    deadline = time.monotonic() + args.timeout
    verdicts = {name: Verdict(WAITING, f"waiting for the control plane to plan generation {g}") for name, g in wanted.items()}
    statuses: dict[str, dict[str, Any]] = {}
    away = False
    try:
        while True:
            try:
                for name, generation in wanted.items():
                    if verdicts[name].state != WAITING:
                        continue
                    obj = api.request("GET", f"/v1/modeldeployments/{path_segment(name)}")
                    statuses[name] = obj.get("status") or {}
                    verdict = judge(statuses[name], generation)
                    if verdict != verdicts[name]:
                        say(f"modeldeployment/{name}: {verdict.said}")
                    verdicts[name] = verdict
            except CliError as exc:
                pause = events.wait_to_ask_again(exc, args.interval)
                if pause is None:  # refused (a deployment deleted meanwhile, a token revoked): asking again is refused again
                    raise
                if not away:
                    problem = f"{exc} (HTTP {exc.status})" if isinstance(exc, RetryLater) else str(exc)
                    say(f"warning: control plane unreachable, retrying: {problem}")
                away = True
            else:
                if away:
                    say("the control plane answers again; following")
                away = False
                pause = args.interval
            if all(v.state != WAITING for v in verdicts.values()) or time.monotonic() >= deadline:
                break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        say("interrupted: stopped following; what was applied stands and its rollout goes on")
        return 130, _summary(wanted, verdicts, statuses)
    return _ended(args, wanted, verdicts, statuses, away)


def _ended(args: argparse.Namespace, wanted: dict[str, int], verdicts: dict[str, Verdict],
           statuses: dict[str, dict[str, Any]], away: bool) -> tuple[int, dict[str, Any]]:
    done = [n for n, v in verdicts.items() if v.state == DONE]
    failed = {n: v for n, v in verdicts.items() if v.state == FAILED}
    waiting = {n: v for n, v in verdicts.items() if v.state == WAITING}
    say(f"{len(done)} of {len(wanted)} deployment(s) serving" + (f": {', '.join(done)}" if done else ""))
    for name, v in failed.items():
        say(f"error: modeldeployment/{name} stopped short: {v.said}")
    for name, v in waiting.items():
        unanswered = " (the control plane did not answer)" if away else ""
        say(f"error: modeldeployment/{name} not serving within {args.timeout:g} s (waiting for generation {wanted[name]} "
            f"to be Running), still {v.said}{unanswered}")
    return (0 if not failed and not waiting else 1), _summary(wanted, verdicts, statuses)


def _summary(wanted: dict[str, int], verdicts: dict[str, Verdict], statuses: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"done": all(v.state == DONE for v in verdicts.values()),
            "deployments": {n: {"state": verdicts[n].state, "generation": g, "status": statuses.get(n, {})}
                            for n, g in wanted.items()}}
