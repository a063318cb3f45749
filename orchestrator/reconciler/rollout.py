"""Which edge sites of a deployment get a new artifact version now: canary steps and
``maxUnavailable``, decided afresh each pass from what the agents report.

A site that serves an older version of the deployment's model is *waiting*; one that was
sent the new version and does not serve it yet is *switching* (an agent keeps serving the
old version until the new one is verified and loaded, so a switching site still answers,
unless the deployment's ``strategy: replaceWhenFull`` let an agent whose memory cannot hold
both unload the old one first: such a site is *replacing*); one that serves it is *upgraded*. A site that served no version gets the new one at once:
there is nothing there to protect (while a rollout is halted it gets the version the other
sites keep). When no site serves or keeps another version (a deployment's first load)
there is no rollout: its status has no ``rollout`` block, unless the load failed (the halt).
Under ``replaceWhenFull`` a site that serves nothing keeps another version when its agent
says it unloaded one first for the new one (``replaced_sha256``, which it loads again if
the new one fails): that site is *replacing*, and the rollout goes on. An agent of an
earlier version does not say, so a site of it serving nothing under that strategy is taken
as one that may have. A site whose agent has joined but not reported yet (it restarted, or this
control plane did) is sent again what it was last sent, or nothing this pass. A switching
site is known by what it was last sent or, after a control-plane restart, by what its agent
says it was asked for; one whose agent reports any failed attempt at the new version
halts the rollout.

With ``canarySteps`` ``[10, 50]``, the first ``ceil(10 % of the sites)`` switch first; the
next step opens once that many serve the new version, and the last (100 %) once half do.
``maxUnavailable`` bounds how many sites switch at once (a count, or a percentage of the
sites being upgraded, rounded down; at least one; 1 by default). When a switching site
reports that the new version failed (a corrupt artifact, a model onnxruntime cannot load),
the rollout halts: no further site is sent it, the failing site keeps serving its old
version, and the deployment's status says which site failed and why. Applying a fixed
version (a new sha256) starts a new rollout.

Nothing is stored: the state is what the agents report and what they were last sent, so a
control plane that restarts mid-rollout resumes it where the fleet is, halt included.
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
    replacing: tuple[str, ...] = ()  # switching sites that serve no version meanwhile (replaceWhenFull)

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
        if self.replacing:
            out["replacing"] = list(self.replacing)
        if self.failed:
            site, message = self.failed[0]
            out["halted"] = f"{site} could not load version {self.sha256[:12]}: {message}"
        return out


@dataclass(frozen=True)
class Decision:
    new: frozenset[str]  # sites sent the version rolling out
    kept: Mapping[str, str]  # site -> the older sha256 it keeps for now
    held: frozenset[str]  # sites sent nothing this pass: their agent has not reported yet
    rollout: Rollout | None  # None: no site is on another version


def plan(
    spec: schema.Rollout,
    model: str,
    sha256: str,
    sites: Iterable[str],
    agents: Mapping[str, agent_model.AgentStatus],
    sent: Mapping[str, agent_model.Assignment | None],
) -> Decision:
    """Where the version ``sha256`` of ``model`` goes this pass. ``sent`` is each site's
    last assignment of the model from this control plane (None after a restart: the
    agent's own report of what it was asked for stands in)."""
    upgraded, switching, waiting, fresh, unknown = [], [], {}, [], []
    failed: list[tuple[str, str]] = []
    replacing: list[str] = []
    empty = 0  # switching sites that serve nothing yet
    for site in sorted(set(sites)):
        agent = agents.get(site)
        if agent is None or not agent.reported:
            unknown.append(site)  # joined, not reported yet: what it serves is not known
            continue
        state = agent.models.get(model)
        serving = state.serving_sha256 if state is not None else ""
        prior = sent.get(site)
        asked = prior.sha256 if prior is not None else (state.sha256 if state is not None else "")
        if serving == sha256:
            upgraded.append(site)
        elif asked == sha256:
            switching.append(site)
            if not serving:
                empty += 1
                if _may_have_replaced(state, spec):
                    replacing.append(site)
            if state is not None and state.sha256 == sha256 and (
                    state.failures or state.phase is agent_model.ModelPhase.FAILED):
                failed.append((site, state.message))
        elif serving:
            waiting[site] = serving
        else:
            fresh.append(site)
    new: set[str] = {*upgraded, *fresh}
    kept: dict[str, str] = {}
    promoted: list[str] = []
    step: int | None = None
    if switching or waiting:
        total = len(upgraded) + len(switching) + len(waiting)
        cap = total
        for percent in sorted(set(spec.canarySteps)):
            allowed = math.ceil(percent / 100 * total)
            if len(upgraded) < allowed:
                cap, step = allowed, percent
                break
        at_once = _max_switching(spec.maxUnavailable, total)
        slots = 0 if failed else max(0, min(cap - len(upgraded) - len(switching), at_once - len(switching)))
        promoted = list(waiting)[:slots]
        kept = {site: old for site, old in waiting.items() if site not in promoted}
        new.update(switching, promoted)
        if failed and kept:
            # Halted: a site that serves nothing yet gets the version the others keep.
            good = max(set(kept.values()), key=list(kept.values()).count)
            kept.update((site, good) for site in fresh)
            new.difference_update(fresh)
    # Even when every site that reported is upgraded: one that has not may still serve an
    # older version, and switching it now would pass the canary steps and maxUnavailable.
    held = {site for site in unknown if sent.get(site) is None}
    for site in unknown:  # resent what it was last sent, or nothing at all this pass
        prior = sent.get(site)
        if prior is not None and prior.sha256 == sha256:
            new.add(site)
        elif prior is not None:
            kept[site] = prior.sha256
    # A first load: no site serves or keeps another version (those switching serve nothing
    # yet, and unloaded none for it), so there is no rollout to speak of, unless one failed
    # (the halt says so).
    first_load = not waiting and not failed and empty == len(switching) and not replacing
    if (not switching and not waiting and not kept) or (first_load and not kept):
        return Decision(frozenset(new), {}, frozenset(held), None)
    state = Rollout(sha256, tuple(upgraded), tuple(switching) + tuple(promoted), tuple(kept), tuple(failed), step,
                    tuple(replacing))
    return Decision(frozenset(new), kept, frozenset(held), state)


def _may_have_replaced(state: agent_model.ModelState | None, spec: schema.Rollout) -> bool:
    """Whether a switching site that serves nothing may have unloaded an older version for
    the new one (replaceWhenFull), which it keeps to load again if the new one fails: its
    agent says so, or, an agent of an earlier version, does not say under that strategy.
    An agent holding no state of the model holds no version of it."""
    if state is None:
        return False
    if state.replaced_sha256 is not None:
        return bool(state.replaced_sha256)
    return spec.strategy == "replaceWhenFull"


def _max_switching(value: int | str, sites: int) -> int:
    if isinstance(value, str):
        return max(1, math.floor(int(value.rstrip("%")) / 100 * sites))
    return max(1, value)
