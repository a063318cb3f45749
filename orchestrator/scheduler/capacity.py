"""Free room per site while one plan or repair runs: what is left of each site's CPU,
memory, GPUs and power budget, and of a cordoned site's admitted replicas.

``fleet.Fleet`` is what a site *is* (built once per plan call, read-only: its masks say
where a replica may ever go); ``Capacity`` is what a site *has left* in this pass, drawn
down and given back as replicas are placed, moved and released. The planner, ``repair``,
``standing``, the MILP's seating of incumbents, the N-1 sweep and maintenance planning all
count room through it, so a budget, a GPU group or a cordon binds them all alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from orchestrator.scheduler.fleet import WATTS_SLACK, BoolArray, Fleet, IntArray, Size, size_of
from orchestrator.scheduler.model import Deployment, Variant


def bound_gpu_models(deployments: Iterable[Deployment]) -> frozenset[str]:
    """The GPU models some variant of ``deployments`` must run on (``Capacity``'s ``bound``)."""
    return frozenset(v.gpu_model for d in deployments for v in d.variants if v.gpus and v.gpu_model)


class Capacity:
    """Free CPU, memory, GPUs and power budget per site; drawn down and given back as
    replicas move (power only where some site has a budget: ``Fleet.any_budget``).

    ``bound``: GPU models some variant must run on. A variant that takes any model leaves
    their cards to those variants where another group fits (``gpu_group``).

    A site's room held for replicas leaving it (``Site.held``) is taken from the start.

    A cordoned site (``Site.admits``) also counts, per (deployment, variant), the replicas
    it may still take: its room is as big as what it holds, and the room one deployment's
    replica frees by leaving must not go to another's, nor to a second copy of one it
    holds. Only cordoned sites are counted: the others pay one empty-dict test per call.
    """

    def __init__(self, fleet: Fleet, bound: frozenset[str] = frozenset()) -> None:
        self.fleet = fleet
        self.bound = bound
        self.cpu = fleet.cpu.copy()
        self.memory_mib = fleet.memory_mib.copy()
        self.gpu_count = fleet.gpu_count.copy()
        self.power = fleet.power.copy()  # IT watts each site's budget has left (+inf: none)
        self.budgeted = fleet.any_budget
        self.closed = np.zeros(fleet.size, dtype=bool)  # lost since the fleet was built (``close``)
        self.gone = np.zeros(fleet.size, dtype=bool)  # of those, the ones no longer in the inventory at all
        # Sites whose free capacity changed, in order; a cached ``fits_mask`` per variant
        # size remembers how far into this log it is up to date. Each deployment changes
        # a few sites, so refreshing those beats a pass over 100,000 sites per deployment.
        self._changed: list[int] = []
        self._fits: dict[Size, tuple[BoolArray, int]] = {}
        self.slots: dict[int, dict[tuple[str, str], int]] = {i: dict(pairs) for i, pairs in fleet.admits.items()}
        for site in fleet.held:
            self._take_held(site)

    def _take_held(self, site: int) -> None:
        """Take the room ``site`` holds for replicas leaving it (``Site.held``), each GPU
        replica (most GPUs first) in the cards ``gpu_group`` gives it, as the planner seated
        it; none of it below zero (a site since made smaller holds what is left)."""
        for v in sorted(self.fleet.held[site], key=lambda v: (-v.gpus, -v.gpu_memory_gib)):
            group = self.gpu_group(site, v)
            if group is not None and group >= 0:
                self.gpu_count[site, group] -= v.gpus
            self.cpu[site] = max(0.0, self.cpu.item(site) - v.cpu)
            self.memory_mib[site] = max(0.0, self.memory_mib.item(site) - v.memory_mib)
            if self.budgeted:
                self.power[site] = max(0.0, self.power.item(site) - v.watts)
        self._changed.append(site)

    def fits_mask(self, variant: Variant) -> BoolArray:
        """Per site: room for one more replica of ``variant`` now. The array is shared and
        kept up to date by later calls: read it, do not keep or change it."""
        key = size_of(variant) if not self.budgeted else (*size_of(variant), variant.watts)
        found = self._fits.get(key)
        if found is None or len(self._changed) - found[1] > self.fleet.size // 8:
            fits = (self.cpu >= variant.cpu - 1e-9) & (self.memory_mib >= variant.memory_mib - 1e-9)
            if variant.gpus:
                fits &= self.fleet.gpu_fit(self.gpu_count, variant).any(axis=1)
            if self.budgeted:
                fits &= self.power >= variant.watts - WATTS_SLACK
        else:
            fits, seen = found
            if seen < len(self._changed):
                changed = set(self._changed[seen:])
                sites = np.fromiter(changed, dtype=np.int64, count=len(changed))
                fits[sites] = self.fits(sites, variant)
        self._fits[key] = (fits, len(self._changed))
        return fits

    def fits(self, sites: IntArray, variant: Variant) -> BoolArray:
        """``fits_mask`` restricted to ``sites`` (cheaper when they are few)."""
        ok = (self.cpu[sites] >= variant.cpu - 1e-9) & (self.memory_mib[sites] >= variant.memory_mib - 1e-9)
        if variant.gpus:
            big = self.fleet.gpu_big(variant, sites)
            ok &= (big & (self.gpu_count[sites] >= variant.gpus)).any(axis=1)
        if self.budgeted:
            ok &= self.power[sites] >= variant.watts - WATTS_SLACK
        return ok

    def room(self, sites: IntArray, variant: Variant) -> npt.NDArray[np.int64]:
        """How many more replicas of ``variant`` each of ``sites`` holds (GPU groups
        counted separately, each whole)."""
        n = np.floor((self.cpu[sites] + 1e-9) / max(variant.cpu, 1e-9))
        n = np.minimum(n, np.floor((self.memory_mib[sites] + 1e-9) / max(variant.memory_mib, 1e-9)))
        if variant.gpus:
            big = self.fleet.gpu_big(variant, sites)
            n = np.minimum(n, ((self.gpu_count[sites] // variant.gpus) * big).sum(axis=1))
        if self.budgeted:  # +inf / watts stays +inf: the minimum above bounds it
            n = np.minimum(n, np.floor((self.power[sites] + WATTS_SLACK) / max(variant.watts, 1e-9)))
        return n.astype(np.int64)

    def gpu_group(self, site: int, variant: Variant) -> int | None:
        """The GPU group to take for one replica: for a variant of any GPU model, a model
        no variant is bound to (``bound``) where one fits; then the smallest cards that
        fit, then the fewest GPUs free (best fit), so large cards, whole groups and the
        cards of a model some variant needs stay free for the variants that need them.
        -1: no GPU needed."""
        if not variant.gpus:
            return -1
        best: tuple[bool, float, int, int] | None = None
        memory = self.fleet.gpu_memory[site]
        counts = self.gpu_count[site]
        models = self.fleet.gpu_model[site]
        for k in range(self.fleet.gpu_groups):
            if counts[k] < variant.gpus or memory[k] < variant.gpu_memory_gib - 1e-9:
                continue
            if variant.gpu_model and models[k] != variant.gpu_model:
                continue
            # a one-GPU replica must not split the only pair a two-GPU one could use
            rank = (not variant.gpu_model and models[k] in self.bound, float(memory[k]), int(counts[k]), k)
            if best is None or rank < best:
                best = rank
        return None if best is None else best[3]

    def spent(self, deployment: str, variant: str) -> BoolArray:
        """The cordoned sites that take no more replicas of ``variant`` of ``deployment``
        (as many run there as it held when cordoned), whatever room they have."""
        mask = np.zeros(self.fleet.size, dtype=bool)
        for site, pairs in self.slots.items():
            mask[site] = pairs.get((deployment, variant), 0) <= 0
        return mask

    def has_room(self, site: int, variant: Variant) -> bool:
        return (
            self.cpu[site] >= variant.cpu - 1e-9
            and self.memory_mib[site] >= variant.memory_mib - 1e-9
            and not (self.budgeted and self.power.item(site) < variant.watts - WATTS_SLACK)
            and self.gpu_group(site, variant) is not None
        )

    def power_short(self, site: int, variant: Variant) -> bool:
        """Whether ``site``'s power budget has too little left for one replica of ``variant``."""
        return self.budgeted and self.power.item(site) < variant.watts - WATTS_SLACK

    def take(self, site: int, variant: Variant, deployment: str, group: int | None = None) -> int | None:
        """Reserve one replica's resources for ``deployment``, in GPU group ``group`` if
        given (a ``seating``'s), else ``gpu_group``'s; the group used, or None if it does
        not fit (or a cordoned site runs no more of the pair)."""
        cpu, memory = self.cpu.item(site), self.memory_mib.item(site)  # Python floats: cheaper
        if cpu < variant.cpu - 1e-9 or memory < variant.memory_mib - 1e-9:
            return None
        if self.budgeted and self.power.item(site) < variant.watts - WATTS_SLACK:  # inline: the no-budget case pays one test
            return None
        if not variant.gpus:
            group = -1
        elif group is None:
            group = self.gpu_group(site, variant)
        elif group < 0 or self.gpu_count.item(site, group) < variant.gpus:
            group = None
        if group is None:
            return None
        if self.slots and site in self.slots:
            pairs, pair = self.slots[site], (deployment, variant.name)
            if pairs.get(pair, 0) <= 0:
                return None
            pairs[pair] -= 1
        self.cpu[site] = cpu - variant.cpu
        self.memory_mib[site] = memory - variant.memory_mib
        if self.budgeted:
            self.power[site] -= variant.watts
        if group >= 0:
            self.gpu_count[site, group] -= variant.gpus
        self._changed.append(site)
        return group

    def give_back(self, site: int, variant: Variant, group: int, deployment: str) -> None:
        self._changed.append(site)
        if self.slots and site in self.slots:
            pair = (deployment, variant.name)
            self.slots[site][pair] = self.slots[site].get(pair, 0) + 1
        self.cpu[site] += variant.cpu
        self.memory_mib[site] += variant.memory_mib
        if self.budgeted:
            self.power[site] += variant.watts
        if group >= 0:
            self.gpu_count[site, group] += variant.gpus

    def hold(self, site: int, variant: Variant, group: int, deployment: str) -> None:
        """Take back exactly what ``give_back`` returned (same GPU group)."""
        self._changed.append(site)
        if self.slots and site in self.slots:
            self.slots[site][(deployment, variant.name)] -= 1
        self.cpu[site] -= variant.cpu
        self.memory_mib[site] -= variant.memory_mib
        if self.budgeted:
            self.power[site] -= variant.watts
        if group >= 0:
            self.gpu_count[site, group] -= variant.gpus

    def trade(self, site: int, variant: Variant, group: int, deployment: str,
              to_site: int, to_variant: Variant, to_deployment: str) -> int | None:
        """Give back one replica of ``deployment`` (``site``, ``variant``, ``group``) and take
        one of ``to_variant`` for ``to_deployment`` on ``to_site``: the group taken, or None
        with the first replica held again as it was."""
        self.give_back(site, variant, group, deployment)
        taken = self.take(to_site, to_variant, to_deployment)
        if taken is None:
            self.hold(site, variant, group, deployment)
        return taken

    def save(self) -> Capacity:
        """A copy of the room left now, to go back to with ``restore``."""
        saved = Capacity.__new__(Capacity)
        saved.fleet, saved.bound, saved.budgeted = self.fleet, self.bound, self.budgeted
        saved.cpu, saved.memory_mib = self.cpu.copy(), self.memory_mib.copy()
        saved.gpu_count, saved.power = self.gpu_count.copy(), self.power.copy()
        saved.closed, saved.gone = self.closed.copy(), self.gone.copy()
        saved._changed, saved._fits = [], {}
        saved.slots = {site: dict(pairs) for site, pairs in self.slots.items()}
        return saved

    def restore(self, saved: Capacity) -> None:
        """Go back to the room left when ``saved`` was taken (``save``)."""
        for mine, theirs in ((self.cpu, saved.cpu), (self.memory_mib, saved.memory_mib), (self.gpu_count, saved.gpu_count),
                             (self.power, saved.power), (self.closed, saved.closed), (self.gone, saved.gone)):
            np.copyto(mine, theirs)
        self.slots = {site: dict(pairs) for site, pairs in saved.slots.items()}
        self._changed, self._fits = [], {}  # rare: the masks are rebuilt as they are asked for

    def close(self, site: int, gone: bool = False) -> None:
        """Nothing fits at ``site`` any more (it was lost, or left the inventory: ``gone``,
        which a full plan would not know of); what ran there is gone too."""
        self._changed.append(site)
        self.closed[site] = True
        self.gone[site] = gone
        self.cpu[site] = -1.0
        self.memory_mib[site] = -1.0
        self.power[site] = -1.0
        self.gpu_count[site] = 0

    def reopen(self, site: int) -> None:
        """``site`` is back, empty: all its capacity is free again."""
        self._changed.append(site)
        self.closed[site] = False
        self.gone[site] = False
        self.cpu[site] = self.fleet.cpu[site]
        self.memory_mib[site] = self.fleet.memory_mib[site]
        self.power[site] = self.fleet.power[site]
        self.gpu_count[site] = self.fleet.gpu_count[site]
        if site in self.fleet.admits:
            self.slots[site] = dict(self.fleet.admits[site])
        if site in self.fleet.held:
            self._take_held(site)
