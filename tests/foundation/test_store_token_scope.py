"""A token's scope in the state store: the models it may call and the residency it is held
to are kept with it and read back by every lookup, on both backends (the ``store`` and
``location`` fixtures, conftest.py), and tokens made before tokens were scoped read as
unscoped: from a file of that release, and from a replica of it writing during a rolling update."""

from __future__ import annotations

import pathlib
import sqlite3

from orchestrator.store import StateStore as Store
from orchestrator.store import open_store

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


def test_tokens_from_a_file_made_before_tokens_were_scoped_are_unscoped(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.db"
    s = open_store(path)
    try:
        secret, old = s.create_token("api", "read", None, "admin")
    finally:
        s.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("ALTER TABLE tokens DROP COLUMN models")
        db.execute("ALTER TABLE tokens DROP COLUMN residency")
    db.close()
    s = open_store(path)
    try:
        verified = s.verify_token(secret, "api")
        assert verified is not None and verified.id == old.id and (verified.models, verified.residency) == ((), ())
        _, scoped = s.create_token("api", "read", None, "admin", models=["intent"])
        assert {t.id: t.models for t in s.tokens()} == {old.id: (), scoped.id: ("intent",)}
    finally:
        s.close()


def test_a_token_an_earlier_release_writes_during_a_rolling_update_is_unscoped(store: Store, location: str) -> None:
    insert_token_as_the_earlier_release(location, "0ld70ken", "epb_0ld70ken_secret")
    token = store.verify_token("epb_0ld70ken_secret", "bootstrap")
    assert token is not None and (token.models, token.residency) == ((), ())
