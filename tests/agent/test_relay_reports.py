"""What a follower reports of its agents, and how the leader takes it: heartbeats merged
between flushes and split past the leader's message limit, an agent reported whole with what
is left of its quiet spell, the end of its heartbeat stream, and a restart with its
identity. Relayed in process, on one injected clock."""

from __future__ import annotations

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import auth, hub, model, relay, relay_leader, service

from .conftest import SECRET, SITE, TOKEN
from .relaying import apply, batches, leader_stream, pending_beat, relayed_in_process


def test_heartbeats_merge_without_losing_what_a_later_one_leaves_out() -> None:
    client = relay.RelayClient(hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN])), "cp-f")
    first = pb.Heartbeat(seq=1, inflight=1, capacity=pb.Capacity(cpu_cores=4), models=pb.ModelStates(models=[pb.ModelState(name="m")]),
                         model_load=[pb.ModelLoad(name="m", requests_total=5)])
    client.beat("s", "a", first)
    client.beat("s", "a", pb.Heartbeat(seq=2, inflight=2))
    agent_id, merged = pending_beat(client, "s")
    assert (agent_id, merged.seq, merged.inflight, merged.capacity.cpu_cores) == ("a", 2, 2, 4)
    assert [m.name for m in merged.models.models] == ["m"] and merged.model_load[0].requests_total == 5
    client.beat("s", "b", pb.Heartbeat(seq=1))  # another agent took the site: nothing carried over
    assert not pending_beat(client, "s")[1].HasField("capacity")


def test_an_agent_reported_whole_carries_what_is_left_of_its_quiet_spell() -> None:
    """A relay stream that starts again (a new leader, a dropped connection) reports its
    agents whole. One that is loading a generative model announced a quiet spell; the
    leader must keep waiting out what is left of it, not call it lost at the usual limit."""
    now = [1_000.0]
    follower = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), clock=lambda: now[0], missed_heartbeats=3)
    leader = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), clock=lambda: now[0], missed_heartbeats=3)
    client = relay.RelayClient(follower, "cp-follower")
    grant = follower.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test",
                                                1.0, model.Capacity(cpu_cores=2)))
    now[0] += 0.1
    loading = pb.Heartbeat(sent_unix_ms=int(now[0] * 1000), quiet_ms=20_000)
    follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(loading))

    now[0] += 5.0  # the stream to the leader starts again while the model loads
    client.touched(SITE)
    [batch] = batches(client)
    [report] = batch.reports
    assert report.HasField("agent") and report.state.quiet_ms == 15_000
    apply(relay_leader.RelayServicer(leader, lambda: SECRET), report, leader_stream("cp-follower"))

    now[0] += 14.9  # past the usual 3 s, inside the announced spell
    assert leader.sweep() == [] and leader.status(SITE).healthy  # type: ignore[union-attr]
    now[0] += 0.2
    [lost] = leader.sweep()
    assert lost.kind is model.AgentEventKind.LOST and "quiet spell" in lost.reason


def test_the_end_of_an_agent_s_stream_at_a_follower_reaches_the_leader() -> None:
    """A killed agent's connection closes at its replica; the leader, which plans, must not
    wait for every missed heartbeat either. A heartbeat on a new stream takes it back."""
    now, follower, leader, client, servicer, stream = relayed_in_process(missed_heartbeats=3, reconnect_grace=1.0)

    def deliver() -> list[pb.AgentReport]:
        reports = [r for batch in batches(client) for r in batch.reports]
        for report in reports:
            apply(servicer, report, stream)
        return reports

    grant = follower.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test",
                                                5.0, model.Capacity(cpu_cores=2)))
    deliver()
    assert leader.status(SITE).agent_id == grant.agent_id  # type: ignore[union-attr]
    opened = follower.heartbeats_opened(SITE, grant.agent_id)
    follower.heartbeats_ended(opened)
    [report] = deliver()
    assert report.disconnected and not report.HasField("state")
    now[0] += 5.1  # one interval, not 3 x 5 s
    [lost] = leader.sweep()
    assert "heartbeat stream ended" in lost.reason

    # back on a new stream before the batch went: no word of the end reaches the leader
    grant = follower.join(model.JoinApplication(SITE, TOKEN, grant.credential, grant.agent_id, "http://127.0.0.1:9",
                                                model.Location(), {}, "test", 5.0, model.Capacity(cpu_cores=2)))
    deliver()
    follower.heartbeats_ended(follower.heartbeats_opened(SITE, grant.agent_id))
    beat = pb.Heartbeat(sent_unix_ms=int(now[0] * 1000))
    follower.heartbeats_opened(SITE, grant.agent_id)
    follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(beat))
    client.beat(SITE, grant.agent_id, beat)
    assert not any(r.disconnected for r in deliver())
    now[0] += 14.9
    assert leader.sweep() == [] and leader.status(SITE).healthy  # type: ignore[union-attr]


def test_an_agent_restarting_on_a_follower_with_its_identity_reaches_the_leader_with_its_new_address_and_pace() -> None:
    """The leader plans and routes: it must have the endpoint and heartbeat interval the
    agent joined with this time, not those of its previous run."""
    now, follower, leader, client, servicer, stream = relayed_in_process(missed_heartbeats=3)

    def deliver() -> None:
        for batch in batches(client):
            for report in batch.reports:
                apply(servicer, report, stream)

    def join(endpoint: str, interval: float, credential: str | None = None, agent_id: str = "") -> model.JoinGrant:
        return follower.join(model.JoinApplication(SITE, TOKEN if credential is None else "", credential, agent_id, endpoint,
                                                   model.Location(), {}, "test", interval, model.Capacity(cpu_cores=2)))

    grant = join("http://10.0.0.5:8080", 5.0)
    deliver()
    now[0] += 1.0
    join("http://10.0.0.6:9090", 30.0, grant.credential, grant.agent_id)  # restarted with its saved identity
    deliver()
    status = leader.status(SITE)
    assert status is not None and status.agent_id == grant.agent_id
    assert (status.endpoint_url, status.heartbeat_interval) == ("http://10.0.0.6:9090", 30.0)
    for _ in range(3):  # beating on time for its new interval
        beat = pb.Heartbeat(sent_unix_ms=int(now[0] * 1000))
        follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(beat))
        client.beat(SITE, grant.agent_id, beat)
        deliver()
        now[0] += 29.0
        assert leader.sweep() == []


def test_heartbeats_merged_past_the_leader_s_limit_go_in_parts_and_the_end_of_the_stream_after_them() -> None:
    now, follower, leader, client, servicer, stream = relayed_in_process(missed_heartbeats=3, reconnect_grace=1.0)

    def deliver() -> list[pb.RelayReports]:
        sent = batches(client)
        for batch in sent:
            assert batch.ByteSize() <= service.MAX_RECEIVE_BYTES
            for report in batch.reports:
                apply(servicer, report, stream)
        return sent

    grant = follower.join(model.JoinApplication(SITE, TOKEN, None, "", "http://127.0.0.1:9", model.Location(), {}, "test",
                                                5.0, model.Capacity(cpu_cores=2)))
    deliver()
    opened = follower.heartbeats_opened(SITE, grant.agent_id)
    models = pb.Heartbeat(sent_unix_ms=1, inflight=3, models=pb.ModelStates(models=[
        pb.ModelState(name=f"model-{i:05d}", sha256="a" * 64, phase=pb.MODEL_PHASE_READY) for i in range(1500)]))
    load = pb.Heartbeat(sent_unix_ms=2, inflight=4, model_load=[
        pb.ModelLoad(name=f"model-{i:05d}" + "y" * 40, requests_total=1, busy_seconds_total=0.5) for i in range(3000)])
    for beat in (models, load):  # in one flush: merged into one report
        now[0] += 0.1
        follower.record_heartbeat(SITE, grant.agent_id, model.Heartbeat.from_proto(beat))
        client.beat(SITE, grant.agent_id, beat)
    follower.heartbeats_ended(opened)
    assert len(deliver()) > 1
    status = leader.status(SITE)
    assert status is not None and (len(status.models), len(status.model_load), status.inflight) == (1500, 3000, 4)
    now[0] += 5.1  # one interval: its stream's end came after its last state
    [lost] = leader.sweep()
    assert "heartbeat stream ended" in lost.reason
