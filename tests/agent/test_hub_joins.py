"""Joins to the hub with an injected clock: the site identity rule, a site revoked, written by
another replica or held by the leader's word while a join is checked, joins refused for what
they carry, and a live agent's new session that is not a second join. No network."""

from __future__ import annotations

import asyncio
import pathlib
import threading

import pytest

from orchestrator.agents import auth, errors, hub, model
from orchestrator.store import sqlite as store_mod

from .hub_support import TOKEN, Tap, application, beat, kinds


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
        ({"endpoint_url": "http://[::1"}, errors.InvalidJoin),  # not a URL at all
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
