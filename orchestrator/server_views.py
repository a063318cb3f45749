"""What the API reads of a running control plane: its leadership, placements, endpoints,
cascades, metrics and the extras of ``describe``.

These are the read side of :class:`orchestrator.api.app.Services`, kept apart from the
wiring and lifecycle in :mod:`orchestrator.server`: each answers from the live state the
event loop owns (the hub, the table, the last pass) and from store reads that must not
hold the loop, so a stalled database delays only the answer that needs it, and callers
that ask meanwhile share one read. :class:`ServerViews` is a base of
:class:`orchestrator.server.ControlPlane`, which holds the state it reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from starlette.concurrency import run_in_threadpool

from orchestrator import capture_counts, catalog, leadership, maintenance, server_config, views
from orchestrator.api import paging
from orchestrator.artifacts import signature
from orchestrator.gateway import routing, series
from orchestrator.manifests import loader
from orchestrator.reconciler import hold, observed, planning
from orchestrator.store import sqlite as store_mod

if TYPE_CHECKING:
    from orchestrator import fleet_metrics
    from orchestrator.agents import hub as hub_mod
    from orchestrator.agents import relay
    from orchestrator.api import simulate as simulate_api
    from orchestrator.artifacts import catalog as artifacts
    from orchestrator.gateway import cascade as cascade_mod
    from orchestrator.gateway import endpoints as endpoints_mod
    from orchestrator.gateway import openai_routes
    from orchestrator.reconciler import snapshot as snap
    from orchestrator.reconciler.loop import Reconciler
    from orchestrator.security import ca as ca_mod

log = logging.getLogger("edgeplane")

API_READ_S = 5.0  # how long GET /v1/placements waits for the store before a 503
METRICS_READ_S = 2.0  # how long a scrape waits for the store (placement, maintenance): well within a scraper's timeout (Prometheus: 10 s)


class ServerViews:
    """The API's reads; the control plane sets what they read as it starts."""

    config: server_config.ServerConfig
    store: store_mod.Store
    hub: hub_mod.AgentHub
    table: endpoints_mod.EndpointTable
    reconciler: Reconciler
    simulations: simulate_api.Simulations
    fleet: fleet_metrics.FleetCollector
    artifacts: artifacts.ArtifactCatalog
    cascades: cascade_mod.CascadeHandler
    openai_gateway: openai_routes.OpenAIGateway
    ca: ca_mod.CertificateAuthority
    ca_file: Any
    replica_id: str
    elector: leadership.Elector | None
    relay_client: relay.RelayClient | None
    _change_feed: Any
    _reads: dict[str, asyncio.Future[Any]]  # the store reads in flight that callers share, by name
    _leaders_view: tuple[int, observed.Observed] | None  # the last observed fleet read of the leader's, with its version
    _leaders_unreadable: int  # the version of the last observed fleet of the leader's that this version could not read

    async def leadership_view(self) -> dict[str, Any]:
        """This replica, who leads, and why changes are on hold (``hold``: this process's own
        reconciler's without an election, else what the leader published, read with the lease):
        ``GET /v1/controlplane``, ``edgeplane status``."""
        agent_ca = {"agentCa": self.ca.view()} if self.ca_file is not None else {}  # until when agents can join and renew
        if self.elector is None:
            return {"replica": self.replica_id, "role": "leader", "election": "none (SQLite: this process owns the store)",
                    "leader": {"replica": self.replica_id, "fencingToken": None}, "leaderChanges": 0, **agent_ca,
                    **({"hold": why} if (why := self.reconciler.on_hold) else {})}
        view: dict[str, Any] = {"replica": self.replica_id, "role": "leader" if self.elector.leading else "follower",
                                "election": "lease", "leaseSeconds": self.elector.ttl_s, "leaderChanges": self.elector.changes,
                                "agents": {"connected": len(self.hub.sites()) - self.hub.relayed(), "relayedHere": self.hub.relayed()},
                                **agent_ca}
        if self.relay_client is not None and not self.elector.leading:
            view["relay"] = self.relay_client.view()
        if self._change_feed is not None:  # other replicas' writes as they commit, else read every storePollSeconds
            feed = self._change_feed
            view["storeChanges"] = {"notified": feed.connected, "pollSeconds": self.config.store_poll_s,
                                    **({"lastError": feed.last_error} if feed.last_error else {})}
        try:
            current, held = await self._shared_read(
                "lease", lambda: (self.store.current_lease(leadership.LEASE), self.store.published(hold.PUBLISHED_KEY)), self.elector.ttl_s)
        except store_mod.StoreError as exc:
            return {**view, "leader": None, "error": str(exc)}
        except TimeoutError:
            return {**view, "leader": None, "error": f"the store did not answer in {self.elector.ttl_s:g} s"}
        view["leader"] = ({"replica": current.holder, "fencingToken": current.token, "expiresInSeconds": round(current.remaining_s, 2)}
                          if current is not None else None)
        if held is not None and held[1]:
            view["hold"] = held[1]
        return view

    async def _shared_read(self, name: str, read: Callable[[], Any], within_s: float) -> Any:
        """``read()`` of the store, on its threads: on PostgreSQL a read is a transaction
        that waits for the store's lock and the database, and on the event loop a stalled
        database would hold the whole replica (API, gateway, agents, health probes). One read
        by ``name`` at a time, which callers that come meanwhile share: a stalled database
        piles up no calls on the store's threads (which joins and the API's reads wait for
        too), however often ``edgeplane status`` or a scraper asks. TimeoutError past ``within_s``."""
        shared = self._reads.get(name)
        if shared is None or shared.done():
            shared = self._reads[name] = asyncio.ensure_future(self.store.run(read))
            shared.add_done_callback(functools.partial(self._read_done, name))
        await asyncio.wait((shared,), timeout=within_s)  # the read goes on for the others if this caller goes
        if not shared.done():
            raise TimeoutError
        return shared.result()

    def _read_done(self, name: str, done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved, if no caller waited on
        if self._reads.get(name) is done:  # forgotten once read: a page's name is one of many
            del self._reads[name]

    async def leaders_view(self) -> observed.Observed | None:
        """On a replica that does not lead, what the leader's last pass observed and
        published (:mod:`orchestrator.reconciler.observed`): previews and views plan and
        read with it, not with this replica's own hub, which holds only the agents connected
        here. None on the leader, and until a leader has published one. Read again only when
        a newer one was published, and decoded off the loop."""
        if self.elector is None or self.elector.leading:
            return None
        cached = self._leaders_view
        # asked from the newest version read, readable or not: one this version cannot read
        # is neither read nor warned of again until the leader publishes another
        since = max(cached[0] if cached is not None else 0, self._leaders_unreadable)
        try:
            got = await self._shared_read("observed", functools.partial(self.store.published, observed.PUBLISHED_KEY, since), API_READ_S)
        except TimeoutError:
            raise _unanswered() from None
        if got is not None:
            try:
                self._leaders_view = cached = (got[0], await asyncio.to_thread(observed.from_text, got[1]))
            except ValueError as exc:  # a leader of another version: the last one read, or this replica's own view
                self._leaders_unreadable = got[0]
                log.warning("%s", exc)
        return cached[1] if cached is not None else None

    async def current(self) -> snap.Snapshot:
        """The snapshot what-ifs plan with: the leader's observations on a follower."""
        return await self.reconciler.current(await self.leaders_view())

    async def preview(self, docs: list[loader.LoadedDocument]) -> dict[str, Any]:
        # The reconciler's state is read on the loop, whose it is; the store and the schedule off it.
        leaders = await self.leaders_view()
        current = await self.reconciler.current(leaders)
        return {**await run_in_threadpool(views.preview, current, docs), **_observed_at(leaders)}

    async def drain_preview(self, site: str) -> dict[str, Any]:
        leaders = await self.leaders_view()
        current = await self.reconciler.current(leaders)
        return {**await run_in_threadpool(planning.drain_preview, current, site), **_observed_at(leaders)}

    async def hold_reason(self) -> str | None:
        held = await self.store.run(self.store.published, hold.PUBLISHED_KEY)
        return held[1] if held is not None and held[1] else None

    async def placements_view(self, page: paging.Page) -> dict[str, Any]:
        """``GET /v1/placements``: the rows of ``page`` with their replicas' states, built
        in a worker thread but for the agents' states, which the loop owns."""
        if page.after is not None and len(page.after) != 3:
            raise paging.BadPage("continue is not a token a page of this list gave (metadata.continue)", "continue")
        if page.limit is None:  # one such read at a time while the database stalls, whoever asks
            name, read = "placements", self.store.placements
        else:  # a page reads its rows alone (one more: whether a next page has any), not the whole table each time
            name, read = f"placements {page.after} {page.limit}", functools.partial(self.store.placements, page.after, page.limit + 1)
        try:
            rows = await self._shared_read(name, read, API_READ_S)
        except TimeoutError:
            raise _unanswered() from None
        more = page.limit is not None and len(rows) > page.limit
        rows = rows[:page.limit]
        if (leaders := await self.leaders_view()) is not None:  # a follower: the states the leader observed
            live = leaders.over(await self.store.run(self.reconciler.read_desired), ())
        else:
            # The snapshot once the rows are read: a pass sets its own before it writes its rows,
            # so the rows are never shown with an older pass's snapshot (their sites "SiteGone").
            last = self.reconciler.last_snapshot
            # the agents' model states as they are now, not as the last pass saw them: a download's
            # progress changes them every second without a pass (agents.hub._decisive); those of
            # the page's sites only
            agents = [a for site in dict.fromkeys(r.site for r in rows) if (a := self.hub.status(site)) is not None]
            live = dataclasses.replace(last, agents=tuple(agents)) if last is not None else None
        view = {**await run_in_threadpool(views.placements, live, rows), **_observed_at(leaders)}
        meta = paging.metadata(page, "placements", more, _placement_key(rows[-1]) if rows else None)
        return view if meta is None else {**view, "metadata": meta}

    def endpoints_view(self, model: str, caller: routing.Caller) -> dict[str, Any]:
        return views.endpoint_list(self.table.rank(model, caller, self.config.position, api=None), model)

    def cascades_view(self) -> dict[str, Any]:
        return {"items": self.cascades.stats.snapshot(self.table.cascades)}

    async def cascades_with_capture(self) -> dict[str, Any]:
        """``GET /v1/cascades``: :meth:`cascades_view` with each capturing cascade's day so far
        (``capture``: captured by zone against ``dailyCap``, when the day resets), counted in
        the state store (:mod:`orchestrator.capture_counts`), one read for them all; null for a
        cascade that captures nothing. While the store does not answer, ``capture`` says so
        (``error``) and the figures still come."""
        items = self.cascades_view()["items"]
        policies = {r.deployment: r.capture for r in self.table.cascades.values() if r.capture is not None}

        def read() -> tuple[float, dict[str, dict[str, int]]]:
            now = self.store.now()
            return now, {name: capture_counts.read_today(self.store, name, p.zones, now) for name, p in sorted(policies.items())}

        try:
            now, taken = await self._shared_read("capture-counts", read, API_READ_S) if policies else (0.0, {})
        except (store_mod.StoreError, TimeoutError) as exc:
            why = str(exc) or f"the store did not answer in {API_READ_S:g} s"
            return {"items": [{**c, "capture": {"error": f"the day's captures cannot be counted: {why}"} if c["name"] in policies
                               else None} for c in items]}
        return {"items": [{**c, "capture": capture_counts.today(policies[c["name"]].zones, policies[c["name"]].daily_cap,
                                                                taken.get(c["name"], {}), now) if c["name"] in policies else None}
                           for c in items]}

    async def simulate(self, body: bytes, each: str | None, top: int | None) -> dict[str, Any]:
        # The store is read and the planning runs off the loop once a slot is free, so the gateway keeps answering.
        leads = self.elector is None or self.elector.leading  # a follower holds no plan in force
        return await self.simulations.run(self.current, body, each, top, self.reconciler.plan_in_force if leads else lambda: None)

    async def metrics(self) -> bytes:
        """``GET /metrics``. What it counts from the store (the placement, and the sites taken
        out for maintenance: any replica's store says it, not only the leader's pass) is read
        in one worker-thread read, shared by the scrapes that come while it is read; the
        collectors read the rest (the hub, the table) on the loop, whose it is. While the store
        fails, or has not answered within :data:`METRICS_READ_S`, the scrape still answers,
        without ``edgeplane_replicas_placed``, ``edgeplane_sites_cordoned`` and
        ``edgeplane_site_power_watts`` (the leader's last pass's estimate, in the Sites' status)
        and ``edgeplane_rollout_*`` (the rollouts in the deployments' status)."""
        def read() -> tuple[list[store_mod.PlacementRow], dict[str, int], dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
            sites = self.store.list("Site")
            taken_out = maintenance.states(maintenance.read_in_force(self.store, {o.name for o in sites}))
            rollouts = {o.name: o.status["rollout"] for o in self.store.list("ModelDeployment") if (o.status or {}).get("rollout")}
            return self.store.placements(), taken_out, {o.name: o.status["power"] for o in sites if o.status.get("power")}, rollouts

        try:
            placements, taken_out, power, rollouts = await self._shared_read("metrics", read, METRICS_READ_S)
        except (store_mod.StoreError, TimeoutError) as exc:
            if self.fleet.placements is not None:  # once an outage, not at every scrape
                log.warning("metrics: the store cannot be read, edgeplane_replicas_placed, edgeplane_sites_cordoned, "
                            "edgeplane_site_power_watts and edgeplane_rollout_* are left out until it can: %s",
                            exc or f"the store did not answer in {METRICS_READ_S:g} s")
            self.fleet.placements = self.fleet.maintenance = self.fleet.power = self.fleet.rollouts = None
        else:
            if self.fleet.placements is None:
                log.info("metrics: the store is read again, edgeplane_replicas_placed, edgeplane_sites_cordoned, "
                         "edgeplane_site_power_watts and edgeplane_rollout_* are back")
            self.fleet.placements, self.fleet.maintenance, self.fleet.power, self.fleet.rollouts = placements, taken_out, power, rollouts
        series.prune(self.table, self.openai_gateway.labelled())  # the gateway's series of models and sites gone
        # Prometheus text format whatever the scraper's Accept asks: the deprecated gauges
        # edgeplane_heartbeats_received and edgeplane_reconcile_passes share their family name
        # with the counters ..._total in OpenMetrics, whose parsers refuse such a scrape whole.
        return generate_latest(self.registry)

    async def describe_extra(self, kind: str, name: str) -> dict[str, Any]:
        if kind == "ModelDeployment":
            leaders = await self.leaders_view()
            extra = ({**leaders.described.get(name, {}), **_observed_at(leaders)} if leaders is not None
                     else views.describe_deployment(self.reconciler.last_plan, name))
            # as GET /v1/cascades gives it: its figures and what it captured today
            cascade = next((c for c in (await self.cascades_with_capture())["items"] if c["name"] == name), None)
            return {**extra, "cascade": cascade} if cascade is not None else extra
        if kind == "Model":
            obj = await self.store.run(self.store.get, "Model", name)
            try:
                spec = catalog.parse_model(obj) if obj is not None else None
            except ValueError:  # stored by an earlier version, and this one does not read it: its status says why
                spec = None
            if spec is None:
                return {}
            # in a worker thread of its own, not the store's: the artifact hashed and read
            return {"variants": await asyncio.to_thread(signature.describe_variants, spec, self.artifacts)}
        return {}


def _placement_key(row: store_mod.PlacementRow) -> tuple[str, str, str]:
    """The order the store lists placements in, which their pages follow."""
    return row.deployment, row.site, row.variant


def _observed_at(leaders: observed.Observed | None) -> dict[str, Any]:
    """On a follower, when the leader wrote what an answer comes from (``observedAt``): it
    writes at each change, so an old time after the leader is gone tells a stale answer."""
    if leaders is None or leaders.at is None:
        return {}
    return {"observedAt": catalog.rfc3339(leaders.at)}


def _unanswered() -> store_mod.StoreUnavailable:
    """A read the store did not answer within :data:`API_READ_S`: unavailable for now, which
    the API answers 503 with Retry-After (a stalled database, a failover), never a 500."""
    return store_mod.StoreUnavailable(f"the store did not answer in {API_READ_S:g} s")
