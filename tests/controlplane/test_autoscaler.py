"""The autoscaler's arithmetic, fed counters the way heartbeats deliver them."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from orchestrator.agents import model as agent_model
from orchestrator.manifests import schema
from orchestrator.reconciler.autoscaler import Autoscaler
from orchestrator.store.sqlite import PlacementRow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(max_replicas: int = 6, **autoscaling: Any) -> schema.ModelDeploymentSpec:
    return schema.ModelDeploymentSpec.model_validate(
        {"model": "intent", "replicas": {"min": 1, "max": max_replicas}, "autoscaling": autoscaling}
    )


def agent(site: str, requests: int, busy: float, at: float, healthy: bool = True) -> agent_model.AgentStatus:
    return agent_model.AgentStatus(
        site=site, agent_id="a-" + site, endpoint_url="http://127.0.0.1:1", healthy=healthy, last_heartbeat=at,
        joined_at=0.0, location=agent_model.Location(), labels={}, agent_version="test",
        capacity=agent_model.Capacity(2, 1 << 30), providers=(), inflight=0, cpu_percent=0.0,
        memory_available_bytes=0, models={}, assignment_version=0, heartbeat_interval=1.0,
        model_load={"intent": agent_model.ModelLoad(requests, busy, at)},
    )


class Fleet:
    """Edge sites whose request counters grow at a given rate per site."""

    def __init__(self, scaler: Autoscaler, clock: Clock, sites: list[str]) -> None:
        self.scaler, self.clock = scaler, clock
        self.counts = {s: 0.0 for s in sites}
        self.busy = {s: 0.0 for s in sites}

    def run(self, seconds: float, rps: float, latency_s: float = 0.01, dc: tuple[str, ...] = (), **spec_fields: Any):
        for s in self.counts:
            self.counts[s] += rps * seconds
            self.busy[s] += rps * seconds * latency_s
        self.clock.now += seconds
        agents = {s: agent(s, int(self.counts[s]), self.busy[s], self.clock.now) for s in self.counts}
        rows = [PlacementRow("intent-eu", s, "v", 1) for s in [*self.counts, *dc]]
        return self.scaler.evaluate([("intent-eu", spec(**spec_fields))], rows, agents)["intent-eu"]


def test_rate_needs_two_samples_then_scales_up_at_once() -> None:
    clock = Clock()
    fleet = Fleet(Autoscaler(clock), clock, ["paris"])
    first = fleet.run(2, rps=50, targetRps=20)
    assert first.per_replica is None and first.replicas == 1 and first.status()["reason"]  # one sample: held
    second = fleet.run(2, rps=50, targetRps=20)
    assert second.replicas == 3 and second.per_replica == pytest.approx(50)  # ceil(50 / 20)
    assert second.status()["desiredReplicas"] == 3


def test_inflight_is_mean_concurrency_from_busy_seconds() -> None:
    clock = Clock()
    fleet = Fleet(Autoscaler(clock), clock, ["paris", "berlin"])
    fleet.run(2, rps=100, latency_s=0.05, targetInflight=2)
    rec = fleet.run(2, rps=100, latency_s=0.05, targetInflight=2)
    # 100 rps x 50 ms = 5 requests in flight on average at each of the two sites
    assert rec.per_replica == pytest.approx(5.0) and rec.replicas == 5


def test_within_tolerance_keeps_the_count_and_bounds_apply() -> None:
    clock = Clock()
    fleet = Fleet(Autoscaler(clock), clock, ["paris", "berlin"])
    fleet.run(2, rps=21, targetRps=20)
    assert fleet.run(2, rps=21, targetRps=20).replicas == 2  # 5 % over: not worth a move
    assert fleet.run(2, rps=1000, targetRps=20).replicas == 6  # max
    clock.now += 3600  # long after any scale-down delay
    assert fleet.run(2, rps=0, targetRps=20, scaleDownDelaySeconds=0).replicas == 1  # min


def test_scale_down_waits_for_the_delay_scale_up_does_not() -> None:
    clock = Clock()
    fleet = Fleet(Autoscaler(clock), clock, ["paris"])
    fleet.run(1, rps=80, targetRps=20, scaleDownDelaySeconds=30)
    assert fleet.run(1, rps=80, targetRps=20, scaleDownDelaySeconds=30).replicas == 4
    for _ in range(14):  # 28 s of low traffic: still within the delay
        assert fleet.run(2, rps=10, targetRps=20, scaleDownDelaySeconds=30).replicas == 4
    for _ in range(3):
        last = fleet.run(2, rps=10, targetRps=20, scaleDownDelaySeconds=30)
    assert last.replicas == 1
    assert fleet.run(1, rps=200, targetRps=20, scaleDownDelaySeconds=30).replicas == 6  # up: immediately


# The wall clock is stepped in a child process, before the autoscaler is imported, as NTP
# steps it under a running control plane: time.monotonic is left alone.
_WALL_CLOCK_STEP = """
import time
real, step = time.time, [0.0]
time.time = lambda: real() + step[0]
from orchestrator.reconciler.autoscaler import Autoscaler
from test_autoscaler import Clock, Fleet
fleet = Fleet(Autoscaler(), Clock(), ["paris"])  # as the reconciler makes it: its default clock
fields = dict(targetRps=20, scaleDownDelaySeconds=300)
fleet.run(2, rps=100, **fields)
print(fleet.run(2, rps=100, **fields).replicas)
step[0] = 3600.0  # the leader's wall clock is stepped an hour forward
print(fleet.run(2, rps=10, **fields).replicas)  # 2 s later traffic dips
"""


def test_a_wall_clock_step_does_not_end_the_scale_down_delay() -> None:
    here = pathlib.Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), *sys.path])}
    out = subprocess.run([sys.executable, "-c", _WALL_CLOCK_STEP], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "5"]  # scaled up to 5, and the 300 s delay holds them


def test_data_centre_replicas_count_like_the_reporting_ones_new_edge_ones_do_not() -> None:
    clock = Clock()
    fleet = Fleet(Autoscaler(clock), clock, ["paris"])
    fleet.run(2, rps=30, targetRps=20, dc=("dc-1",))
    rec = fleet.run(2, rps=30, targetRps=20, dc=("dc-1",))
    assert rec.reporting == 1 and rec.current == 2
    assert rec.replicas == 3  # paris 30 rps and dc-1 taken as 30 too: 60 / 20
    # a new edge replica with no rate yet carries nothing: no double counting
    scaler = Autoscaler(clock)
    scaler.evaluate([("intent-eu", spec(targetRps=20))], [PlacementRow("intent-eu", "paris", "v", 1)],
                    {"paris": agent("paris", 0, 0.0, clock.now)})
    clock.now += 2
    rows = [PlacementRow("intent-eu", "paris", "v", 1), PlacementRow("intent-eu", "berlin", "v", 1)]
    agents = {"paris": agent("paris", 100, 1.0, clock.now), "berlin": agent("berlin", 0, 0.0, clock.now)}
    rec = scaler.evaluate([("intent-eu", spec(targetRps=20))], rows, agents)["intent-eu"]
    assert rec.reporting == 1 and rec.replicas == 3  # ceil(50 / 20), not ceil(2 x 50 / 20)


def test_agent_restart_and_unhealthy_agents_give_no_rate() -> None:
    clock = Clock()
    scaler = Autoscaler(clock)
    rows = [PlacementRow("intent-eu", "paris", "v", 1)]
    scaling = [("intent-eu", spec(targetRps=20))]
    scaler.evaluate(scaling, rows, {"paris": agent("paris", 500, 5.0, clock.now)})
    clock.now += 2
    restarted = scaler.evaluate(scaling, rows, {"paris": agent("paris", 10, 0.1, clock.now)})["intent-eu"]
    assert restarted.per_replica is None  # counters went back: a new first sample, not a negative rate
    clock.now += 2
    assert scaler.evaluate(scaling, rows, {"paris": agent("paris", 90, 0.9, clock.now)})["intent-eu"].replicas == 2
    clock.now += 2
    lost = scaler.evaluate(scaling, rows, {"paris": agent("paris", 170, 1.7, clock.now, healthy=False)})["intent-eu"]
    assert lost.per_replica is None and lost.replicas == 2  # no load known: the count is held


def test_counters_too_large_to_count_ask_for_the_maximum_and_one_not_a_number_gives_no_rate() -> None:
    """Neither fails the reconcile pass (math.ceil of an infinite load raises)."""
    clock = Clock()
    scaler = Autoscaler(clock)
    rows = [PlacementRow("intent-eu", s, "v", 1) for s in ("paris", "berlin")]
    scaling = [("intent-eu", spec(targetInflight=2))]

    def evaluate(busy: float):
        return scaler.evaluate(scaling, rows, {s: agent(s, 10, busy, clock.now) for s in ("paris", "berlin")})["intent-eu"]

    evaluate(0.0)
    clock.now += 1
    assert evaluate(1.5e308).replicas == 6  # each site's rate is a float, their sum overflows to inf
    clock.now += 1
    held = evaluate(math.inf)
    assert held.per_replica is None and held.replicas == 6


def test_load_lost_holds_the_count_it_does_not_drop_to_min() -> None:
    clock = Clock()
    fleet = Fleet(Autoscaler(clock), clock, ["paris"])
    fleet.run(1, rps=80, targetRps=20, scaleDownDelaySeconds=30)
    assert fleet.run(1, rps=80, targetRps=20, scaleDownDelaySeconds=30).replicas == 4
    rows = [PlacementRow("intent-eu", s, "v", 1) for s in ("paris", "dc-1", "dc-2", "dc-3")]
    for _ in range(3):  # paris silent (unhealthy); the data-centre replicas report nothing
        clock.now += 5
        silent = {"paris": agent("paris", 999, 9.0, clock.now, healthy=False)}
        rec = fleet.scaler.evaluate([("intent-eu", spec(targetRps=20, scaleDownDelaySeconds=30))], rows, silent)["intent-eu"]
        assert rec.replicas == 4
    # a fresh autoscaler (a restarted control plane) keeps what is placed until it has a rate
    fresh = Autoscaler(clock).evaluate([("intent-eu", spec(targetRps=20))], rows, {})["intent-eu"]
    assert fresh.replicas == 4 and fresh.per_replica is None


def test_load_of_a_site_serving_the_model_for_another_deployment_is_not_counted() -> None:
    clock = Clock()
    scaler = Autoscaler(clock)
    rows = [PlacementRow("a", "paris", "v", 1), PlacementRow("b", "paris", "v", 1)]
    both = [("a", spec(targetRps=10)), ("b", spec(targetRps=10))]

    def paris(requests: int) -> agent_model.AgentStatus:
        status = agent("paris", requests, 0.0, clock.now)
        state = agent_model.ModelState("intent", "s", agent_model.ModelPhase.READY, serving_sha256="s", deployment="a")
        return dataclasses.replace(status, models={"intent": state})

    scaler.evaluate(both, rows, {"paris": paris(0)})
    clock.now += 2
    recs = scaler.evaluate(both, rows, {"paris": paris(40)})
    assert recs["a"].replicas == 2 and recs["a"].per_replica == pytest.approx(20)
    assert recs["b"].per_replica is None  # not double counted


def test_deployments_without_autoscaling_are_left_alone() -> None:
    plain = schema.ModelDeploymentSpec.model_validate({"model": "intent"})
    assert Autoscaler().evaluate([("plain", plain)], [PlacementRow("plain", "paris", "v", 1)], {}) == {}


def test_exactly_one_target_and_a_bounded_delay() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        spec(targetRps=10, targetInflight=2)
    with pytest.raises(ValueError):
        spec(targetRps=10, scaleDownDelaySeconds=-1)


def test_the_scale_down_delay_runs_from_the_first_recommendation() -> None:
    clock = Clock()
    scaler = Autoscaler(clock)
    scaling = [("intent-eu", spec(targetRps=20, scaleDownDelaySeconds=30))]
    assert scaler.evaluate(scaling, [], {}) == {"intent-eu": scaler.latest["intent-eu"]}  # nothing placed yet
    rows = [PlacementRow("intent-eu", s, "v", 1) for s in ("paris", "berlin", "madrid", "rome")]
    for rps in (0, 1):  # two samples: idle sites, one rate
        clock.now += 2
        agents = {s: agent(s, rps, 0.0, clock.now) for s in ("paris", "berlin", "madrid", "rome")}
        rec = scaler.evaluate(scaling, rows, agents)["intent-eu"]
    assert rec.replicas == 4  # idle, but the four placed replicas stand for the delay
    clock.now += 31
    agents = {s: agent(s, 2, 0.0, clock.now) for s in ("paris", "berlin", "madrid", "rome")}
    assert scaler.evaluate(scaling, rows, agents)["intent-eu"].replicas == 1


def test_scale_to_zero_and_a_request_wakes_it() -> None:
    clock = Clock()
    scaler = Autoscaler(clock)
    zero = schema.ModelDeploymentSpec.model_validate(
        {"model": "intent", "replicas": {"min": 0, "max": 4}, "autoscaling": {"targetRps": 10, "scaleDownDelaySeconds": 5}})
    one = [PlacementRow("intent-eu", "paris", "v", 1)]

    def step(rows: list[PlacementRow], wakes: int, requests: int = 0, seconds: float = 1.0):  # noqa: ANN202
        clock.now += seconds
        agents = {"paris": agent("paris", requests, 0.0, clock.now)} if rows else {}
        return scaler.evaluate([("intent-eu", zero)], rows, agents, {"intent": wakes})["intent-eu"]

    # Nothing placed and nobody asked: it stays at zero, and says why.
    rec = step([], wakes=0)
    assert rec.replicas == 0 and "scaled to zero" in rec.status()["reason"]
    # A request found the model cold: one replica at once.
    rec = step([], wakes=1)
    assert rec.replicas == 1 and rec.status()["desiredReplicas"] == 1
    # Not placed yet (or placed and still loading, reporting nothing): the count is held.
    assert step([], wakes=1).replicas == 1
    assert step(one, wakes=2).replicas == 1  # a wake while starting up: nothing more
    # Serving, then idle: down to zero only once the delay has passed.
    assert step(one, wakes=2, requests=0).replicas == 1
    assert step(one, wakes=2, requests=0).replicas == 1
    assert step(one, wakes=2, requests=0, seconds=6).replicas == 0
    # At zero again, the wakes counted while it had a replica do not start another.
    assert step([], wakes=2).replicas == 0
    assert step([], wakes=3).replicas == 1


def test_wakes_do_nothing_to_a_deployment_with_a_minimum() -> None:
    clock = Clock()
    scaler = Autoscaler(clock)
    rec = scaler.evaluate([("intent-eu", spec(targetRps=10))], [], {}, {"intent": 5})["intent-eu"]
    assert rec.replicas is None  # held/no load: the scheduler's min (1) applies


def test_a_scale_to_zero_deployment_applied_later_starts_at_zero_whatever_the_models_earlier_wakes() -> None:
    """The gateway counts wakes per model since it started; those that woke a deployment
    since deleted are no request for a new deployment of the model (or the same one applied
    again), which starts at zero. A request for the model since the last pass still wakes it."""
    clock = Clock()
    scaler = Autoscaler(clock)
    zero = schema.ModelDeploymentSpec.model_validate(
        {"model": "intent", "replicas": {"min": 0, "max": 4}, "autoscaling": {"targetRps": 10, "scaleDownDelaySeconds": 60}})

    def step(deployments: list[str], rows: list[PlacementRow], wakes: int) -> dict[str, Any]:
        clock.now += 1
        return scaler.evaluate([(name, zero) for name in deployments], rows, {}, {"intent": wakes})

    assert step(["old"], [], wakes=0)["old"].replicas == 0
    assert step(["old"], [], wakes=1)["old"].replicas == 1  # woken
    step(["old"], [PlacementRow("old", "paris", "v", 1)], wakes=1)
    step([], [], wakes=1)  # deleted
    clock.now += 600
    for name in ("new", "old"):  # another name, or the same applied again
        assert step([name], [], wakes=1)[name].replicas == 0
        step([], [], wakes=1)
    # a request for the model since the last pass (held by the gateway) wakes one new now
    assert step(["again"], [], wakes=2)["again"].replicas == 1


def test_a_lowered_maximum_bounds_the_count_at_once_through_the_scale_down_delay() -> None:
    clock = Clock()
    fleet = Fleet(Autoscaler(clock), clock, ["paris"])
    fleet.run(10, rps=60, targetRps=10, scaleDownDelaySeconds=300)
    assert fleet.run(10, rps=60, targetRps=10, scaleDownDelaySeconds=300).replicas == 6
    # replicas.max lowered to 2, the load as high: 2 now, not 6 until the delay is over
    rec = fleet.run(10, rps=60, targetRps=10, scaleDownDelaySeconds=300, max_replicas=2)
    assert rec.replicas == 2 and rec.status()["desiredReplicas"] == 2
    clock.now += 10  # no load reported now: the count held is bounded too
    held = fleet.scaler.evaluate([("intent-eu", spec(2, targetRps=10, scaleDownDelaySeconds=300))],
                                 [PlacementRow("intent-eu", "paris", "v", 1)], {})["intent-eu"]
    assert held.replicas == 2
    # raised again once the load is gone, within the delay: the 6 it no longer ran is not held
    assert fleet.run(10, rps=0, targetRps=10, scaleDownDelaySeconds=300).replicas == 2
