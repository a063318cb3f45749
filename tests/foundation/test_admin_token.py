"""``edgeplane serve`` writes the initial admin token to ``<data-dir>/admin.token`` while the
store holds no API token: a start that could not write the file must not leave the store
with a token nobody holds, or no later start writes one and the operator is locked out."""

from __future__ import annotations

import pathlib
import subprocess

import httpx

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
