"""The reconcile loop: gather a snapshot, plan the pass purely, execute, repeat.

A pass runs when something changed (an apply, an agent joining or going silent) and at
least every ``resync_s`` to observe data centres. The loop never dies: a failing pass
is logged and retried with backoff; a data centre that cannot be reached is retried on
its own schedule and reported in status and events without holding up other sites, and
one that answers slowly costs a pass a second at most (``datacentre_calls.WAIT_S``).
What the pass tells the other replicas through the store is written beside it by
:mod:`orchestrator.reconciler.publishing`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator import views
from orchestrator.backoff import Backoff
from orchestrator.agents import errors as agent_errors
from orchestrator.agents import hub as hub_mod
from orchestrator.agents import model as agent_model
from orchestrator.artifacts import catalog as artifacts
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.reconciler import actions as act
from orchestrator.reconciler import artifact_use
from orchestrator.reconciler import autoscaler as autoscaler_mod
from orchestrator.reconciler import datacentre_sync, hold
from orchestrator.reconciler import desired as desired_mod
from orchestrator.reconciler import failback as failback_mod
from orchestrator.reconciler import failback_record
from orchestrator.reconciler import observed as observed_mod
from orchestrator.reconciler import planning, publishing
from orchestrator.reconciler import rejoin as rejoin_mod
from orchestrator.reconciler import snapshot as snap
from orchestrator.reconciler.datacentres import DataCentres
from orchestrator.scheduler import standing as standing_mod
from orchestrator.store import sqlite as store_mod

log = logging.getLogger(__name__)


@dataclass
class Reconciler:
    store: store_mod.Store
    hub: hub_mod.AgentHub
    datacentres: DataCentres
    artifacts: artifacts.ArtifactCatalog
    table: endpoints_mod.EndpointTable
    clock: Callable[[], float] = time.monotonic
    resync_s: float = 5.0
    load_publish_s: float = 15.0  # a table whose only change is agents' load goes to the store at most this often
    # A data centre out of reach this long is declared lost, as an agent is after its missed
    # heartbeats (the server passes that time); by default never: not known gone, never drained.
    datacentre_lost_after_s: float = math.inf
    failback_after_s: float = 0.0  # a lost site's replicas move back once it is healthy this long (0: never; see failback)
    passes: int = 0
    failed_back: int = 0  # replicas failback moved back since start, as written (edgeplane_failback_replicas_total)
    last_plan: planning.PassPlan | None = None
    last_snapshot: snap.Snapshot | None = None
    converging: bool = False
    dc_sync: datacentre_sync.DataCentreSync = field(init=False)  # data centres: observed, applied, retired, each with its backoff
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _applied_event: asyncio.Event = field(default_factory=asyncio.Event)  # objects were applied or deleted
    _read_since: float = 0.0  # table clock when the current pass began reading the store
    autoscaler: autoscaler_mod.Autoscaler = field(default_factory=autoscaler_mod.Autoscaler)
    _pass_done: asyncio.Condition = field(default_factory=asyncio.Condition)
    _unreadable: dict[tuple[str, str], str] = field(default_factory=dict)  # reported, with why
    _unapplied: dict[str, str] = field(default_factory=dict)  # deployments whose Serve applications were not rendered: reported, with why
    _stopping: bool = False
    lease: store_mod.Lease | None = None  # several replicas: the leader's lease, which fences its writes of intent
    comeback: rejoin_mod.Comeback = field(init=False)  # the time agents are given to come back after a takeover or restart
    publisher: publishing.Publisher = field(init=False)  # what this leader tells the other replicas through the store
    failback_record: failback_record.FailbackRecord = field(init=False)  # the failback memory, kept in the store for the next leader
    # sha256 -> the URI a Model named, of each version in use: a version agents are kept on
    # that no stored Model names any more is checked and served from it (see observed_mod)
    _sources: dict[str, str] = field(default_factory=dict)
    _inherit: bool = True  # the next pass first takes the sources the last leader published
    _unservable: set[str] = field(default_factory=set)  # versions in sets that cannot be checked here (warned once)
    # The pass's pure planning step (a seam: a test holds a pass mid-plan through it).
    planner: Callable[[snap.Snapshot, standing_mod.Standing | None], planning.PassPlan] = planning.plan_pass
    _standing: standing_mod.Standing | None = None  # the plan in force, for the next pass to repair
    _failback: failback_mod.Failback | None = None  # the seats stand-ins stood in for (None: none yet, or a new term)
    desired_reader: desired_mod.DesiredReader = field(default_factory=desired_mod.DesiredReader)  # stored objects, parsed once a write

    def __post_init__(self) -> None:
        self.dc_sync = datacentre_sync.DataCentreSync(self.store, self.datacentres, clock=lambda: self.clock(), lease=lambda: self.lease,
                                                      lost_after=self.datacentre_lost_after_s,
                                                      answered=lambda: self.trigger("a data centre answered a call that outlived its pass"))
        self.publisher = publishing.Publisher(self.store, self.table, clock=lambda: self.clock(), lease=lambda: self.lease,
                                              load_publish_s=self.load_publish_s)
        self.failback_record = failback_record.FailbackRecord(self.store, clock=lambda: self.clock(), lease=lambda: self.lease)
        self.comeback = rejoin_mod.Comeback(clock=lambda: self.clock())
        # A request for a model scaled to zero starts a pass at once, not at the next resync.
        self.table.on_wake = lambda model: self.trigger(f"request for {model}, scaled to zero")

    def trigger(self, reason: str = "") -> None:
        if reason:
            log.debug("reconcile requested: %s", reason)
        self._wake.set()

    def applied(self, reason: str) -> None:
        """Objects were applied or deleted: a pass, and at once (while a pass may still be
        running) the gateway learns of new deployments' models as pending."""
        self._applied_event.set()
        self.trigger(reason)

    async def _note_pending(self) -> None:
        """Runs beside :meth:`run`: each time objects are applied, the models of deployments
        the endpoint table does not know are noted as pending in it (and published to the
        other replicas and gateways), so that a request for one is told to retry, not that
        the model is not deployed, until the pass that places it publishes its table. When
        changes go on hold or off it, the notes made already say so too."""
        while True:
            await self._applied_event.wait()
            self._applied_event.clear()
            try:
                stored = await self.store.run(self.store.list, "ModelDeployment")
            except Exception as exc:  # the next pass reads the store anyway
                log.warning("could not read the deployments just applied: %s", exc)
                continue
            reasons: dict[str, str] = {}
            held = self.on_hold  # nothing is placed until it ends: a request is told why, not to retry shortly
            for d in stored:
                why = (f"deployment {d.name} was applied; it is placed when the hold ends ({held})" if held
                       else f"deployment {d.name} was just applied; its replicas are being placed")
                if isinstance(d.spec.get("model"), str):
                    reasons.setdefault(d.spec["model"], why)
                if d.spec.get("cascade"):  # a cascade is called by its deployment's name too
                    reasons.setdefault(d.name, why)
            if self.table.note_applied(reasons):
                self.publisher.table_changed()

    async def wait_for_pass(self, after: int, timeout: float = 30.0) -> int:
        """Wait until a pass numbered > ``after`` has finished (for tests and the CLI)."""
        async with self._pass_done:
            async with asyncio.timeout(timeout):
                await self._pass_done.wait_for(lambda: self.passes > after)
        return self.passes

    async def publishes_done(self, timeout: float = 10.0) -> None:
        """Until the writes to the store begun so far beside the passes (the table, the
        observed fleet) have ended, at most ``timeout`` seconds."""
        await self.publisher.done(timeout)

    async def run(self) -> None:
        notes = asyncio.create_task(self._note_pending(), name="pending-deployments")
        try:
            await self._run()
        finally:
            notes.cancel()
            await self.dc_sync.close()  # a data centre's call still in flight: of no use to the next run or leader
            await self.publishes_done()  # a write in a thread goes on anyway: the store stays open until it ends

    async def _run(self) -> None:
        backoff = Backoff()
        await self.comeback.taken_over(self.hub, stopping=lambda: self._stopping)
        while not self._stopping:
            try:
                async with asyncio.timeout(min(self.resync_s, 1.0) if self.converging or self.comeback.rejoining else self.resync_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.reconcile_once()
                backoff = Backoff()
            except asyncio.CancelledError:
                raise
            except artifacts.CatalogClosed:  # the control plane stops: the pass ends where it is, and writes nothing more
                return
            except store_mod.Fenced as exc:  # the replica is about to learn it no longer leads
                backoff.fail(self.clock(), str(exc), base=0.5, cap=5.0)
                log.warning("reconcile pass not written: %s", exc)
                await asyncio.sleep(max(0.0, backoff.next_try - self.clock()))
                self._wake.set()
            except Exception as exc:  # the loop never dies
                backoff.fail(self.clock(), str(exc), base=0.5, cap=30.0)
                if isinstance(exc, store_mod.StoreError):  # the database away or full: its reason says it all
                    log.error("reconcile pass failed: %s; retrying in %.1fs", exc, backoff.next_try - self.clock())
                else:
                    log.exception("reconcile pass failed; retrying in %.1fs", backoff.next_try - self.clock())
                await asyncio.sleep(max(0.0, backoff.next_try - self.clock()))
                self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def step_down(self) -> None:
        """This replica no longer leads (the control plane cancels the pass). The lease it
        led under stays as ``lease``: a write still on its way, such as the endpoint table
        queued behind a slow one, is fenced by it and refused once another replica leads.
        ``None`` would mean a control plane alone on its database, whose writes are not
        fenced at all. What its passes found unreadable is the next leader's to report."""
        self.stop()
        self._unreadable, self._unapplied = {}, {}

    def lead(self, lease: store_mod.Lease, takeover_s: float = 0.0) -> None:
        """Before :meth:`run` on a replica that just became the leader: what this replica
        observed while it did not lead is forgotten (another leader may have changed it).

        A new leader knows no agent yet: they were connected to the old one and come over
        within seconds. Planning at once would call every edge site lost, tell its agent to
        unload what it serves as soon as it rejoins, and publish an empty table, so the
        first pass waits (at most ``takeover_s``) until every edge site that serves in the
        inherited table (the one the old leader published) has joined this replica;
        meanwhile gateways route from that table. A site that does not come back in that
        time is lost as any other: its agent would have been declared lost by then anyway.
        (A control plane on its own database plans at once instead: see :meth:`resume`.)"""
        self.comeback.led(takeover_s, self.table.all_endpoints())
        self.lease = lease
        self._stopping = False
        self.dc_sync.forget()
        self._failback = None  # another leader's memory, read from the store by the first pass (failback_record)
        self.publisher.forget()  # another leader may have published since this replica last did
        self._inherit = True
        self._unreadable, self._unapplied = {}, {}  # each term reports them again: its events and log are this leader's
        self.autoscaler = autoscaler_mod.Autoscaler(self.clock)
        self.converging = False
        self._wake.set()  # the first pass runs at once

    def resume(self, rejoin_s: float) -> None:
        """Before :meth:`run` on a control plane that just started on its own database. Its
        agents come back on their next reconnect; until they do (at most ``rejoin_s``), an
        edge site that holds replicas in the stored placements keeps them and is sent
        nothing, so its agent goes on serving them (a pass that called it lost would have it
        unload them the moment it rejoined). Passes run meanwhile; the table keeps the
        endpoints such a site had in the table this control plane started with (the one its
        last run published, see ``ControlPlane``), and gets each agent as it comes back. A
        site not back in that time is lost as any other."""
        self.comeback.resumed(rejoin_s, self.table.all_endpoints())
        self._wake.set()

    # -- gather --------------------------------------------------------------------

    def read_desired(self) -> snap.Desired:
        """The stored Sites, Models and ModelDeployments as validated values, read in one
        query: applies run in threads (and on other replicas), and three reads could see a
        new deployment without the new Model it names. One this version no longer reads is
        left out, with why: the fleet is then on hold (:mod:`orchestrator.reconciler.hold`).
        Only the objects written since the last read are decoded and validated again
        (:mod:`orchestrator.reconciler.desired`)."""
        return self.desired_reader.read(self.store)

    def _read_stored(self) -> tuple[snap.Desired, tuple[store_mod.PlacementRow, ...]]:
        """What :meth:`current` reads from the store, in a worker thread."""
        return self.read_desired(), tuple(self.store.placements())

    async def _report_unreadable(self, unreadable: Mapping[tuple[str, str], str]) -> None:
        """An event and a warning for each stored object found unreadable, once per leader
        term (again if why changes), a line when the hold they put the fleet on ends, and
        the hold's reason published for every replica's view."""
        previous, self._unreadable = self._unreadable, dict(unreadable)  # the view says it from now on
        try:
            for (kind, name), why in sorted(unreadable.items()):
                if previous.get((kind, name)) == why:
                    continue
                log.warning("%s %s: this version does not read it as stored (%s); every change to the fleet is on hold until %s",
                            kind, name, why, hold.until(kind, name))
                await self._record(store_mod.Event("reconciler", "unreadable", kind, name, why,
                                                   {"note": "every change to the fleet is on hold (what runs keeps running) until "
                                                            + hold.until(kind, name)}))
        except Exception:
            self._unreadable = previous  # reported again at the next pass
            raise
        if previous and not unreadable:
            log.info("every stored object reads again: changes to the fleet are no longer on hold")
        if hold.reason(previous) != hold.reason(unreadable):  # models noted as pending say why they wait now
            self._applied_event.set()
        await self.publisher.hold(hold.reason(unreadable) or "")

    @property
    def unreadable(self) -> Mapping[tuple[str, str], str]:
        """The stored objects the last pass could not read, with why: the fleet is on hold while any is."""
        return dict(self._unreadable)

    @property
    def on_hold(self) -> str | None:
        """Why changes to the fleet are on hold as of the last pass, or None."""
        return hold.reason(self._unreadable)

    def plan_in_force(self) -> standing_mod.Standing | None:
        """The plan the next pass repairs where only sites are lost (None: it plans in full,
        or a pass holds it now); a what-if repairs a fork of it (``Standing.fork``)."""
        return self._standing

    async def current(self, leaders: observed_mod.Observed | None = None) -> snap.Snapshot:
        """Desired state as stored now, observed state as of the last pass (for previews).

        The store is read in a worker thread (see :meth:`gather`), the reconciler's own
        state on the loop, whose it is. Edge sites still rejoining after a restart are in it
        as a pass has them (keeping their replicas): a preview or what-if would otherwise
        plan them as lost. ``leaders``: what the leader published it observed, for a replica
        that does not lead (its own hub holds only the agents connected to it)."""
        desired, placements = await self.store.run(self._read_stored)
        if leaders is not None:  # the failback the leader's next pass makes, as it keeps it in the store
            stored = await self.failback_record.read(term=False)
            return dataclasses.replace(leaders.over(desired, placements), failback=dataclasses.replace(
                stored, after_s=self.failback_after_s, now=self.clock()))
        sites, models, deployments = desired.sites, desired.models, desired.deployments
        agents = tuple(self.hub.snapshot())
        last = self.last_snapshot
        # past the window, the next pass plans them lost
        rejoining = self.comeback.awaited(sites, placements, agents) if self.comeback.is_open() else frozenset()
        return snap.Snapshot(
            sites, models, deployments, placements, agents,
            datacentres=last.datacentres if last else {}, artifacts=last.artifacts if last else {},
            assignments=last.assignments if last else {}, applied_apps=last.applied_apps if last else {},
            autoscale=dict(self.autoscaler.latest),
            rejoining=rejoining,
            remembered=self.comeback.remembered(rejoining),
            unreadable=desired.unreadable,
            maintenance=desired.maintenance,
            failback=self._failback_now(),  # a what-if plans the failback the next pass would
            model_generations=desired.model_generations,
        )

    def _failback_now(self) -> failback_mod.Failback:
        """What the failback rule knows now, as a pass gathering now would find it."""
        return dataclasses.replace(self._failback or failback_mod.Failback(), after_s=self.failback_after_s, now=self.clock(),
                                   rejoin_until=self.comeback.joins_until)

    async def gather(self, desired: snap.Desired | None = None) -> snap.Snapshot:
        """The pass's snapshot. Every store call of a pass runs in a worker thread, here and
        in :meth:`execute`: on PostgreSQL one may wait on a stalled database or on another
        replica's lock, and on the event loop it would hold the whole replica (API, gateway,
        agents, health probes) with it. The hub, the table and this reconciler's own state
        are read and changed on the loop only. ``desired``: already read.

        The snapshot is planned in a worker thread while the loop goes on changing all of
        those, so it holds nothing the loop changes: the stored objects as read (frozen, and
        shared with the passes before that read them unchanged: ``desired_reader``); the
        agents' statuses, data-centre observations and autoscaler recommendations are
        frozen values that the loop replaces whole, never changes in place, and each mapping
        of them is the pass's own copy."""
        if desired is None:
            desired = await self.store.run(self.read_desired)
        sites, models, deployments = desired.sites, desired.models, desired.deployments
        deleted = await self.store.run(self.store.deleted_sites)  # read after the Sites: one declared again is in both
        if self._inherit:
            await self._inherit_observed()
        if self._failback is None:  # a new term: the last leader's stand-ins, and the hold-downs under way
            self._failback = await self.failback_record.read()
        await self.dc_sync.observe(sites, deleted)
        placements = tuple(await self.store.run(self.store.placements))
        agents = tuple(self.hub.snapshot())
        rejoining = self.comeback.narrow(sites, placements, agents)
        assignments = {name: a.assignments for name in sorted({s.name for s in sites} | {agent.site for agent in agents})
                       if (a := self.hub.assignments(name)) is not None}
        self._sources.update((v.artifact.sha256, v.artifact.uri) for spec in models.values() for v in spec.variants if v.artifact is not None)
        sent = {a.sha256: uri for got in assignments.values() for a in got if (uri := self._sources.get(a.sha256)) is not None}
        # a new local artifact is hashed here, in a thread: the gateway shares this loop
        refs, versions, unservable = await asyncio.to_thread(artifact_use.resolve, self.artifacts, models, sent)
        for sha256 in unservable.keys() - self._unservable:  # once, not at every pass
            log.warning("version %s that agents were sent cannot be served from here: %s", sha256[:12], unservable[sha256])
        self._unservable = set(unservable)
        autoscale = self.autoscaler.evaluate(((d.name, d.spec) for d in deployments), placements, {a.site: a for a in agents},
                                             self.table.wakes)
        return snap.Snapshot(
            sites=sites,
            models=models,
            deployments=deployments,
            placements=placements,
            agents=agents,
            datacentres=dict(self.dc_sync.observed),  # copies: observing a data centre replaces its entry on the loop
            artifacts=refs,
            versions=versions,
            assignments=assignments,  # agents of sites no longer stored too: they are told to serve nothing
            applied_apps=dict(self.dc_sync.applied),
            autoscale=dict(autoscale),  # the autoscaler's latest too, which the next evaluation replaces
            rejoining=rejoining,
            remembered=self.comeback.remembered(rejoining),
            maintenance=desired.maintenance,
            failback=self._failback_now(),
            model_generations=desired.model_generations,
        )

    def _sent(self, s: snap.Snapshot) -> list[tuple[agent_model.Assignment, ...]]:
        """The assignments each agent of the pass's sites was last sent, as the pass left them."""
        return [a.assignments for name in {r.name for r in s.sites} | {agent.site for agent in s.agents}
                if (a := self.hub.assignments(name)) is not None]

    async def _inherit_observed(self) -> None:
        """A new leader (or a control plane that restarted) takes from what the last leader
        published it observed the sources of the versions in use (agents may be kept on one
        no Model names) and each data centre's last observation (one out of reach is routed
        as last observed, and declared lost when it would have been)."""
        try:
            got = await self.store.run(self.store.published, observed_mod.PUBLISHED_KEY)
            # decoded off the loop: a large fleet's document takes milliseconds the gateway must not wait
            inherited = await asyncio.to_thread(observed_mod.from_text, got[1]) if got is not None else observed_mod.Observed()
        except ValueError as exc:
            log.warning("%s; versions agents are kept on that no Model names are served by the leader that sent them only, "
                        "and a data centre out of reach is routed to only once observed", exc)
            inherited = observed_mod.Observed()
        self._sources = {**self._sources, **inherited.sources}
        self.dc_sync.inherit(inherited.datacentres)
        self._inherit = False

    async def _record(self, event: store_mod.Event) -> None:
        """An event of the pass, written in a worker thread under the lease it runs under."""
        await self.store.run(self.store.record, event, lease=self.lease)

    # -- execute -------------------------------------------------------------------

    async def reconcile_once(self) -> planning.PassPlan | None:
        """One pass: its plan, or None when the fleet is on hold (a stored object does not read)."""
        self._read_since = self.table.clock()
        desired = await self.store.run(self.read_desired)
        await self._report_unreadable(desired.unreadable)
        if desired.unreadable:
            await self._hold(desired)
            return None
        snapshot = await self.gather(desired)
        # The plan in force, which a repair changes in place, is the pass's while it plans: a
        # pass cancelled mid-plan (a step-down) leaves its thread to finish with it, and the
        # next pass, finding none, plans in full rather than repair the same one beside it.
        standing, self._standing = self._standing, None
        plan = await self._plan(snapshot, standing)
        await self.failback_record.write(plan.failback)  # before the moves it remembers are made
        self._standing, self._failback = plan.standing, plan.failback
        # What `get placements` pairs the stored rows with from now on: this pass writes its
        # rows and may then wait seconds (a data centre's apps deploying); shown with the
        # previous snapshot, rows on sites that snapshot did not know read "SiteGone". Set
        # before the rows are written: `get placements` reads the rows, then takes this.
        self.last_snapshot = snapshot
        await self._execute_all(plan.actions)
        await self.dc_sync.settle()  # the applies it began, waited for a second at most
        self.last_plan = plan
        # after the pass's sets and applications went out: what they no longer name can go
        live = artifact_use.live(snapshot.models, self._sent(snapshot), self.dc_sync.applied)
        self.artifacts.retain(live)
        self._sources = {sha256: uri for sha256, uri in self._sources.items() if sha256 in live}
        self.publisher.observed(observed_mod.Observed(
            snapshot.agents, snapshot.datacentres, snapshot.artifacts, snapshot.autoscale, snapshot.rejoining,
            {name: views.describe_deployment(plan, name) for name in plan.result.deployments}, dict(self._sources)))
        # While replicas are on their way up, or a site drains, look again soon rather than at the next resync.
        self.converging = any(
            (item.kind == "ModelDeployment" and item.status.get("phase") in ("Progressing", "Failing"))
            or (item.kind == "Site" and item.status.get("maintenance", {}).get("state") == "Draining")
            for a in plan.actions if isinstance(a, act.SetStatuses) for item in a.items
        )
        await self._pass_ended()
        return plan

    async def _plan(self, snapshot: snap.Snapshot, standing: standing_mod.Standing | None) -> planning.PassPlan:
        """The pass's plan, made in a worker thread: at 1,000 Sites planning takes hundreds of
        milliseconds, and made on the event loop, every heartbeat, gateway request and API
        call waited as long. On asyncio's pool, not the store's: planning touches no
        database, and on a store thread it would hold up the store calls queued behind it
        (agents' joins among them). It plans from what is the pass's own or frozen (see
        :meth:`gather`)."""
        return await asyncio.to_thread(self.planner, snapshot, standing)

    async def _hold(self, desired: snap.Desired) -> None:
        """A pass on hold: nothing is observed (observing a data centre removes what a Site
        that does not read would seem to have left), planned or sent; what runs is kept, and
        the last plan and snapshot with it (previews, ``get placements``), but the table's
        residency is narrowed to the stored specs' at once (``hold.narrowed``), and what a
        deployment deleted meanwhile routed to leaves it (``hold.stored``). The window for
        agents to rejoin after a restart runs on as in any pass: a site still awaited keeps
        its endpoints, any other whose agent is gone (revoked, say) is unhealthy at once."""
        placements = tuple(await self.store.run(self.store.placements))
        agents = tuple(self.hub.snapshot())
        if not hold.unreadable_sites(desired.unreadable):
            awaited = self.comeback.narrow(desired.sites, placements, agents, on_hold=True)
        elif self.comeback.is_open():  # which of its sites to await cannot be told yet: none leaves the window
            awaited = self.comeback.awaited(desired.sites, placements, agents) | hold.awaited_unread(desired.unreadable, placements, agents)
        else:
            awaited = frozenset()
        deployed = (m for m, _ in self.table.deployed().items() if not self.table.is_pending(m))
        await self._execute_all(hold.actions(desired, self.table.all_endpoints(), agents, awaited, self.table.cascades, deployed))
        self.converging = False
        await self._pass_ended()

    async def _pass_ended(self) -> None:
        async with self._pass_done:
            self.passes += 1
            self._pass_done.notify_all()

    async def _execute_all(self, actions: Sequence[act.Action]) -> None:
        """``actions`` in order. The pass's assignment versions are taken from the store in one
        block, under the lease, when its first set is sent (after the placement is written):
        one transaction per pass, not one per site. The block is below any version a later
        leader takes, so a deposed leader that resumes mid-pass still cannot push a set that
        agents would take for newer than the new leader's; one deposed before it took the
        block gets none (:class:`~orchestrator.store.values.Fenced`). What a failed pass
        leaves of its block is dropped. Each set is executed with its version.

        A block that starts at or below a version the hub already holds means the store's
        counter went back (restored from a backup, or a standby that missed the last commits):
        the block is taken again above the hub's versions, which moves the counter past them,
        as agents take only a newer set for news."""
        versions: Iterator[int] | None = None
        for i, action in enumerate(actions):
            if isinstance(action, act.PushAssignments):
                if versions is None:
                    count = sum(isinstance(a, act.PushAssignments) for a in actions[i:])
                    versions = iter(await self._assignment_versions(count))
                action = dataclasses.replace(action, version=next(versions))
            await self.execute(action)

    async def _assignment_versions(self, count: int) -> range:
        block = await self.store.run(self.store.next_sequences, "assignments", count, lease=self.lease)
        if block.start <= (sent := self.hub.latest_version()):
            log.warning("the store's assignment counter went back (%d, and sets up to version %d were sent): restored "
                        "from a backup? It is moved past them, and agents are sent sets from version %d on",
                        block.start - 1, sent, sent + 1)
            block = await self.store.run(self.store.next_sequences, "assignments", count, lease=self.lease, above=sent)
        return block

    async def execute(self, action: act.Action) -> None:
        match action:
            case act.RecordPlacement(rows, events):
                await self.store.run(self.store.replace_placements, rows, events, lease=self.lease)
                self.failed_back += failback_mod.moved_back(events)
            case act.PushAssignments(site, assignments, version):
                if version is None:  # a planned set: only the pass's block, under the lease, may number it
                    raise ValueError(f"the assignment set for {site} has no version: a pass's actions are executed by _execute_all")
                try:
                    self.hub.set_assignments(site, list(assignments), version)
                except agent_errors.StaleAssignments as exc:  # one site's set: the pass goes on for the others
                    log.error("assignment set for site %s not sent: %s", site, exc)
            case act.ForgetAgent(site):
                self.hub.forget_if_lost(site)
            case act.ApplyServeApps(site, apps, drift):
                await self.dc_sync.apply(site, apps, drift)
            case act.ReportUnapplied(reasons):
                for name, why in sorted(reasons.items()):
                    if self._unapplied.get(name) != why:
                        log.warning("deployment %s: its Serve application is not applied: %s", name, why)
                        await self._record(store_mod.Event("reconciler", "serve-app-invalid", "ModelDeployment", name, why))
                        self._unapplied[name] = why
                self._unapplied = dict(reasons)
            case act.SetStatuses(items):
                await self.store.run(self.store.set_statuses, [(i.kind, i.name, i.status) for i in items], lease=self.lease,
                                     created={(i.kind, i.name): i.created_at for i in items if i.created_at is not None})
            case act.PublishEndpoints(endpoints, regions, deployed, cold, starting):
                self.table.replace(endpoints, regions, dict(deployed), cold, read_since=self._read_since, starting=starting)
                self.publisher.table_changed()
            case act.RefreshHealth(endpoints, unrouted, undeployed):
                # the regions and pending notes as they are, the reasons too but for models left with no endpoint
                reasons = None
                if unrouted or undeployed:
                    reasons = {m: why for m, why in self.table.deployed().items()
                               if not self.table.is_pending(m) and m not in undeployed} | dict(unrouted)
                self.table.replace(endpoints, deployed=reasons, cold=self.table.cold() - undeployed if undeployed else None,
                                   health_since=self._read_since)
                self.publisher.table_changed()
            case act.PublishCascades(routes):
                self.table.set_cascades(dict(routes))
                self.publisher.table_changed()

    def mark_down(self, url: str) -> None:
        """Route to ``url`` no more, at once (its agent is lost): see :meth:`~orchestrator.reconciler.publishing.Publisher.mark_down`."""
        self.publisher.mark_down(url)
