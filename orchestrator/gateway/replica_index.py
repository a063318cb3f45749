"""One model's replicas laid out as arrays, so that routing a request costs what it tries.

``routing.rank`` states the rule (residency, health and ejections, expected latency,
fallback tiers) over a list of endpoints: a distance, a copy and a ranked entry per
replica, then a sort. A model on every site of a fleet is ranked on every request, while
the proxy tries at most its few attempts: at 5,000 replicas that was ~20 ms of the event
loop's CPU per request. :class:`ReplicaIndex` applies the same rule to arrays built once
per endpoint table (lazily, by the first request for the model): per request, masks and
one distance per distinct position in numpy, a partition for the ``limit`` best, and
ranked entries for those alone. Ties resolve as the rule's stable sort does (by site, then
the table's listing order), so both answer the same replicas in the same order. A
versioned request is ranked the same way, its replicas holding the version first, then
those whose version is not known (``routing.holding``'s rule after ``routing.rank``'s).

After an answer, :meth:`ReplicaIndex.skipped` says why replicas nearer the caller than the
one that answered were not tried (``skips``); an answer from the nearest costs it one
comparison with the nearest distance, kept per caller position as the distances are. One
not from the nearest is worked out once per index and kept (:data:`CACHED_SKIPS`): a
caller whose nearest replica can never answer it (outside its residency, another version)
asks the same on every request, and an index is built anew whenever the model's replicas
change (health included), so only what is not in it (the ejections) is in the key.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from orchestrator.gateway import routing, skips
from orchestrator.scheduler import geo

#: Caller positions whose distances an index keeps (the gateway's own, regions' centroids):
#: callers that give their own coordinates rarely repeat them, so the cache stays small.
CACHED_POSITIONS = 64
#: Answers' skips an index keeps (:meth:`ReplicaIndex.skipped`), the least recently asked let go first.
CACHED_SKIPS = 256

Mask = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.intp]


@dataclass(frozen=True)
class ReplicaIndex:
    endpoints: tuple[routing.Endpoint, ...]  # in the table's listing order
    healthy: Mask
    checks_tokens: Mask  # an agent run with --serve-auth token (Endpoint.auth): no candidate for an anonymous caller
    in_deployment_residency: Mask
    country: Ints  # index into ``countries``
    countries: tuple[str, ...]  # in order of first appearance
    inflight: npt.NDArray[np.float64]  # as the table reports it, before the gateway's own
    site_rank: Ints  # ties in expected latency go to the lesser site name
    position: Ints  # index into the distinct positions below
    lat_rad: npt.NDArray[np.float64]
    lon_rad: npt.NDArray[np.float64]
    cos_lat: npt.NDArray[np.float64]
    by_url: Mapping[str, Sequence[int]]
    by_api: Mapping[str, Mask]
    version: Ints  # index into ``versions``
    versions: tuple[str, ...]  # in order of first appearance; "" where a replica's is not known
    site_row: Mapping[str, int]  # each site's first replica, in listing order
    _distances: dict[tuple[float, float], npt.NDArray[np.float64]] = field(default_factory=dict, compare=False, repr=False)
    _tiers: dict[tuple[str, ...], Ints] = field(default_factory=dict, compare=False, repr=False)
    #: The round trip to the nearest replica speaking an API, by (position, API), for :meth:`skipped`
    _nearest: dict[tuple[tuple[float, float], str | None], float] = field(default_factory=dict, compare=False, repr=False)
    #: :meth:`skipped`'s answers not from the nearest, by all they depend on besides the index
    _skips: collections.OrderedDict[tuple[object, ...], skips.Skips | None] = field(
        default_factory=collections.OrderedDict, compare=False, repr=False)

    @classmethod
    def build(cls, endpoints: Sequence[routing.Endpoint]) -> ReplicaIndex:
        # the first request after each table change pays this: comprehensions, then arrays
        n = len(endpoints)
        countries: dict[str, int] = {}
        versions: dict[str, int] = {}
        positions: dict[tuple[float, float], int] = {}
        by_url: dict[str, list[int]] = {}
        by_api: dict[str, list[int]] = {}
        for i, e in enumerate(endpoints):
            by_url.setdefault(e.url, []).append(i)
            by_api.setdefault(e.api, []).append(i)
        sites = {s: i for i, s in enumerate(sorted({e.site for e in endpoints}))}
        position = np.array([positions.setdefault((e.lat, e.lon), len(positions)) for e in endpoints], dtype=np.intp)
        distinct = np.radians(np.array(list(positions), dtype=np.float64).reshape(len(positions), 2))
        return cls(
            endpoints=tuple(endpoints),
            healthy=np.array([e.healthy for e in endpoints], dtype=bool),
            checks_tokens=np.array([e.auth == routing.AUTH_TOKEN for e in endpoints], dtype=bool),
            in_deployment_residency=np.array([not e.allowed_countries or e.country in e.allowed_countries for e in endpoints], dtype=bool),
            country=np.array([countries.setdefault(e.country, len(countries)) for e in endpoints], dtype=np.intp),
            countries=tuple(countries),
            inflight=np.array([e.inflight for e in endpoints], dtype=np.float64),
            site_rank=np.array([sites[e.site] for e in endpoints], dtype=np.intp),
            position=position,
            lat_rad=distinct[:, 0], lon_rad=distinct[:, 1], cos_lat=np.cos(distinct[:, 0]),
            by_url=by_url,
            by_api={api: _mask(n, at) for api, at in by_api.items()},
            version=np.array([versions.setdefault(e.version, len(versions)) for e in endpoints], dtype=np.intp),
            versions=tuple(versions),
            site_row={e.site: i for i, e in reversed(list(enumerate(endpoints)))},
        )

    def speaks(self, api: str) -> bool:
        return api in self.by_api

    def rank(self, caller: routing.Caller, where: tuple[float, float] | None, *, api: str | None,
             ejected: Collection[str] = frozenset(), local_load: Mapping[str, int] | None = None,
             panic: bool = True, limit: int | None = None, version: str | None = None) -> list[routing.Ranked] | routing.NoRoute:
        """``routing.rank`` of the endpoints that speak ``api`` (all, when None) for a caller
        at ``where``, with the gateway's own in-flight counts (``local_load``, by URL) added;
        with ``version``, ``routing.holding`` of that ranking; the ``limit`` best only, when given."""
        spoken = self.by_api.get(api) if api is not None else np.ones(len(self.endpoints), bool)
        if spoken is None or not spoken.any():
            return routing.NoRoute(routing.NOT_PLACED)
        allowed = spoken & self.in_deployment_residency
        if caller.residency:
            allowed &= self._in_countries(caller.residency)
            if not allowed.any():
                return routing.NoRoute(routing.outside_caller_residency(caller, {self.countries[i] for i in self.country[spoken]}))
        if not allowed.any():
            return routing.NoRoute(routing.OUTSIDE_DEPLOYMENT_RESIDENCY)
        if caller.anonymous and (allowed & self.checks_tokens).any():
            checking = allowed
            allowed = allowed & ~self.checks_tokens
            if not allowed.any():
                return routing.NoRoute(routing.needs_token({self.endpoints[i].site for i in np.flatnonzero(checking)}))
        healthy = allowed & self.healthy
        live = healthy & ~self._at(ejected) if ejected else healthy
        if panic and not live.any():
            live = healthy
        if not live.any():
            return routing.NoRoute(routing.no_healthy_replica({self.endpoints[i].site for i in np.flatnonzero(allowed)}))
        chosen = np.flatnonzero(live)
        later = None  # by replica chosen: 1 where its version is not known, to rank after those that hold it
        if version is not None:
            held = self._holding(chosen, version)
            if isinstance(held, routing.NoRoute):
                return held
            chosen, later = held
        load = self.inflight
        if local_load:  # the gateway's own requests in flight: walk the shorter of the two maps
            load = load.copy()
            if len(local_load) <= len(self.by_url):
                added = ((self.by_url.get(url, ()), mine) for url, mine in local_load.items())
            else:
                added = ((at, local_load.get(url, 0)) for url, at in self.by_url.items())
            for at, mine in added:
                for i in at:
                    load[i] += mine
        expected = routing.INFLIGHT_PENALTY_MS * load[chosen]
        if where is not None:
            expected += self._distances_from(where)[self.position[chosen]]
        fallback = self.endpoints[live.argmax()].fallback  # the rule's: its first live replica's
        tiers = self._tier_rank(fallback)[chosen] if fallback else None
        if later is not None and later.any():  # (holds the version, tier) as one group
            tiers = later * (len(fallback) + 1) + (tiers if tiers is not None else 0)
        order = best(expected, self.site_rank[chosen], tiers, limit)
        return [routing.Ranked(self._loaded(int(chosen[j]), load), float(expected[j])) for j in order]

    def skipped(self, caller: routing.Caller, where: tuple[float, float] | None, answered: str, tried: Collection[str], *,
                api: str | None, ejected: Collection[str] = frozenset(), panic: bool = True,
                version: str | None = None) -> skips.Skips | None:
        """Why the replicas that speak ``api`` nearer ``where`` than the one at site ``answered``
        were passed over, as :meth:`rank` with the same arguments ranked them, the sites
        ``tried`` (moved on from: ``X-Edgeplane-Failover``) left out; None when there are none,
        and at once when ``answered`` is the nearest (or no position is known)."""
        row = self.site_row.get(answered) if where is not None else None
        if row is None or where is None:
            return None
        distances = self._distances_from(where)
        mine = float(distances[self.position[row]])
        nearest = self._nearest.get((where, api))
        if nearest is None:
            spoken = self.by_api.get(api) if api is not None and len(self.by_api) > 1 else None
            nearest = float(distances[self.position[spoken]].min() if spoken is not None else distances.min())
            if len(self._nearest) >= CACHED_POSITIONS:
                self._nearest.clear()
            self._nearest[(where, api)] = nearest
        if mine <= nearest:
            return None
        # the ejections of this index's replicas alone: one elsewhere changes nothing here
        key = (where, caller.residency, caller.anonymous, answered, tuple(tried), api, panic, version,
               frozenset(u for u in ejected if u in self.by_url) if ejected else frozenset())
        try:
            found = self._skips[key]
        except KeyError:
            found = self._skips[key] = self._explained(caller, distances[self.position], row, tried, api=api, ejected=ejected,
                                                       panic=panic, version=version)
            if len(self._skips) > CACHED_SKIPS:
                self._skips.popitem(last=False)
        else:
            self._skips.move_to_end(key)
        return found

    def _explained(self, caller: routing.Caller, away: npt.NDArray[np.float64], answered: int, tried: Collection[str], *,
                   api: str | None, ejected: Collection[str], panic: bool, version: str | None) -> skips.Skips | None:
        """:meth:`skipped` once the answer (replica ``answered``) is known not to be from the
        nearest: the rule's masks over the nearer replicas listed only, each given the first
        reason that holds (``skips.REASONS``), replicas at ``away`` (ms) from the caller."""
        spoken = self.by_api.get(api) if api is not None else None
        nearer = away < away[answered]
        if spoken is not None:
            nearer &= spoken
        if tried:
            nearer &= ~np.isin(self.site_rank, [self.site_rank[self.site_row[s]] for s in tried if s in self.site_row])
        rows = np.flatnonzero(nearer)
        if not len(rows):
            return None
        sites = int(np.count_nonzero(np.bincount(self.site_rank[rows], minlength=len(self.site_row))))
        shown = _nearest_sites(rows, away, self.site_rank, skips.LISTED)
        allowed = self.in_deployment_residency.copy()
        if caller.residency:
            allowed &= self._in_countries(caller.residency)
        usable = allowed & ~self.checks_tokens if caller.anonymous else allowed
        ejections = self._at(ejected) if ejected else np.zeros(len(self.endpoints), bool)
        live = usable & self.healthy & ~ejections
        if spoken is not None:
            live &= spoken
        if panic and not live.any():
            ejections[:] = False  # every healthy replica ejected: the rule tried them all the same
        other_version = np.zeros(len(shown), bool)
        if version is not None:
            code = self.version[shown]
            held = self._code(version)
            other_version = code != held
            if self.version[answered] != held:  # the answer's version is not known: theirs not being known is no reason
                other_version &= code != self._code("")
        fallback = self.endpoints[answered].fallback
        tiers = self._tier_rank(fallback) if fallback else None
        later_tier = tiers[shown] > tiers[answered] if tiers is not None else np.zeros(len(shown), bool)
        reasons = np.select([~self.in_deployment_residency[shown], ~allowed[shown], ~usable[shown], ~self.healthy[shown], ejections[shown],
                             other_version, later_tier], list(skips.REASONS[:-1]), default=skips.LOAD)
        return skips.Skips(tuple(zip((self.endpoints[i].site for i in shown), reasons.tolist())), sites - len(shown))

    def _holding(self, chosen: Ints, version: str) -> tuple[Ints, Ints] | routing.NoRoute:
        """``routing.holding`` of ``chosen``: those holding ``version`` or whose version is not
        known, with 1 for each of the latter; the rule's 404 when none may answer for it."""
        code = self.version[chosen]
        holds, unknown = code == self._code(version), code == self._code("")
        may = holds | unknown
        if not may.any():
            return routing.NoRoute(routing.no_version(self.endpoints[chosen[0]].model, version,
                                                      {self.versions[i] for i in np.unique(code)}), 404)
        return chosen[may], unknown[may].astype(np.intp)

    def _in_countries(self, countries: Collection[str]) -> Mask:
        """Those whose site is in one of ``countries`` (a caller's residency)."""
        return np.isin(self.country, [i for i, c in enumerate(self.countries) if c in countries])

    def _code(self, version: str) -> int:
        """``version``'s index in :attr:`versions` (``""``: not known), -1 where no replica's is it."""
        return self.versions.index(version) if version in self.versions else -1

    def _loaded(self, i: int, load: npt.NDArray[np.float64]) -> routing.Endpoint:
        """Endpoint ``i`` with the gateway's own requests counted in its in-flight ones."""
        e = self.endpoints[i]
        return e if load[i] == e.inflight else dataclasses.replace(e, inflight=int(load[i]))

    def _at(self, urls: Collection[str]) -> Mask:
        mask = np.zeros(len(self.endpoints), bool)
        for url in urls:
            for i in self.by_url.get(url, ()):
                mask[i] = True
        return mask

    def _distances_from(self, where: tuple[float, float]) -> npt.NDArray[np.float64]:
        """Round trips (ms) from ``where`` to each distinct position."""
        found = self._distances.get(where)
        if found is None:
            found = geo.rtt_ms_many(where[0], where[1], self.lat_rad, self.lon_rad, self.cos_lat)
            if len(self._distances) >= CACHED_POSITIONS:
                self._distances.clear()
            self._distances[where] = found
        return found

    def _tier_rank(self, fallback: tuple[str, ...]) -> Ints:
        """Each endpoint's place in ``fallback`` (after it, when its tier is not named)."""
        found = self._tiers.get(fallback)
        if found is None:
            order = {t: i for i, t in enumerate(fallback)}
            found = self._tiers[fallback] = np.fromiter((order.get(e.tier, len(order)) for e in self.endpoints), np.intp,
                                                        len(self.endpoints))
        return found


def _nearest_sites(rows: Ints, away: npt.NDArray[np.float64], site: Ints, k: int) -> Ints:
    """Of ``rows``, the nearest replica (by ``away``) of each of the ``k`` nearest sites, nearest
    first, ties as the rule breaks them (by site): a partition finds the few candidates
    (all those as near as the 4k-th) without sorting the rest, unless a few sites hold them all."""
    if len(rows) > 4 * k:
        cut = np.partition(away[rows], 4 * k)[4 * k]
        found = _first_per_site(rows[away[rows] <= cut], away, site)
        if len(found) >= k:
            return found[:k]
    return _first_per_site(rows, away, site)[:k]


def _first_per_site(rows: Ints, away: npt.NDArray[np.float64], site: Ints) -> Ints:
    """``rows`` nearest first (ties by site), each site's nearest only."""
    rows = rows[np.lexsort((site[rows], away[rows]))]
    _, first = np.unique(site[rows], return_index=True)
    return rows[np.sort(first)]


def _mask(n: int, at: list[int]) -> Mask:
    mask = np.zeros(n, bool)
    mask[at] = True
    return mask


def best(expected: npt.NDArray[np.float64], site: Ints, tiers: Ints | None, limit: int | None) -> list[int]:
    """Positions ordered by (tier, expected, site), ties in position order (a stable sort's),
    the ``limit`` first only when given: a partition per tier finds them without sorting the rest."""
    n = len(expected)
    if limit is None or n <= limit:
        keys = (site, expected) if tiers is None else (site, expected, tiers)
        return np.lexsort(keys).tolist()
    groups = [np.arange(n)] if tiers is None else [g for t in range(int(tiers.max()) + 1) if len(g := np.flatnonzero(tiers == t))]
    out: list[int] = []
    for group in groups:
        need = limit - len(out)
        if len(group) > need:
            # every one at most the need-th smallest: ties at that value are sorted by site below
            nth = np.partition(expected[group], need - 1)[need - 1]
            group = group[expected[group] <= nth]
        out += group[np.lexsort((site[group], expected[group]))][:need].tolist()
        if len(out) == limit:
            break
    return out
