"""A site holding the room of replicas that leave it once their replacements serve
(``Site.held``) has the hardware it has, but not that room: every path that places
replicas leaves it free (plan, the exact baseline, repair of the plan in force), and a
deployment it keeps short is told the room is held, not that the site is smaller."""

from __future__ import annotations

import dataclasses

import pytest
from scheduler_builders import LARGE, SMALL, deployment, site

from orchestrator.scheduler import Status, Variant, exact, plan
from orchestrator.scheduler.standing import Standing

SIX = Variant("six", "onnx", cpu=6, memory_mib=1024)


def _holding(name: str = "edge-a", city: str = "paris", **kwargs: object) -> object:
    return dataclasses.replace(site(name, city, **kwargs), held=(SIX,))  # 6 of its 8 cores held


@pytest.mark.parametrize("solve", [plan, exact.solve], ids=["plan", "exact"])
def test_no_plan_places_a_replica_in_room_a_site_holds(solve) -> None:  # type: ignore[no-untyped-def]
    dep = deployment(variants=(SIX,), replicas=(1, 1))
    assert solve([_holding()], [dep], []).replicas == ()
    small = deployment(variants=(SMALL,), replicas=(3, 3))
    assert len(solve([_holding()], [small], []).replicas) == 2  # the 2 cores left


def test_a_deployment_kept_short_by_held_room_is_told_so_with_the_site_s_own_hardware() -> None:
    result = plan([_holding()], [deployment(variants=(SIX,))])
    (p,) = result.deployments.values()
    assert p.status is Status.UNSCHEDULABLE
    assert p.reason.endswith("sites have at most 2 free CPU on one site, 6 needed; "
                             "site edge-a holds the room of 1 replica moved off until its replacement serves"), p.reason
    big = dataclasses.replace(site("dc", "paris", tier="datacenter", cpu=64, memory_gib=256, gpus=((2, 80),)), held=(LARGE,))
    (p,) = plan([big], [deployment(variants=(LARGE,))]).deployments.values()
    assert "no healthy one has the hardware" not in p.reason, p.reason
    assert p.reason.endswith("have 0 free GPU(s) with ≥80 GiB (at most 0 on one site), 2 needed per replica; "
                             "site dc holds the room of 1 replica moved off until its replacement serves"), p.reason


def test_a_repaired_plan_leaves_held_room_free_on_a_site_that_comes_back() -> None:
    a, b = _holding(), site("edge-b", "lyon")
    small = deployment(variants=(SMALL,), replicas=(4, 4))
    standing = Standing([a, b], [small], list(plan([a, b], [small]).as_running()))
    assert standing.repair([dataclasses.replace(a, healthy=False), b]) is not None
    # edge-a back and edge-b lost: edge-a takes what its 2 free cores hold, not its 8
    repaired = standing.repair([a, dataclasses.replace(b, healthy=False)])
    assert repaired is not None
    assert [r.site for r in repaired.replicas] == ["edge-a", "edge-a"], repaired.replicas


HUNDRED = Variant("hundred", "onnx", cpu=1, memory_mib=1024, power_watts=100)


def _budgeted(name: str, watts: float, held: int = 0) -> object:
    return dataclasses.replace(site(name), power_budget_watts=watts, held=(HUNDRED,) * held)


@pytest.mark.parametrize("sites, wanted, reason", [
    ([_budgeted("edge-a", 150)], 2,
     "site edge-a: power budget 150 W, 100 W used, replica needs 100 W"),
    ([_budgeted("edge-a", 150, held=1)], 1,
     "site edge-a: power budget 150 W, 100 W used (100 W of it held by replicas moved off until replaced), "
     "replica needs 100 W"),
    ([_budgeted("edge-a", 250, held=2)], 1,
     "site edge-a: power budget 250 W, 200 W used (200 W of it held by replicas moved off until replaced), "
     "replica needs 100 W"),
    ([_budgeted("edge-a", 150, held=1), _budgeted("edge-b", 120, held=1)], 1,
     "the power budgets of all 2 sites are spent, the most left at site edge-a: power budget 150 W, 100 W used "
     "(100 W of it held by replicas moved off until replaced), replica needs 100 W; "
     "site edge-b holds the room of 1 replica moved off until its replacement serves"),
    ([_budgeted("edge-a", 150, held=1), _budgeted("edge-b", 120, held=1), _budgeted("edge-c", 110, held=1)], 1,
     "the power budgets of all 3 sites are spent, the most left at site edge-a: power budget 150 W, 100 W used "
     "(100 W of it held by replicas moved off until replaced), replica needs 100 W; "
     "sites edge-b, edge-c hold the room of 2 replicas moved off until their replacements serve"),
    ([_budgeted("edge-a", 150), _budgeted("edge-b", 120, held=1)], 2,
     "the power budgets of all 2 sites are spent, the most left at site edge-a: power budget 150 W, 100 W used, "
     "replica needs 100 W; site edge-b holds the room of 1 replica moved off until its replacement serves"),
    ([_budgeted("edge-a", 110), _budgeted("edge-b", 120, held=1)], 2,
     "the power budgets of all 2 sites are spent, the most left at site edge-b: power budget 120 W, 100 W used "
     "(100 W of it held by replicas moved off until replaced), replica needs 100 W"),
], ids=["none-held", "one-site-holding", "one-site-holding-two", "two-sites-holding", "three-sites-holding",
        "another-site-holds", "only-the-site-named-holds"])
def test_a_power_budget_s_reason_names_the_room_a_site_holds_once(sites, wanted, reason) -> None:  # type: ignore[no-untyped-def]
    (p,) = plan(sites, [deployment(variants=(HUNDRED,), replicas=(wanted, wanted))]).deployments.values()
    assert p.placed == wanted - 1, p.reason
    assert p.reason.endswith(f"placed: {reason}"), p.reason
