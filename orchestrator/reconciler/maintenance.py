"""Make before break: what a pass keeps on a site the plan takes replicas off, for a drain
or any other move, and what it says.

The scheduler plans a draining site as one it may not use (``Site.draining``): each of
its replicas gets a replacement on another site that every hard rule allows (residency
first). Were the plan's placement written as it is, the drained site's replicas would be
removed, and leave the gateway's table, in the same pass that places their replacements:
requests would lose that capacity while the replacements download and load, and a
replica with nowhere to go would be removed outright. So a pass keeps, on the draining
site, as many of each deployment's replicas as the deployment needs to have as many
serving as it wants (``wanted``) counting only those elsewhere that serve now: a replica
leaves the placement (and the table, and then its agent or cluster) only once its
replacement serves, and one with nowhere allowed to go stays, reported as stuck with the
scheduler's reason. A forced drain keeps none, nor does a draining site that is lost
anyway (its agent gone, its cluster out of reach past its loss time). Such a site is
drained once it serves nothing: a lost agent answers no one, but a data centre out of
reach may still run its applications, and counts as serving until they are seen removed
or it is declared lost by the agents' rule (``DataCentreObservation.lost``); until then it
keeps its replicas as any draining site does.

Any other move is made before it breaks the same way (``keep_until_replaced``): a replica
the plan takes off a site that does not drain (its deployment's siteSelector, tiers or
demand changed, a spread, a power budget, a Site's labels or location) stays placed,
routed to and assigned while the plan's replacements do not serve yet, and the deployment
is ``Progressing`` meanwhile. Counted per (deployment, site, variant): the plan keeping 1 of
3 replicas on a site moves 2, and a data centre's replicas whose deployment switches
variant there move to the new variant's (an edge agent switches a variant in place,
answering with the old until the new one loads). Only as many as the replacements placed: with none to come,
the operator's new rules win at once. Never outside the deployment's residency, which is
the law of where requests may go, not the operator's preference (a draining site keeps no
such replica either); never on a lost site; and never past a site's capacity or power
budget (``_fitting``). Decided purely
from the snapshot and the plan; level-based, so a pass repeated after a crash keeps the
same: the kept rows are in the placement written.

A kept replica's room is its own until its replacement serves: a plan that gives it to
another deployment's newcomer is made again with the room held (``room_held``), and the
newcomer goes elsewhere or waits (``Wait``), rather than callers losing the kept replica
before its replacement answers. Planning twice costs a second plan only on the passes that
would give such room away.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
import dataclasses
from dataclasses import dataclass
from typing import Any

from orchestrator import catalog
from orchestrator import maintenance as maintenance_mod
from orchestrator.manifests import schema
from orchestrator.reconciler import inventory
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import capacity as sched_capacity
from orchestrator.scheduler import fleet as sched_fleet
from orchestrator.scheduler import model as sched_model
from orchestrator.scheduler import result as sched_result
from orchestrator.scheduler import seating
from orchestrator.store import sqlite as store_mod

ACTOR = "scheduler"


@dataclass(frozen=True)
class Stuck:
    """Replicas of ``deployment`` left on a draining site: no other allowed site takes them."""

    deployment: str
    replicas: int
    reason: str


@dataclass(frozen=True)
class Progress:
    """Where one draining site's drain stands after a pass."""

    site: str
    left: int  # replicas still placed on it
    waiting: tuple[str, ...]  # deployments whose replacements do not serve yet
    stuck: tuple[Stuck, ...]


def _replicas(n: int) -> str:
    return "1 replica stays" if n == 1 else f"{n} replicas stay"


@dataclass(frozen=True)
class Handover:
    """Replicas of a deployment (as ``variant``) kept on ``site`` (which does not drain)
    until their replacements serve."""

    site: str
    variant: str
    replicas: int

    def note(self) -> str:
        whose = "its replacement serves" if self.replicas == 1 else "their replacements serve"
        return f"{_replicas(self.replicas)} on site {self.site} until {whose}"


@dataclass(frozen=True)
class Wait:
    """Replicas of a deployment the plan would put on ``sites`` but for the room replicas
    kept there until replaced hold (``room_held``): they come once those are replaced."""

    sites: tuple[str, ...]
    replicas: int
    schedulable: bool  # with them, as many replicas as the deployment needs are placed

    def note(self) -> str:
        which = "1 replica waits" if self.replicas == 1 else f"{self.replicas} replicas wait"
        return (f"{which} for room on site {', '.join(self.sites)}, held by replicas moved off it "
                "until their replacements serve")


def waits(first: sched_result.PlanResult, second: sched_result.PlanResult,
          held: Mapping[str, object]) -> dict[str, Wait]:
    """Per deployment, its replicas that ``first`` (the plan that gave the room away) put on
    a site whose room is ``held``, and ``second`` (the plan with it held) placed nowhere."""
    out: dict[str, Wait] = {}
    for name, plan in second.deployments.items():
        gone = Counter(r.site for r in first.replicas if r.deployment == name and r.site in held)
        gone.subtract(r.site for r in second.replicas if r.deployment == name)
        before = first.deployments.get(name)
        n = min(sum(n for n in gone.values() if n > 0), (before.placed if before is not None else 0) - plan.placed)
        if n > 0:
            out[name] = Wait(tuple(sorted(site for site, k in gone.items() if k > 0)), n,
                             before is not None and before.status != sched_result.Status.UNSCHEDULABLE)
    return out


@dataclass(frozen=True)
class Stay:
    """Replicas of a deployment a drain keeps on ``site``, as its deployment's status says."""

    site: str
    replicas: int
    reason: str  # the scheduler's, for the deployment: why no other allowed site takes them

    def note(self) -> str:
        return f"{_replicas(self.replicas)} on draining site {self.site}: {self.reason}"


def stays(progress: Mapping[str, Progress]) -> dict[str, tuple[Stay, ...]]:
    """Per deployment, the replicas draining sites keep for want of another allowed site."""
    out: dict[str, list[Stay]] = {}
    for site, p in sorted(progress.items()):
        for x in p.stuck:
            out.setdefault(x.deployment, []).append(Stay(site, x.replicas, x.reason))
    return {name: tuple(found) for name, found in out.items()}


def draining_sites(s: snap.Snapshot) -> frozenset[str]:
    return frozenset(name for name, m in maintenance_mod.in_force(s.maintenance, s.site_by_name).items() if m.draining)


def _holding(s: snap.Snapshot) -> frozenset[str]:
    """The draining sites that may keep replicas until their replacements serve (``_may_hold``)."""
    return frozenset(site for site in draining_sites(s) if _may_hold(s, site))


def _may_hold(s: snap.Snapshot, site: str) -> bool:
    """Whether ``site`` may keep replicas the plan takes off it until their replacements
    serve: not one that is lost (its agent gone, its cluster out of reach past its loss
    time), whose replicas answer no one and are placed elsewhere as any lost site's are."""
    record = s.site_by_name.get(site)
    return record is not None and inventory.site_health(record, s.agent_by_site.get(site), s.datacentres.get(site),
                                                        site in s.rejoining)[0]


def _kept(rows: Iterable[store_mod.PlacementRow], keep: int, short: int,
          forced: frozenset[str] = frozenset()) -> list[tuple[store_mod.PlacementRow, int, int]]:
    """Of one deployment's ``rows`` the plan takes replicas off (each row as many replicas as
    it takes off), how many each keeps (``keep`` in all, none on a site drained by force)
    and how many of those have nowhere to go (``short`` in all, the deployment's shortfall):
    each counted once, row after row."""
    out = []
    for row in sorted(rows, key=lambda r: (r.site, r.variant)):
        if keep <= 0 or row.site in forced:
            continue
        n = min(row.replicas, keep)
        held = min(n, short)
        keep, short = keep - n, short - held
        out.append((row, n, held))
    return out


def _why_stuck(plan: sched_result.DeploymentPlan) -> str:
    """Why no other allowed site takes a deployment's replicas: the scheduler's reason
    without its count, which leaves out the replicas the drain keeps."""
    return plan.shortfall.cause if plan.shortfall is not None else "no other allowed site has room"


@dataclass(frozen=True)
class _Leaving:
    """What a plan takes off sites that a pass keeps until replaced, before any room is counted."""

    drained: list[store_mod.PlacementRow]  # kept on draining sites
    moving: list[tuple[store_mod.PlacementRow, int]]  # kept on the others, where they fit (``_fitting``)
    waiting: dict[str, list[str]]
    stuck: dict[str, list[Stuck]]


def _leaving(s: snap.Snapshot, result: sched_result.PlanResult, rows: tuple[store_mod.PlacementRow, ...],
             ready: Callable[[store_mod.PlacementRow, str], int]) -> _Leaving:
    draining = draining_sites(s)
    forced = frozenset(site for site in draining if s.maintenance[site].force)
    mine: dict[str, list[store_mod.PlacementRow]] = {}
    for row in rows:
        mine.setdefault(row.deployment, []).append(row)
    planned = Counter[tuple[str, str, str]]()
    for row in rows:
        planned[(row.deployment, row.site, row.variant)] += row.replicas
    # An edge agent serves a model once and switches its variant in place, answering with the
    # old one until the new one loads: a row of another variant kept beside it would only
    # make two assignments of one model.
    in_place = {(row.deployment, row.site) for row in rows if s.site_by_name[row.site].spec.tier == "edge"}
    there: dict[str, list[store_mod.PlacementRow]] = {}  # per deployment, the replicas the plan takes off a site, by row
    for row in s.placements:
        off = row.replicas - planned[(row.deployment, row.site, row.variant)]
        if off > 0 and (row.deployment, row.site) not in in_place and _may_keep(s, row):
            there.setdefault(row.deployment, []).append(store_mod.PlacementRow(row.deployment, row.site, row.variant, off))
    out = _Leaving([], [], {site: [] for site in draining}, {site: [] for site in draining})
    for name, old in sorted(there.items()):
        d, plan = s.deployment_by_name.get(name), result.deployments.get(name)
        if d is None or plan is None:  # deleted, or its Model is: nothing of it runs anywhere
            continue
        serving = sum(ready(row, d.spec.model) for row in mine.get(name, ()))
        keep = max(0, plan.wanted - serving)
        short = max(0, plan.wanted - plan.placed)  # of those kept, the ones with nowhere to go
        replacing = 0  # replacements that do not serve yet, of those the drain waits for
        for row, n, held in _kept([r for r in old if r.site in draining], keep, short, forced):
            out.drained.append(store_mod.PlacementRow(row.deployment, row.site, row.variant, n))
            if held:
                out.stuck[row.site].append(Stuck(name, held, _why_stuck(plan)))
            if n > held:
                out.waiting[row.site].append(name)
            replacing += n - held
        # A replica moved waits only for a replacement the plan placed: with none to come,
        # it leaves as the plan says (the operator's rules no longer want it there).
        pending = max(0, min(keep, plan.placed - serving) - replacing)
        out.moving.extend((row, n) for row, n, _ in _kept([r for r in old if r.site not in draining], pending, 0))
    return out


def keep_until_replaced(s: snap.Snapshot, result: sched_result.PlanResult, rows: tuple[store_mod.PlacementRow, ...],
                        ready: Callable[[store_mod.PlacementRow, str], int]
                        ) -> tuple[tuple[store_mod.PlacementRow, ...], dict[str, Progress], dict[str, tuple[Handover, ...]]]:
    """The plan's ``rows`` with the replicas it takes off a site kept there until their
    replacements serve; each draining site's progress; per deployment, the replicas kept
    on sites that do not drain (a move: see the module's docstring). ``ready(row, model)``:
    how many of a placement row's replicas answer now (``planning.row_ready``)."""
    leaving = _leaving(s, result, rows, ready)
    kept = list(leaving.drained)
    handed: dict[str, list[Handover]] = {}
    for row, n in _fitting(s, result, leaving.moving):
        kept.append(store_mod.PlacementRow(row.deployment, row.site, row.variant, n))
        handed.setdefault(row.deployment, []).append(Handover(row.site, row.variant, n))
    planned = Counter[tuple[str, str, str]]()
    for row in (*rows, *kept):  # one row per key
        planned[(row.deployment, row.site, row.variant)] += row.replicas
    out = tuple(store_mod.PlacementRow(*key, n) for key, n in sorted(planned.items()))
    left = Counter[str]()
    for row in kept:
        left[row.site] += row.replicas
    progress = {site: Progress(site, left[site], tuple(dict.fromkeys(leaving.waiting[site])), tuple(leaving.stuck[site]))
                for site in sorted(leaving.waiting)}
    return out, progress, {name: tuple(h) for name, h in handed.items()}


def room_held(s: snap.Snapshot, result: sched_result.PlanResult, rows: tuple[store_mod.PlacementRow, ...],
              ready: Callable[[store_mod.PlacementRow, str], int], sites: Iterable[sched_model.Site] = ()
              ) -> dict[str, tuple[tuple[str, str], ...]]:
    """Per site, the replicas (deployment, variant) kept there until replaced whose room a
    plan must leave them, when ``result`` gives some of it to another deployment's newcomers;
    empty when it gives none. The room is theirs until their replacements serve: planned
    again without it (``planning.plan_full``), the newcomers go elsewhere or wait,
    instead of the kept replicas leaving their callers before their replacements answer.
    A deployment's own replacement on the same site (a data centre's variant switch) is no
    newcomer here: where both do not fit, the old one leaves as before. ``sites``: those
    ``result`` was planned on, whose size (a what-if's, say) the room is counted in."""
    moving = _leaving(s, result, rows, ready).moving
    planned = {site.name: site for site in sites}
    held = _fitting(s, result, moving, rivals=False, planned=planned)
    if sum(n for _, n in held) <= sum(n for _, n in _fitting(s, result, moving, planned=planned)):
        return {}
    out: dict[str, list[tuple[str, str]]] = {}
    for row, n in held:
        out.setdefault(row.site, []).extend([(row.deployment, row.variant)] * n)
    return {site: tuple(pairs) for site, pairs in out.items()}


def holding(sites: Iterable[sched_model.Site], deployments: Iterable[sched_model.Deployment],
            held: Mapping[str, Iterable[tuple[str, str]]]) -> list[sched_model.Site]:
    """``sites`` keeping the room of the replicas (deployment, variant) ``room_held`` found
    held on each (``Site.held``), for a plan made again (``planning.plan_full``)."""
    variants = {(d.name, v.name): v for d in deployments for v in d.variants}
    return [dataclasses.replace(site, held=tuple(variants[pair] for pair in held[site.name] if pair in variants))
            if site.name in held else site for site in sites]


def _may_keep(s: snap.Snapshot, row: store_mod.PlacementRow) -> bool:
    """Whether a replica the plan takes off its site may stay there until its replacement
    serves: on a site that answers (``_may_hold``), as a variant its Model still has, and
    in a country the deployment's residency allows. Residency is the law, not a choice of
    where to run: no caller is ever routed outside it, not even for the seconds a
    replacement takes. A changed siteSelector, tiers or demand is the operator's choice,
    made knowing that replicas move: the old one answers until the new one does."""
    d = s.deployment_by_name.get(row.deployment)
    if d is None or _variant(s, row.deployment, row.variant) is None or not _may_hold(s, row.site):
        return False
    allowed = inventory.allowed_countries(d.spec)
    return not allowed or s.site_by_name[row.site].spec.location.country in allowed


def _variant(s: snap.Snapshot, deployment: str, name: str) -> schema.Variant | None:
    """``deployment``'s Model's variant ``name``; None once the deployment, its Model or that variant is gone."""
    d = s.deployment_by_name.get(deployment)
    model = s.models.get(d.spec.model) if d is not None else None
    return next((v for v in model.variants if v.name == name), None) if model is not None else None


def _fitting(s: snap.Snapshot, result: sched_result.PlanResult, moving: list[tuple[store_mod.PlacementRow, int]],
             rivals: bool = True, planned: Mapping[str, sched_model.Site] | None = None
             ) -> list[tuple[store_mod.PlacementRow, int]]:
    """Of the ``moving`` replicas, those that may stay on their sites beside what the plan
    puts there: all of them on a site where the plan places no replica that was not there
    before (it runs what it ran, if over a budget just lowered, which its status shows),
    else those that fit with the newcomers in its capacity and power budget. A site is never
    run past either for a replica the plan gave their room to: the moved one goes at once
    (and the pass plans again with its room held: ``room_held``). ``rivals``: whether the
    newcomers of deployments that move none off the site count; ``planned``: the sites the
    plan was made on, by name, whose size counts (``_sized``)."""
    if not moving:
        return []
    names = sorted({row.site for row, _ in moving})
    fleet = sched_fleet.Fleet([_sized(s, n, planned or {}) for n in names])
    room = sched_capacity.Capacity(fleet)
    variants: dict[tuple[str, str], sched_model.Variant | None] = {}

    def variant(deployment: str, name: str) -> sched_model.Variant | None:
        if (deployment, name) not in variants:
            found = _variant(s, deployment, name)
            variants[(deployment, name)] = inventory.to_variant(found) if found is not None else None
        return variants[(deployment, name)]
    arrived: set[str] = set()
    placed: dict[str, list[tuple[str, sched_model.Variant]]] = {}
    leaving = {(row.deployment, row.site) for row, _ in moving}
    for r in result.replicas:
        v = variant(r.deployment, r.variant)
        if r.site in fleet.index and v is not None and (rivals or r.kept or (r.deployment, r.site) in leaving):
            placed.setdefault(r.site, []).append((r.deployment, v))
            if not r.kept:
                arrived.add(r.site)
    full: set[str] = set()  # sites the plan's own replicas fill past what this count can seat: keep nothing there
    for name, replicas in placed.items():
        site = fleet.index[name]
        groups = seating.seat(room, site, [v for _, v in replicas])
        if not all(g is not None and room.take(site, v, d, g) is not None for (d, v), g in zip(replicas, groups)):
            full.add(name)
    out = []
    for row, n in moving:
        v = variant(row.deployment, row.variant)
        fits = n if row.site not in arrived else 0 if row.site in full else sum(
            1 for _ in range(n) if v is not None and room.take(fleet.index[row.site], v, row.deployment) is not None)
        if fits:
            out.append((row, fits))
    return out


def _sized(s: snap.Snapshot, name: str, planned: Mapping[str, sched_model.Site]) -> sched_model.Site:
    """Site ``name`` at its full size: as the plan sized it (a what-if may change it), but
    where the plan sized it to what it holds (cordoned, draining or rejoining), as it is."""
    site = planned.get(name)
    if site is None or site.admits is not None or site.draining or name in s.rejoining:
        return inventory.to_site(s.site_by_name[name], s.agent_by_site.get(name), s.datacentres.get(name), None)
    return dataclasses.replace(site, held=())


def _replaced(s: snap.Snapshot, result: sched_result.PlanResult, rows: tuple[store_mod.PlacementRow, ...],
              ready: Callable[[store_mod.PlacementRow, str], int]) -> Counter[tuple[str, str, str]]:
    """Per (deployment, site, variant), the replicas moved off a site that does not drain
    which leave it in this pass because their replacements serve: those a pass would keep
    were none of the deployment's replicas serving yet, and this one keeps no more."""
    def kept(moving: list[tuple[store_mod.PlacementRow, int]]) -> Counter[tuple[str, str, str]]:
        return Counter({(row.deployment, row.site, row.variant): n for row, n in _fitting(s, result, moving)})
    return kept(_leaving(s, result, rows, lambda row, model: 0).moving) - kept(_leaving(s, result, rows, ready).moving)


def events(s: snap.Snapshot, result: sched_result.PlanResult, planned: tuple[store_mod.PlacementRow, ...],
           rows: Iterable[store_mod.PlacementRow], logged: Iterable[store_mod.Event],
           ready: Callable[[store_mod.PlacementRow, str], int]) -> tuple[store_mod.Event, ...]:
    """The placement's events (``logged``, from the plan) as make before break makes them
    true: a replica moved off a site that keeps it until its replacement serves is logged as
    its replacement placed where it goes, and as removed from the site it leaves when it
    leaves (its replacement serves: said so, with the plan's reason for the move), not both
    at once when the plan first moves it, nor while it stays (each pass until then plans it
    away again). ``planned`` and ``ready`` as ``keep_until_replaced`` was given them, which
    made ``rows``."""
    rows = tuple(rows)
    draining = _holding(s)
    plan = Counter[tuple[str, str, str]]()
    for row in planned:
        plan[(row.deployment, row.site, row.variant)] += row.replicas
    before = Counter[tuple[str, str, str]]()
    for row in s.placements:
        before[(row.deployment, row.site, row.variant)] += row.replicas
    after = Counter[tuple[str, str, str]]()
    for row in rows:
        after[(row.deployment, row.site, row.variant)] += row.replicas
    kept = Counter({key: n for key, n in (after - plan).items() if key[1] not in draining})  # until replaced
    staying = Counter[tuple[str, str]]()  # the same, per (deployment, site): a move's event names no variant left
    for (deployment, site, _), n in kept.items():
        staying[(deployment, site)] += n
    replaced = _replaced(s, result, planned, ready)
    if not draining and not staying and not replaced:
        return tuple(logged)
    added = after - before
    out: list[store_mod.Event] = []
    for e in logged:
        if e.action == "replica-removed" and e.details.get("site") in draining:
            continue
        source = str(e.details.get("from"))
        if e.action == "replica-moved" and (source in draining or staying[(e.name, source)] > 0):
            if source not in draining:
                staying[(e.name, source)] -= 1
            key = (e.name, str(e.details.get("to")), str(e.details.get("variant")))
            if added[key] > 0:
                added[key] -= 1
                why = (f"replacing a replica on site {source}, which is draining" if source in draining else
                       f"replacing a replica on site {source}, which stays until this one serves: {e.reason}")
                out.append(store_mod.Event(e.actor, "replica-placed", e.kind, e.name, why, {"site": key[1], "variant": key[2]}))
            continue
        key = (e.name, str(e.details.get("site")), str(e.details.get("variant")))
        if e.action == "replica-removed" and replaced[key] > 0:
            replaced[key] -= 1
            out.append(dataclasses.replace(e, reason=f"replaced by {_serving_elsewhere(s, rows, key, ready)}, serving ({e.reason})"))
            continue
        if e.action == "replica-removed" and kept[key] > 0:  # still placed: logged when it leaves
            kept[key] -= 1
            staying[key[:2]] -= 1
            continue
        out.append(e)
    for (deployment, site, variant), n in sorted((before - after).items()):
        if site in draining:
            why = ("the drain is forced" if s.maintenance[site].force
                   else f"site {site} is draining and the deployment's other replicas serve")
            out.extend(store_mod.Event(ACTOR, "replica-removed", "ModelDeployment", deployment, why,
                                       {"site": site, "variant": variant}) for _ in range(n))
    return tuple(out)


def _serving_elsewhere(s: snap.Snapshot, rows: Iterable[store_mod.PlacementRow], key: tuple[str, str, str],
                       ready: Callable[[store_mod.PlacementRow, str], int]) -> str:
    """Where the deployment of a replica that leaves (``key``: deployment, site, variant) serves now, but there."""
    d = s.deployment_by_name[key[0]]
    return ", ".join(sorted({r.site for r in rows if r.deployment == key[0] and (r.site, r.variant) != key[1:]
                             and ready(r, d.spec.model)})) or "its other replicas"


def site_status(s: snap.Snapshot, site: str, progress: Mapping[str, Progress], serves: bool) -> dict[str, Any]:
    """What a Site's status says of its maintenance (nothing when it is schedulable):
    ``Cordoned``; ``Draining`` while replicas are left on it or it still ``serves``; ``Drained``."""
    m = s.maintenance.get(site)
    if m is None:
        return {}
    out: dict[str, Any] = {"mode": m.mode.value, "reason": m.reason, "by": m.actor, "since": catalog.rfc3339(m.since)}
    if not m.draining:
        return {"schedulable": False, "maintenance": {"state": "Cordoned", **out}}
    p = progress.get(site, Progress(site, 0, (), ()))
    state = "Draining" if p.left or serves else "Drained"
    out.update({"state": state, "replicasLeft": p.left, "force": m.force})
    if p.waiting:
        out["waitingFor"] = list(p.waiting)
    if p.stuck:
        out["stuck"] = [{"deployment": x.deployment, "replicas": x.replicas, "reason": x.reason} for x in p.stuck]
    dc = s.datacentres.get(site)
    if dc is not None and dc.owned_by is not None and not p.left:  # nothing there is this control plane's to remove
        out["note"] = f"its cluster is another control plane's ({dc.owned_by}): what runs there is not this one's to remove"
    elif dc is not None and not dc.reachable and not p.left:  # what runs there is not seen: say why it is done or not
        out["note"] = (f"its cluster does not answer ({dc.error}); its Serve applications there were seen removed before"
                       if state == "Drained" and not dc.lost else
                       f"its cluster does not answer ({dc.error}) and is declared lost: its Serve applications there "
                       "are not seen removed, and are removed if it answers again" if state == "Drained" else
                       f"no replica is placed here any more; its cluster does not answer ({dc.error}): its Serve "
                       "applications there are not seen removed (Drained once they are, or once it is declared lost)")
    elif state == "Draining" and not p.left:
        out["note"] = "no replica is placed here any more; waiting for the site to stop serving them"
    return {"schedulable": False, "maintenance": out}


def preview(s: snap.Snapshot, site: str, result: sched_result.PlanResult) -> dict[str, Any]:
    """What draining ``site`` would do, from a plan made as if it drained (``result``):
    where each of its replicas would go, and those that would stay, with why."""
    moves: list[dict[str, Any]] = []
    stays: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for a in result.actions:
        if isinstance(a, sched_result.MoveReplica) and a.from_site == site:
            moves.append({"deployment": a.deployment, "variant": a.from_variant, "to": a.to_site, "toVariant": a.to_variant})
        elif isinstance(a, sched_result.RemoveReplica) and a.site == site:
            removed.append({"deployment": a.deployment, "variant": a.variant, "reason": a.reason})
    there: dict[str, list[store_mod.PlacementRow]] = {}
    for row in s.placements:
        if row.site == site:
            there.setdefault(row.deployment, []).append(row)
    for name, old in sorted(there.items()):
        plan = result.deployments.get(name)
        if plan is None or plan.placed >= plan.wanted:
            continue
        everything = sum(r.replicas for r in old)  # all kept until replaced; of them, the shortfall stays
        held = sum(h for _, _, h in _kept(old, everything, plan.wanted - plan.placed))
        stays.append({"deployment": name, "replicas": held, "reason": _why_stuck(plan)})
    # A removal without a replacement of a deployment that also falls short is a replica that stays.
    short = {x["deployment"] for x in stays}
    removed = [r for r in removed if r["deployment"] not in short]
    return {"site": site, "replicas": sum(r.replicas for r in s.placements if r.site == site), "moves": moves,
            "stays": stays, "removed": removed, "moved": len(moves)}
