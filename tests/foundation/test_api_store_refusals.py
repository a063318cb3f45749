"""What a caller of the control API is told when the store refuses a call: one the database
may take later (unreachable, read-only, a full disk) is 503 with Retry-After, which the CLI
waits out; one refused for what it is (a constraint, a bug) is 500 with the store's message,
as asking again gets the same answer. PostgreSQL's side is in test_store_postgres_refusals."""

from __future__ import annotations

import pathlib
import sqlite3

import httpx

from orchestrator.testing import manifests

from . import support
from .conftest import start_control_plane


def test_an_apply_the_store_refuses_for_what_it_is_is_a_500_with_its_message_not_a_retry(
        tmp_path: pathlib.Path, offline_fleet: pathlib.Path) -> None:
    server = start_control_plane(tmp_path / "cp", offline_fleet)
    try:
        with sqlite3.connect(tmp_path / "cp" / "state.db") as db:  # an operator's constraint on the objects
            db.execute("CREATE TRIGGER no_lab_sites BEFORE INSERT ON objects WHEN NEW.name LIKE 'lab-%' "
                       "BEGIN SELECT RAISE(ABORT, 'no lab sites here'); END")
        manifest = tmp_path / "site.yaml"
        manifest.write_text(manifests.edge_site("lab-1", "FR", 48.0, 2.35, region="fr"))
        answer = httpx.post(f"{server.url}/v1/apply", content=manifest.read_bytes(),
                            headers={"content-type": "application/yaml"}, timeout=30)
        assert answer.status_code == 500 and "retry-after" not in answer.headers, (answer.status_code, answer.headers, answer.text)
        assert "no lab sites here" in answer.json()["error"] and "Traceback" not in answer.text, answer.text
        done = support.cli("apply", "-f", str(manifest), server_url=server.url, timeout=20)
        assert done.returncode != 0 and "no lab sites here" in done.stderr and "retry" not in done.stderr.lower(), done.stderr
    finally:
        server.stop()
