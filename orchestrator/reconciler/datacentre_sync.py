"""The reconciler's dealings with data-centre sites, apart from its pass.

Edge sites are driven by data (assignments the hub pushes); a data centre is driven by
calls that fail on their own schedule: observing its Serve applications, applying them,
removing those a deleted or moved Site left. Each such site keeps a backoff of its own so
that one cluster out of reach holds up neither the pass nor the other sites, and each new
error, recovery and change is an event on the Site. Each call runs beside the pass
(:mod:`orchestrator.reconciler.datacentre_calls`), so that one that answers slowly holds up
no other site either: the pass waits for it a second at most, then plans the site as last
observed and takes the answer in a later pass. This state lives here, apart from
:mod:`orchestrator.reconciler.loop`, which only calls :meth:`DataCentreSync.observe` when
it gathers, :meth:`DataCentreSync.apply` when it executes and :meth:`DataCentreSync.settle`
once it has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from orchestrator import catalog
from orchestrator.backoff import Backoff
from orchestrator.adapters import serve_config
from orchestrator.adapters.ownership import OwnedElsewhere
from orchestrator.manifests import schema
from orchestrator.reconciler import datacentre_calls
from orchestrator.reconciler import snapshot as snap
from orchestrator.reconciler.datacentres import DataCentres, target_of
from orchestrator.store import sqlite as store_mod

log = logging.getLogger(__name__)


@dataclass
class DataCentreBackoff(Backoff):
    """A data centre's backoff, and what its last failure was."""

    unreachable: bool = False  # its last failure was observing it (not applying or removing apps)
    unreachable_since: float = 0.0  # when observing it began to fail (this run of failures)
    unreachable_at: float | None = None  # the same, on the store's time: published, for a new leader (DataCentreObservation)
    target: str | None = None  # where the site's applications ran when it failed
    # the last failure was the cluster refusing the call (its error not ``retryable``, e.g.
    # a Serve config it answers 422 to): the operator's to fix, where a retryable one (Ray
    # starting, a dropped connection) passes on its own
    refused: bool = False
    # the last failure was the cluster's applications marked as another control plane's
    # (``OwnedElsewhere``), this one's id: nothing there changes until an operator takes it over
    owned_by: str | None = None


class Left(NamedTuple):
    """The key of what ``site`` left on ``target`` (its backoff, its count), beside the keys
    of sites' own in one dict: a value of its own, never taken for a site's name."""

    site: str
    target: str | None

    def __str__(self) -> str:  # as the log names a call to it
        return f"{self.site} (what it left on {self.target})"


@dataclass(frozen=True)
class Observing:
    """A call in flight that observes ``site`` on ``target``, where its Site drives it."""

    site: snap.SiteRecord
    target: str | None


@dataclass(frozen=True)
class Applying:
    """A call in flight that gives a site's cluster (``target``) its applications."""

    target: str | None
    apps: tuple[serve_config.ServeAppSpec, ...]
    drift: str


@dataclass(frozen=True)
class Retiring:
    """A call in flight that removes what a Site left on a target (``record``): deleted, or ``moved``."""

    record: store_mod.DeletedSite
    moved: bool

    @property
    def target(self) -> str | None:
        return self.record.target


Call = Observing | Applying | Retiring
Ended = datacentre_calls.Ended[str | Left, Call]


@dataclass
class DataCentreSync:
    """What a leader observed of, applied to and is removing from its data centres.

    ``clock`` and ``lease`` are read at each call: the reconciler's, which change (a test's
    stopped clock, a new lease when the replica leads again). ``lost_after``: how long a
    site may stay out of reach before it is declared lost (``DataCentreObservation.lost``),
    the time an agent is given before it is (its missed heartbeats). ``wall``: the time when
    an outage began is stamped with, which tells a leader that takes over mid-outage when it
    began (:meth:`inherit`); by default the store's (``store.now``), the database server's
    clock that every replica reads the same, since the new leader's own clock may be hours
    from the old one's (a test gives its own). ``answered``: called when a call that
    outlived its pass's wait (``wait_s``) ends, for a pass to take its answer then (the
    reconciler's trigger)."""

    store: store_mod.Store
    datacentres: DataCentres
    clock: Callable[[], float]
    lease: Callable[[], store_mod.Lease | None]
    lost_after: float
    wall: Callable[[], float] | None = None
    wait_s: float = datacentre_calls.WAIT_S
    answered: Callable[[], None] = lambda: None
    observed: dict[str, snap.DataCentreObservation] = field(default_factory=dict)
    applied: dict[str, tuple[serve_config.ServeAppSpec, ...]] = field(default_factory=dict)
    reapplied: dict[str, int] = field(default_factory=dict)  # by site: Serve applications applied again after another writer
    _backoff: dict[str | Left, DataCentreBackoff] = field(default_factory=dict)
    # deleted sites whose applications are being removed, and targets sites moved off (Left): how many ran
    _retiring: dict[str | Left, int] = field(default_factory=dict)
    # by site: the applications its last apply did not apply as asked (left out), by name: why
    _not_as_asked: dict[str, dict[str, str]] = field(default_factory=dict)
    # by site: the actuator its last apply went through; one built since drives a new cluster
    # (the embedded Ray started again) or the site's new settings, where it is applied again
    _applied_through: dict[str, serve_config.DataCentreActuator] = field(default_factory=dict)
    # by site: what the last leader published it observed, taken at the next observe (inherit)
    _inherited: dict[str, snap.DataCentreObservation] = field(default_factory=dict)
    # the calls in flight: by site (observing, applying) and by what a site left (Left: removing)
    _calls: datacentre_calls.Calls[str | Left, Call] = field(init=False)

    def __post_init__(self) -> None:
        self._calls = datacentre_calls.Calls(self.wait_s, answered=lambda: self.answered())

    def owned_elsewhere(self) -> dict[str, bool]:
        """Per data centre observed, whether its last call found its cluster's applications
        another control plane's (``edgeplane_datacentre_owned_elsewhere``): a Site deleted, or
        no longer a data centre, leaves ``observed`` at the next pass, and its series with it."""
        return {site: (b := self._backoff.get(site)) is not None and b.owned_by is not None for site in self.observed}

    def _now(self) -> float:
        """The time outages' starts are stamped and compared on (``wall``)."""
        return self.wall() if self.wall is not None else self.store.now()

    def forget(self) -> None:
        """What was observed and applied, and the backoffs, go: another leader may have
        changed them. Calls in flight are cancelled: what they answer is of the last term."""
        self._calls.cancel(lambda key, call: False)
        self.applied.clear()
        self._not_as_asked.clear()
        self._applied_through.clear()
        self._backoff.clear()
        self.observed.clear()
        self._inherited.clear()

    def inherit(self, observations: Mapping[str, snap.DataCentreObservation]) -> None:
        """What the last leader (another replica, or this control plane before it restarted)
        published it observed of each data centre, for the next :meth:`observe` to start
        from. Without it a site out of reach had no last observation, so the gateway stopped
        routing to it at once, and its loss time ran again from this leader's first try."""
        self._inherited = dict(observations)

    def _take_over(self, site: snap.SiteRecord, last: snap.DataCentreObservation) -> None:
        """``site`` as the last leader left it: its last observation, and, out of reach, the
        outage as it began then, so that it is declared lost at the same time; it is tried
        at once, and an error it answers as then is no new event. An outage an earlier
        version's leader published does not say when it began: taken as unseen, since
        routed as last observed it could be routed again once that leader declared it lost."""
        if last.reachable:
            self.observed[site.name] = last
        elif last.unreachable_at is not None:
            self.observed[site.name] = last
            since = self.clock() - max(0.0, self._now() - last.unreachable_at)
            self._backoff[site.name] = DataCentreBackoff(
                failures=1, next_try=self.clock(), last_error=last.error, since=since, unreachable=True, unreachable_since=since,
                unreachable_at=last.unreachable_at, target=target_of(site.spec), owned_by=last.owned_by)

    async def observe(self, stored: list[snap.SiteRecord], deleted: Iterable[store_mod.DeletedSite] = ()) -> None:
        """Observe the declared data centres; remove the applications left on a target no
        Site drives any more (its Site deleted, or moved to another cluster or the edge
        tier). The store keeps each such target until they are removed, so whichever replica
        leads next, or this one after a restart, removes them too; an actuator held for a
        site neither declared nor kept was abandoned (``delete site --abandon-applications``)."""
        sites = [s for s in stored if s.spec.tier == "datacenter"]
        declared = {s.name for s in sites}
        inherited, self._inherited = self._inherited, {}
        for site in sites:
            if (last := inherited.get(site.name)) is not None and site.name not in self.observed:
                self._take_over(site, last)
        # a series per site ever declared would outlive its Site (edgeplane_datacentre_reapplied_total)
        self.reapplied = {site: n for site, n in self.reapplied.items() if site in declared}
        driven = {s.name: target_of(s.spec) for s in stored}
        for gone in set(self.observed) - declared:  # deleted, or moved to the edge tier: counted by the target it left
            observed, applied = self.observed.pop(gone), self.applied.pop(gone, ())
            self._not_as_asked.pop(gone, None)
            self._applied_through.pop(gone, None)
            self._retiring[gone if gone not in driven else Left(gone, self.datacentres.target(gone))] = max(len(observed.apps), len(applied))
        for back in set(self._retiring) & declared:  # declared again: its apply takes over
            del self._retiring[back]
        for kept in (self._backoff, self._retiring):  # a site's own, for a site no longer a data centre: what it left has its own
            for edge in set(kept) & (set(driven) - declared):
                del kept[edge]
        for site in sites:  # moved: what was applied went to the old target, and the new one is given it
            if (backoff := self._backoff.get(site.name)) is not None and backoff.target != driven[site.name]:
                del self._backoff[site.name]  # the old target's failures (often why it moved) hold up nothing on the new one
            if (left := self.datacentres.target(site.name)) not in (None, driven[site.name]):
                observed = self.observed.pop(site.name, None)  # the old target's: the new one is not seen yet
                self._not_as_asked.pop(site.name, None)
                self._retiring[Left(site.name, left)] = max(len(observed.apps) if observed else 0,
                                                             len(self.applied.pop(site.name, ())))
        # a record of the target its Site drives now was read racing the apply that drops it
        records = [d for d in deleted if d.target != driven.get(d.name)]
        left = {Left(d.name, d.target) for d in records}
        # a call to what no Site drives any more (deleted, moved, abandoned, declared again where it was
        # being removed from) is cancelled: its answer is of no use, and what follows must not race it
        self._calls.cancel(lambda key, call: key in left if isinstance(key, Left) else key in declared and call.target == driven[key])
        if abandoned := self.datacentres.sites() - declared - {d.name for d in records}:
            await self._abandon(abandoned)
        for kept in (self._backoff, self._retiring):  # removed, or abandoned
            for key in [k for k in kept if isinstance(k, Left) and k not in left]:
                del kept[key]
        taken = await self.settle()  # what ended since the last pass: not called again in this one
        for site in sites:
            if site.name not in taken:
                self._observe_one(site)
        for record in records:
            if Left(record.name, record.target) not in taken:
                self._retire(record, moved=record.name in driven)
        await self.settle()

    async def settle(self) -> set[str | Left]:
        """Take what each call to a data centre that has ended answered, waiting a second at
        most (``wait_s``) for those begun since the last settle; the keys of those taken. A
        site whose call is still running is planned as last observed (its applications as
        last applied) until a later settle takes it."""
        taken: set[str | Left] = set()
        for ended in await self._calls.settle():
            match ended.note:
                case Observing() as call:
                    await self._observed(call, ended)
                case Applying() as call:
                    await self._applied(str(ended.key), call, ended)
                case Retiring() as call:
                    await self._retired(call, ended)
            taken.add(ended.key)
        return taken

    async def close(self) -> None:
        """The calls in flight are cancelled: the leader stops, or steps down."""
        await self._calls.close()

    def _retire(self, record: store_mod.DeletedSite, moved: bool) -> None:
        """A target a data-centre Site left (``moved``: it is still declared, elsewhere): its
        Serve applications are removed before its record in the store goes, or they would run
        on, owned by nothing. A cluster that cannot be reached is tried again with a backoff
        of its own (the site's new target is not held up by its old one), each new error an
        event on the Site."""
        key = Left(record.name, record.target)
        backoff = self._backoff.get(key)
        if self._calls.busy(key) or (backoff is not None and backoff.next_try > self.clock()):
            return
        self._calls.start(key, self._removing(record), Retiring(record, moved))

    async def _removing(self, record: store_mod.DeletedSite) -> int:
        return await self.datacentres.retire(record.name, schema.SiteSpec.model_validate(record.spec))

    async def _retired(self, call: Retiring, ended: Ended) -> None:
        """What removing the applications a Site left answered (how many ran there)."""
        record, moved = call.record, call.moved
        site, key = record.name, Left(record.name, record.target)
        what = f"the Site moved off {record.target}" if moved else "the Site is deleted"
        if (error := ended.error) is not None:  # whatever the cause, tried again: this site's alone
            if not isinstance(error, (serve_config.DataCentreError, OSError, RuntimeError, ValueError)):
                log.error("data centre %s: removing its Serve applications failed", site, exc_info=error)
            await self._failed(site, error, f"{what}, but its Serve applications there are not removed yet: ", key=key)
            return
        removed: int = ended.result
        # a failed write leaves it for the next pass, whose apply([]) finds nothing left
        await self.store.run(self.store.forget_deleted_site, record, lease=self.lease())
        self._backoff.pop(key, None)
        if not moved:
            self._backoff.pop(site, None)
        held = max(removed, self._retiring.pop(key if moved else site, 0))
        log.info("data centre %s: %s; its %d Serve application(s) there removed", site, what, held)
        if held:
            await self._record(store_mod.Event("reconciler", "serve-removed", "Site", site,
                                               f"{what}: its {held} Serve application(s) removed"))

    async def _abandon(self, sites: set[str]) -> None:
        """Sites whose left applications an operator gave up removing: their actuators are
        closed, what runs there left as it is, and nothing is tried again."""
        await self.datacentres.forget(self.datacentres.sites() - sites)
        for site in sorted(sites):
            self._retiring.pop(site, None)
            self._backoff.pop(site, None)
            log.warning("data centre %s: the Serve applications the Site left are abandoned: no longer removed", site)

    def _observe_one(self, site: snap.SiteRecord) -> None:
        """Observe what runs on ``site``'s cluster, unless a call to it is in flight (an
        observation or an apply: one at a time). A backoff from observing it holds the next
        try; one from applying does not: the cluster answered, and what it runs (the last
        apply's applications, say, that a drain waits to see removed) is seen while the apply waits."""
        if self._calls.busy(site.name):
            return
        backoff = self._backoff.get(site.name)
        if backoff is not None and backoff.unreachable and backoff.next_try > self.clock():
            self.observed[site.name] = self._unreachable(site.name)
            return
        self._calls.start(site.name, self._observing(site), Observing(site, target_of(site.spec)))
        # not observed yet (a new site, or one moved to a new target): until its answer comes it
        # is awaited, out of reach, not planned as a cluster that answers
        self.observed.setdefault(site.name, snap.DataCentreObservation.awaited())

    async def _observing(self, site: snap.SiteRecord) -> tuple[serve_config.DataCentreActuator, Mapping[str, serve_config.ServeAppStatus]]:
        actuator = await self.datacentres.actuator(site.name, site.spec)
        return actuator, await actuator.observe()

    async def _observed(self, call: Observing, ended: Ended) -> None:
        """What observing a site answered (its actuator, and what it runs): its observation,
        for the passes from now on."""
        site = call.site.name
        if (error := ended.error) is not None:
            if isinstance(error, (serve_config.DataCentreError, OSError, RuntimeError)):
                await self._failed(site, error, unreachable=True, target=call.target)
                self.observed[site] = self._unreachable(site, str(error))
                return
            # an adapter's fault is this site's alone: the others' pass goes on
            log.error("data centre %s: observing it failed", site, exc_info=error)
            await self._failed(site, error, f"observing it failed: {type(error).__name__}: ", unreachable=True, target=call.target)
            self.observed[site] = self._unreachable(site)
            return
        actuator: serve_config.DataCentreActuator
        apps: Mapping[str, serve_config.ServeAppStatus]
        actuator, apps = ended.result
        if self._applied_through.get(site, actuator) is not actuator:
            # what the last apply gave through another (its cluster a head that exited since, or the site as it
            # was set before) is not known to run as given: applied again
            self.applied.pop(site, None)
            self._not_as_asked.pop(site, None)
            del self._applied_through[site]
        backoff = self._backoff.get(site)
        if backoff is not None and backoff.unreachable:
            await self._recovered(site, backoff)
            backoff = None
        # the site's status says why its apply is retried
        self.observed[site] = snap.DataCentreObservation(True, apps, error=backoff.last_error if backoff is not None else "",
                                                         drift=actuator.drift, refused=backoff is not None and backoff.refused,
                                                         owned_by=backoff.owned_by if backoff is not None else None)

    def _unreachable(self, site: str, error: str | None = None) -> snap.DataCentreObservation:
        """``site`` out of reach: lost once it has been for ``lost_after``, counted from when
        the outage began, by the last leader's account for one that began before this one
        led (:meth:`inherit`). What it ran when last observed goes along (``last_apps``).
        One whose cluster answered that it is another control plane's is never lost: it is
        held (``DataCentreObservation.owned_by``)."""
        backoff, last = self._backoff[site], self.observed.get(site)
        return snap.DataCentreObservation(False, error=backoff.last_error if error is None else error,
                                          lost=backoff.owned_by is None and self.clock() - backoff.unreachable_since >= self.lost_after,
                                          last_apps=None if last is None else last.apps if last.reachable else last.last_apps,
                                          unreachable_at=backoff.unreachable_at, owned_by=backoff.owned_by)

    async def _failed(self, site: str, exc: Exception, context: str = "", unreachable: bool = False, key: Left | None = None,
                         target: str | None = None) -> None:
        """``site`` failed: on ``target``, where it drives its applications, or on what it left (``key``)."""
        backoff = self._backoff.setdefault(key or site, DataCentreBackoff())
        backoff.target = target
        message = context + str(exc)
        if message != backoff.last_error:
            await self._record(store_mod.Event("reconciler", "datacentre-error", "Site", site, message))
        backoff.fail(self.clock(), message)
        backoff.refused = getattr(exc, "retryable", True) is False
        # another's, the cluster answered: an outage after it is given back begins then
        given_back = backoff.owned_by is not None and not isinstance(exc, OwnedElsewhere)
        backoff.owned_by = exc.other if isinstance(exc, OwnedElsewhere) else None
        if unreachable and (not backoff.unreachable or given_back):
            backoff.unreachable_since, backoff.unreachable_at = self.clock(), self._now()
        backoff.unreachable = unreachable
        if unreachable and self.clock() < (lost_at := backoff.unreachable_since + self.lost_after):
            # declared lost only by a try that fails once its loss time has come, not by a
            # backoff that happens to wait past it while the cluster answers again
            backoff.next_try = min(backoff.next_try, lost_at)
        log.warning("data centre %s: %s (retry in %.0fs)", site, message, backoff.next_try - self.clock())

    async def _recovered(self, site: str, backoff: DataCentreBackoff) -> None:
        """Observed again after it could not be: the outage's end is an event, and its
        backoff goes, so that the next outage is an event of its own (even with the same
        error) and is retried from the shortest delay. A backoff from applying is kept:
        observing says nothing of whether the next apply would succeed."""
        down_s = self.clock() - backoff.since
        log.info("data centre %s: observed again after %.0fs (%d failed attempt(s))", site, down_s, backoff.failures)
        await self._record(store_mod.Event("reconciler", "datacentre-recovered", "Site", site,
                                           f"observed again after {down_s:.0f}s ({backoff.failures} failed attempt(s); "
                                           f"the last: {backoff.last_error})"))
        self._backoff.pop(site, None)

    async def apply(self, site: str, apps: tuple[serve_config.ServeAppSpec, ...], drift: str = "") -> None:
        """Begin giving ``site``'s cluster ``apps``; what it answers is taken at a settle. A
        site with a call in flight (its observation, or the last apply) is left: the pass
        after its answer plans again with it."""
        backoff = self._backoff.get(site)
        if self._calls.busy(site) or (backoff is not None and backoff.next_try > self.clock()):
            return
        obj = await self.store.run(self.store.get, "Site", site)
        if obj is None or self._calls.busy(site):
            return
        self._calls.start(site, self._applying(site, obj, apps), Applying(store_mod.datacentre_target(obj.spec), apps, drift))

    async def _applying(self, site: str, obj: store_mod.StoredObject,
                        apps: tuple[serve_config.ServeAppSpec, ...]) -> tuple[serve_config.DataCentreActuator, dict[str, str]]:
        actuator = await self.datacentres.actuator(site, catalog.parse_site(obj))
        return actuator, dict(await actuator.apply(apps))

    async def _applied(self, site: str, call: Applying, ended: Ended) -> None:
        """What applying a site's applications answered (its actuator, and what it did not apply as asked)."""
        apps, drift = call.apps, call.drift
        if (error := ended.error) is not None:
            if isinstance(error, (serve_config.DataCentreError, OSError, RuntimeError, ValueError)):
                await self._failed(site, error, target=call.target)
                return
            # as in _observed: this site's alone
            log.error("data centre %s: applying its Serve applications failed", site, exc_info=error)
            await self._failed(site, error, f"applying failed: {type(error).__name__}: ", target=call.target)
            return
        actuator: serve_config.DataCentreActuator
        not_as_asked: dict[str, str]
        actuator, not_as_asked = ended.result
        backoff = self._backoff.get(site)
        if backoff is not None and backoff.unreachable:  # the cluster answered this apply before the next observe
            await self._recovered(site, backoff)
        self._backoff.pop(site, None)
        if drift:  # e.g. a deposed leader's apply that landed after this leader's
            self.reapplied[site] = self.reapplied.get(site, 0) + 1
            log.warning("data centre %s: its Serve applications were changed by another writer (%s); applied ours again", site, drift)
            await self._record(store_mod.Event("reconciler", "serve-reapplied", "Site", site,
                                               f"changed by another writer ({drift}); applied this control plane's again"))
        if apps != self.applied.get(site) or not_as_asked != self._not_as_asked.get(site, {}):
            await self._record(store_mod.Event("reconciler", "serve-applied", "Site", site, applied_reason(apps, not_as_asked)))
        self.applied[site] = apps
        self._not_as_asked[site] = not_as_asked
        self._applied_through[site] = actuator

    async def _record(self, event: store_mod.Event) -> None:
        """An event on a Site, written in a worker thread under the lease held when it runs."""
        await self.store.run(self.store.record, event, lease=self.lease())


def applied_reason(apps: tuple[serve_config.ServeAppSpec, ...], not_as_asked: Mapping[str, str]) -> str:
    """What a ``serve-applied`` event says: the applications applied, and apart, those the
    cluster did not take as asked (left out, or kept at fewer replicas or as it runs), each with why."""
    applied = [a for a in apps if a.name not in not_as_asked]
    said = f"{len(applied)} Serve application(s): " + ", ".join(f"{a.name}x{a.num_replicas}" for a in applied)
    if not_as_asked:
        said += f"; {len(not_as_asked)} not applied as asked: " + "; ".join(f"{name}: {why}" for name, why in sorted(not_as_asked.items()))
    return said
