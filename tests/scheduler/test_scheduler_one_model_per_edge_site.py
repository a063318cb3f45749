"""An edge site serves a model for one deployment: its agent loads a model once, so a second
deployment of the same model placed there would never be sent. Data centres run one Serve
application per deployment and are free of the rule."""

from __future__ import annotations

import dataclasses

from orchestrator.scheduler import Replica, Status, exact, plan
from orchestrator.scheduler.standing import Standing
from orchestrator.testing.placement_rules import violations
from scheduler_builders import SMALL, deployment, site


def of_model(name: str, model: str = "intent", **kwargs) -> object:
    return dataclasses.replace(deployment(name, **kwargs), model=model)


def sites_of(result, name: str) -> list[str]:
    return sorted(r.site for r in result.as_running() if r.deployment == name)


def test_two_deployments_of_one_model_take_different_edge_sites():
    sites = [site("paris-1", "paris"), site("lyon-1", "lyon")]
    # both want Paris most: without the rule both land on paris-1
    deps = [of_model("intent-a", demand=(("paris", 10.0),)), of_model("intent-b", demand=(("paris", 10.0),))]
    result = plan(sites, deps)
    assert violations(sites, deps, result.as_running()) == []
    assert {sites_of(result, "intent-a")[0], sites_of(result, "intent-b")[0]} == {"paris-1", "lyon-1"}


def test_other_models_and_data_centres_may_share_a_site():
    edge = [site("paris-1", "paris")]
    different = [of_model("a", model="intent"), of_model("b", model="fields")]
    assert sites_of(plan(edge, different), "b") == ["paris-1"]
    dc = [site("paris-dc", "paris", tier="datacenter")]
    same = [of_model("a"), of_model("b")]
    result = plan(dc, same)
    assert sites_of(result, "a") == sites_of(result, "b") == ["paris-dc"]


def test_the_deployment_left_without_a_site_says_which_deployment_holds_it():
    sites = [site("paris-1", "paris")]
    deps = [of_model("intent-a"), of_model("intent-b")]
    result = plan(sites, deps)
    assert sites_of(result, "intent-a") == ["paris-1"]
    short = result.deployments["intent-b"]
    assert short.status is Status.UNSCHEDULABLE and short.placed == 0
    assert "paris-1" in short.reason and "deployment intent-a" in short.reason and "model intent" in short.reason


def test_a_running_conflict_keeps_the_first_deployment_by_name():
    sites = [site("paris-1", "paris"), site("lyon-1", "lyon")]
    deps = [of_model("intent-a", demand=(("paris", 10.0),)), of_model("intent-b", demand=(("paris", 10.0),))]
    current = [Replica("intent-a", "paris-1", "small"), Replica("intent-b", "paris-1", "small")]
    result = plan(sites, deps, current)
    assert sites_of(result, "intent-a") == ["paris-1"]
    assert sites_of(result, "intent-b") == ["lyon-1"]
    assert violations(sites, deps, result.as_running()) == []


def test_a_repair_does_not_put_a_lost_replica_next_to_the_other_deployment():
    sites = [site("paris-1", "paris"), site("paris-2", "paris"), site("lyon-1", "lyon", carbon=400.0)]
    deps = [of_model("intent-a", demand=(("paris", 10.0),)), of_model("intent-b", demand=(("paris", 10.0),))]
    first = plan(sites, deps)
    standing = Standing(sites, deps, first.as_running())
    b_site = sites_of(first, "intent-b")[0]
    a_site = sites_of(first, "intent-a")[0]
    assert {a_site, b_site} == {"paris-1", "paris-2"}
    lost = [dataclasses.replace(s, healthy=False) if s.name == b_site else s for s in sites]
    repaired = standing.repair(lost)
    assert repaired is not None
    # paris-x of intent-a is nearer and greener, but taken: lyon-1 it is
    assert sites_of(repaired, "intent-b") == ["lyon-1"]
    assert violations(lost, deps, repaired.as_running()) == []


def test_make_room_never_moves_a_replica_onto_a_site_of_its_model():
    # "pinned" (FR only) is short unless "intent-b" leaves paris-1; its only other room is
    # berlin-1, where "intent-a" of the same model runs: the trade must not happen.
    sites = [site("paris-1", "paris", cpu=1, memory_gib=1), site("berlin-1", "berlin", cpu=2, memory_gib=4)]
    deps = [of_model("pinned", model="fields", residency={"FR"}), of_model("intent-a", residency={"DE"}),
            of_model("intent-b")]
    current = [Replica("intent-a", "berlin-1", "small"), Replica("intent-b", "paris-1", "small")]
    result = plan(sites, deps, current)
    assert violations(sites, deps, result.as_running()) == []
    assert sites_of(result, "intent-a") == ["berlin-1"]


def test_the_exact_baseline_keeps_the_rule_too():
    sites = [site("paris-1", "paris"), site("lyon-1", "lyon")]
    deps = [of_model("intent-a", demand=(("paris", 10.0),)), of_model("intent-b", demand=(("paris", 10.0),))]
    solved = exact.solve(sites, deps, time_limit_s=10)
    assert violations(sites, deps, solved.replicas) == []
    assert sorted(r.site for r in solved.replicas) == ["lyon-1", "paris-1"]


def test_variants_with_more_replicas_stack_on_the_sites_they_own():
    sites = [site("paris-1", "paris"), site("lyon-1", "lyon")]
    deps = [of_model("intent-a", replicas=(2, 2), variants=(SMALL,)), of_model("intent-b", replicas=(2, 2))]
    result = plan(sites, deps)
    assert len(sites_of(result, "intent-a")) == len(sites_of(result, "intent-b")) == 2
    assert not set(sites_of(result, "intent-a")) & set(sites_of(result, "intent-b"))
