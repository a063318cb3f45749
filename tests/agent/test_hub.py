"""The hub's bookkeeping with an injected clock: health by missed heartbeats, the site
identity rule, change events and assignment channels. No network."""

from __future__ import annotations

import asyncio
import math
import pathlib
import threading
import time

import pytest

from orchestrator.agents import auth, errors, hub, model
from orchestrator.store import sqlite as store_mod

TOKEN = "t0k3n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def application(site: str = "edge-1", **overrides: object) -> model.JoinApplication:
    fields: dict[str, object] = {
        "site": site,
        "bootstrap_token": TOKEN,
        "credential": None,
        "agent_id": "",
        "endpoint_url": "http://10.0.0.5:8080",
        "location": model.Location("FR", "eu-west", 48.8, 2.3),
        "labels": {"rack": "a"},
        "agent_version": "0.1.0",
        "heartbeat_interval": 1.0,
        "capacity": model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",)),
    }
    fields.update(overrides)
    return model.JoinApplication(**fields)  # type: ignore[arg-type]


def beat(**overrides: object) -> model.Heartbeat:
    fields: dict[str, object] = {
        "seq": 1, "sent_unix_ms": 0, "inflight": 0, "cpu_percent": 1.0, "memory_available_bytes": 1 << 30,
        "assignment_version": 0, "draining": False, "capacity": None, "models": None, "gpu_free_bytes": (),
    }
    fields.update(overrides)
    return model.Heartbeat(**fields)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> list[model.AgentEvent]:
    return []


@pytest.fixture
def agent_hub(clock: FakeClock, events: list[model.AgentEvent]) -> hub.AgentHub:
    return hub.AgentHub(
        auth.InMemoryJoinAuthenticator([TOKEN]),
        on_change=events.append,
        clock=clock,
        missed_heartbeats=3,
    )


def kinds(events: list[model.AgentEvent]) -> list[str]:
    return [e.kind.value for e in events]


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


def test_site_identity_rule(agent_hub, clock) -> None:
    first = agent_hub.join(application())
    with pytest.raises(errors.SiteTaken, match="held by live agent"):
        agent_hub.join(application())
    # The same agent (id + credential), e.g. after a restart, may rejoin at once.
    again = agent_hub.join(application(credential=first.credential, agent_id=first.agent_id))
    assert again.agent_id == first.agent_id
    # A valid credential does not let a bootstrap-only caller pick someone else's id.
    with pytest.raises(errors.SiteTaken):
        agent_hub.join(application(agent_id=first.agent_id))
    clock.now += 3.5
    agent_hub.sweep()
    second = agent_hub.join(application())
    assert second.agent_id != first.agent_id
    with pytest.raises(errors.NotJoined):
        agent_hub.record_heartbeat("edge-1", first.agent_id, beat())
    with pytest.raises(errors.NotJoined):
        asyncio.run(agent_hub.authenticate_stream("edge-1", first.agent_id, second.credential))


class SlowToIssue(auth.InMemoryJoinAuthenticator):
    """Writes a credential only once let through, as a database slow to answer does."""

    def __init__(self) -> None:
        super().__init__([TOKEN])
        self.issuing, self.go = threading.Event(), threading.Event()
        self.issued: list[str] = []

    def issue_credential(self, site: str, agent_id: str, token: auth.BootstrapToken | None, replacing: str | None = None) -> str:
        self.issued.append(agent_id)
        self.issuing.set()
        assert self.go.wait(10), "not let through"
        return super().issue_credential(site, agent_id, token, replacing)


class SlowToCheckToken(auth.StoreJoinAuthenticator):
    """Checks a bootstrap token only once let through, as a database slow to answer does."""

    def __init__(self, store: store_mod.Store) -> None:
        super().__init__(store, (TOKEN,))
        self.checking, self.go = threading.Event(), threading.Event()

    def verify_bootstrap(self, token: str) -> auth.BootstrapToken | None:
        self.checking.set()
        assert self.go.wait(10), "not let through"
        return super().verify_bootstrap(token)


class SlowToAnswerCredential(auth.StoreJoinAuthenticator):
    """Reads a credential at once but answers only once let through, as a worker thread the
    event loop has not resumed yet does."""

    def __init__(self, store: store_mod.Store) -> None:
        super().__init__(store, (TOKEN,))
        self.checked, self.go = threading.Event(), threading.Event()
        self.go.set()

    def verify_credential(self, site: str, credential: str) -> bool:
        ok = super().verify_credential(site, credential)
        self.checked.set()
        assert self.go.wait(10), "not let through"
        return ok


async def test_an_agent_whose_site_is_revoked_while_its_credential_is_checked_is_refused(tmp_path: pathlib.Path) -> None:
    """The credential was still good when read; the revocation (store, then hub, as the API
    does) lands before the hub decides: the agent is refused, not held with a revoked identity."""
    store = store_mod.Store(tmp_path / "cp.db")
    slow = SlowToAnswerCredential(store)
    agent_hub = hub.AgentHub(slow)

    async def revoked_while_checked(check: asyncio.Future[object]) -> None:
        await asyncio.to_thread(slow.checked.wait, 10)
        assert store.revoke_agent("edge-1", "admin")
        agent_hub.revoke("edge-1")
        slow.go.set()
        with pytest.raises(errors.NotAuthenticated, match="revoked"):
            await check

    try:
        first = await agent_hub.join_async(application())
        slow.go.clear()
        await revoked_while_checked(asyncio.ensure_future(
            agent_hub.join_async(application(credential=first.credential, agent_id=first.agent_id))))
        assert agent_hub.status("edge-1") is None
        # a stream opened as the site is revoked is refused as revoked, not told to join again
        secret, _ = store.create_token("bootstrap", "agent", 3600, "admin")  # the admin lets the site back in
        again = await agent_hub.join_async(application(bootstrap_token=secret))
        slow.go.clear()
        slow.checked.clear()
        await revoked_while_checked(asyncio.ensure_future(
            agent_hub.authenticate_stream("edge-1", again.agent_id, again.credential)))
    finally:
        slow.go.set()
        store.close()


async def test_a_credential_another_replica_wrote_while_a_join_was_checked_is_not_replaced(tmp_path: pathlib.Path) -> None:
    """Two replicas on one store, each with a join for a site that none of them (nor the
    leader they asked) saw held: the credential written second would replace the first
    agent's, which then could not reconnect. The join that writes second is refused."""
    shared = store_mod.Store(tmp_path / "shared.db")
    slow = SlowToCheckToken(shared)
    here, there = hub.AgentHub(slow), hub.AgentHub(auth.StoreJoinAuthenticator(shared, (TOKEN,)))
    try:
        late = asyncio.ensure_future(here.join_async(application()))
        await asyncio.to_thread(slow.checking.wait, 10)
        first = await there.join_async(application(endpoint_url="http://10.0.0.6:8080"))
        slow.go.set()
        with pytest.raises(errors.SiteTaken, match="given to another agent") as taken:
            await late
        assert taken.value.retry_after_s > 0 and here.status("edge-1") is None
        assert shared.agent_credential_ok("edge-1", first.credential)
        await there.authenticate_stream("edge-1", first.agent_id, first.credential)
    finally:
        slow.go.set()
        shared.close()


async def test_a_site_is_held_for_the_join_whose_credential_is_being_written(clock) -> None:
    authenticator = SlowToIssue()
    agent_hub = hub.AgentHub(authenticator, clock=clock, missed_heartbeats=3)
    authenticator.go.set()
    first = await agent_hub.join_async(application())
    clock.now += 3.5
    agent_hub.sweep()  # its agent lost: another may take the site over
    authenticator.go.clear()
    authenticator.issuing.clear()  # set by the first join: wait for this one's write
    taking = asyncio.ensure_future(agent_hub.join_async(application(endpoint_url="http://10.0.0.6:8080")))
    await asyncio.to_thread(authenticator.issuing.wait, 10)
    # meanwhile no other agent's join, here or relayed from another replica, gets the site or writes a credential for it
    with pytest.raises(errors.SiteTaken, match="being joined") as taken:
        await agent_hub.join_async(application())
    assert taken.value.holder == authenticator.issued[-1] and taken.value.retry_after_s > 0
    with pytest.raises(errors.SiteTaken, match="being joined"):
        agent_hub.admit_relayed(application(), "agt-elsewhere", "cp-2")
    authenticator.go.set()
    second = await taking
    assert authenticator.issued == [first.agent_id, second.agent_id]
    assert agent_hub.status("edge-1").agent_id == second.agent_id  # type: ignore[union-attr]
    assert authenticator.verify_credential("edge-1", second.credential)
    # a site revoked while its join's credential is written is not joined
    clock.now += 3.5
    agent_hub.sweep()
    authenticator.go.clear()
    authenticator.issuing.clear()
    joining = asyncio.ensure_future(agent_hub.join_async(application()))
    await asyncio.to_thread(authenticator.issuing.wait, 10)
    agent_hub.revoke("edge-1")
    authenticator.go.set()
    with pytest.raises(errors.NotAuthenticated, match="revoked"):
        await joining
    assert agent_hub.status("edge-1") is None


def test_a_site_the_leader_says_another_replica_holds_is_refused_here_until_the_holder_could_be_lost(clock) -> None:
    authenticator = auth.InMemoryJoinAuthenticator([TOKEN])
    agent_hub = hub.AgentHub(authenticator, clock=clock, missed_heartbeats=3)
    agent_hub.tap = Tap()  # this replica relays its agents to a leader
    first = agent_hub.join(application())
    reason = "site 'edge-1' is held by live agent agt-a through replica cp-2"
    agent_hub.refused_by_leader("edge-1", first.agent_id, "agt-a", reason, 2.0)
    assert agent_hub.status("edge-1") is None  # the refused agent is dropped
    for refused in (application(), application(credential=first.credential, agent_id=first.agent_id)):
        with pytest.raises(errors.SiteTaken, match="agt-a through replica cp-2") as taken:
            agent_hub.join(refused)
        assert taken.value.holder == "agt-a" and taken.value.retry_after_s == 2.0
    # the holder itself, moving to this replica, may join
    credential = authenticator.issue_credential("edge-1", "agt-a", auth.BootstrapToken())
    assert agent_hub.join(application(credential=credential, agent_id="agt-a")).agent_id == "agt-a"
    # a refusal naming an agent this replica does not hold drops nothing
    agent_hub.refused_by_leader("edge-1", "agt-other", "agt-z", reason, 2.0)
    assert agent_hub.status("edge-1").agent_id == "agt-a"  # type: ignore[union-attr]
    # a replica that leads decides itself: the hold is the old leader's word
    agent_hub.forget("edge-1")
    agent_hub.tap = None
    assert agent_hub.join(application()).agent_id not in (first.agent_id, "agt-a")
    # once the holder could have been lost, another agent may try again
    agent_hub.tap = Tap()
    agent_hub.forget("edge-1")
    with pytest.raises(errors.SiteTaken):
        agent_hub.join(application())
    clock.now += 2.0
    assert agent_hub.join(application()).agent_id not in (first.agent_id, "agt-a")


class Tap:
    def touched(self, site: str) -> None:
        pass

    def beat(self, site: str, agent_id: str, message: object) -> None:
        pass

    def disconnected(self, site: str, agent_id: str) -> None:
        self.gone.append((site, agent_id))

    def __init__(self) -> None:
        self.gone: list[tuple[str, str]] = []


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"bootstrap_token": "wrong"}, errors.NotAuthenticated),
        ({"bootstrap_token": ""}, errors.NotAuthenticated),
        ({"bootstrap_token": "", "credential": "forged", "agent_id": "agt-x"}, errors.NotAuthenticated),
        ({"site": "Edge_1"}, errors.InvalidJoin),
        ({"site": ""}, errors.InvalidJoin),
        ({"site": "edge-1\n"}, errors.InvalidJoin),  # a certificate and a stored Site no API path could name
        ({"endpoint_url": "ftp://x"}, errors.InvalidJoin),
        ({"endpoint_url": "http://0.0.0.0:80"}, errors.InvalidJoin),
        ({"endpoint_url": "http://10.0.0.5:99999"}, errors.InvalidJoin),  # a gateway could not forward to these
        ({"endpoint_url": "http://10.0.0.5:80a"}, errors.InvalidJoin),
        ({"endpoint_url": "http://10.0.0.5:0"}, errors.InvalidJoin),
        ({"location": model.Location("France")}, errors.InvalidJoin),
        ({"location": model.Location("XX")}, errors.InvalidJoin),  # two capitals, no country: it would be placed nowhere
        ({"location": model.Location("FR", "", 91.0, 0.0)}, errors.InvalidJoin),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, errors.InvalidJoin),
        # labels the Site registered from the join would hold, and no manifest could
        ({"labels": {"rack": "a b"}}, errors.InvalidJoin),
        ({"labels": {"rack": "a\n"}}, errors.InvalidJoin),
        ({"labels": {"-rack": "a"}}, errors.InvalidJoin),
        ({"labels": {"rack": "a" * 64}}, errors.InvalidJoin),
        ({"endpoint_url": "http://" + "a" * 2050 + ".example"}, errors.InvalidJoin),
        ({"agent_version": "1" * 65}, errors.InvalidJoin),
    ],
)
def test_bad_joins_are_refused(agent_hub, overrides, error) -> None:
    with pytest.raises(error):
        agent_hub.join(application(**overrides))
    assert agent_hub.snapshot() == []


def test_labels_a_manifest_may_hold_are_taken(agent_hub) -> None:
    labels = {"rack": "a", "topology.example.com/zone": "fr-par_1.b", "empty": ""}
    agent_hub.join(application(labels=labels))
    assert agent_hub.snapshot()[0].labels == labels


def test_heartbeat_interval_is_clamped(agent_hub) -> None:
    assert agent_hub.join(application("a", heartbeat_interval=0.001)).heartbeat_interval == 0.05
    assert agent_hub.join(application("b", heartbeat_interval=None)).heartbeat_interval == 5.0


def test_callback_errors_do_not_break_the_hub(clock) -> None:
    def explode(event: model.AgentEvent) -> None:
        raise RuntimeError("boom")

    noisy = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), on_change=explode, clock=clock)
    assert noisy.join(application()).agent_id


async def test_assignments_latest_wins_and_stale_versions_refused(agent_hub) -> None:
    grant = agent_hub.join(application())
    a = model.Assignment("m", "d", "v", "http://x/m.onnx", "a" * 64)
    agent_hub.set_assignments("edge-1", [a], 1)
    agent_hub.set_assignments("edge-1", [a, a], 2)
    with pytest.raises(errors.StaleAssignments):
        agent_hub.set_assignments("edge-1", [], 1)
    stream = agent_hub.watch_assignments("edge-1", grant.agent_id)
    first = await anext(stream)
    assert first.version == 2 and len(first.assignments) == 2
    agent_hub.set_assignments("edge-1", [], 3)
    agent_hub.set_assignments("edge-1", [a], 4)
    assert (await asyncio.wait_for(anext(stream), 1)).version == 4
    # A watch opened again gets the current set first, then each newer one.
    again = agent_hub.watch_assignments("edge-1", grant.agent_id)
    assert (await asyncio.wait_for(anext(again), 1)).version == 4
    agent_hub.set_assignments("edge-1", [], 5)
    assert (await asyncio.wait_for(anext(again), 1)).version == 5


async def test_a_site_whose_agent_is_forgotten_leaves_nothing_and_starts_afresh_if_it_returns(agent_hub, clock) -> None:
    """Nodes come and go for months (the agent DaemonSet names a site per node): a site whose
    lost agent is forgotten, after its last (empty) set, leaves nothing in the hub; its watch
    stream ends. Back under the same name, it is given a set again, as to a new site."""
    a = model.Assignment("m", "d", "v", "http://x/m.onnx", "a" * 64)
    for i in range(3):
        site = f"edge-lyon-node-{i}"
        agent_hub.join(application(site))
        agent_hub.set_assignments(site, [a], 2 * i + 1)
        clock.now += 10.0  # the node is gone: its agent misses its heartbeats
        agent_hub.sweep()
        agent_hub.set_assignments(site, [], 2 * i + 2)
        agent_hub.forget_if_lost(site)  # its Site is no longer stored
        assert agent_hub.status(site) is None and agent_hub.assignments(site) is None
    assert agent_hub.sites() == []

    grant = agent_hub.join(application("edge-lyon-node-0"))
    watch = agent_hub.watch_assignments("edge-lyon-node-0", grant.agent_id)
    agent_hub.set_assignments("edge-lyon-node-0", [a], 7)  # the reconciler reads no set for it: it sends one
    assert (await asyncio.wait_for(anext(watch), 1)).version == 7
    # forgotten while watched, and back with its credential before the stream woke: it watches the new set
    following = asyncio.ensure_future(anext(watch))
    agent_hub.forget("edge-lyon-node-0")
    agent_hub.join(application("edge-lyon-node-0", credential=grant.credential, agent_id=grant.agent_id))
    agent_hub.set_assignments("edge-lyon-node-0", [], 8)
    assert (await asyncio.wait_for(following, 1)).version == 8
    # forgotten for good: the stream ends
    agent_hub.forget("edge-lyon-node-0")
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(watch), 1)
    assert agent_hub.assignments("edge-lyon-node-0") is None


def test_lag_histogram_quantiles() -> None:
    lag = hub.LagHistogram()
    assert lag.quantile(0.99) == 0.0
    for ms in [1.0] * 98 + [100.0, 5000.0]:
        lag.observe(ms)
    assert lag.quantile(0.5) <= 1.25
    assert 100 <= lag.quantile(0.99) <= 130
    assert lag.quantile(1.0) >= 5000


def test_a_live_agents_new_session_is_not_a_second_join(agent_hub, clock, events) -> None:
    """Enrolment over the join port, then the session over mutual TLS: one join."""
    grant = agent_hub.join(application())
    clock.now += 0.1
    again = agent_hub.join(application(bootstrap_token="", credential=grant.credential, agent_id=grant.agent_id))
    assert again.agent_id == grant.agent_id
    assert kinds(events) == ["JOINED", "RECONNECTED"]
    # once it was lost, coming back with the same credential is a join again
    clock.now += 10
    agent_hub.sweep()
    agent_hub.join(application(bootstrap_token="", credential=grant.credential, agent_id=grant.agent_id))
    assert kinds(events) == ["JOINED", "RECONNECTED", "LOST", "JOINED"]
    assert events[0].reason == "agent joined with a bootstrap token" and events[-1].reason == "agent joined with its credential"




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
