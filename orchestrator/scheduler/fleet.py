"""The site inventory as arrays, so that filtering 10,000 sites is a handful of vector ops.

Every hard constraint that depends only on a site (country, tier, labels, health, total
hardware, the runtimes its agent runs) becomes a boolean mask; free capacity lives in
mutable arrays that the planner draws down as it places replicas (``capacity.Capacity``).
The exact baseline and the diagnostics read the same masks, so "feasible" means one thing
everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from scipy.spatial import cKDTree

from orchestrator.scheduler import geo
from orchestrator.scheduler.model import DemandPoint, Deployment, Runtime, Site, Tier, Variant

NEAREST_KEPT = 256  # sites remembered per demand point, nearest first

#: Watts a budget may seem short by and still feed a replica: drawing thousands of replicas
#: of a few watts from a budget one at a time leaves some 1e-8 W of float error, which a
#: budget set to hold them exactly must not count against the last one.
WATTS_SLACK = 1e-6

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
#: What a replica of a variant needs from a site, as a cache key: variants that agree on it
#: fit the same sites (the GPU model included: same-sized cards of another model do not do).
Size = tuple[float, float, int, float, str | None]


def size_of(variant: Variant) -> Size:
    return (variant.cpu, variant.memory_mib, variant.gpus, variant.gpu_memory_gib, variant.gpu_model)


class Fleet:
    """Per-site arrays built once per plan call, plus caches of the masks asked for."""

    def __init__(
        self,
        sites: Sequence[Site],
        region_locations: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self.sites = tuple(sites)
        self.names = [site.name for site in self.sites]
        self.index = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != len(self.names):
            dup = sorted(n for n in self.index if self.names.count(n) > 1)
            raise ValueError(f"site {dup[0]!r} is declared twice")
        self.size = n = len(self.sites)
        countries = sorted({site.country for site in self.sites})
        self.country_ids = {code: i for i, code in enumerate(countries)}
        self.country = np.array([self.country_ids[s.country] for s in self.sites], dtype=np.int64)
        self.region_names = sorted({site.region for site in self.sites})
        self.region_ids = {name: i for i, name in enumerate(self.region_names)}
        self.region = np.array([self.region_ids[s.region] for s in self.sites], dtype=np.int64)
        self.is_edge = np.array([s.tier is Tier.EDGE for s in self.sites], dtype=bool)
        # the runtimes each site runs, as an index into the few distinct sets (None: any)
        runtime_ids: dict[frozenset[Runtime] | None, int] = {}
        self._runtimes = np.array([runtime_ids.setdefault(s.runtimes, len(runtime_ids)) for s in self.sites], dtype=np.int64)
        self._runtime_sets = list(runtime_ids)
        self.healthy = np.array([s.open for s in self.sites], dtype=bool)  # a draining site counts as unhealthy here
        self.draining = np.array([s.draining for s in self.sites], dtype=bool)
        restricted = np.array([s.admits is not None for s in self.sites], dtype=bool)
        self._restricted_at = np.flatnonzero(restricted)  # the cordoned sites: few, so admits_mask looks at them alone
        # per cordoned site, how many replicas of each (deployment, variant) it may run (``capacity.Capacity`` counts them down)
        self.admits: dict[int, Mapping[tuple[str, str], int]] = {
            i: self.sites[i].admits or {} for i in self._restricted_at.tolist()}
        self._unrestricted = ~restricted
        self._unrestricted.flags.writeable = False
        self.lat = np.array([s.lat for s in self.sites], dtype=np.float64)
        self.lon = np.array([s.lon for s in self.sites], dtype=np.float64)
        self.xyz = geo.unit_vectors(self.lat, self.lon).reshape(n, 3)
        self.cpu = np.array([s.cpu for s in self.sites], dtype=np.float64)
        self.memory_mib = np.array([s.memory_gib * 1024 for s in self.sites], dtype=np.float64)
        self.gpu_groups = max((len(s.gpus) for s in self.sites), default=0)
        self.gpu_count = np.zeros((n, self.gpu_groups), dtype=np.int64)
        self.gpu_memory = np.zeros((n, self.gpu_groups), dtype=np.float64)
        self.gpu_model = np.full((n, self.gpu_groups), "", dtype=object)
        for i, site in enumerate(self.sites):
            for k, group in enumerate(site.gpus):
                self.gpu_count[i, k] = group.count
                self.gpu_memory[i, k] = group.memory_gib
                self.gpu_model[i, k] = group.model
        self.pue = np.array([s.pue for s in self.sites], dtype=np.float64)
        # The power budget as the IT watts it leaves the replicas (budget / PUE), +inf where
        # none is set: a budget is then one more resource drawn down, and a fleet without any
        # skips it altogether (``any_budget``).
        self.budgeted = np.array([s.power_budget_watts is not None for s in self.sites], dtype=bool)
        self.power = np.array([s.power_budget_watts / s.pue if s.power_budget_watts is not None else np.inf
                               for s in self.sites], dtype=np.float64)
        self.any_budget = bool(self.budgeted.any())
        # Per site, the replicas whose room it holds until their replacements serve (``Site.held``):
        # its hardware above is whole, and ``capacity.Capacity`` starts with that room taken.
        self.held = {i: s.held for i, s in enumerate(self.sites) if s.held}
        # gCO2 per hour per watt drawn by a replica: grid g/kWh × PUE / 1000
        self.intensity = np.array([s.carbon_g_per_kwh * s.pue / 1000.0 for s in self.sites], dtype=np.float64)
        self.measured_rtt = {i: s.rtt_ms for i, s in enumerate(self.sites) if s.rtt_ms}
        self.region_locations = self._locate_regions(region_locations or {})
        self._residency_cache: dict[frozenset[str] | None, BoolArray] = {}
        self._label_cache: dict[tuple[str, str], BoolArray] = {}
        self._tier_cache: dict[frozenset[Tier], BoolArray] = {}
        self._runtime_cache: dict[Runtime, BoolArray] = {}
        self._near_cache: dict[tuple[float, float], tuple[IntArray, FloatArray]] = {}
        self._by_intensity: IntArray | None = None
        self._kdtree: cKDTree | None = None
        self._arange: IntArray | None = None
        self._unit_cache: dict[tuple[float, float], FloatArray] = {}
        self._points_cache: dict[tuple[tuple[float, float], ...], FloatArray] = {}
        self._static_cache: dict[tuple[float, float, bool], FloatArray] = {}
        self._hardware_cache: dict[tuple[object, ...], BoolArray] = {}
        # Deployments repeat a few rule sets (a country, the EU, anywhere) and variant
        # sizes: at 100,000 sites × 10,000 deployments one mask per deployment would be
        # gigabytes and most of the planning time, one per distinct rule set is neither.
        self._placement_cache: dict[tuple[object, ...], BoolArray] = {}
        self._eligible_cache: dict[tuple[object, ...], BoolArray] = {}
        self._content_cache: dict[bytes, BoolArray] = {}
        self._sites_cache: dict[int, tuple[BoolArray, IntArray]] = {}
        self._regions_cache: dict[int, tuple[BoolArray, IntArray]] = {}
        self._cheapest_cache: dict[tuple[int, bool], tuple[BoolArray, IntArray]] = {}
        self._union_cache: dict[tuple[int, ...], tuple[tuple[BoolArray, ...], BoolArray]] = {}

    def _locate_regions(self, given: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """A region is where the caller says, else the centroid of its sites."""
        located = dict(given)
        missing = [(name, rid) for name, rid in self.region_ids.items() if name not in located]
        if not missing:
            return located
        # one pass over the sites for every region (a mask per region is O(sites × regions))
        sums = np.stack([np.bincount(self.region, weights=self.xyz[:, k], minlength=len(self.region_ids)) for k in range(3)], axis=1)
        first = np.full(len(self.region_ids), -1, dtype=np.int64)
        first[self.region[::-1]] = np.arange(self.size - 1, -1, -1)
        for name, rid in missing:
            norm = float(np.linalg.norm(sums[rid]))
            if norm < 1e-12:  # antipodal sites: any answer is as good; take the first
                located[name] = (float(self.lat[first[rid]]), float(self.lon[first[rid]]))
                continue
            x, y, z = sums[rid] / norm
            located[name] = (float(np.degrees(np.arcsin(z))), float(np.degrees(np.arctan2(y, x))))
        return located

    # -- masks of site-only constraints -------------------------------------------------

    def residency_mask(self, residency: frozenset[str] | None) -> BoolArray:
        mask = self._residency_cache.get(residency)
        if mask is None:
            if residency is None:
                mask = np.ones(self.size, dtype=bool)
            else:
                allowed = np.zeros(len(self.country_ids) + 1, dtype=bool)
                for code in residency:
                    if code in self.country_ids:
                        allowed[self.country_ids[code]] = True
                mask = allowed[self.country]
            self._residency_cache[residency] = mask
        return mask

    def tier_mask(self, tiers: frozenset[Tier]) -> BoolArray:
        mask = self._tier_cache.get(tiers)
        if mask is None:
            mask = np.zeros(self.size, dtype=bool)
            if Tier.EDGE in tiers:
                mask |= self.is_edge
            if Tier.DATACENTER in tiers:
                mask |= ~self.is_edge
            self._tier_cache[tiers] = mask
        return mask

    def runtime_mask(self, runtime: Runtime) -> BoolArray:
        """Sites that run replicas of ``runtime`` (``Site.runtimes``): read-only, cached."""
        mask = self._runtime_cache.get(runtime)
        if mask is None:
            mask = np.array([found is None or runtime in found for found in self._runtime_sets], dtype=bool)[self._runtimes]
            mask.flags.writeable = False
            self._runtime_cache[runtime] = mask
        return mask

    def selector_mask(self, selector: Mapping[str, str]) -> BoolArray:
        mask = np.ones(self.size, dtype=bool)
        for key, value in sorted(selector.items()):
            label = self._label_cache.get((key, value))
            if label is None:
                label = np.array([s.labels.get(key) == value for s in self.sites], dtype=bool)
                self._label_cache[(key, value)] = label
            mask = mask & label
        return mask

    def placement_mask(self, deployment: Deployment) -> BoolArray:
        """Sites the deployment may use at all: residency, tiers, selector and health."""
        rules = deployment.placement
        key = (rules.residency, rules.tiers, tuple(sorted(rules.site_selector.items())))
        mask = self._placement_cache.get(key)
        if mask is None:
            mask = self.residency_mask(rules.residency) & self.tier_mask(rules.tiers) & self.selector_mask(rules.site_selector) & self.healthy
            mask.flags.writeable = False  # shared by every deployment with the same rules
            self._placement_cache[key] = mask
        return mask

    def variant_tiers_mask(self, deployment: Deployment, variant: Variant) -> BoolArray:
        """Sites of the tiers where ``deployment`` may run ``variant`` (none: all False)."""
        tiers = frozenset(t for t in Tier if variant in deployment.variants_for(t))
        return self.tier_mask(tiers)

    def eligible_masks(self, deployment: Deployment) -> dict[str, BoolArray]:
        """Per variant name that may run somewhere: the sites allowed for the deployment
        whose tier takes that variant, that run its runtime and whose total hardware holds
        one replica."""
        allowed = self.placement_mask(deployment)
        rules = deployment.placement
        out: dict[str, BoolArray] = {}
        for name, variant in deployment.runnable_variants().items():
            tiers = frozenset(t for t in Tier if variant in deployment.variants_for(t))
            key = (
                rules.residency,
                rules.tiers,
                tuple(sorted(rules.site_selector.items())),
                tiers,
                variant.runtime,
                self.hardware_key(variant),
            )
            mask = self._eligible_cache.get(key)
            if mask is None:
                mask = self._shared(allowed & self.tier_mask(tiers) & self.runtime_mask(variant.runtime) & self.hardware_mask(variant))
                self._eligible_cache[key] = mask
            out[name] = mask if not self._restricted_at.size else self._shared(mask & self.admits_mask(deployment.name, name))
        return out

    def admits_mask(self, deployment: str, variant: str) -> BoolArray:
        """Sites that may run ``variant`` of ``deployment``: all but those that admit only
        other pairs (``Site.admits``, a cordoned site's)."""
        if not self._restricted_at.size:
            return self._unrestricted
        mask = self._unrestricted.copy()
        for i in self._restricted_at.tolist():
            admits = self.sites[i].admits
            mask[i] = admits is not None and (deployment, variant) in admits
        return mask

    def _shared(self, mask: BoolArray) -> BoolArray:
        """One read-only array per distinct content: variant sizes that every site holds
        give equal masks, and everything cached per mask (site lists, orders by carbon)
        is then computed once for all of them."""
        key = np.packbits(mask).tobytes()
        found = self._content_cache.get(key)
        if found is None:
            mask.flags.writeable = False
            found = self._content_cache[key] = mask
        return found

    def sites_of(self, mask: BoolArray) -> IntArray:
        """``np.flatnonzero(mask)``, cached for the shared read-only masks above."""
        if mask.flags.writeable:
            return np.flatnonzero(mask)
        found = self._sites_cache.get(id(mask))
        if found is None or found[0] is not mask:
            found = self._sites_cache[id(mask)] = (mask, np.flatnonzero(mask))
        return found[1]

    def cheapest_of(self, mask: BoolArray, edge: bool) -> IntArray:
        """The sites of ``mask`` in the edge tier (``edge``) or the data-centre tier, lowest
        carbon intensity first; cached for the shared read-only masks above, so a
        deployment's shortlist walks its own sites, not the whole fleet's order."""
        order = self.by_intensity()
        if mask.flags.writeable:
            return order[mask[order] & (self.is_edge[order] == edge)]
        found = self._cheapest_cache.get((id(mask), edge))
        if found is None or found[0] is not mask:
            found = self._cheapest_cache[(id(mask), edge)] = (mask, order[mask[order] & (self.is_edge[order] == edge)])
        return found[1]

    def any_of(self, masks: Sequence[BoolArray]) -> BoolArray:
        """The union of shared read-only masks, itself shared and read-only (cached)."""
        key = tuple(id(m) for m in masks)
        found = self._union_cache.get(key)
        if found is None or any(a is not b for a, b in zip(found[0], masks)):
            union = np.logical_or.reduce(list(masks))
            union.flags.writeable = False
            found = self._union_cache[key] = (tuple(masks), union)
        return found[1]

    def domains(self, by: str) -> IntArray:
        """The spread domain of every site: its region index, or the site itself."""
        return self.region if by == "region" else self._site_indices()

    def domains_of(self, mask: BoolArray, by: str) -> IntArray:
        """The spread domains (``domains``) that hold a site of ``mask``; cached for the
        shared read-only masks, as ``sites_of`` is."""
        if by != "region":
            return self.sites_of(mask)
        found = self._regions_cache.get(id(mask))
        if found is None or found[0] is not mask:
            regions = np.flatnonzero(np.bincount(self.region[mask], minlength=len(self.region_names)))
            if not mask.flags.writeable:
                self._regions_cache[id(mask)] = (mask, regions)
            return regions
        return found[1]

    def _site_indices(self) -> IntArray:
        if self._arange is None:
            self._arange = np.arange(self.size)
        return self._arange

    def hardware_key(self, variant: Variant) -> tuple[object, ...]:
        """What ``hardware_mask`` depends on: the variant's size, and its watts where a site has a budget."""
        return size_of(variant) if not self.any_budget else (*size_of(variant), variant.watts)

    def hardware_mask(self, variant: Variant) -> BoolArray:
        """Sites whose total capacity and power budget hold one replica (whatever else runs
        there): a budget that never feeds one is as final as too few cores."""
        key = self.hardware_key(variant)
        cached = self._hardware_cache.get(key)
        if cached is not None:
            return cached
        fits = self.sized_mask(variant)
        if self.any_budget:
            fits &= self.power >= variant.watts - WATTS_SLACK
        self._hardware_cache[key] = fits
        return fits

    def sized_mask(self, variant: Variant) -> BoolArray:
        """Sites whose cores, memory and GPUs hold one replica, their power budgets aside."""
        fits = (self.cpu >= variant.cpu - 1e-9) & (self.memory_mib >= variant.memory_mib - 1e-9)
        if variant.gpus:
            fits &= self.gpu_fit(self.gpu_count, variant).any(axis=1)
        return fits

    def gpu_fit(self, counts: npt.NDArray[np.int64], variant: Variant) -> BoolArray:
        """(sites, groups) mask: the group holds ``variant.gpus`` GPUs big enough."""
        return self.gpu_big(variant) & (counts >= variant.gpus)

    def gpu_big(self, variant: Variant, sites: IntArray | None = None) -> BoolArray:
        """(sites, groups) mask: the group's cards are big enough and of the wanted model."""
        memory = self.gpu_memory if sites is None else self.gpu_memory[sites]
        big: BoolArray = memory >= variant.gpu_memory_gib - 1e-9
        if variant.gpu_model:
            big &= (self.gpu_model if sites is None else self.gpu_model[sites]) == variant.gpu_model
        return big

    # -- the spatial index -------------------------------------------------------------

    def nearest(self, lat: float, lon: float) -> tuple[IntArray, FloatArray]:
        """The ``NEAREST_KEPT`` sites closest to a point, nearest first, with their RTT
        estimate; cached per point, so deployments sharing a demand region share it."""
        found = self._near_cache.get((lat, lon))
        if found is None:
            keep = min(self.size, NEAREST_KEPT)
            if keep == 0:
                order = np.zeros(0, dtype=np.int64)
            else:
                # chord distance on the unit sphere grows with the great-circle angle
                _, order = self._tree().query(self.unit_vector(lat, lon), k=keep)
                order = np.atleast_1d(np.asarray(order, dtype=np.int64))
            dots = self.xyz[order] @ self.unit_vector(lat, lon)
            found = self._near_cache[(lat, lon)] = (order, geo.rtt_from_dot(dots))
        return found

    def prefetch_nearest(self, points: Sequence[tuple[float, float]]) -> None:
        """``nearest`` for many points in one tree query (one per point costs ~40× more
        at 100,000 sites); the answers are the same."""
        todo = sorted({p for p in points if p not in self._near_cache})
        keep = min(self.size, NEAREST_KEPT)
        if len(todo) < 2 or keep == 0:
            return
        xyz = np.stack([self.unit_vector(lat, lon) for lat, lon in todo])
        _, orders = self._tree().query(xyz, k=keep)
        orders = np.asarray(orders, dtype=np.int64).reshape(len(todo), keep)
        for i, point in enumerate(todo):  # the same products as ``nearest``, to the bit
            order = orders[i].copy()
            self._near_cache[point] = (order, geo.rtt_from_dot(self.xyz[order] @ xyz[i]))

    def _tree(self) -> cKDTree:
        if self._kdtree is None:
            self._kdtree = cKDTree(self.xyz)
        return self._kdtree

    def unit_vector(self, lat: float, lon: float) -> FloatArray:
        """The point's unit vector, cached: demand points recur across deployments."""
        found = self._unit_cache.get((lat, lon))
        if found is None:
            found = self._unit_cache[(lat, lon)] = geo.unit_vectors(float(lat), float(lon))
        return found

    @staticmethod
    def union(*parts: IntArray) -> IntArray:
        """Sorted distinct site indices of ``parts`` (``np.union1d`` of many, without its
        per-call overhead, which dominates on the few dozen sites of a shortlist)."""
        joined = np.sort(np.concatenate(parts).astype(np.int64, copy=False))
        keep = np.empty(joined.size, dtype=bool)
        keep[:1] = True
        np.not_equal(joined[1:], joined[:-1], out=keep[1:])
        return joined[keep]

    def replica_cost(self, carbon: float, fit: float, distilled: bool) -> FloatArray:
        """Per-replica carbon and variant-fit cost points at every site, for a variant
        drawing ``carbon`` points per unit of intensity; cached, variants recur."""
        key = (carbon, fit, distilled)
        found = self._static_cache.get(key)
        if found is None:
            found = carbon * self.intensity + np.where(self.is_edge != distilled, fit, 0.0)
            self._static_cache[key] = found
        return found

    def by_intensity(self) -> IntArray:
        """All sites, lowest carbon intensity (gCO2/h per W) first."""
        if self._by_intensity is None:
            self._by_intensity = np.argsort(self.intensity, kind="stable")
        return self._by_intensity

    # -- demand ---------------------------------------------------------------------------

    def locate(self, point: DemandPoint) -> tuple[float, float] | None:
        if point.lat is not None and point.lon is not None:
            return point.lat, point.lon
        if point.region is not None:
            return self.region_locations.get(point.region)
        return None

    def rtt_to(self, point: DemandPoint, where: tuple[float, float], sites: IntArray) -> FloatArray:
        """Round-trip time (ms) from a demand point to each of ``sites``."""
        return self.rtt_table([point], [where], sites)[:, 0]

    def rtt_table(self, points: Sequence[DemandPoint], where: Sequence[tuple[float, float]], sites: IntArray) -> FloatArray:
        """Round-trip times (ms), shape (sites, points): one product for every point,
        then the measured RTTs of sites that report them for a point's region."""
        if not points:
            return np.zeros((sites.size, 0))
        key = tuple(where)
        xyz = self._points_cache.get(key)
        if xyz is None:  # deployments share demand regions: stack each set once
            xyz = self._points_cache[key] = np.stack([self.unit_vector(lat, lon) for lat, lon in where], axis=1)
        rtt = geo.rtt_from_dot(self.xyz[sites] @ xyz)
        if self.measured_rtt:
            for p, point in enumerate(points):
                if point.region is None:
                    continue
                for j, site in enumerate(sites.tolist()):
                    measured = self.measured_rtt.get(site)
                    if measured is not None and point.region in measured:
                        rtt[j, p] = measured[point.region]
        return rtt
