"""Rollout decisions (canary steps, maxUnavailable, halting) from what agents report."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from orchestrator.agents import model as agent_model
from orchestrator.manifests import schema
from orchestrator.reconciler import rollout

OLD, NEW = "a" * 64, "b" * 64


def agent(site: str, serving: str, *, wanted: str | None = None, failed: str = "",
          replaced: str | None = "") -> agent_model.AgentStatus:
    """``replaced``: the version the agent says it unloaded first for ``wanted`` ("" none;
    None: an agent of an earlier version, which does not say)."""
    state = agent_model.ModelState(
        name="intent", sha256=wanted or serving, phase=agent_model.ModelPhase.FAILED if failed else agent_model.ModelPhase.READY,
        message=failed, serving_sha256=serving, replaced_sha256=replaced,
    )
    return agent_model.AgentStatus(
        site=site, agent_id="a-" + site, endpoint_url="http://127.0.0.1:1", healthy=True, last_heartbeat=1.0, joined_at=0.0,
        location=agent_model.Location(), labels={}, agent_version="test", capacity=agent_model.Capacity(2, 1 << 30), providers=(),
        inflight=0, cpu_percent=0.0, memory_available_bytes=0, models={"intent": state} if serving or failed or wanted else {},
        assignment_version=0, heartbeat_interval=1.0,
    )


def sent(sha: str) -> agent_model.Assignment:
    return agent_model.Assignment("intent", "intent-eu", "distilled", f"http://cp/{sha[:4]}", sha)


def run(fleet: dict[str, tuple[str, str | None]], **spec: Any) -> tuple[set[str], dict[str, str], rollout.Rollout | None]:
    """``fleet``: site -> (sha it serves, sha it was last sent)."""
    agents = {site: agent(site, serving, wanted=last) for site, (serving, last) in fleet.items()}
    d = rollout.plan(schema.Rollout(**spec), "intent", NEW, fleet, agents, {s: sent(last) if last else None for s, (_, last) in fleet.items()})
    return set(d.new), dict(d.kept), d.rollout


def ten(serving_new: int = 0, switching: int = 0) -> dict[str, tuple[str, str | None]]:
    """Ten sites, the first ``serving_new`` on NEW, the next ``switching`` sent NEW."""
    out: dict[str, tuple[str, str | None]] = {}
    for i in range(10):
        site = f"s{i}"
        if i < serving_new:
            out[site] = (NEW, NEW)
        elif i < serving_new + switching:
            out[site] = (OLD, NEW)
        else:
            out[site] = (OLD, OLD)
    return out


def test_one_site_at_a_time_by_default_all_at_once_when_asked() -> None:
    new, kept, state = run(ten())
    assert new == {"s0"} and len(kept) == 9
    new, kept, state = run(ten(), maxUnavailable="100%")
    assert len(new) == 10 and kept == {}
    assert state is not None and len(state.switching) == 10 and not state.waiting


def test_canary_steps_open_as_the_previous_one_serves() -> None:
    new, kept, state = run(ten(), canarySteps=[10, 50])
    assert new == {"s0"} and set(kept.values()) == {OLD} and len(kept) == 9
    assert state is not None and state.step == 10 and state.status()["canaryStep"] == "10%"
    new, _, state = run(ten(switching=1), canarySteps=[10, 50])
    assert new == {"s0"}  # the canary has not loaded it yet: nothing more
    new, _, state = run(ten(serving_new=1), canarySteps=[10, 50], maxUnavailable=10)
    assert new == {f"s{i}" for i in range(5)} and state is not None and state.step == 50
    new, kept, state = run(ten(serving_new=5), canarySteps=[10, 50], maxUnavailable=10)
    assert len(new) == 10 and not kept and state is not None and state.step is None  # the rest: 100 %
    assert run(ten(serving_new=10), canarySteps=[10, 50])[2] is None  # done


def test_max_unavailable_bounds_the_sites_switching_at_once() -> None:
    new, _, _ = run(ten(), maxUnavailable=3)
    assert new == {"s0", "s1", "s2"}
    new, _, _ = run(ten(serving_new=2, switching=2), maxUnavailable=3)
    assert new == {"s0", "s1", "s2", "s3", "s4"}  # 2 done, 2 switching, room for one more
    new, _, _ = run(ten(), maxUnavailable="25%")
    assert len(new) == 2  # floor(25 % of 10)
    new, _, _ = run(ten(), maxUnavailable=0)
    assert len(new) == 1  # at least one, or the rollout would never move


def test_a_failed_canary_halts_the_rollout_and_says_why() -> None:
    fleet = ten(switching=1)
    agents = {site: agent(site, serving, wanted=last) for site, (serving, last) in fleet.items()}
    agents["s0"] = agent("s0", OLD, wanted=NEW, failed="onnxruntime could not load the model: invalid protobuf")
    d = rollout.plan(schema.Rollout(canarySteps=[10, 50]), "intent", NEW, fleet, agents,
                     {s: sent(last) if last else None for s, (_, last) in fleet.items()})
    new, kept, state = set(d.new), dict(d.kept), d.rollout
    assert new == {"s0"} and len(kept) == 9
    assert state is not None and state.failed and "s0 could not load version bbbbbbbbbbbb" in state.status()["halted"]
    assert "invalid protobuf" in state.status()["halted"]


def test_a_retrying_canary_keeps_the_halt_and_a_restarted_control_plane_remembers_it() -> None:
    fleet = ten(switching=1)
    agents = {site: agent(site, serving, wanted=last) for site, (serving, last) in fleet.items()}
    retrying = agent("s0", OLD, wanted=NEW)
    state = dataclasses.replace(retrying.models["intent"], phase=agent_model.ModelPhase.LOADING, failures=2)
    agents["s0"] = dataclasses.replace(retrying, models={"intent": state})
    spec = schema.Rollout(maxUnavailable=3)
    # loading again after two failures: still halted, nobody else gets it
    d = rollout.plan(spec, "intent", NEW, fleet, agents, {s: sent(last) if last else None for s, (_, last) in fleet.items()})
    assert d.new == {"s0"} and d.rollout is not None and d.rollout.failed
    # a control plane that restarted knows nothing it sent: the agents' reports stand in
    d = rollout.plan(spec, "intent", NEW, fleet, agents, {s: None for s in fleet})
    assert d.new == {"s0"} and d.rollout is not None and d.rollout.failed


def test_a_site_not_reported_since_it_joined_is_held_or_resent_its_last_version() -> None:
    fleet = ten()
    agents = {site: agent(site, serving, wanted=last) for site, (serving, last) in fleet.items()}
    for site in ("s0", "s1"):  # rejoined a moment ago: no heartbeat yet, no models known
        agents[site] = dataclasses.replace(agents[site], models={}, last_heartbeat=0.0)
    sent_before = {s: sent(OLD) for s in fleet}
    sent_before["s1"] = None  # and this one, nothing known at all
    d = rollout.plan(schema.Rollout(canarySteps=[10]), "intent", NEW, fleet, agents, sent_before)
    assert "s0" not in d.new and d.kept["s0"] == OLD  # resent what it had, not the new version
    assert d.held == {"s1"} and "s1" not in d.new and "s1" not in d.kept
    assert len(d.new) == 1  # the canary is one of the sites that reported


def test_sites_not_reported_since_they_rejoined_wait_their_turn_when_the_others_are_upgraded() -> None:
    # s0 serves the new version; s1..s3 were waiting on the old one when their agents restarted.
    agents = {"s0": agent("s0", NEW), **{s: dataclasses.replace(agent(s, OLD), models={}, last_heartbeat=0.0) for s in ("s1", "s2", "s3")}}
    sites = sorted(agents)
    d = rollout.plan(schema.Rollout(), "intent", NEW, sites, agents, {"s0": sent(NEW), **{s: sent(OLD) for s in sites[1:]}})
    assert d.new == {"s0"} and d.kept == {s: OLD for s in sites[1:]}
    assert d.rollout is not None and not d.rollout.done
    # a control plane that restarted knows nothing it sent: they are held until they report
    d = rollout.plan(schema.Rollout(), "intent", NEW, sites, agents, {s: None for s in sites})
    assert d.new == {"s0"} and d.held == {"s1", "s2", "s3"} and not d.kept


def test_while_halted_a_new_site_gets_the_version_the_others_keep() -> None:
    fleet = ten(switching=1)
    fleet["fresh"] = ("", None)
    agents = {site: agent(site, serving, wanted=last) for site, (serving, last) in fleet.items()}
    agents["s0"] = agent("s0", OLD, wanted=NEW, failed="bad model")
    d = rollout.plan(schema.Rollout(), "intent", NEW, fleet, agents, {s: sent(last) if last else None for s, (_, last) in fleet.items()})
    assert d.kept["fresh"] == OLD and "fresh" not in d.new


def test_new_sites_get_the_new_version_without_waiting() -> None:
    fleet = ten()
    fleet["fresh"] = ("", None)  # placed just now: serves nothing of this model
    new, _, _ = run(fleet, canarySteps=[10])
    assert "fresh" in new and "s0" in new and len(new) == 2


def test_get_shows_rollout_progress_and_the_autoscaled_count(capsys) -> None:  # noqa: ANN001
    from orchestrator.cli import render

    deployment = {
        "metadata": {"name": "intent-eu"}, "spec": {"model": "intent", "replicas": {"min": 1, "max": 3}},
        "status": {"phase": "Progressing", "replicas": 3, "readyReplicas": 3,
                   "rollout": {"version": NEW[:12], "upgraded": 1, "switching": 1, "waiting": 1, "canaryStep": "30%"},
                   "autoscaling": {"metric": "rps", "target": 20, "currentReplicas": 3, "desiredReplicas": 3,
                                   "reportingReplicas": 3, "observedPerReplica": 26.7}},
    }
    render.objects("ModelDeployment", [deployment])
    line = capsys.readouterr().out.splitlines()[1]
    assert "Progressing, rollout 1/3, canary 30%, autoscaled to 3 (26.7 rps/replica)" in line


@pytest.mark.parametrize(("fleet", "spec", "said"), [
    # a first load: no site serves another version, so there is no rollout to speak of
    ({"s0": ("", NEW), "s1": ("", NEW)}, {}, False),
    ({"s0": (NEW, NEW), "s1": ("", NEW)}, {}, False),
    ({"s0": (NEW, NEW), "s1": ("", NEW)}, {"maxUnavailable": "100%"}, False),
    # a site still serves (or keeps) the older version: a rollout
    ({"s0": ("", NEW), "s1": (OLD, OLD)}, {}, True),
    ({"s0": (OLD, NEW), "s1": (NEW, NEW)}, {}, True),
    # replaceWhenFull: a site serving nothing whose agent says it unloaded no older version
    # for the new one loads it first too
    ({"s0": (NEW, NEW), "s1": ("", NEW)}, {"strategy": "replaceWhenFull"}, False),
])
def test_a_first_load_is_no_rollout(fleet: dict[str, tuple[str, str | None]], spec: dict[str, Any], said: bool) -> None:
    """A fresh apply's status said 'rollout 0/1' while the first version loaded, though no
    site had an older version to roll from."""
    new, kept, state = run(fleet, **spec)
    if not said:  # every site gets the version, as before: only the status changes
        assert new == set(fleet) and kept == {}
    assert (state is not None) is said, state


def test_a_first_load_that_fails_still_halts() -> None:
    """The halt is what says a site could not load the version (apply --wait ends on it)."""
    agents = {"s0": agent("s0", "", wanted=NEW, failed="bad model")}
    d = rollout.plan(schema.Rollout(), "intent", NEW, ["s0"], agents, {"s0": sent(NEW)})
    assert d.rollout is not None and "halted" in d.rollout.status(), d.rollout


@pytest.mark.parametrize(("replaced", "strategy", "said"), [
    ("", "replaceWhenFull", ()),  # its agent unloaded nothing for it: a first load, no rollout
    (OLD, "replaceWhenFull", ("s1",)),  # its agent unloaded the older version first: a rollout, and it replaces
    (None, "replaceWhenFull", ("s1",)),  # an earlier agent does not say: it may have unloaded one
    (None, "makeBeforeBreak", ()),  # which make before break never does: a first load
])
def test_a_site_serving_nothing_replaces_only_when_its_agent_unloaded_a_version(
        replaced: str | None, strategy: str, said: tuple[str, ...]) -> None:
    """Under replaceWhenFull every first load showed a rollout block, listing each loading
    site as replacing, as a site serving nothing might have unloaded an older version for
    the new one: its agent says whether it did."""
    agents = {"s0": agent("s0", NEW, wanted=NEW), "s1": agent("s1", "", wanted=NEW, replaced=replaced)}
    d = rollout.plan(schema.Rollout(strategy=strategy), "intent", NEW, ["s0", "s1"], agents, {s: sent(NEW) for s in agents})
    assert d.new == {"s0", "s1"} and not d.kept
    if not said:
        assert d.rollout is None, d.rollout
    else:
        assert d.rollout is not None and d.rollout.replacing == said and d.rollout.status()["replacing"] == list(said), d.rollout


def test_a_site_loading_a_version_beside_one_rolled_from_elsewhere_is_not_replacing() -> None:
    """Make before break unloads nothing: a site placed fresh while another site still
    serves the older version was listed in the rollout as replacing (and counted in
    edgeplane_rollout_replacing_sites) while it loaded its first version."""
    agents = {"s0": agent("s0", OLD, wanted=OLD), "s1": agent("s1", "", wanted=NEW)}
    d = rollout.plan(schema.Rollout(), "intent", NEW, ["s0", "s1"], agents, {"s0": sent(OLD), "s1": sent(NEW)})
    assert d.rollout is not None and d.rollout.switching == ("s1",) and d.rollout.replacing == (), d.rollout
