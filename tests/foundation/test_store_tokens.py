"""Tokens and agent identities in the state store: expiry by the injected clock, revocation,
digests only, static bootstrap tokens, a site revoked as its join is written, and tokens
made by earlier releases. A test that takes the ``store``, ``reopen`` or ``location``
fixture (conftest.py) runs against both backends, an SQLite file and a real PostgreSQL
server; they must behave identically."""

from __future__ import annotations

import pathlib
import sqlite3
import time

import pytest

from orchestrator.store import StateStore as Store
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.store.sqlite import Event

from .support import FakeClock, stored_bytes


def test_tokens_expire_by_the_injected_clock(store: Store, clock: FakeClock) -> None:
    secret, info = store.create_token("bootstrap", "agent", 60, "admin", "for lyon")
    assert info.expires_at == clock.now + 60
    assert store.verify_token(secret, "bootstrap") == info
    assert store.verify_token(secret, "api") is None  # a bootstrap token is not an API token
    clock.now += 59
    assert store.verify_token(secret, "bootstrap") is not None
    clock.now += 2
    assert store.verify_token(secret, "bootstrap") is None
    assert store.events()[-1].action == "token-created" and store.events()[-1].actor == "admin"


def test_tokens_revoke_and_only_digests_are_stored(store: Store, location: str, clock: FakeClock) -> None:
    secret, info = store.create_token("api", "read", None, "admin")
    assert info.expires_at is None and store.has_api_tokens()
    assert not store.has_admin_token()  # a read token administers nothing
    assert store.verify_token(secret + "x", "api") is None
    assert store.revoke_token(info.id, "admin") is True
    assert store.verify_token(secret, "api") is None
    assert store.revoke_token("nope", "admin") is False
    assert not store.has_api_tokens()
    assert [e.action for e in store.events()][-1] == "token-revoked"
    raw = stored_bytes(location)
    assert secret.encode() not in raw and store_mod.digest(secret).encode() in raw
    admin_secret, _ = store.create_token("api", "admin", 60, "admin")
    assert store.has_admin_token()
    clock.now += 61
    assert not store.has_admin_token() and store.verify_token(admin_secret, "api") is None  # expired: it works no more


def test_an_expired_api_token_no_longer_counts_as_one(store: Store, clock: FakeClock) -> None:
    """As an expired admin token does not count as one that works: a restored backup brings
    expired tokens back, and none of them lets anyone in."""
    store.create_token("api", "read", 60, "admin")
    assert store.has_api_tokens()
    clock.now += 61
    assert not store.has_api_tokens()
    store.create_token("api", "read", None, "admin")
    assert store.has_api_tokens()


def test_tokens_are_listed_with_their_state_and_never_their_secret(store: Store, clock: FakeClock) -> None:
    read_secret, read = store.create_token("api", "read", None, "admin", "dashboards")
    clock.now += 1
    _, boot = store.create_token("bootstrap", "agent", 60, "admin")
    clock.now += 1
    _, admin = store.create_token("api", "admin", None, "admin")
    assert store.revoke_token(admin.id, "alice", "left the team") is True
    assert store.revoke_token(admin.id, "bob") is True  # already revoked: still known, logged once
    clock.now += 61  # past the bootstrap token's 60 s
    listed = store.tokens()
    assert [(t.id, t.purpose, t.role, t.state) for t in listed] == [
        (read.id, "api", "read", "active"), (boot.id, "bootstrap", "agent", "expired"), (admin.id, "api", "admin", "revoked")]
    assert listed[0].description == "dashboards" and listed[1].expires_at == boot.expires_at
    assert read_secret not in repr(listed) and store_mod.digest(read_secret) not in repr(listed)
    revoked = [e for e in store.events() if e.action == "token-revoked"]
    assert [(e.actor, e.name, e.reason) for e in revoked] == [("alice", admin.id, "left the team")]


def test_agent_credentials(store: Store) -> None:
    store.save_agent("edge-lyon", "agent-1", "cred-1", "agent@edge-lyon")
    assert store.agent_credential_ok("edge-lyon", "cred-1")
    assert not store.agent_credential_ok("edge-lyon", "cred-2")
    assert not store.agent_credential_ok("edge-berlin", "cred-1")
    store.save_agent("edge-lyon", "agent-2", "cred-2", "agent@edge-lyon")  # a re-join replaces the credential
    assert not store.agent_credential_ok("edge-lyon", "cred-1") and store.agent_credential_ok("edge-lyon", "cred-2")
    assert store.revoke_agent("edge-lyon", "admin")
    assert not store.agent_credential_ok("edge-lyon", "cred-2")


def test_an_agent_identity_is_replaced_only_while_it_is_the_one_a_join_read(store: Store) -> None:
    """Replicas share the store: a join writes its credential only over the identity it read."""
    saved, replaced = store_mod.AgentSaved.SAVED, store_mod.AgentSaved.REPLACED
    assert store.agent_of("edge-lyon") == ""
    assert store.save_agent("edge-lyon", "agent-1", "cred-1", "agent@edge-lyon", replacing="") is saved
    assert store.save_agent("edge-lyon", "agent-2", "cred-2", "agent@edge-lyon", replacing="") is replaced  # read before agent-1
    assert store.agent_of("edge-lyon") == "agent-1"
    assert store.save_agent("edge-lyon", "agent-3", "cred-3", "agent@edge-lyon", replacing="agent-1") is saved
    assert store.save_agent("edge-lyon", "agent-4", "cred-4", "agent@edge-lyon", replacing="agent-1") is replaced
    assert store.agent_credential_ok("edge-lyon", "cred-3")
    assert not any(store.agent_credential_ok("edge-lyon", c) for c in ("cred-1", "cred-2", "cred-4"))


def test_free_text_with_a_nul_is_kept_the_same_way_by_both_backends(store: Store) -> None:
    """PostgreSQL refuses NUL in text (a 500 from the API, where the text was a record id,
    a token's description or an agent's message); both backends now write it as ``\\x00``."""
    store.record(Event("agent\x00x", "model-failed", "Site", "edge\x00lyon", "load failed: bad\x00byte", {"error": "a\x00b"}))
    _, token = store.create_token("api", "read", None, "admin", "ci\x00bot")
    store.save_agent("edge-lyon", "agent\x00id", "cred-1", "agent@edge-lyon")
    logged = store.events()[-2:]
    assert [(e.actor, e.name, e.reason) for e in logged] == [
        ("agent\\x00x", "edge\\x00lyon", "load failed: bad\\x00byte"), ("admin", token.id, "ci\\x00bot")]
    assert logged[0].details == {"error": "a\x00b"}  # JSON holds it escaped, and gives it back
    assert token.description == "ci\\x00bot" and [t.description for t in store.tokens()] == ["ci\\x00bot"]
    assert store.agent_credential_ok("edge-lyon", "cred-1")


def test_static_bootstrap_tokens_admit_joins_but_never_a_revoked_site(store: Store, clock: FakeClock) -> None:
    from orchestrator.agents import errors as agent_errors
    from orchestrator.agents.auth import StoreJoinAuthenticator

    auth = StoreJoinAuthenticator(store, ("static-secret",))
    static = auth.verify_bootstrap("static-secret")
    assert static is not None and auth.verify_bootstrap("other") is None and auth.verify_bootstrap("") is None
    assert auth.issue_credential("edge-lyon", "agent-1", static)
    assert store.revoke_agent("edge-lyon", "admin")
    clock.now += 60
    assert auth.verify_bootstrap("static-secret") == static
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):
        auth.issue_credential("edge-lyon", "agent-2", static)
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):  # nor one that came with a credential
        auth.issue_credential("edge-lyon", "agent-2", None)
    assert auth.issue_credential("edge-berlin", "agent-3", static)  # other sites still join on it
    secret, _ = store.create_token("bootstrap", "agent", 3600, "admin")
    fresh = auth.verify_bootstrap(secret)
    assert fresh is not None and auth.issue_credential("edge-lyon", "agent-4", fresh)  # a token made after the revocation


class RevokedJustBeforeSaving:
    """The store, with the site's identity revoked (as by another request) right before a
    join's credential is saved: after the join checked the site, before it wrote."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def save_agent(self, site: str, *args: object, **kwargs: object) -> object:
        assert self._store.revoke_agent(site, "admin")
        return self._store.save_agent(site, *args, **kwargs)  # type: ignore[arg-type]


def test_a_site_revoked_as_its_join_is_written_stays_revoked(store: Store, clock: FakeClock) -> None:
    """The join is refused, and the revocation is not written over: bootstrap tokens made
    before it, static ones included, still do not admit the site."""
    from orchestrator.agents import errors as agent_errors
    from orchestrator.agents.auth import StoreJoinAuthenticator

    auth = StoreJoinAuthenticator(store, ("static-secret",))
    static = auth.verify_bootstrap("static-secret")
    assert static is not None and auth.issue_credential("edge-lyon", "agent-1", static)
    clock.now += 60
    racing = StoreJoinAuthenticator(RevokedJustBeforeSaving(store), ("static-secret",))  # type: ignore[arg-type]
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):
        racing.issue_credential("edge-lyon", "agent-2", static, replacing="agent-1")
    assert store.agent_revoked_at("edge-lyon") == clock.now and store.agent_of("edge-lyon") == "agent-1"
    clock.now += 60
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):
        auth.issue_credential("edge-lyon", "agent-3", static)
    # the store's own rule: a revoked identity is replaced only for a join admitted after the revocation
    _, after = store.create_token("bootstrap", "agent", 3600, "admin")
    assert store.save_agent("edge-lyon", "agent-4", "cred-4", "agent@edge-lyon", "agent-1", after.created_seq - 1) \
        is store_mod.AgentSaved.REVOKED
    assert not store.agent_credential_ok("edge-lyon", "cred-4")
    assert store.save_agent("edge-lyon", "agent-5", "cred-5", "agent@edge-lyon", "agent-1", after.created_seq) is store_mod.AgentSaved.SAVED
    assert store.agent_credential_ok("edge-lyon", "cred-5") and store.agent_revoked_at("edge-lyon") is None


def test_a_bootstrap_token_made_before_a_revocation_stays_refused_whatever_the_clocks_said(store: Store, clock: FakeClock) -> None:
    """The cut-off is the store's order of events: a replica whose clock ran two minutes fast
    made the token, NTP (or a replica with a true clock) stamped the revocation ten seconds
    later, and the token's stamp reads after the revocation's."""
    from orchestrator.agents import errors as agent_errors
    from orchestrator.agents.auth import StoreJoinAuthenticator

    joins = StoreJoinAuthenticator(store)
    secret, _ = store.create_token("bootstrap", "agent", 3600, "admin")
    token = joins.verify_bootstrap(secret)
    assert token is not None and joins.issue_credential("edge-lyon", "agent-1", token)
    clock.now -= 110  # stepped back to the true time, 10 s after the token was made
    assert store.revoke_agent("edge-lyon", "admin", "device stolen")
    again = joins.verify_bootstrap(secret)  # not expired: whoever copied it still holds a valid token
    assert again is not None
    with pytest.raises(agent_errors.NotAuthenticated, match="revoked"):
        joins.issue_credential("edge-lyon", "agent-2", again)
    clock.now -= 3600  # a token made after the revocation admits the site, however far back its clock
    fresh = joins.verify_bootstrap(store.create_token("bootstrap", "agent", 7200, "admin")[0])
    assert fresh is not None and joins.issue_credential("edge-lyon", "agent-3", fresh)


def test_tokens_made_before_the_store_ordered_them_keep_their_place_or_count_as_oldest(tmp_path: pathlib.Path) -> None:
    """A state file from before tokens kept their place in the store's sequence: a token whose
    creation event is still logged takes that event's place; one whose event retention deleted
    counts as made before any revocation (it rejoins no revoked site)."""
    path = tmp_path / "state.db"
    s = open_store(path)
    try:
        _, logged = s.create_token("bootstrap", "agent", None, "admin")
        _, pruned = s.create_token("bootstrap", "agent", None, "admin")
    finally:
        s.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("DELETE FROM events WHERE name = ?", (pruned.id,))
        db.execute("ALTER TABLE tokens DROP COLUMN created_seq")
    db.close()
    s = open_store(path)
    try:
        seqs = {t.id: t.created_seq for t in s.tokens()}
        assert seqs == {logged.id: logged.created_seq, pruned.id: 0}
    finally:
        s.close()


def insert_token_as_the_earlier_release(location: str, token_id: str, secret: str) -> None:
    """What a replica of the release before tokens kept ``created_seq`` writes for a new
    bootstrap token, on the same store: its creation event, then the row without it."""
    now = time.time()
    event = ("admin", "token-created", "Token", token_id, "bootstrap token", "{}", now)
    token = (token_id, store_mod.digest(secret), "bootstrap", "agent", now, "")
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            conn.execute("INSERT INTO events (actor, action, kind, name, reason, details, ts) VALUES (%s, %s, %s, %s, %s, %s, %s)", event)
            conn.execute("INSERT INTO tokens (id, digest, purpose, role, created_at, description) VALUES (%s, %s, %s, %s, %s, %s)", token)
        return
    db = sqlite3.connect(location)
    with db:
        db.execute("INSERT INTO events (actor, action, kind, name, reason, details, ts) VALUES (?, ?, ?, ?, ?, ?, ?)", event)
        db.execute("INSERT INTO tokens (id, digest, purpose, role, created_at, description) VALUES (?, ?, ?, ?, ?, ?)", token)
    db.close()


def test_a_bootstrap_token_made_by_an_earlier_release_after_a_revocation_rejoins_the_site(store: Store, location: str) -> None:
    """During a rolling update a replica of the earlier release makes the token, after this
    release's replicas started (so no backfill gives it its place): it is read at its
    creation event's place, after the revocation, and admits the site."""
    from orchestrator.agents.auth import StoreJoinAuthenticator

    joins = StoreJoinAuthenticator(store)
    first = joins.verify_bootstrap(store.create_token("bootstrap", "agent", 3600, "admin")[0])
    assert first is not None and joins.issue_credential("edge-lyon", "agent-1", first)
    assert store.revoke_agent("edge-lyon", "admin", "device stolen")
    insert_token_as_the_earlier_release(location, "0ld70ken", "epb_0ld70ken_secret")
    token = joins.verify_bootstrap("epb_0ld70ken_secret")
    assert token is not None and token.created_seq > first.created_seq
    assert joins.issue_credential("edge-lyon", "agent-2", token)
    assert store.agent_of("edge-lyon") == "agent-2" and store.agent_revoked_at("edge-lyon") is None
    assert {t.id: t.created_seq for t in store.tokens()}["0ld70ken"] == token.created_seq
