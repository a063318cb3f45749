"""The hub's health bookkeeping with an injected clock: an agent lost by missed heartbeats,
after a quiet spell it announced or once its heartbeat stream ended, what a heartbeat
changes and which changes are events, a monotonic clock, draining, callbacks that fail, the
heartbeat lag histogram and the sweeper's pace. No network."""

from __future__ import annotations

import asyncio
import math
import time


from orchestrator.agents import auth, hub, model

from .hub_support import TOKEN, FakeClock, Tap, application, beat, kinds


def test_lost_after_missed_heartbeats_and_recovered(agent_hub, clock, events) -> None:
    grant = agent_hub.join(application())
    assert grant.heartbeat_interval == 1.0 and grant.missed_heartbeats_allowed == 3
    clock.now += 2.9
    assert agent_hub.sweep() == []
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    clock.now += 3.01
    lost = agent_hub.sweep()
    assert [e.kind for e in lost] == [model.AgentEventKind.LOST]
    assert "3 x 1s missed" in lost[0].reason
    assert not agent_hub.snapshot()[0].healthy
    assert agent_hub.sweep() == []  # reported once
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    assert kinds(events) == ["JOINED", "REPORTED", "LOST", "RECOVERED"]
    assert agent_hub.snapshot()[0].healthy


def test_healthy_since_moves_with_a_loss_not_with_a_live_agent_s_new_session(agent_hub, clock) -> None:
    """The failback hold-down reads it: a loss and a return between two reconcile passes
    moves it; a dropped connection the agent reconnected while live does not."""
    grant = agent_hub.join(application())
    joined = clock.now
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    clock.now += 1.0
    agent_hub.join(application(credential=grant.credential, agent_id=grant.agent_id))  # a new session, still live
    assert agent_hub.status("edge-1").healthy_since == joined
    clock.now += 3.01
    agent_hub.sweep()
    clock.now += 1.0
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())  # heartbeats resume after the loss
    resumed = clock.now
    assert agent_hub.status("edge-1").healthy and agent_hub.status("edge-1").healthy_since == resumed > joined
    clock.now += 3.01
    agent_hub.sweep()
    clock.now += 1.0
    agent_hub.join(application(credential=grant.credential, agent_id=grant.agent_id))  # joins again after the loss
    assert agent_hub.status("edge-1").healthy_since == clock.now > resumed


def test_a_quiet_spell_the_agent_announced_is_waited_out_and_then_the_usual_limit_is_back(agent_hub, clock, events) -> None:
    """An agent about to load a generative model (onnxruntime-genai holds Python's lock,
    heartbeats included) says how long it may be silent; it is not lost before that."""
    grant = agent_hub.join(application())
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(quiet_ms=20_000))
    clock.now += 19.9
    assert agent_hub.sweep() == []
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())  # loaded: the next beat says nothing
    clock.now += 3.01
    lost = agent_hub.sweep()
    assert [e.kind for e in lost] == [model.AgentEventKind.LOST] and "quiet" not in lost[0].reason
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(quiet_ms=5_000))
    clock.now += 5.01
    lost = agent_hub.sweep()
    assert [e.kind for e in lost] == [model.AgentEventKind.LOST]
    assert "after a quiet spell of 5s it announced" in lost[0].reason


def test_an_agent_whose_heartbeat_stream_ended_is_lost_after_the_reconnect_grace_not_every_missed_beat(clock, events) -> None:
    """A crashed agent's connections close at once; a live one opens a session again within
    its backoff. With no stream left, it gets max(interval, reconnect_grace), not 3 x 5 s."""
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), on_change=events.append, clock=clock,
                             missed_heartbeats=3, reconnect_grace=2.0)
    grant = agent_hub.join(application(heartbeat_interval=5.0))
    stream = agent_hub.heartbeats_opened("edge-1", grant.agent_id)
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    agent_hub.heartbeats_ended(stream)
    clock.now += 4.9
    assert agent_hub.sweep() == []  # one interval (5 s, longer than the 2 s grace)
    clock.now += 0.2
    [lost] = agent_hub.sweep()
    assert lost.kind is model.AgentEventKind.LOST and "heartbeat stream ended 5.1s ago" in lost.reason

    # back within the grace: a new session (a new record) keeps the usual limit; so does a
    # heartbeat on a second stream that is still open when the first one ends
    grant = agent_hub.join(application(heartbeat_interval=5.0, credential=grant.credential, agent_id=grant.agent_id))
    first = agent_hub.heartbeats_opened("edge-1", grant.agent_id)
    second = agent_hub.heartbeats_opened("edge-1", grant.agent_id)
    agent_hub.heartbeats_ended(first)
    clock.now += 14.9
    assert agent_hub.sweep() == []
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    agent_hub.heartbeats_ended(second)
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())  # a beat that was on its way: the usual limit again
    clock.now += 14.9
    assert agent_hub.sweep() == []
    old = grant
    grant = agent_hub.join(application(heartbeat_interval=5.0, credential=old.credential, agent_id=old.agent_id))
    stream = agent_hub.heartbeats_opened("edge-1", grant.agent_id)
    agent_hub.join(application(heartbeat_interval=5.0, credential=old.credential, agent_id=old.agent_id))
    agent_hub.heartbeats_ended(stream)  # the stream of a session already replaced
    clock.now += 14.9
    assert agent_hub.sweep() == []

    # while a quiet spell it announced runs (a model loading), the spell stands
    stream = agent_hub.heartbeats_opened("edge-1", grant.agent_id)
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(quiet_ms=30_000))
    agent_hub.heartbeats_ended(stream)
    clock.now += 29.9
    assert agent_hub.sweep() == []


def test_a_relaying_replica_tells_the_leader_when_its_agent_s_stream_ended(clock) -> None:
    follower = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), clock=clock, reconnect_grace=1.0)
    follower.tap = tap = Tap()
    grant = follower.join(application())
    follower.heartbeats_ended(follower.heartbeats_opened("edge-1", grant.agent_id))
    assert tap.gone == [("edge-1", grant.agent_id)]

    leader = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), clock=clock, missed_heartbeats=3)  # 5 s grace
    leader.admit_relayed(application(heartbeat_interval=5.0), grant.agent_id, "cp-2")
    leader.relayed_disconnected("edge-1", grant.agent_id, "cp-3")  # another replica's word: not its agent there
    leader.relayed_disconnected("edge-1", "agt-other", "cp-2")
    clock.now += 5.01
    assert leader.sweep() == []
    leader.relayed_disconnected("edge-1", grant.agent_id, "cp-2")
    clock.now += 4.9
    assert leader.sweep() == []
    clock.now += 0.2
    [lost] = leader.sweep()
    assert "heartbeat stream ended 5.1s ago" in lost.reason


def test_reporting_counts_agents_heard_from_since_they_joined(agent_hub, clock) -> None:
    grants = [agent_hub.join(application(f"edge-{i}")) for i in range(3)]
    assert agent_hub.reporting() == 0
    clock.now += 0.5
    agent_hub.record_heartbeat("edge-1", grants[1].agent_id, beat())
    agent_hub.record_heartbeat("edge-1", grants[1].agent_id, beat())
    assert agent_hub.reporting() == 1
    agent_hub.record_heartbeat("edge-2", grants[2].agent_id, beat())
    assert agent_hub.reporting() == 2 == sum(s.last_heartbeat > s.joined_at for s in agent_hub.snapshot())


def test_capacity_and_model_changes_emit_events_request_counts_do_not(agent_hub, events) -> None:
    grant = agent_hub.join(application())
    same = model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",))
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(capacity=same))
    assert kinds(events) == ["JOINED"]
    gpu = model.Gpu(0, "NVIDIA L4", 24 << 30, 20 << 30)
    bigger = model.Capacity(4, 8 << 30, (gpu,), ("CUDAExecutionProvider", "CPUExecutionProvider"))
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(capacity=bigger))
    assert kinds(events) == ["JOINED", "CAPACITY_CHANGED"]
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(gpu_free_bytes=((0, 1 << 30),)))
    assert agent_hub.snapshot()[0].capacity.gpus[0].memory_free_bytes == 1 << 30
    assert kinds(events) == ["JOINED", "CAPACITY_CHANGED"]  # free memory is load
    ready = model.ModelState("m", "a" * 64, model.ModelPhase.READY, serving_sha256="a" * 64)
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(models=(ready,)))
    busier = model.ModelState("m", "a" * 64, model.ModelPhase.READY, requests_served=9, serving_sha256="a" * 64)
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(models=(busier,)))
    assert kinds(events) == ["JOINED", "CAPACITY_CHANGED", "MODELS_CHANGED"]
    assert agent_hub.snapshot()[0].models["m"].requests_served == 9


def test_a_downloads_progress_is_kept_but_wakes_no_reconciler(agent_hub, events) -> None:
    grant = agent_hub.join(application())
    url = "https://models.example/m.onnx"

    def loading(message: str) -> model.ModelState:
        return model.ModelState("m", "a" * 64, model.ModelPhase.LOADING, message=message)

    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(models=(loading(f"fetching {url}"),)))
    assert kinds(events) == ["JOINED", "MODELS_CHANGED"]
    for done in ("0% of 812.3 MB", "40% of 812.3 MB"):
        agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(models=(loading(f"downloading {url}: {done}"),)))
    assert kinds(events) == ["JOINED", "MODELS_CHANGED"]  # the reconciler has nothing to decide on progress...
    assert agent_hub.snapshot()[0].models["m"].message == f"downloading {url}: 40% of 812.3 MB"  # ...which is kept to be shown
    failed = model.ModelState("m", "a" * 64, model.ModelPhase.FAILED, message="sha256 mismatch")
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(models=(failed,)))
    assert kinds(events) == ["JOINED", "MODELS_CHANGED", "MODELS_CHANGED"]


def test_numbers_no_agent_measures_are_not_taken_from_a_heartbeat(agent_hub) -> None:
    """Protobuf floats carry inf and NaN: a broken or hostile agent's are not the fleet's state."""
    grant = agent_hub.join(application())
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(cpu_percent=12.5, model_load=(("m", 100, 1.0), ("n", 5, 0.5))))
    agent_hub.record_heartbeat("edge-1", grant.agent_id,
                               beat(cpu_percent=math.nan, model_load=(("m", 200, math.inf), ("n", 9, 0.9))))
    status = agent_hub.status("edge-1")
    assert status is not None and status.cpu_percent == 0.0
    assert status.model_load["m"].requests_total == 100  # its last good sample stands
    assert status.model_load["n"].requests_total == 9


def test_the_first_heartbeat_after_each_join_is_an_event(agent_hub, clock, events) -> None:
    """A site that joined is sent nothing in a rollout until it has said what it serves
    (reconciler.rollout): its first heartbeat wakes the reconciler, as a join does, instead
    of waiting for the next resync."""
    grant = agent_hub.join(application())
    clock.now += 0.1
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    clock.now += 0.1
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    assert kinds(events) == ["JOINED", "REPORTED"]
    assert events[1].status.last_heartbeat > events[1].status.joined_at
    clock.now += 1
    again = agent_hub.join(application(credential=grant.credential, agent_id=grant.agent_id))  # a new session
    clock.now += 0.1
    agent_hub.record_heartbeat("edge-1", again.agent_id, beat())
    assert kinds(events) == ["JOINED", "REPORTED", "RECONNECTED", "REPORTED"]


def test_liveness_keeps_to_a_monotonic_clock_when_the_wall_clock_steps(clock, events) -> None:
    """An NTP step or a resumed virtual machine moves the wall clock by minutes: on it, every
    agent would be lost at once (or a dead one kept). Only lag is measured on the wall clock,
    against the agents' send times."""
    assert abs(hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN])).now() - time.monotonic()) < 5  # the default clock
    wall = [1_700_000_000.0]
    stepped = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), on_change=events.append, clock=clock,
                           wall=lambda: wall[0], missed_heartbeats=3)
    grant = stepped.join(application())
    clock.now += 0.5
    stepped.record_heartbeat("edge-1", grant.agent_id, beat(sent_unix_ms=int((wall[0] - 0.2) * 1000)))
    wall[0] += 3600.0
    clock.now += 1.0
    assert stepped.sweep() == [] and stepped.snapshot()[0].healthy
    assert 150 <= stepped.lag.quantile(0.5) <= 260  # ms, from the send time on the wall clock
    assert stepped.wall_time(stepped.snapshot()[0].last_heartbeat) == wall[0] - 1.0
    clock.now += 3.01
    assert [e.kind for e in stepped.sweep()] == [model.AgentEventKind.LOST]


def test_draining_agent_is_lost_at_once(agent_hub, events) -> None:
    grant = agent_hub.join(application())
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat(draining=True))
    assert kinds(events) == ["JOINED", "LOST"]
    assert events[-1].reason == "agent is draining"


def test_callback_errors_do_not_break_the_hub(clock) -> None:
    def explode(event: model.AgentEvent) -> None:
        raise RuntimeError("boom")

    noisy = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), on_change=explode, clock=clock)
    assert noisy.join(application()).agent_id


def test_lag_histogram_quantiles() -> None:
    lag = hub.LagHistogram()
    assert lag.quantile(0.99) == 0.0
    for ms in [1.0] * 98 + [100.0, 5000.0]:
        lag.observe(ms)
    assert lag.quantile(0.5) <= 1.25
    assert 100 <= lag.quantile(0.99) <= 130
    assert lag.quantile(1.0) >= 5000


async def test_an_agent_joining_with_a_short_interval_is_swept_at_its_pace_from_the_start(clock: FakeClock) -> None:
    """The sweeper sleeps half the smallest interval it knows (2.5 s with the hub's default of
    5 s and no agent). An agent that joins with 0.1 s heartbeats wakes it, so a loss is seen
    after its 0.3 s, not after the rest of that sleep."""
    lost = asyncio.Event()
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), clock=clock, heartbeat_interval=5.0,
                             on_change=lambda e: lost.set() if e.kind is model.AgentEventKind.LOST else None)
    sweeper = asyncio.create_task(agent_hub.run_sweeper())
    try:
        await asyncio.sleep(0.05)  # the sweeper is in its first sleep
        agent_hub.join(application(heartbeat_interval=0.1))
        clock.now += 1.0  # no heartbeat since
        await asyncio.wait_for(lost.wait(), 2.0)  # well before the 2.5 s sleep ends
    finally:
        sweeper.cancel()


def test_a_just_joined_agent_whose_stream_opened_is_not_lost_before_its_first_heartbeat(agent_hub, clock, events) -> None:
    """Between a join and its first heartbeat lie the agent's save of its identity, the
    stream's authentication (a credential checked on a busy store) and a link that may lag:
    more than three intervals on a starved machine. An authenticated heartbeat stream that
    opens is a sign of life, as a heartbeat is, with the same allowance from its opening; a
    join followed by no stream, or a stream by no heartbeat, is still lost in that time."""
    grant = agent_hub.join(application())  # 1 s interval, 3 missed
    clock.now += 2.5
    stream = agent_hub.heartbeats_opened("edge-1", grant.agent_id)
    clock.now += 2.0  # 4.5 s after the join, 2 s after the stream opened
    assert agent_hub.sweep() == []
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    assert kinds(events) == ["JOINED", "REPORTED"] and agent_hub.snapshot()[0].healthy
    agent_hub.heartbeats_ended(stream)

    # a join and no stream: lost three intervals after the join
    silent = agent_hub.join(application("edge-2"))
    clock.now += 3.01
    [lost] = [e for e in agent_hub.sweep() if e.site == "edge-2"]
    assert "no heartbeat since it joined 3.0s ago (3 x 1s missed)" in lost.reason

    # a stream that opened and sent no heartbeat: lost three intervals after it opened
    quiet = agent_hub.join(application("edge-3"))
    clock.now += 1.0
    agent_hub.heartbeats_opened("edge-3", quiet.agent_id)
    clock.now += 2.9
    assert [e for e in agent_hub.sweep() if e.site == "edge-3"] == []
    clock.now += 0.2
    [lost] = [e for e in agent_hub.sweep() if e.site == "edge-3"]
    assert "no heartbeat since it joined 4.1s ago (3 x 1s missed, since its heartbeat stream opened 3.1s ago)" in lost.reason
    assert silent.agent_id != quiet.agent_id


def test_an_agent_whose_streams_open_and_end_with_no_heartbeat_is_lost_all_the_same(agent_hub, clock, events) -> None:
    """A stream's opening is a sign of life once after each heartbeat, not at every opening:
    an agent whose streams open and end again with no heartbeat on any (each one's heartbeat
    refused as malformed, a link that drops them before a message passes) reports nothing
    and is lost, however often it reconnects."""
    grant = agent_hub.join(application())  # 1 s interval, 3 missed
    agent_hub.record_heartbeat("edge-1", grant.agent_id, beat())
    lost = []
    for _ in range(20):  # 10 s of streams, each ended after 0.5 s
        stream = agent_hub.heartbeats_opened("edge-1", grant.agent_id)
        clock.now += 0.5
        agent_hub.heartbeats_ended(stream)
        lost += agent_hub.sweep()
    assert [e.site for e in lost] == ["edge-1"], "an agent that sent no heartbeat for 10 s was never lost"
    assert kinds(events)[-1] == "LOST"


def test_a_thin_link_site_asking_a_longer_interval_rides_out_a_stall_the_fleet_s_would_not(clock, events) -> None:
    """docs/agent.md, "Thin links": edgeplane-agent --heartbeat-interval 20 at a control plane
    whose interval is 5 s is lost after 3 x 20 s of silence, its own, where its neighbours are
    lost after 15 s; a satellite stall of 45 s moves none of its replicas."""
    agent_hub = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), on_change=events.append, clock=clock,
                             heartbeat_interval=5.0, missed_heartbeats=3)
    thin = agent_hub.join(application(heartbeat_interval=20.0))
    assert thin.heartbeat_interval == 20.0
    agent_hub.record_heartbeat("edge-1", thin.agent_id, beat())
    clock.now += 45.0  # the stall
    assert agent_hub.sweep() == []
    agent_hub.record_heartbeat("edge-1", thin.agent_id, beat())
    clock.now += 60.1
    [lost] = agent_hub.sweep()
    assert lost.kind is model.AgentEventKind.LOST and "3 x 20s missed" in lost.reason
