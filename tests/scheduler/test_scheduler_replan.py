"""Re-planning from a running placement: what stays, what moves, and the actions that say so."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scheduler_builders import deployment, site

from bench.scheduler_instances import make_deployments, make_fleet

from orchestrator.scheduler import (
    GpuGroup,
    MoveReplica,
    PlaceReplica,
    RemoveReplica,
    Replica,
    Site,
    Status,
    Tier,
    Tuning,
    Variant,
    diff_by_site,
    plan,
)

SITES = [
    site("paris-1", "paris"),
    site("paris-2", "paris"),
    site("lyon-1", "lyon"),
    site("berlin-1", "berlin"),
]


def running(result):
    return result.as_running()


def test_same_inputs_plan_nothing_to_do():
    deps = [deployment(replicas=(2, 2), demand=(("paris", 10), ("lyon", 5)))]
    first = plan(SITES, deps)
    again = plan(SITES, deps, running(first))
    assert again.actions == ()
    assert all(r.kept for r in again.replicas)


def test_plan_is_deterministic():
    deps = [deployment(f"d{i}", replicas=(2, 3), demand=(("paris", 70), ("berlin", 40))) for i in range(4)]
    assert plan(SITES, deps) == plan(SITES, deps)


def test_small_gain_does_not_move_a_running_replica():
    # lyon-1 serves paris demand at ~8 ms; moving to paris saves ~6 ms < move cost
    dep = deployment(demand=(("paris", 10),))
    result = plan(SITES, [dep], [Replica("d", "lyon-1", "small")])
    assert result.actions == ()


def test_large_gain_moves_a_running_replica():
    dep = deployment(demand=(("berlin", 10),))
    result = plan(SITES, [dep], [Replica("d", "paris-1", "small")])
    (move,) = result.actions
    assert isinstance(move, MoveReplica)
    assert (move.from_site, move.to_site) == ("paris-1", "berlin-1")


def test_site_loss_moves_its_replicas_in_one_plan():
    deps = [deployment(f"d{i}", replicas=(2, 2), residency={"FR"}, demand=(("paris", 10),)) for i in range(3)]
    first = plan(SITES, deps)
    lost = next(r.site for r in first.replicas)
    sites = [dataclasses.replace(s, healthy=False) if s.name == lost else s for s in SITES]
    second = plan(sites, deps, running(first))
    assert all(r.site != lost for r in second.replicas)
    assert all(d.status is Status.SCHEDULED for d in second.deployments.values())
    moved = [a for a in second.actions if isinstance(a, MoveReplica)]
    assert moved and all(a.from_site == lost and "unhealthy" in a.reason for a in moved)
    assert all(f"; now on {a.to_site}: " in a.reason and "new;" not in a.reason for a in moved), [a.reason for a in moved]
    assert {a.to_site for a in moved} <= {"paris-1", "paris-2", "lyon-1"} - {lost}
    # nothing else changed
    assert len(moved) == len(second.actions) == sum(r.site == lost for r in first.replicas)


def test_site_removed_from_inventory():
    first = plan(SITES, [deployment(residency={"DE"})])
    assert [r.site for r in first.replicas] == ["berlin-1"]
    second = plan(SITES[:3], [deployment(residency={"DE"})], running(first))
    (remove,) = second.actions
    assert isinstance(remove, RemoveReplica) and "left the inventory" in remove.reason
    assert second.deployments["d"].status is Status.UNSCHEDULABLE


def test_deleted_deployment_is_removed():
    result = plan(SITES, [], [Replica("gone", "paris-1", "small")])
    assert result.actions == (RemoveReplica("gone", "paris-1", "small", "deployment deleted"),)


def test_residency_change_evicts():
    first = plan(SITES, [deployment(residency={"DE"})])
    second = plan(SITES, [deployment(residency={"FR"})], running(first))
    (move,) = second.actions
    assert isinstance(move, MoveReplica)
    assert move.from_site == "berlin-1" and "residency no longer allows DE" in move.reason


def test_scale_down_and_up():
    dep = deployment(replicas=(1, 4), demand=(("paris", 190),))
    first = plan(SITES, [dep])
    assert len(first.replicas) == 4
    down = plan(SITES, [dataclasses.replace(dep, max_replicas=2)], running(first))
    assert [type(a) for a in down.actions] == [RemoveReplica, RemoveReplica]
    assert all("scale down to 2" in a.reason for a in down.actions)
    up = plan(SITES, [dep], running(down))
    assert [type(a) for a in up.actions] == [PlaceReplica, PlaceReplica]


def test_running_replicas_keep_their_seats_against_newcomers():
    one = [site("only", "paris", cpu=2)]
    first = plan(one, [deployment("old", replicas=(2, 2))])
    second = plan(
        one,
        [deployment("old", replicas=(2, 2)), deployment("new", replicas=(1, 1))],
        running(first),
    )
    assert second.deployments["old"].status is Status.SCHEDULED
    assert second.deployments["new"].status is Status.UNSCHEDULABLE


def test_diff_groups_changes_per_site():
    actions = [
        PlaceReplica("d", "a", "v", "r"),
        MoveReplica("d", "a", "v", "b", "v", "r"),
        RemoveReplica("e", "c", "v", "r"),
    ]
    by_site = {d.site: d for d in diff_by_site(actions)}
    assert list(by_site) == ["a", "b", "c"]
    assert by_site["a"].added == (actions[0],) and by_site["a"].moved_out == (actions[1],)
    assert by_site["b"].moved_in == (actions[1],)
    assert by_site["c"].removed == (actions[2],)


def test_a_move_that_saves_less_than_the_keep_margin_is_not_made():
    # marseille → paris saves 1.6 points net of the move: less than Tuning.keep_margin
    sites = [*SITES, site("marseille-1", "marseille")]
    dep = deployment(demand=(("paris", 10),))
    running = [Replica("d", "marseille-1", "small")]
    assert plan(sites, [dep], running).actions == ()
    (move,) = plan(sites, [dep], running, tuning=Tuning(keep_margin=0.0)).actions
    assert isinstance(move, MoveReplica) and move.to_site.startswith("paris")


@pytest.mark.parametrize(("n_sites", "n_deployments", "seed"), [(300, 30, s) for s in range(4)] + [(1000, 100, 0)])
def test_planning_a_fleet_from_its_own_plan_moves_nothing(n_sites, n_deployments, seed):
    rng = np.random.default_rng(seed)
    sites = make_fleet(rng, n_sites)
    deployments = make_deployments(rng, sites, n_deployments, replicas_per=8)
    first = plan(sites, deployments)
    again = plan(sites, deployments, first.as_running())
    assert again.actions == ()
    assert again.replicas and all(r.kept for r in again.replicas)


ONE_GPU = Variant("one", "ray-serve", cpu=1, memory_mib=1024, gpus=1, gpu_memory_gib=16)
TWO_GPUS = Variant("two", "ray-serve", cpu=1, memory_mib=1024, gpus=2, gpu_memory_gib=16)
MIXED_CARDS = Site("dc", Tier.DATACENTER, "FR", "fr", 48.8, 2.3, cpu=64, memory_gib=256,
                   gpus=(GpuGroup("T4", 2, 16), GpuGroup("A100", 1, 80)))


def test_replanning_a_site_of_mixed_cards_keeps_every_gpu_replica():
    deps = [deployment("alpha", variants=(ONE_GPU,)), deployment("beta", variants=(TWO_GPUS,))]
    first = plan([MIXED_CARDS], deps)
    assert sorted(r.deployment for r in first.replicas) == ["alpha", "beta"]
    again = plan([MIXED_CARDS], deps, first.as_running())
    assert again.actions == ()
    assert again.deployments["beta"].status is Status.SCHEDULED


def test_running_gpu_replicas_packed_unlike_the_planner_keep_their_seats():
    # 6 + 4 GPUs hold 3 + 3 and 2 + 2; seated one by one, largest first, the 2-GPU pair
    # would be split across the groups and the last replica left without one
    dc = site("dc", tier="datacenter", cpu=64, memory_gib=256, gpus=((6, 16), (4, 16)))
    sizes = {"a": 3, "b": 3, "c": 2, "d": 2}
    deps = [deployment(name, variants=(Variant("v", "ray-serve", cpu=1, memory_mib=1024, gpus=n, gpu_memory_gib=16),))
            for name, n in sizes.items()]
    running = [Replica(name, "dc", "v") for name in sizes]
    result = plan([dc], deps, running)
    assert result.actions == ()
    assert all(d.status is Status.SCHEDULED for d in result.deployments.values())
