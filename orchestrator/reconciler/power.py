"""What the placement in force draws: per budgeted site (a Site's ``status.power``) and in
all (``plan``'s "now", against which the planned future is set).

Both read the placement rows, not the scheduler's result: while a replica moves (make
before break, :mod:`orchestrator.reconciler.maintenance`) the rows keep the old one until
its replacement serves, and it draws all that time; the result counts only the replicas it
places. Read from the rows, "now" is the placement `plan` lists as before and `simulate`
measures as today, on a follower as on the leader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from orchestrator.reconciler import inventory
from orchestrator.reconciler import snapshot as snap
from orchestrator.scheduler import result as sched_result
from orchestrator.store import sqlite as store_mod


def site_power(s: snap.Snapshot, rows: Iterable[store_mod.PlacementRow]) -> dict[str, dict[str, float]]:
    """Per site with a power budget, the budget and the estimated draw of the replicas
    ``rows`` put there (facility watts: their watts × PUE, as the budget is given). A replica
    kept while its replacement starts counts: it still draws."""
    energy = {r.name: r.spec.energy for r in s.sites if r.spec.energy is not None and r.spec.energy.powerBudgetWatts is not None}
    if not energy:
        return {}
    watts = dict.fromkeys(energy, 0.0)
    for row, each in _draws(s, (row for row in rows if row.site in watts)):
        watts[row.site] += each * row.replicas
    return {site: {"estimatedWatts": round(watts[site] * e.pue, 1), "budgetWatts": float(e.powerBudgetWatts or 0.0)}
            for site, e in energy.items()}


def placement_energy(s: snap.Snapshot, rows: Iterable[store_mod.PlacementRow]) -> sched_result.Energy:
    """The draw at the wall (watts × PUE) of the replicas ``rows`` place, and the emissions
    it causes, as the scheduler counts them for a plan. A row on a site no longer stored
    counts nothing: the next pass removes it, and no site says what it draws at."""
    watts = grams = 0.0
    for row, each in _draws(s, rows):
        site = s.site_by_name.get(row.site)
        if site is None:
            continue
        energy = site.spec.energy
        pue = energy.pue if energy else 1.0
        carbon = energy.carbonGramsPerKWh if energy else inventory.DEFAULT_CARBON_G_PER_KWH
        wall = each * row.replicas * pue
        watts += wall
        grams += wall * carbon / 1000.0
    return sched_result.Energy(watts, grams)


def _draws(s: snap.Snapshot, rows: Iterable[store_mod.PlacementRow]) -> Iterator[tuple[store_mod.PlacementRow, float]]:
    """Each of ``rows`` with the estimated watts of one of its replicas; a row of a
    deployment no longer stored, or whose model or variant is gone, is left out."""
    models = {d.name: s.models.get(d.spec.model) for d in s.deployments}
    each: dict[tuple[str, str], float | None] = {}
    for row in rows:
        key = (row.deployment, row.variant)
        if key not in each:
            model = models.get(row.deployment)
            variant = next((v for v in model.variants if v.name == row.variant), None) if model is not None else None
            each[key] = inventory.to_variant(variant).watts if variant is not None else None
        if (watts := each[key]) is not None:
            yield row, watts
