"""Which edge sites of a deployment get a new artifact version now: canary steps and
``maxUnavailable``, decided afresh each pass from what the agents report.

A site that serves an older version of the deployment's model is *waiting*; one that was
sent the new version and does not serve it yet is *switching* (an agent keeps serving the
old version until the new one is verified and loaded, so a switching site still answers);
one that serves it is *upgraded*. A site that served no version gets the new one at once:
there is nothing there to protect.

With ``canarySteps`` ``[10, 50]``, the first ``ceil(10 % of the sites)`` switch first; the
next step opens once that many serve the new version, and the last (100 %) once half do.
``maxUnavailable`` bounds how many sites switch at once (a count, or a percentage of the
sites being upgraded, rounded down; at least one); unset, there is no bound. When a switching site
reports that the new version failed (a corrupt artifact, a model onnxruntime cannot load),
the rollout halts: no further site is sent it, the failing site keeps serving its old
version, and the deployment's status says which site failed and why. Applying a fixed
version (a new sha256) starts a new rollout.

Nothing is stored: the state is what the agents report and what they were last sent, so a
control plane that restarts mid-rollout resumes it where the fleet is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.agents import model as agent_model
from orchestrator.manifests import schema


@dataclass(frozen=True)
class Rollout:
    sha256: str  # the version rolling out
    upgraded: tuple[str, ...]
    switching: tuple[str, ...]
    waiting: tuple[str, ...]
    failed: tuple[tuple[str, str], ...] = ()  # (site, what the agent said)
    step: int | None = None  # canary step open now (its percentage), None without canaries

    @property
    def done(self) -> bool:
        return not self.switching and not self.waiting

    def status(self) -> dict[str, Any]:
        """The deployment status's ``rollout`` block."""
        out: dict[str, Any] = {
            "version": self.sha256[:12],
            "upgraded": len(self.upgraded),
            "switching": len(self.switching),
            "waiting": len(self.waiting),
        }
        if self.step is not None:
            out["canaryStep"] = f"{self.step}%"
        if self.failed:
            site, message = self.failed[0]
            out["halted"] = f"{site} could not load version {self.sha256[:12]}: {message}"
        return out


def plan(
    spec: schema.Rollout,
    model: str,
    sha256: str,
    sites: Iterable[str],
    agents: Mapping[str, agent_model.AgentStatus],
    sent: Mapping[str, agent_model.Assignment | None],
) -> tuple[set[str], dict[str, str], Rollout | None]:
    """``(sites sent the new version, old sha256 kept per waiting site, the rollout)``.

    ``sent`` is each site's last assignment of ``model``; the rollout is None when no site
    is on another version.
    """
    upgraded, switching, waiting, fresh = [], [], {}, []
    failed: list[tuple[str, str]] = []
    for site in sorted(set(sites)):
        agent = agents.get(site)
        state = agent.models.get(model) if agent is not None else None
        serving = state.serving_sha256 if state is not None else ""
        prior = sent.get(site)
        if serving == sha256:
            upgraded.append(site)
        elif prior is not None and prior.sha256 == sha256:
            switching.append(site)
            if state is not None and state.sha256 == sha256 and state.phase is agent_model.ModelPhase.FAILED:
                failed.append((site, state.message))
        elif serving:
            waiting[site] = serving
        else:
            fresh.append(site)
    if not switching and not waiting:
        return {*upgraded, *fresh}, {}, None
    total = len(upgraded) + len(switching) + len(waiting)
    cap, step = total, None
    for percent in sorted(set(spec.canarySteps)):
        allowed = math.ceil(percent / 100 * total)
        if len(upgraded) < allowed:
            cap, step = allowed, percent
            break
    at_once = _max_switching(spec.maxUnavailable, total)
    slots = 0 if failed else max(0, min(cap - len(upgraded) - len(switching), at_once - len(switching)))
    promoted = list(waiting)[:slots]
    kept = {site: old for site, old in waiting.items() if site not in promoted}
    state = Rollout(sha256, tuple(upgraded), tuple(switching) + tuple(promoted), tuple(kept), tuple(failed), step)
    return {*upgraded, *switching, *promoted, *fresh}, kept, state


def _max_switching(value: int | str | None, sites: int) -> int:
    if value is None:
        return 1 << 30
    if isinstance(value, str):
        return max(1, math.floor(int(value.rstrip("%")) / 100 * sites))
    return max(1, value)
