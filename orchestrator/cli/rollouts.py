"""``edgeplane apply --wait``: follow the deployments an apply created or changed until they serve.

An apply returns once the control plane stored the manifests; a GitOps job or a script
wants to know when the rollout it started is over, a new Model version's included (the
deployments that use a Model the apply changed are followed until their status was
computed against it: ``status.modelGeneration``). :func:`judge` reads one deployment's
status against the generation the apply gave it (pure: the phases that mean done, failed
or still going are decided there, as docs/api.md, "Waiting for a deployment", describes);
:func:`follow` asks the control plane until every one is judged, or ``--timeout``,
saying once when it holds every change (:mod:`orchestrator.cli.hold`, as ``drain --wait``
says it), which no deployment's status shows while nothing is planned.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.cli import events, hold
from orchestrator.cli.http import ApiClient, CliError, RetryLater
from orchestrator.urlpath import path_segment

DEFAULT_WAIT_S = 600.0
#: every wanted replica placed and answering (ScaledToZero: placed on demand, by design)
DONE_PHASES = ("Running", "ScaledToZero")
#: the control plane has stopped short where waiting mends nothing, a person must act: a
#: Model that does not exist (a halted rollout too, whatever the phase). Unschedulable,
#: Failing and Degraded are not among them: the control plane also says so of what mends
#: itself (a fresh fleet's first apply is Unschedulable until its agents join and its data
#: centres first answer; a data centre briefly unreachable), so they are waited on until
#: the timeout, as ``kubectl rollout status`` waits on pods that cannot be scheduled yet.
FAILED_PHASES = ("Invalid",)

WAITING, DONE, FAILED = "waiting", "done", "failed"


@dataclass(frozen=True)
class Verdict:
    state: str  # WAITING, DONE or FAILED
    said: str  # the deployment's state in words, as a progress line ends


@dataclass(frozen=True)
class Target:
    """What the apply asked of one deployment: its spec's ``generation``, and the
    ``model_generation`` of its Model when the apply changed that Model (None otherwise)."""

    generation: int
    model_generation: int | None = None

    def awaited(self) -> str:
        model = f" and its Model's generation {self.model_generation}" if self.model_generation is not None else ""
        return f"generation {self.generation}{model}"


def judge(status: dict[str, Any], generation: int, model_generation: int | None = None) -> Verdict:
    """Where a deployment stands: ``status`` as ``GET /v1/modeldeployments/NAME`` answers it,
    ``generation`` the one the apply gave its spec, ``model_generation`` the one it gave the
    deployment's Model (None: the apply left the Model as it was). A status of an older
    generation, or computed against an older Model (or none yet), describes another spec:
    still waiting, whatever its phase."""
    observed = status.get("observedGeneration")
    if not isinstance(observed, int) or observed < generation:
        return Verdict(WAITING, f"waiting for the control plane to plan generation {generation}")
    if model_generation is not None:
        against = status.get("modelGeneration")  # absent from a status an older control plane wrote
        if not isinstance(against, int) or against < model_generation:
            return Verdict(WAITING, f"waiting for the control plane to plan its Model's generation {model_generation}")
    phase = str(status.get("phase", "Pending"))
    said = f"{phase}, {status.get('readyReplicas', 0)}/{status.get('wantedReplicas', 0)} ready"
    rollout = status.get("rollout")
    if rollout:
        total = rollout.get("upgraded", 0) + rollout.get("switching", 0) + rollout.get("waiting", 0)
        said += f", rollout {rollout.get('upgraded', 0)}/{total}" + (" halted" if "halted" in rollout else "")
    if status.get("reason"):
        said += f": {status['reason']}"
    if phase in FAILED_PHASES or (rollout and "halted" in rollout):
        return Verdict(FAILED, said)
    return Verdict(DONE if phase in DONE_PHASES and not rollout else WAITING, said)


def followed(results: list[dict[str, Any]], deployments: Sequence[dict[str, Any]] = ()) -> dict[str, Target]:
    """The deployments an apply's ``results`` created or changed, with the generation each
    got, and those of ``deployments`` (the stored ones, as listed) whose Model it changed:
    a new version rolls out to them without changing their spec."""
    wanted = {r["name"]: Target(int(r.get("generation", 1))) for r in results
              if r["kind"] == "ModelDeployment" and r["action"] in ("created", "configured")}
    models = {r["name"]: int(r.get("generation", 1)) for r in results if r["kind"] == "Model" and r["action"] == "configured"}
    for d in deployments:
        name, model = d["metadata"]["name"], (d.get("spec") or {}).get("model")
        if model in models:
            generation = wanted[name].generation if name in wanted else int(d["metadata"].get("generation", 1))
            wanted[name] = Target(generation, models[model])
    return wanted


def changed_models(results: list[dict[str, Any]]) -> list[str]:
    """The Models an apply's ``results`` changed."""
    return [r["name"] for r in results if r["kind"] == "Model" and r["action"] == "configured"]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def follow_apply(api: ApiClient, args: argparse.Namespace, results: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """:func:`follow` the deployments an apply's ``results`` created or changed, and those
    that use a Model it changed."""
    stored = api.request_list("/v1/modeldeployments")["items"] if changed_models(results) else []
    return follow(api, args, followed(results, stored))


def follow(api: ApiClient, args: argparse.Namespace, wanted: dict[str, Target]) -> tuple[int, dict[str, Any]]:
    """Follow ``wanted`` (name -> what the apply asked of it) until each is done or failed, or ``--timeout``:
    a progress line on stderr each time a deployment's state changes, then one line each
    for those that failed or are still going. Returns the exit code and what ``-o json``
    adds to the apply's answer. A control plane away (restarting) is said once and asked
    again until the deadline; Ctrl-C stops following, and the apply stands."""
    if not wanted:
        say("nothing to wait for: the apply created or changed no deployment, nor a Model one uses")
        return 0, _summary(wanted, {}, {})
    deadline = time.monotonic() + args.timeout
    verdicts = {name: Verdict(WAITING, f"waiting for the control plane to plan {g.awaited()}") for name, g in wanted.items()}
    statuses: dict[str, dict[str, Any]] = {}
    away = False
    held = ""  # why the control plane holds every change (a stored object it cannot read), said once
    try:
        while True:
            try:
                for name, target in wanted.items():
                    if verdicts[name].state != WAITING:
                        continue
                    obj = api.request("GET", f"/v1/modeldeployments/{path_segment(name)}")
                    statuses[name] = obj.get("status") or {}
                    verdict = judge(statuses[name], target.generation, target.model_generation)
                    if verdict != verdicts[name]:
                        say(f"modeldeployment/{name}: {verdict.said}")
                    verdicts[name] = verdict
                if any(v.state == WAITING for v in verdicts.values()):
                    held = hold.noticed(api, held, say)
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
        return 130, _summary(wanted, verdicts, statuses, held)
    return _ended(args, wanted, verdicts, statuses, away, held)


def _ended(args: argparse.Namespace, wanted: dict[str, Target], verdicts: dict[str, Verdict],
           statuses: dict[str, dict[str, Any]], away: bool, held: str) -> tuple[int, dict[str, Any]]:
    done = [n for n, v in verdicts.items() if v.state == DONE]
    failed = {n: v for n, v in verdicts.items() if v.state == FAILED}
    waiting = {n: v for n, v in verdicts.items() if v.state == WAITING}
    say(f"{len(done)} of {len(wanted)} deployment(s) serving" + (f": {', '.join(done)}" if done else ""))
    for name, v in failed.items():
        say(f"error: modeldeployment/{name} stopped short: {v.said}")
    for name, v in waiting.items():
        unanswered = " (the control plane did not answer)" if away else hold.suffix(held)
        say(f"error: modeldeployment/{name} not serving within {args.timeout:g} s (waiting for {wanted[name].awaited()} "
            f"to be Running), still {v.said}{unanswered}")
    return (0 if not failed and not waiting else 1), _summary(wanted, verdicts, statuses, held)


def _summary(wanted: dict[str, Target], verdicts: dict[str, Verdict], statuses: dict[str, dict[str, Any]],
             held: str = "") -> dict[str, Any]:
    return {"done": all(v.state == DONE for v in verdicts.values()), **({"hold": held} if held else {}),
            "deployments": {n: {"state": verdicts[n].state, "generation": g.generation, "status": statuses.get(n, {}),
                                **({"modelGeneration": g.model_generation} if g.model_generation is not None else {})}
                            for n, g in wanted.items()}}
