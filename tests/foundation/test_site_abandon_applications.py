"""Deleting a data-centre Site and giving up its Serve applications
(``DELETE /v1/sites/NAME?abandonApplications=true``) is one change: a store that refuses
either part leaves the Site as it was, so the caller's error means nothing was done, and a
retry answers as the first attempt would have. Run on a real SQLite store."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest

from orchestrator import catalog
from orchestrator.store import sqlite as store_mod

DATACENTRE = {"tier": "datacenter", "ray": {"address": "http://ray:8265"},
              "location": {"country": "FR", "lat": 48.86, "lon": 2.34}}


def test_a_site_whose_applications_cannot_be_abandoned_is_not_deleted_either(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.db"
    store = store_mod.Store(path)
    try:
        store.apply([store_mod.ObjectWrite("Site", "dc", {}, DATACENTRE)], store_mod.Event("test", "apply", "", "", "declare"))
        with sqlite3.connect(path) as db:  # an operator's constraint refuses the second part
            db.execute("CREATE TRIGGER ticketed BEFORE INSERT ON events WHEN NEW.action = 'applications-abandoned' "
                       "BEGIN SELECT RAISE(ABORT, 'abandoning needs a ticket'); END")
        with pytest.raises(store_mod.StoreError, match="needs a ticket"):
            catalog.delete_site_abandoning(store, "dc", actor="alice")
        assert store.get("Site", "dc") is not None and store.deleted_sites() == []
        assert not [e for e in store.events(limit=100) if e.name == "dc" and e.action == "deleted"]

        with sqlite3.connect(path) as db:
            db.execute("DROP TRIGGER ticketed")
        assert catalog.delete_site_abandoning(store, "dc", actor="alice")  # the retry deletes it, as the first would have
        assert store.get("Site", "dc") is None and store.deleted_sites() == []
        assert [e.action for e in store.events(limit=100) if e.name == "dc"][-2:] == ["deleted", "applications-abandoned"]
    finally:
        store.close()
