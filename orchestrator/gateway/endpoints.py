"""The live endpoint table the gateway routes from, and the ejections it makes itself.

The control plane rebuilds the table from observed state (agent heartbeats, Ray Serve
status) with :meth:`EndpointTable.replace`; the gateway reads it on every request and
records failures with :meth:`eject`, which takes an endpoint out of rotation at once,
before any heartbeat could say so (passive outlier ejection). An ejection lasts
``ejection_s``; an endpoint that fails again after it is readmitted is ejected again.
Every answer a replica gives is told to :meth:`answered`: 502, 503 and 504 eject at once
(the replica cannot answer now; a 503 with a Retry-After for no longer than it says), while a 500 is an error of that one request and ejects
only after ``ejecting_500s`` in a row with no other answer between them (a replica whose
session broke answers 500 to everything; one odd body must not take a healthy replica
from every caller). A request the replica took and did not answer in time
(:meth:`timed_out`: a huge batch) counts in the same run: one slow request must not take
the replica from every caller either, while one that hangs on everything is ejected.
When every replica a caller may use is ejected, they are tried all the same
(``routing.rank``'s panic rule).

A model whose autoscaled deployment is at zero replicas is *cold*. A request for it
:meth:`wakes <EndpointTable.wake>` it (the autoscaler reads the count of wakes and asks for
a replica) and waits in :meth:`EndpointTable.wait_for_endpoints` until the table has one.

A model whose deployment was applied after the current table's pass had read the store is
*pending* (:meth:`EndpointTable.note_applied`): it is known, with "being placed" as the
reason it has no endpoint, until a pass that read the store after it publishes its table.
Without that, a request sent right after an apply was told the model is not deployed (404)
for as long as the pass then running took (seconds while a data centre starts).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from starlette import datastructures

from orchestrator.gateway import cascade_rules, replica_index, routing, skips

#: What ``GET /v1/endpoints/{model}`` reads of its query: who is asking.
CALLER_PARAMETERS = ("lat", "lon", "region", "residency")


#: Which of a model's replicas an index holds: (deployments (None: all), whether those
#: deployments are left out instead, tiers (None: all), whether only those serving LoRA
#: adapters).
Selection = tuple[frozenset[str] | None, bool, frozenset[str] | None, bool]


@dataclass
class LaidOut:
    """One model's replicas as the table held them when its indices were built, and those
    indices (a deployment's, a cascade stage's...), None where a selection has no replica.
    They are a function of the replicas alone: a new table that lists the model's replicas
    alike (load and health included) keeps them."""

    endpoints: tuple[routing.Endpoint, ...]
    indices: dict[Selection, replica_index.ReplicaIndex | None] = field(default_factory=dict)


#: When a loss marked here must have been marked for another replica to have heard of it by
#: now: one time for all, or per URL (:meth:`EndpointTable.replace`'s ``heard_before``).
HeardBefore = float | Callable[[str], float]


def _at(heard_before: HeardBefore, url: str) -> float:
    return heard_before(url) if callable(heard_before) else heard_before


def listing_order(e: routing.Endpoint) -> tuple[str, str, str, str]:
    """How a model's endpoints are listed (ties in routing are broken by site before this)."""
    return e.model, e.deployment, e.site, e.url


@dataclass
class EndpointTable:
    clock: Callable[[], float] = time.monotonic
    ejection_s: float = 15.0
    #: 500s (or timeouts) in a row after which a replica is ejected (Envoy's consecutive_5xx has 5 too)
    ejecting_500s: int = 5
    _by_model: dict[str, tuple[routing.Endpoint, ...]] = field(default_factory=dict)
    #: Each model's replicas as arrays to rank from (a deployment's, a cascade stage's: :meth:`_index`),
    #: built by the first request after a :meth:`replace` that changed the model's replicas.
    _laid_out: dict[str, LaidOut] = field(default_factory=dict)
    _ejected_until: dict[str, float] = field(default_factory=dict)
    _500s_in_a_row: dict[str, int] = field(default_factory=dict)
    _inflight: dict[str, int] = field(default_factory=dict)
    regions: routing.RegionIndex = field(default_factory=routing.RegionIndex)
    #: Every model some deployment serves, with why it has no endpoint when it has none.
    _deployed: dict[str, str] = field(default_factory=dict)
    #: Models of deployments applied since the table's pass read the store: (when noted, why).
    _pending: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: Models the table this one follows notes as pending (a follower's or standalone gateway's).
    _pending_followed: frozenset[str] = frozenset()
    #: Models scaled to zero by autoscaling: a request starts a replica.
    _cold: frozenset[str] = frozenset()
    #: Models with replicas placed that do not answer yet (their deployment is Progressing):
    #: a caller is told when to retry, as for a pending model.
    _starting: frozenset[str] = frozenset()
    #: Requests that found a cold model, by model, since the control plane started.
    wakes: dict[str, int] = field(default_factory=dict)
    #: Called with the model on each wake (the reconciler's trigger).
    on_wake: Callable[[str], None] = lambda model: None
    _waiters: dict[str, list[asyncio.Future[None]]] = field(default_factory=dict)
    #: Models whose deployment has a cascade, by model: requests to them run it.
    cascades: dict[str, cascade_rules.CascadeRoute] = field(default_factory=dict)
    #: Called after each :meth:`replace` and :meth:`set_cascades` (the control plane's watch publisher).
    on_change: Callable[[], None] = lambda: None
    #: False until the first :meth:`replace`: before the control plane's first pass (or a
    #: gateway's first table) no model is known, which is not the same as "not deployed".
    published: bool = False
    #: The regions a caller may name: those of the sites (:attr:`regions`) and of the endpoints.
    _known_regions: frozenset[str] = frozenset()
    #: URLs marked down (:meth:`mark_down`: their agent is lost), with when (:attr:`clock`).
    #: A pass under way at the mark read the agent healthy: every table keeps them down until
    #: one whose health was read after the mark replaces it, or, followed from another
    #: replica, one that lists them down or not at all (that replica has seen the loss), or
    #: one read after that replica must have heard of the loss (``heard_before``): its
    #: down-then-healthy tables may both have come between two reads of this one's.
    _down: dict[str, float] = field(default_factory=dict)

    def replace(self, endpoints: Iterable[routing.Endpoint], regions: routing.RegionIndex | None = None,
                deployed: dict[str, str] | None = None, cold: Iterable[str] | None = None,
                read_since: float | None = None, pending: Iterable[str] | None = None,
                starting: Iterable[str] | None = None, health_since: float | None = None,
                followed: bool = False, heard_before: HeardBefore | None = None) -> None:
        """The new table. ``read_since``: when the pass that made it began reading the store
        (:attr:`clock` time); pending notes made before then are dropped, as that pass saw
        their deployments (it placed them, or says in ``deployed`` why it could not).
        ``pending``: the models that the table this one follows notes as pending (their
        reasons are in its ``deployed``). ``starting``: the models whose replicas are placed
        but do not answer yet. None (for each of these): as the table has it.
        ``health_since``: when the endpoints' health was read (default ``read_since``);
        URLs marked down before then are routed as the table says, those marked since stay
        down. ``followed``: the table is another replica's (its marks are its own), its word
        on every loss marked here before ``heard_before`` (None: on none; per URL where it is
        a function of the URL: agents heartbeat at intervals of their own, and the other
        replica takes as long to hear of each one's loss)."""
        if health_since is None:
            health_since = read_since
        endpoints = list(endpoints)
        if health_since is not None:
            self._down = {url: at for url, at in self._down.items() if at >= health_since}
        if followed and self._down:
            listed = {e.url for e in endpoints if e.healthy}
            self._down = {url: at for url, at in self._down.items()
                          if url in listed and (heard_before is None or at >= _at(heard_before, url))}
        grouped: dict[str, list[routing.Endpoint]] = {}
        for e in endpoints:
            if e.healthy and e.url in self._down:
                e = dataclasses.replace(e, healthy=False)
            grouped.setdefault(e.model, []).append(e)
        # one order whatever the input's (by deployment, site, URL): a gateway that rebuilds the
        # table from deltas (gateway.wire.apply_delta) holds it exactly as the control plane does
        self._by_model = {m: tuple(sorted(es, key=listing_order)) for m, es in grouped.items()}
        self._laid_out = self._still_laid_out()
        if self._500s_in_a_row:  # counts of replicas gone from the table go with them
            urls = {e.url for es in grouped.values() for e in es}
            self._500s_in_a_row = {u: n for u, n in self._500s_in_a_row.items() if u in urls}
        if regions is not None:
            self.regions = regions
        self._known_regions = frozenset(self.regions.centroids) | {e.region for es in grouped.values() for e in es if e.region}
        if deployed is not None:
            self._deployed = dict(deployed)
        if cold is not None:
            self._cold = frozenset(cold)
        if starting is not None:
            self._starting = frozenset(starting)
        if pending is not None:
            self._pending_followed = frozenset(pending)
        if read_since is not None:
            self._pending = {m: note for m, note in self._pending.items() if note[0] >= read_since and m not in self._deployed}
        self.published = True
        for model in [m for m in self._waiters if m in self._by_model]:
            for waiter in self._waiters.pop(model):
                if not waiter.done():
                    waiter.set_result(None)
        self.on_change()

    def mark_down(self, url: str) -> bool:
        """Route to the replicas at ``url`` no more, before the next table says so: their agent
        is stopping or lost (its draining heartbeat is in). It stays down in the tables that
        replace this one until one whose health was read after now (see :attr:`_down`), or
        until :meth:`mark_up`. True when the table changed."""
        url = url.rstrip("/")
        self._down[url] = self.clock()
        if any(e.url == url and e.healthy for es in self._by_model.values() for e in es):
            self.replace(self.all_endpoints())
            return True
        return False

    def marked_before(self, at: HeardBefore) -> bool:
        """Whether a URL marked down before ``at`` (per URL where it is a function) is still marked."""
        return any(marked < _at(at, url) for url, marked in self._down.items())

    def mark_up(self, url: str) -> None:
        """The agent at ``url`` is back: the tables that follow route to it as they say."""
        self._down.pop(url.rstrip("/"), None)

    def set_cascades(self, routes: dict[str, cascade_rules.CascadeRoute]) -> None:
        self.cascades = dict(routes)
        self.on_change()

    def all_endpoints(self) -> list[routing.Endpoint]:
        return [e for m in sorted(self._by_model) for e in self._by_model[m]]

    def deployed(self) -> dict[str, str]:
        """Every deployed model, with why it has no endpoint ("" or a reason); pending ones
        included (gateways that follow this table learn of them with it)."""
        return {**{m: why for m, (_, why) in self._pending.items()}, **self._deployed}

    def note_applied(self, reasons: dict[str, str]) -> bool:
        """Note models of newly applied deployments that the table does not know, each with
        why it has no endpoint yet, and say the new why of one noted already (changes went on
        hold, or off it, since); True when the table changed. A note keeps the time it was
        first made: the pass that read the store after it still drops it."""
        now = self.clock()
        changed = {m: (self._pending[m][0] if m in self._pending else now, why) for m, why in reasons.items()
                   if m not in self._deployed and m not in self._by_model and self._pending.get(m, (0.0, None))[1] != why}
        if changed:
            self._pending.update(changed)
            self.on_change()
        return bool(changed)

    def unknown_region(self, region: str, name: str = "X-Edgeplane-Region", instead: str = "X-Edgeplane-Location: lat,lon",
                       parameter: str | None = None) -> routing.NoRoute | None:
        """Why a caller's ``region`` (given as ``name``) places it nowhere, or None. A region
        is known when a site declares it, whether or not a replica runs there now (a caller
        there is then answered from the nearest one, or told there is none). Before the
        first table no region is known yet and none is refused: the answer then says the
        table is missing."""
        if not self.published:
            return None
        return routing.check_region(region, self._known_regions, name, instead, parameter)

    def query_caller(self, params: datastructures.QueryParams) -> routing.Caller | routing.NoRoute:
        """The caller of the endpoint list (``?lat=&lon=&region=&residency=``), or why its
        query cannot be read (400, naming the parameter). A parameter given twice is refused
        as every control-plane route refuses it (``paging.refuse_repeated``): which value
        counts is each server's and proxy's own rule."""
        names = collections.Counter(name for name, _ in params.multi_items())
        if repeated := sorted(name for name, n in names.items() if n > 1):
            said = ", ".join(f"{name!r} is given {names[name]} times" for name in repeated)
            return routing.NoRoute(f"query parameter {said}; give each once", 400, parameter=repeated[0] if len(repeated) == 1 else None,
                                   problem="RepeatedParameter")
        if unknown := sorted(set(params) - set(CALLER_PARAMETERS)):  # a misspelt one would rank as if from nowhere
            return routing.NoRoute(f"unknown query parameter {', '.join(map(repr, unknown))}: this list takes "
                                   f"{', '.join(CALLER_PARAMETERS)}", 400, parameter=unknown[0] if len(unknown) == 1 else None,
                                   problem="UnknownParameter")
        caller = routing.parse_query_caller(params.get("lat"), params.get("lon"), params.get("region"), params.get("residency"))
        if isinstance(caller, routing.NoRoute) or caller.region is None:
            return caller
        return self.unknown_region(caller.region, "query parameter region", "lat and lon", "region") or caller

    def cold(self) -> frozenset[str]:
        return self._cold

    def starting(self) -> frozenset[str]:
        return self._starting

    def retry_after(self, model: str) -> int | None:
        """When a caller of ``model``, which has no replica to answer, may retry (seconds):
        2 while its deployment was just applied or its replicas start, when a retry soon
        can succeed; None when nothing is on its way (the reason says why)."""
        return 2 if self.is_pending(model) or model in self._starting else None

    def is_cold(self, model: str) -> bool:
        return model in self._cold and not self._by_model.get(model)

    def wake(self, model: str) -> None:
        """Note a request for a cold model, so that the autoscaler starts a replica."""
        self.wakes[model] = self.wakes.get(model, 0) + 1
        self.on_wake(model)

    async def wait_for_endpoints(self, model: str, timeout: float) -> bool:
        """Wait until ``model`` has an endpoint; False if ``timeout`` passed first."""
        if self._by_model.get(model):
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(model, []).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            waiting = self._waiters.get(model)
            if waiting is not None and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._waiters[model]

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model the table has (served, deployed or pending) or a
        cascade's name: the names worth a metric label of their own."""
        return name in self._by_model or name in self._deployed or name in self._pending or name in self.cascades

    def models(self) -> list[str]:
        return sorted(set(self._by_model) | set(self._deployed) | set(self._pending))

    def unavailable_reason(self, model: str) -> str | None:
        """Why a deployed model has no endpoint; None when the model is not deployed at all."""
        why = self._deployed.get(model)
        if why is None and model in self._pending:
            why = self._pending[model][1]
        return why

    def is_pending(self, model: str) -> bool:
        """Whether ``model``'s deployment was just applied and its replicas are being placed:
        a retry in a few seconds can succeed (the gateway says so with Retry-After)."""
        if model in self._pending_followed:
            return not self._by_model.get(model)
        return model in self._pending and model not in self._deployed

    def pending(self) -> frozenset[str]:
        """The models :meth:`is_pending` is true of (followers learn them with the table)."""
        return frozenset(m for m in {*self._pending, *self._pending_followed} if self.is_pending(m))

    def endpoints(self, model: str) -> tuple[routing.Endpoint, ...]:
        return self._by_model.get(model, ())

    def target(self, name: str) -> tuple[str, str | None]:
        """The model a request for ``name`` runs, and the one deployment whose replicas may
        answer it (None: any of the model's). A cascade is called by its deployment's name
        too, and then only that deployment's replicas answer, whatever the route (plain,
        versioned, ``X-Edgeplane-Cascade: off``): another deployment of the same model may
        place its replicas in another jurisdiction."""
        route = self.cascades.get(name)
        if route is None or route.model == name:
            return name, None
        return route.model, route.deployment

    def with_local_load(self, model: str) -> list[routing.Endpoint]:
        """The model's endpoints with the gateway's own in-flight count folded in."""
        out = []
        for e in self._by_model.get(model, ()):
            mine = self._inflight.get(e.url, 0)
            out.append(e if not mine else dataclasses.replace(e, inflight=e.inflight + mine))
        return out

    def rank(self, model: str, caller: routing.Caller, position: tuple[float, float] | None,
             api: str | None = routing.API_V2, limit: int | None = None,
             deployment: str | None = None, version: str | None = None, *, lora: bool = False) -> list[routing.Ranked] | routing.NoRoute:
        """The model's endpoints that speak ``api`` (any, when None) for ``caller``, best
        first, the ``limit`` best only when given (``routing.rank``'s rule on the live table:
        the gateway's own load and ejections included); ``position`` is the gateway's, for
        callers that give none; ``deployment``: that deployment's endpoints only (:meth:`target`);
        ``version``: those of them that may answer for it (``routing.holding``'s rule);
        ``lora``: those serving LoRA adapters only (``Endpoint.lora``)."""
        index = self._index(model, None if deployment is None else frozenset({deployment}), lora=lora)
        if index is None:
            if lora and self._index(model, None if deployment is None else frozenset({deployment})) is not None:
                whose = f"deployment {deployment!r} of model {model!r}" if deployment is not None else f"model {model!r}"
                return routing.NoRoute(f"{whose} serves no LoRA adapters: no replica of it running now is of a vllm variant "
                                       "with llm.lora; ask for the base model without ':<adapter>'", 404)
            if deployment is not None and self._by_model.get(model):
                return routing.NoRoute(f"deployment {deployment!r} has no replica of model {model!r} running")
            return routing.NoRoute(routing.NOT_PLACED)
        if api is not None and not index.speaks(api):
            spoken = ", ".join(sorted(index.by_api))
            return routing.NoRoute(f"model {model!r} is served over {spoken} only, not {api}", 404)
        return index.rank(caller, routing.position_of(caller, self.regions, position), api=api, ejected=self.ejected(),
                          local_load=self._inflight, limit=limit, version=version)

    def skipped(self, model: str, caller: routing.Caller, position: tuple[float, float] | None, answered: str,
                tried: Collection[str], api: str | None = routing.API_V2, deployment: str | None = None,
                version: str | None = None, *, lora: bool = False) -> skips.Skips | None:
        """Why replicas nearer ``caller`` than the one at site ``answered`` were not tried, as
        :meth:`rank` with the same arguments ranked them (``ReplicaIndex.skipped``); None when
        it is the nearest. ``tried``: the sites moved on from (they failed; they are not skipped)."""
        index = self._index(model, None if deployment is None else frozenset({deployment}), lora=lora)
        if index is None:
            return None
        return index.skipped(caller, routing.position_of(caller, self.regions, position), answered, tried, api=api,
                             ejected=self.ejected(), version=version)

    def skipped_stage(self, route: cascade_rules.CascadeRoute, stage: int, caller: routing.Caller,
                      position: tuple[float, float] | None, answered: str, tried: Collection[str]) -> skips.Skips | None:
        """:meth:`skipped` among the replicas of a cascade's ``stage``, as :meth:`rank_stage` ranked them."""
        index = self._index(route.model, frozenset({route.deployment}), tiers=route.stages[stage].tiers)
        if index is None:
            return None
        return index.skipped(caller, routing.position_of(caller, self.regions, position), answered, tried, api=None,
                             ejected=self.ejected(), panic=cascade_rules.stage_panics(route, stage))

    def rank_stage(self, route: cascade_rules.CascadeRoute, stage: int, caller: routing.Caller,
                   position: tuple[float, float] | None, limit: int | None = None) -> list[routing.Ranked] | routing.NoRoute:
        """:func:`cascade_rules.stage_ranking` on the live table, the ``limit`` best only when
        given, from the stage's replicas laid out as arrays as :meth:`rank` ranks a model's."""
        spec = route.stages[stage]
        index = self._index(route.model, frozenset({route.deployment}), tiers=spec.tiers)
        if index is None:
            return cascade_rules.no_stage_replica(spec)
        return index.rank(caller, routing.position_of(caller, self.regions, position), api=None, ejected=self.ejected(),
                          local_load=self._inflight, panic=cascade_rules.stage_panics(route, stage), limit=limit)

    def cascade_for(self, routes: Sequence[cascade_rules.CascadeRoute], caller: routing.Caller,
                    position: tuple[float, float] | None) -> cascade_rules.CascadeRoute | None:
        """:func:`cascade_for` of one model's cascades (``routes``) on the live table: only
        whether anyone is reachable and who is best matters, so each side ranks its best one."""
        theirs = frozenset(r.deployment for r in routes)

        def best(excluded: bool) -> list[routing.Ranked] | routing.NoRoute:
            index = self._index(routes[0].model, theirs, excluded=excluded)
            if index is None:
                return routing.NoRoute(routing.NOT_PLACED)
            return index.rank(caller, routing.position_of(caller, self.regions, position), api=None, ejected=self.ejected(),
                              local_load=self._inflight, limit=1)

        return cascade_rules.cascade_of(routes, best)

    def serves(self, model: str, api: str) -> bool:
        """Whether one of ``model``'s endpoints speaks ``api``."""
        index = self._index(model)
        return index is not None and index.speaks(api)

    def _still_laid_out(self) -> dict[str, LaidOut]:
        """The models laid out before the table changed whose replicas it lists alike, each now
        held as its indices hold them (the new table's equal values are let go). Laying a
        model on 5,000 sites out costs the first request after a change ~7 ms, so a change at
        one model (a heartbeat's load, a health flip) must cost that model's alone;
        comparing the replicas costs a fraction of it, and nothing where they are the same
        objects (a table rebuilt from a delta keeps the endpoints it did not touch)."""
        kept = {}
        for model, laid in self._laid_out.items():
            now = self._by_model.get(model)
            if now is not None and now == laid.endpoints:
                self._by_model[model] = laid.endpoints
                kept[model] = laid
        return kept

    def _index(self, model: str, deployments: frozenset[str] | None = None, *, excluded: bool = False,
               tiers: frozenset[str] | None = None, lora: bool = False) -> replica_index.ReplicaIndex | None:
        """``model``'s replicas laid out for ranking (of ``deployments`` only, or all but
        those when ``excluded``; on ``tiers`` only; with ``lora``, those serving LoRA adapters
        only), built by the first request after the model's replicas changed."""
        laid = self._laid_out.get(model)
        if laid is None:
            mine = self._by_model.get(model)
            if mine is None:  # a name any caller may send: nothing is kept of it
                return None
            laid = self._laid_out[model] = LaidOut(mine)
        key: Selection = (deployments, excluded, tiers, lora)
        try:
            return laid.indices[key]
        except KeyError:
            pass
        endpoints = [e for e in laid.endpoints
                     if (deployments is None or (e.deployment in deployments) != excluded) and (tiers is None or e.tier in tiers)
                     and (e.lora or not lora)]
        # None kept too: a deployment or stage with no replica of a model on many sites is asked
        # at every request, and would scan the model's replicas each time
        index = laid.indices[key] = replica_index.ReplicaIndex.build(endpoints) if endpoints else None
        return index

    def ejected(self) -> frozenset[str]:
        now = self.clock()
        expired = [u for u, until in self._ejected_until.items() if until <= now]
        for u in expired:
            del self._ejected_until[u]
        return frozenset(self._ejected_until)

    def eject(self, url: str, for_s: float | None = None) -> None:
        """Take ``url`` out of rotation for ``ejection_s``, or ``for_s`` when that is shorter."""
        self._ejected_until[url] = self.clock() + (self.ejection_s if for_s is None else min(for_s, self.ejection_s))
        self._500s_in_a_row.pop(url, None)

    def answered(self, url: str, status: int, retry_after_s: float | None = None) -> None:
        """Record a replica's answer: 502, 503 and 504 eject it, and a redirect (3xx: an
        ingress in front of it redirects, every request alike; the gateway follows none), the
        ``ejecting_500s``-th 500 (or timeout) in a row too; any other answer ends a run of them. A 503 that says
        when to retry (``retry_after_s``, its Retry-After) ejects for that long at most: a
        replica whose model was replaced while a request waited serves the new one at once."""
        if 300 <= status < 400:
            self.eject(url)
        elif status < 500:
            if self._500s_in_a_row:
                self._500s_in_a_row.pop(url, None)
        elif status != 500:
            self.eject(url, retry_after_s if status == 503 else None)
        else:
            self._failed_one(url)

    def malformed(self, url: str) -> None:
        """Record a 200 that is no answer (a proxy's own page where a stream was asked for, JSON
        cut short): like a 500, an error of that request until ``ejecting_500s`` in a row; a
        replica behind a proxy that answers every request so is then ejected."""
        self._failed_one(url)

    def timed_out(self, url: str) -> None:
        """Record a request the replica took and did not answer in time: like a 500, an
        error of that request until ``ejecting_500s`` of them in a row."""
        self._failed_one(url)

    def failed(self, url: str, *, slow: bool) -> None:
        """Record a request the replica did not answer: a ``slow`` one (taken, not answered in
        time) as :meth:`timed_out`; any other (refused or dropped connection: down) ejects it."""
        if slow:
            self.timed_out(url)
        else:
            self.eject(url)

    def _failed_one(self, url: str) -> None:
        if (count := self._500s_in_a_row.get(url, 0) + 1) >= self.ejecting_500s:
            self.eject(url)
        else:
            self._500s_in_a_row[url] = count

    def started(self, url: str) -> None:
        self._inflight[url] = self._inflight.get(url, 0) + 1

    def finished(self, url: str) -> None:
        left = self._inflight.get(url, 1) - 1
        if left:
            self._inflight[url] = left
        else:
            self._inflight.pop(url, None)
