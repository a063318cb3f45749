"""Which releases may use a store: each store says which schema generation last brought it
up to date and the oldest generation that may still read and write it, so that a control
plane older than that (a rollback past a change that was not only additive, a replica left
behind in a rolling update) refuses to start rather than write a schema it does not know.
Each test runs on both backends (the ``reopen`` and ``location`` fixtures, conftest.py)."""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Callable

import pytest

from orchestrator.store import StateStore as Store
from orchestrator.store import open_store, schema_version
from orchestrator.store.sqlite import StoreError

from . import support
from .support import WHO, stored_bytes, write
from .test_store_deleted_sites import raw_sql

KEYS = (schema_version.WRITTEN_BY, schema_version.USABLE_FROM)
THIS = {schema_version.WRITTEN_BY: schema_version.GENERATION, schema_version.USABLE_FROM: schema_version.OLDEST_USER}


def mark(location: str) -> dict[str, int]:
    with raw_sql(location) as sql:
        return {k: int(v) for k, v in sql("SELECT key, value FROM meta WHERE key IN (?, ?)", KEYS)}


def stamp(location: str, written_by: int, usable_from: int) -> None:
    """As a release of generation ``written_by`` leaves the store, one that ``usable_from`` on may use."""
    with raw_sql(location) as sql:
        sql("DELETE FROM meta WHERE key IN (?, ?)", KEYS)
        sql("INSERT INTO meta (key, value) VALUES (?, ?), (?, ?)", (KEYS[0], written_by, KEYS[1], usable_from))


def test_a_new_store_says_which_generation_made_it(reopen: Callable[..., Store], location: str) -> None:
    reopen()
    assert mark(location) == THIS


def test_a_store_an_earlier_release_kept_is_brought_up_to_date_and_stamped(reopen: Callable[..., Store], location: str) -> None:
    """Releases before the mark kept none: their store opens as before, and says so from then on."""
    reopen().apply([write("dc", {"tier": "datacenter"})], WHO)
    with raw_sql(location) as sql:
        sql("DELETE FROM meta WHERE key IN (?, ?)", KEYS)
        sql("DROP TABLE left_targets")  # as the release before it was added left the store
    again = reopen()
    assert mark(location) == THIS
    assert again.get("Site", "dc") is not None
    again.delete("Site", "dc", WHO)
    assert [d.name for d in again.deleted_sites()] == ["dc"]


def test_a_store_a_newer_release_left_usable_by_this_one_opens_and_keeps_its_mark(
        reopen: Callable[..., Store], location: str) -> None:
    """A rollback past changes that only added: this release uses it, and never says it made it."""
    reopen().close()
    stamp(location, schema_version.GENERATION + 3, schema_version.GENERATION)
    reopen().apply([write("dc", {"tier": "datacenter"})], WHO)
    assert mark(location) == {KEYS[0]: schema_version.GENERATION + 3, KEYS[1]: schema_version.GENERATION}


def newer_message(location: str) -> str:
    """What this release says of a store a release of generation +3 left, usable from +2 on."""
    return (f"the store {location} was last brought up to date by a newer edgeplane (schema generation "
            f"{schema_version.GENERATION + 3}), which no control plane before schema generation {schema_version.GENERATION + 2} "
            f"may use; this one is generation {schema_version.GENERATION}: upgrade it to that release or a later one "
            "(or restore the store from a backup taken before that release first started on it)")


def test_a_store_a_newer_release_left_unusable_by_this_one_is_refused_and_nothing_is_written(location: str) -> None:
    open_store(location).close()
    stamp(location, schema_version.GENERATION + 3, schema_version.GENERATION + 2)
    with raw_sql(location) as sql:
        sql("DROP TABLE left_targets")  # a table the newer release gave up: this one would make it again
    before = stored_bytes(location)
    with pytest.raises(StoreError) as refused:
        open_store(location)
    assert str(refused.value) == newer_message(location)
    assert stored_bytes(location) == before


def test_serve_on_a_store_a_newer_release_left_unusable_stops_in_one_line(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    open_store(data / "state.db").close()
    stamp(str(data / "state.db"), schema_version.GENERATION + 3, schema_version.GENERATION + 2)
    before = (data / "state.db").read_bytes()
    proc = subprocess.run([str(support.EDGEPLANE), "serve", "--data-dir", str(data), "--port", str(support.free_port()),
                           "--agent-port", "0", "--agent-join-port", "0"],
                          capture_output=True, text=True, timeout=60, env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    assert proc.stderr.strip().splitlines() == [f"error: {newer_message(str(data / 'state.db'))}"], proc.stderr
    assert (data / "state.db").read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["state.db", "state.db.owner"]  # no CA, no admin token: it started nothing
