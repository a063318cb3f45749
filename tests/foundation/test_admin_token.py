"""``edgeplane serve`` writes the initial admin token to ``<data-dir>/admin.token`` while the
store holds no API token: a start that could not write the file must not leave the store
with a token nobody holds, or no later start writes one and the operator is locked out."""

from __future__ import annotations

import pathlib
import subprocess

import httpx
import pytest

from orchestrator import durable
from orchestrator.api import auth
from orchestrator.store import sqlite as store_mod

from . import support


def serve_once(data: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """A start that fails before it serves: its exit code and what it said."""
    return subprocess.run([str(support.EDGEPLANE), "serve", "--data-dir", str(data), "--port", str(support.free_port()),
                           "--agent-port", str(support.free_port()), "--agent-join-port", str(support.free_port())],
                          capture_output=True, text=True, timeout=60, env=support.clean_env(), cwd=support.REPO)


def test_a_start_that_could_not_write_the_admin_token_leaves_none_and_the_next_start_writes_one(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "cp"
    (data / "admin.token").mkdir(parents=True)  # what the file cannot replace: the write fails
    failed = serve_once(data)
    assert failed.returncode == 1, failed.stderr
    assert "admin.token" in failed.stderr, failed.stderr
    assert not [p.name for p in data.iterdir() if p.name.startswith(".admin.token")]  # no secret left about
    (data / "admin.token").rmdir()
    cp = support.ServeProcess(data).wait_ready()
    try:
        token = (data / "admin.token").read_text().strip()
        listed = httpx.get(f"{cp.url}/v1/tokens", headers={"authorization": f"Bearer {token}"}, timeout=10)
        assert listed.status_code == 200, listed.text
        assert [t["description"] for t in listed.json()["items"]] == ["initial admin token"]
    finally:
        assert cp.stop() == 0


def test_the_admin_token_s_name_is_on_disk_before_the_store_has_the_token(tmp_path: pathlib.Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Its folder is synced once the file is in place: after a power cut the store's token
    must not outlive the file that holds it (the next start would write none)."""
    store = store_mod.Store(tmp_path / "store.db")
    synced: list[tuple[pathlib.Path, bool, bool]] = []  # the folder; the file there then; the store holding a token then
    real = durable.sync_folder

    def watched(folder: pathlib.Path) -> None:
        synced.append((folder, (folder / "admin.token").is_file(), store.has_api_tokens()))
        real(folder)

    monkeypatch.setattr(durable, "sync_folder", watched)
    secret = auth.ensure_admin_token(store, tmp_path)
    assert secret is not None and (tmp_path / "admin.token").read_text().strip() == secret
    assert synced == [(tmp_path, True, False)]


def test_a_store_whose_admin_tokens_all_expired_or_were_revoked_gets_a_new_admin_token_at_the_next_start(
        tmp_path: pathlib.Path) -> None:
    """Admin tokens that no longer work (expired, revoked; a restored backup brings back
    expired ones too) left the control plane with no way to administer it: a start wrote no
    new admin.token while any API token was stored. One that works is kept, and its file."""
    now = [1_000_000.0]
    store = store_mod.Store(tmp_path / "store.db", clock=lambda: now[0])
    try:
        first = auth.ensure_admin_token(store, tmp_path)
        assert first is not None and auth.ensure_admin_token(store, tmp_path) is None
        initial = store.verify_token(first, "api")
        assert initial is not None
        short, _ = store.create_token("api", "admin", 3600, "admin", "an admin's token for a day's work")
        store.create_token("api", "read", None, "admin", "a dashboard")  # it administers nothing
        store.revoke_token(initial.id, "admin")
        assert auth.ensure_admin_token(store, tmp_path) is None  # the short-lived one still works
        now[0] += 7200  # it expired
        (tmp_path / "admin.token").unlink()  # and the file is lost, or holds the revoked one
        written = auth.ensure_admin_token(store, tmp_path)
        assert written is not None and (tmp_path / "admin.token").read_text().strip() == written
        given = store.verify_token(written, "api")
        assert given is not None and given.role == "admin" and store.verify_token(short, "api") is None
    finally:
        store.close()
