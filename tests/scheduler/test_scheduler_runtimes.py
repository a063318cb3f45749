"""An edge site runs the runtimes its agent runs: a hard rule like its hardware. A replica of
a variant whose runtime the site's agent cannot run is never placed there, one that runs
there is moved off, and a deployment no agent can run says which agents and what they run."""

from __future__ import annotations

import dataclasses

import pytest
from scheduler_builders import deployment, site

from orchestrator.scheduler import MoveReplica, Replica, Runtime, Site, Status, Variant, exact, plan
from orchestrator.testing.placement_rules import violations

CHAT = Variant("chat", "onnx-genai", cpu=1, memory_mib=2048)
TINY = Variant("tiny", "onnx", cpu=1, memory_mib=512)
ONNX = frozenset({Runtime.ONNX})
BOTH = frozenset({Runtime.ONNX, Runtime.ONNX_GENAI})


def runs(s: Site, runtimes: frozenset[Runtime] | None) -> Site:
    return dataclasses.replace(s, runtimes=runtimes)


def test_a_generative_replica_goes_to_the_site_whose_agent_runs_it_not_the_nearest() -> None:
    near, far = runs(site("edge-paris", "paris"), ONNX), runs(site("edge-lyon", "lyon"), BOTH)
    dep = deployment(variants=(CHAT,), demand=(("paris", 10.0),))
    result = plan([near, far], [dep])
    assert [(r.site, r.variant) for r in result.replicas] == [("edge-lyon", "chat")]
    assert result.deployments["d"].status is Status.SCHEDULED
    assert violations([near, far], [dep], result.as_running()) == []


@pytest.mark.parametrize(
    ("runtimes", "placed"),
    [
        (None, 1),  # not said: any runtime (a data centre's, a simulated fleet's)
        (ONNX, 0),
        (BOTH, 1),
        (frozenset({Runtime.ONNX_GENAI}), 1),  # an agent that offers generative models only
        (frozenset(), 0),
    ],
    ids=["any", "onnx", "both", "genai-only", "none"],
)
def test_a_site_takes_a_variant_only_of_a_runtime_it_runs(runtimes: frozenset[Runtime] | None, placed: int) -> None:
    sites = [runs(site("edge-paris"), runtimes)]
    assert len(plan(sites, [deployment(variants=(CHAT,))]).replicas) == placed
    assert len(exact.solve(sites, [deployment(variants=(CHAT,))]).replicas) == placed


def test_a_model_with_an_onnx_variant_runs_that_one_where_the_generative_one_cannot() -> None:
    sites = [runs(site("edge-paris", "paris", cpu=1), ONNX), runs(site("edge-lyon", "lyon", cpu=1), BOTH)]
    dep = deployment(variants=(CHAT, TINY), replicas=(2, 2))
    result = plan(sites, [dep])
    assert {(r.site, r.variant) for r in result.replicas} <= {("edge-lyon", "chat"), ("edge-lyon", "tiny"), ("edge-paris", "tiny")}
    assert ("edge-paris", "tiny") in {(r.site, r.variant) for r in result.replicas} and len(result.replicas) == 2


@pytest.mark.parametrize(
    ("sites", "words"),
    [
        ([runs(site("edge-x"), ONNX)], "site edge-x: its agent cannot run onnx-genai (it runs: onnx)"),
        ([runs(site("edge-x"), frozenset())], "site edge-x: its agent cannot run onnx-genai (it runs: none)"),
        ([runs(site(f"edge-{n}"), ONNX) for n in "abcde"],
         "site edge-a: its agent cannot run onnx-genai (it runs: onnx); site edge-b: its agent cannot run onnx-genai "
         "(it runs: onnx); site edge-c: its agent cannot run onnx-genai (it runs: onnx); and 2 more sites"),
        # the rules that come first still speak first: an unhealthy site is not quoted for its runtimes
        ([runs(site("edge-x", healthy=False), ONNX)], "all 1 matching sites are unhealthy"),
    ],
    ids=["one-site", "no-runtime", "several-sites", "unhealthy-first"],
)
def test_a_deployment_no_agent_can_run_says_which_agents_run_what(sites: list[Site], words: str) -> None:
    status = plan(sites, [deployment(variants=(CHAT,))]).deployments["d"]
    assert (status.placed, status.status) == (0, Status.UNSCHEDULABLE)
    assert status.reason == f"{words}; 0 of 1 placed", status.reason


def test_a_site_whose_agent_runs_it_but_is_full_is_quoted_for_its_room_not_the_others_runtimes() -> None:
    sites = [runs(site("edge-x", cpu=64, memory_gib=256), ONNX), runs(site("edge-y", cpu=0.5), BOTH)]
    status = plan(sites, [deployment(variants=(CHAT,))]).deployments["d"]
    assert status.placed == 0
    assert "largest has 0.5 CPU" in status.reason, status.reason


def test_a_replica_on_a_site_whose_agent_cannot_run_it_moves_and_says_why() -> None:
    """An agent restarted without onnxruntime-genai (or with --runtimes onnx): its generative
    replica goes where an agent runs it, not kept to fail there."""
    before = [runs(site("edge-paris", "paris"), BOTH), runs(site("edge-lyon", "lyon"), BOTH)]
    dep = deployment(variants=(CHAT,), demand=(("paris", 10.0),))
    assert [r.site for r in plan(before, [dep]).replicas] == ["edge-paris"]
    after = [runs(before[0], ONNX), before[1]]
    result = plan(after, [dep], [Replica("d", "edge-paris", "chat")])
    assert [r.site for r in result.replicas] == ["edge-lyon"]
    (move,) = result.actions
    assert isinstance(move, MoveReplica) and move.from_site == "edge-paris"
    assert "site edge-paris: its agent cannot run onnx-genai (it runs: onnx)" in move.reason, move.reason


def test_the_independent_check_names_a_replica_its_site_cannot_run() -> None:
    sites = [runs(site("edge-x"), ONNX)]
    assert violations(sites, [deployment(variants=(CHAT,))], [Replica("d", "edge-x", "chat")]) == [
        "Replica(deployment='d', site='edge-x', variant='chat'): runtime onnx-genai"]
