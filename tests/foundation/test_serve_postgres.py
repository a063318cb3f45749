"""`edgeplane serve --store postgresql://…`: the control plane keeps its state in a real
PostgreSQL server; a control plane killed with -9 and another started on the same
database (with an empty data dir) sees every acknowledged write; a database that cannot
be reached is a one-line error."""

from __future__ import annotations

import json
import os
import pathlib
import signal

from orchestrator.store import open_store

from . import support
from orchestrator.testing.postgres import PostgresServer


def test_state_in_postgresql_survives_kill_9_and_is_seen_by_another_control_plane(
    tmp_path: pathlib.Path, offline_fleet: pathlib.Path, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    support.shared_agent_ca(tmp_path / "one", tmp_path / "two")
    first = support.ServeProcess(tmp_path / "one", "--store", url, artifact_root=offline_fleet).wait_ready()
    try:
        first.cli_ok("apply", "-f", str(offline_fleet))
        before = json.loads(first.cli_ok("get", "sites", "-o", "json").stdout)
        assert before, "the example fleet has sites"
    finally:
        os.killpg(first.process.pid, signal.SIGKILL)
        first.stop()
    store = open_store(url)
    try:
        assert support.user_events(store), "the apply was logged in PostgreSQL"
        desired = support.desired_state(store)
    finally:
        store.close()
    second = support.ServeProcess(tmp_path / "two", "--store", url, artifact_root=offline_fleet).wait_ready()
    try:
        after = json.loads(second.cli_ok("get", "sites", "-o", "json").stdout)
        names = lambda doc: sorted(item["metadata"]["name"] for item in doc["items"])  # noqa: E731
        assert names(after) == names(before)
        again = second.cli_ok("apply", "-f", str(offline_fleet))
        assert "configured" not in again.stdout and "created" not in again.stdout, again.stdout
    finally:
        second.stop()
    assert not (tmp_path / "one" / "state.db").exists()  # nothing went to SQLite
    store = open_store(url)
    try:
        assert support.desired_state(store) == desired
    finally:
        store.close()


def _fails_to_start_with(tmp_path: pathlib.Path, url: str) -> str:
    """``serve --store URL`` exits 2 with one line and no traceback; that line."""
    proc = support.ServeProcess(tmp_path / "cp", "--store", url)
    code = proc.process.wait(60)
    log = proc.log()
    proc.stop()
    assert code == 2, log  # serve's exit status for a configuration it cannot start with
    assert "Traceback" not in log and len(log.strip().splitlines()) == 1, log
    return log


def test_an_unreachable_database_is_a_one_line_error(tmp_path: pathlib.Path) -> None:
    log = _fails_to_start_with(tmp_path, f"postgresql://postgres@127.0.0.1:{support.closed_port()}/nowhere")
    assert "cannot reach the PostgreSQL store" in log and "Connection refused" in log
    assert "postgresql://postgres@127.0.0.1" in log


def test_a_malformed_database_url_is_a_one_line_error(tmp_path: pathlib.Path) -> None:
    log = _fails_to_start_with(tmp_path, f"postgresql://postgres:secret@127.0.0.1:{support.closed_port()}/db?no_such_option=1")
    assert "not a PostgreSQL URL" in log and "no_such_option" in log and "secret" not in log, log
