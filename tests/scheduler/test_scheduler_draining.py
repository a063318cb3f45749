"""A site being drained (``Site.draining``), as the planner sees it: nothing lands on it,
its replicas move to sites every hard rule allows with the drain as their reason, and one
with nowhere allowed to go is reported, never placed outside its residency. The full plan
and the repair of the plan in force agree. A cordoned site (``Site.admits``) is named as
the reason a deployment it does not run gets nothing there, and runs no more of any
deployment than it held, in a full plan as in a repair."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.scheduler import MoveReplica, Replica, Site, plan
from orchestrator.scheduler import standing as standing_mod

from scheduler_builders import deployment, site


@pytest.mark.parametrize(("residency", "moved_to", "status"), [
    (None, "lyon", "Scheduled"),  # the other French site is nearest to the Paris demand
    ({"FR"}, "lyon", "Scheduled"),
    ({"DE"}, None, "Unschedulable"),  # the German site is the only German one: nowhere to go
])
def test_a_draining_site_s_replica_moves_where_the_rules_allow(residency: set[str] | None, moved_to: str | None, status: str) -> None:
    sites = [site("paris"), site("lyon", "lyon"), site("frankfurt", "frankfurt")]
    d = deployment(residency=residency, demand=(("paris", 10.0),))
    first = plan(sites, [d])
    (at,) = {r.site for r in first.replicas}
    drained = [dataclasses.replace(s, draining=True) if s.name == at else s for s in sites]
    result = plan(drained, [d], [Replica("d", at, "small")])
    assert at not in {r.site for r in result.replicas}
    assert str(result.deployments["d"].status) == status
    if moved_to is None:
        assert result.replicas == () and result.deployments["d"].reason.startswith("all 1 matching DE sites are draining"), result
        return
    (move,) = result.actions
    assert isinstance(move, MoveReplica) and move.to_site == moved_to and move.reason.startswith(f"site {at} is draining")
    # the plan in force, repaired for the drain, moves the same replica
    standing = standing_mod.Standing(sites, [d], [Replica("d", at, "small")])
    repaired = standing.repair(drained)
    assert repaired is not None and [a.to_site for a in repaired.actions if isinstance(a, MoveReplica)] == [moved_to]


def test_nothing_new_lands_on_a_draining_site() -> None:
    sites = [dataclasses.replace(site("paris"), draining=True), site("lyon", "lyon")]
    result = plan(sites, [deployment(replicas=(2, 2), demand=(("paris", 10.0),))])
    assert {r.site for r in result.replicas} == {"lyon"}


def test_a_deployment_kept_off_by_a_cordon_is_told_so_not_that_the_site_is_too_small() -> None:
    """A cordoned site is as big as what it holds: its capacity is no reason to quote."""
    paris = dataclasses.replace(site("paris", cpu=1, memory_gib=1), admits={("a", "small"): 1})
    a = deployment("a", demand=(("paris", 10.0),))
    fr = deployment("fr", residency={"FR"}, demand=(("paris", 10.0),))
    result = plan([paris, site("frankfurt", "frankfurt")], [a, fr], [Replica("a", "paris", "small")])
    assert {(r.deployment, r.site) for r in result.replicas} == {("a", "paris")}
    reason = result.deployments["fr"].reason
    assert reason == "all 1 healthy matching FR sites are cordoned (they take no new deployment); 0 of 1 placed", reason


def test_room_a_replica_moving_off_a_cordoned_site_frees_goes_to_no_other_replica() -> None:
    """``a`` moves off the cordoned site (its demand is in Berlin) while ``b``, which runs
    there, grows and would rather have the site's low carbon: ``b`` still runs one there."""
    paris = dataclasses.replace(site("paris", cpu=2, memory_gib=2, carbon=10), admits={("a", "small"): 1, ("b", "small"): 1})
    a = deployment("a", demand=(("berlin", 10.0),))
    b = deployment("b", replicas=(2, 2), demand=(("paris", 10.0),))
    sites = [paris, site("berlin", "berlin", carbon=500), site("lyon", "lyon", carbon=500)]
    result = plan(sites, [a, b], [Replica("a", "paris", "small"), Replica("b", "paris", "small")])
    assert [r.site for r in result.replicas if r.deployment == "a"] == ["berlin"]  # it did move
    assert sorted((r.deployment, r.site) for r in result.replicas if r.site == "paris") == [("b", "paris")], result.replicas
    assert result.deployments["b"].placed == 2


@pytest.mark.parametrize("how", ["plan", "repair"])
def test_a_lost_replica_does_not_take_a_cordoned_site_s_room_by_moving_another_off_it(how: str) -> None:
    """``b``'s replica on lyon is lost and France has no room left but the cordoned site's:
    moving ``a`` off it to make room would add a ``b`` replica there."""
    paris = dataclasses.replace(site("paris", cpu=2, memory_gib=2), admits={("a", "small"): 1, ("b", "small"): 1})
    a = deployment("a", demand=(("paris", 10.0),))
    b = deployment("b", replicas=(2, 2), residency={"FR"}, demand=(("paris", 10.0),))
    sites = [paris, site("berlin", "berlin", cpu=1, memory_gib=1), site("lyon", "lyon", cpu=1, memory_gib=1)]
    current = [Replica("a", "paris", "small"), Replica("b", "paris", "small"), Replica("b", "lyon", "small")]
    lost = [*sites[:2], dataclasses.replace(sites[2], healthy=False)]
    result = (plan(lost, [a, b], current) if how == "plan"
              else standing_mod.Standing(sites, [a, b], current).repair(lost))
    assert result is not None
    assert sorted((r.deployment, r.site) for r in result.replicas) == [("a", "paris"), ("b", "paris")], result.replicas
    assert result.deployments["b"].placed == 1



#: 2026-03-01T08:30:00Z, when a data centre's outage began in the cases below
OUTAGE = 1772353800.0
OUT_OF_REACH = "; a site out of reach takes no new deployment until it answers; 0 of 1 placed"


@pytest.mark.parametrize(("states", "reason"), [
    (["cordoned", "cordoned"], "all 2 healthy matching FR sites are cordoned (they take no new deployment); 0 of 1 placed"),
    ([OUTAGE, OUTAGE + 100],
     "all 2 matching FR sites are out of reach (s0 since 2026-03-01T08:30:00Z, s1 since 2026-03-01T08:31:40Z)" + OUT_OF_REACH),
    (["away", OUTAGE], "all 2 matching FR sites are out of reach (s0, s1 since 2026-03-01T08:30:00Z)" + OUT_OF_REACH),
    (["cordoned", OUTAGE], "of 2 matching FR sites, 1 is cordoned and 1 out of reach (s1 since 2026-03-01T08:30:00Z)" + OUT_OF_REACH),
    (["unhealthy", "unhealthy", "cordoned", "away"],
     "of 4 matching FR sites, 2 are unhealthy, 1 cordoned and 1 out of reach (s3)" + OUT_OF_REACH),
    (["draining", "away"], "of 2 matching FR sites, 1 is draining and 1 out of reach (s1)" + OUT_OF_REACH),
    (["away"] * 5, "all 5 matching FR sites are out of reach (s0, s1, s2 and 2 more)" + OUT_OF_REACH),
])
def test_a_data_centre_out_of_reach_is_named_so_not_cordoned(states: list[object], reason: str) -> None:
    """A data centre out of reach keeps what it runs and takes nothing new, as a cordoned
    site does (``Site.admits``): the reason said "all 2 healthy matching EU datacenter sites
    are cordoned" of data centres nobody cordoned. It says they are out of reach, and since
    when where that is known."""
    def state(name: str, what: object) -> Site:
        s = site(name)
        if what == "unhealthy":
            return dataclasses.replace(s, healthy=False)
        if what == "draining":
            return dataclasses.replace(s, draining=True)
        held = dataclasses.replace(s, admits={("other", "small"): 1})
        if what == "cordoned":
            return held
        return dataclasses.replace(held, out_of_reach=True, out_of_reach_since=None if what == "away" else what)

    sites = [state(f"s{i}", what) for i, what in enumerate(states)]
    result = plan([*sites, site("berlin", "berlin")], [deployment("fr", residency={"FR"}, demand=(("paris", 10.0),))])
    assert result.deployments["fr"].reason == reason
