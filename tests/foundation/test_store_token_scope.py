"""A token's scope in the state store: the models it may call and the residency it is held
to are kept with it and read back by every lookup, on both backends (the ``store`` and
``location`` fixtures, conftest.py), and tokens made before tokens were scoped read as
unscoped: from a file of that release, and from a replica of it writing during a rolling update."""

from __future__ import annotations

import hashlib
import sqlite3

from orchestrator.store import StateStore as Store
from orchestrator.store import open_store

from .support import FakeClock
from .test_store_tokens import insert_token_as_the_earlier_release


def test_a_tokens_scope_is_kept_and_read_by_every_lookup(store: Store) -> None:
    secret, made = store.create_token("api", "read", None, "admin", "tenant a", models=["intent", "chat-a"], residency=["FR"])
    assert (made.models, made.residency) == (("intent", "chat-a"), ("FR",))
    verified = store.verify_token(secret, "api")
    assert verified is not None and (verified.models, verified.residency) == (("intent", "chat-a"), ("FR",))
    plain_secret, unscoped = store.create_token("api", "read", None, "admin")
    plain = store.verify_token(plain_secret, "api")
    assert plain is not None and (plain.models, plain.residency) == ((), ())
    assert {t.id: (t.models, t.residency) for t in store.tokens()} == {made.id: (("intent", "chat-a"), ("FR",)), unscoped.id: ((), ())}
    created = [e for e in store.events() if e.action == "token-created"]
    assert created[0].details["models"] == ["intent", "chat-a"] and created[0].details["residency"] == ["FR"]
    assert "models" not in created[1].details  # an unscoped token's event is as before


def test_tokens_from_a_store_made_before_tokens_were_scoped_are_unscoped(location: str) -> None:
    """A file, or a PostgreSQL database, of the release before: the columns are added on
    start, while another replica of this release holds the store open, and its tokens verify unscoped."""
    s = open_store(location)
    try:
        secret, old = s.create_token("api", "read", None, "admin")
    finally:
        s.close()
    _drop_scope_columns(location)
    s, other = open_store(location), open_store(location)
    try:
        verified = s.verify_token(secret, "api")
        assert verified is not None and verified.id == old.id and (verified.models, verified.residency) == ((), ())
        _, scoped = s.create_token("api", "read", None, "admin", models=["intent"])
        assert {t.id: t.models for t in other.tokens()} == {old.id: (), scoped.id: ("intent",)}
    finally:
        s.close()
        other.close()


def _drop_scope_columns(location: str) -> None:
    drop = ["ALTER TABLE tokens DROP COLUMN models", "ALTER TABLE tokens DROP COLUMN residency"]
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            for statement in drop:
                conn.execute(statement)
        return
    db = sqlite3.connect(location)
    with db:
        for statement in drop:
            db.execute(statement)
    db.close()


def test_a_token_an_earlier_release_writes_during_a_rolling_update_is_unscoped(store: Store, location: str) -> None:
    insert_token_as_the_earlier_release(location, "0ld70ken", "epb_0ld70ken_secret")
    token = store.verify_token("epb_0ld70ken_secret", "bootstrap")
    assert token is not None and (token.models, token.residency) == ((), ())


def test_the_tokens_agents_are_sent_are_the_api_tokens_that_work_as_digests(store: Store, clock: FakeClock) -> None:
    """What agents run with --serve-auth token check callers against: each working API token's
    digest (never its secret) and scope; revoked, expired and bootstrap tokens are left out."""
    secret, scoped = store.create_token("api", "read", 3600, "admin", models=["intent"], residency=["EU"])
    _, admin = store.create_token("api", "admin", None, "admin")
    _, revoked = store.create_token("api", "read", None, "admin")
    store.revoke_token(revoked.id, "admin")
    store.create_token("api", "read", 10, "admin")
    store.create_token("bootstrap", "agent", None, "admin")
    clock.now += 11  # the 10 s token expired, by the store's clock
    sent = {row.id: row for row in store.serve_tokens()}
    assert set(sent) == {scoped.id, admin.id}
    row = sent[scoped.id]
    assert (row.digest, row.role, row.models, row.residency) == (hashlib.sha256(secret.encode()).hexdigest(), "read", ("intent",), ("EU",))
    assert row.expires_at == scoped.expires_at and sent[admin.id].expires_at is None
    assert secret not in repr(sent)
