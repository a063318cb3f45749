"""Cordon, drain and uncordon through the HTTP API and the ``edgeplane`` command line,
against a real control plane on a real SQLite store (the offline example fleet: nothing
runs, so a drain has nothing to move): round trips, idempotence, the event log, errors,
``--dry-run``, ``-o json``, the metrics gauge, and a cordon that outlives a re-apply."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from orchestrator import maintenance
from orchestrator.reconciler import hold
from orchestrator.store import open_store
from orchestrator.testing import manifests
from orchestrator.store import sqlite as store_mod

from .conftest import start_control_plane
from . import support
from .support import cli


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory, offline_fleet: pathlib.Path) -> Iterator[support.ServerThread]:
    server = start_control_plane(tmp_path_factory.mktemp("maintenance"), offline_fleet, auth="token")
    try:
        with httpx.Client(base_url=server.url, headers=_admin(server)) as c:
            assert c.post("/v1/apply", content=_examples(offline_fleet)).status_code == 200
        yield server
    finally:
        server.stop()


ADMIN = "token:"  # the initial admin token's identity starts so


def _admin(server: support.ServerThread) -> dict[str, str]:
    assert server.cp is not None and server.cp.admin_token
    return {"authorization": f"Bearer {server.cp.admin_token}"}


def _examples(folder: pathlib.Path) -> str:
    return "\n---\n".join(f.read_text() for f in sorted(folder.glob("*.yaml")))


def _trigger(server: support.ServerThread) -> None:
    """A pass now, asked on the control plane's own loop (a store written behind its back)."""
    assert server.cp is not None and server.loop is not None
    server.loop.call_soon_threadsafe(server.cp.changed, "test")


def _a_pass_started_after(server: support.ServerThread, passes: int) -> None:
    """Returns once a pass that began after ``passes`` were counted has ended: two more, as
    one may have been under way (TimeoutError after 30 s)."""
    assert server.cp is not None and server.loop is not None
    asyncio.run_coroutine_threadsafe(server.cp.reconciler.wait_for_pass(passes + 1), server.loop).result(timeout=35)


def _held(server: support.ServerThread) -> None:
    """Returns once a pass has read the store as written now (a stored object it cannot read
    is on hold from then on: the pass publishes the hold before it ends)."""
    assert server.cp is not None
    passes = server.cp.reconciler.passes
    _trigger(server)
    _a_pass_started_after(server, passes)


def _site_events(c: httpx.Client, site: str) -> list[dict[str, Any]]:
    return [e for e in c.get("/v1/events", params={"kind": "sites", "name": site, "limit": 1000}).json()["items"]
            if e["action"].startswith("site-")]


def _maintenance_once_passed(c: httpx.Client, site: str, want: str | None, timeout: float = 30.0) -> dict[str, Any]:
    """The Site's status once a pass has written the maintenance state ``want`` (None: none)."""
    deadline = time.monotonic() + timeout
    while True:
        status = c.get(f"/v1/sites/{site}").json().get("status", {})
        if (status.get("maintenance") or {}).get("state") == want:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"site {site} never showed maintenance state {want}: {status}")
        time.sleep(0.05)


def test_cordon_and_uncordon_round_trip_with_events_and_idempotence(cp: support.ServerThread) -> None:
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        r = c.post("/v1/sites/edge-lyon/cordon", headers={"x-edgeplane-reason": "disk swap"})
        assert r.status_code == 200, r.text
        by = r.json()["maintenance"]["by"]
        assert by.startswith(ADMIN) and r.json() == {"kind": "Site", "name": "edge-lyon", "action": "cordoned", "schedulable": False,
                                                     "maintenance": {"mode": "cordon", "reason": "disk swap", "by": by, "force": False}}
        again = c.post("/v1/sites/edge-lyon/cordon", headers={"x-edgeplane-reason": "still the disk"})
        assert again.status_code == 200 and again.json()["action"] == "unchanged"
        status = _maintenance_once_passed(c, "edge-lyon", "Cordoned")
        assert status["schedulable"] is False and status["maintenance"]["reason"] == "disk swap"
        assert [(e["action"], e["actor"], e["reason"]) for e in _site_events(c, "edge-lyon")] == [("site-cordoned", by, "disk swap")]
        gauge = [line for line in c.get("/metrics").text.splitlines() if line.startswith("edgeplane_sites_cordoned{")]
        assert 'edgeplane_sites_cordoned{state="cordoned"} 1.0' in gauge, gauge
        r = c.post("/v1/sites/edge-lyon/uncordon", headers={"x-edgeplane-reason": "done"})
        assert r.json() == {"kind": "Site", "name": "edge-lyon", "action": "uncordoned", "schedulable": True}
        assert c.post("/v1/sites/edge-lyon/uncordon").json()["action"] == "unchanged"
        assert "maintenance" not in _maintenance_once_passed(c, "edge-lyon", None)
        assert [e["action"] for e in _site_events(c, "edge-lyon")] == ["site-cordoned", "site-uncordoned"]


def test_a_deleted_site_s_drain_is_not_counted_in_the_gauge(cp: support.ServerThread) -> None:
    # drained, then deleted: a decommission. Its maintenance is kept for a Site declared again under the name.
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        assert c.post("/v1/apply", content=manifests.edge_site("edge-retired", "FR", 45.0, 3.0)).status_code == 200
        assert c.post("/v1/sites/edge-retired/drain").status_code == 200
        assert 'edgeplane_sites_cordoned{state="draining"} 1.0' in c.get("/metrics").text
        assert c.delete("/v1/sites/edge-retired").status_code == 200
        gauge = [line for line in c.get("/metrics").text.splitlines() if line.startswith("edgeplane_sites_cordoned{")]
        assert 'edgeplane_sites_cordoned{state="draining"} 0.0' in gauge, gauge


def test_errors_are_clear(cp: support.ServerThread) -> None:
    with httpx.Client(base_url=cp.url, timeout=30) as c:
        assert c.post("/v1/sites/edge-lyon/cordon").status_code == 401
        admin = _admin(cp)
        read = c.post("/v1/tokens", json={"purpose": "api", "role": "read"}, headers=admin).json()["token"]
        r = c.post("/v1/sites/edge-lyon/drain", headers={"authorization": f"Bearer {read}"})
        assert r.status_code == 403 and "'read'" in r.json()["error"]
        for action in ("cordon", "drain", "uncordon"):
            r = c.post(f"/v1/sites/nowhere/{action}", headers=admin)
            assert r.status_code == 404 and "Site 'nowhere' does not exist" in r.json()["error"], (action, r.text)
        r = c.post("/v1/sites/edge-lyon/drain", params={"dryrun": "true"}, headers=admin)
        assert r.status_code == 400 and "dryrun" in r.json()["error"]  # misspelt: refused, never drained
        assert c.post("/v1/sites/edge-lyon/drain", params={"force": "maybe"}, headers=admin).status_code == 400
        r = c.post("/v1/sites/edge-lyon/drain", params={"dryRun": "true", "force": "true"}, headers=admin)
        assert r.status_code == 400 and "force" in r.json()["error"], r.text  # as --dry-run --force is: never a preview that ignores it
        assert "maintenance" not in c.get("/v1/sites/edge-lyon", headers=admin).json().get("status", {})


def test_a_cordon_outlives_applying_the_manifests_again(cp: support.ServerThread, offline_fleet: pathlib.Path) -> None:
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        assert c.post("/v1/sites/edge-madrid/cordon").json()["action"] == "cordoned"
        _maintenance_once_passed(c, "edge-madrid", "Cordoned")
        site = c.get("/v1/sites/edge-madrid").json()
        changed = _examples(offline_fleet).replace("zone: eu-south}", "zone: eu-south, rack: b}", 1)
        assert c.post("/v1/apply", content=changed).status_code == 200
        assert c.get("/v1/sites/edge-madrid").json()["metadata"]["resourceVersion"] != site["metadata"]["resourceVersion"]
        assert c.post("/v1/apply", content=_examples(offline_fleet)).status_code == 200
        _a_pass_started_after(cp, cp.cp.reconciler.passes)  # type: ignore[union-attr]
        assert c.get("/v1/sites/edge-madrid").json()["status"]["maintenance"]["state"] == "Cordoned"
        assert c.post("/v1/sites/edge-madrid/uncordon").json()["action"] == "uncordoned"


def test_the_command_line(cp: support.ServerThread) -> None:
    env = {"EDGEPLANE_TOKEN": cp.cp.admin_token}  # type: ignore[union-attr,dict-item]

    def run(*args: str) -> Any:
        return cli(*args, server_url=cp.url, env=env)

    done = run("cordon", "site", "edge-berlin", "--reason", "firmware")
    assert done.returncode == 0 and done.stdout.strip() == "site edge-berlin cordoned", done.stderr
    assert run("cordon", "site", "edge-berlin").stdout.strip() == "site edge-berlin unchanged (already so)"
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        _maintenance_once_passed(c, "edge-berlin", "Cordoned")
    table = run("get", "sites").stdout
    assert "SCHEDULING" in table and [line for line in table.splitlines() if line.startswith("edge-berlin") and "Cordoned" in line], table
    assert "edge-berlin: Cordoned" in run("status").stdout
    described = run("describe", "site", "edge-berlin").stdout
    assert "state: Cordoned" in described and "site-cordoned" in described, described
    plan = json.loads(run("drain", "site", "edge-berlin", "--dry-run", "-o", "json").stdout)
    assert plan == {"site": "edge-berlin", "replicas": 0, "moves": [], "stays": [], "removed": [], "moved": 0}
    assert "nothing to move" in run("drain", "site", "edge-berlin", "--dry-run").stdout
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        assert c.get("/v1/sites/edge-berlin").json()["status"]["maintenance"]["mode"] == "cordon"  # the dry run changed nothing
    done = run("drain", "site", "edge-berlin", "--wait", "--timeout", "30s", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["drained"] is True  # it ran nothing: drained at the first pass
    done = run("uncordon", "site", "edge-berlin", "-o", "json")
    assert json.loads(done.stdout)["action"] == "uncordoned"
    missing = run("drain", "site", "nowhere")
    assert missing.returncode == 1 and "Site 'nowhere' does not exist" in missing.stderr
    assert run("drain", "site", "edge-berlin", "--dry-run", "--force").returncode == 2
    assert run("cordon", "model", "edge-berlin").returncode == 2  # only sites are taken out
    # a name is one path segment: this one names no Site, never a forced drain of edge-berlin
    tricked = run("cordon", "site", "edge-berlin/drain?force=true#")
    assert tricked.returncode == 1 and "drain" not in tricked.stdout, (tricked.stdout, tricked.stderr)
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        assert "maintenance" not in c.get("/v1/sites/edge-berlin").json()["status"]


def test_a_reason_in_any_language_reaches_the_event_log_as_written(cp: support.ServerThread) -> None:
    """The CLI could not send a reason that is not ASCII (the HTTP client refused to put it in a
    header), and the server read the UTF-8 bytes curl sends as latin-1, storing them garbled."""
    env = {"EDGEPLANE_TOKEN": cp.cp.admin_token}  # type: ignore[union-attr,dict-item]
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        assert c.post("/v1/apply", content=manifests.edge_site("edge-grenoble", "FR", 45.19, 5.72)).status_code == 200
        said = ["maintenance électrique (coupure 2 h, 100% du site)", "UTF-8'' is what a reason may start with", "終わり"]
        for action, reason in zip(("cordon", "uncordon", "drain"), said):
            done = cli(action, "site", "edge-grenoble", "--reason", reason, server_url=cp.url, env=env)
            assert done.returncode == 0, done.stderr
        # as curl -H sends it: the reason's UTF-8 bytes as they are; an ASCII one is read as ever
        for action, raw in (("uncordon", "réparé".encode()), ("cordon", b"disk swap, 50%20 done")):
            assert c.post(f"/v1/sites/edge-grenoble/{action}", headers={"x-edgeplane-reason": raw}).status_code == 200
        # a line break does not make a line of its own in the log
        assert c.post("/v1/sites/edge-grenoble/uncordon", headers={"x-edgeplane-reason": "UTF-8''one%0Atwo"}).status_code == 200
    listed = cli("events", "--kind", "sites", "--name", "edge-grenoble", "-o", "json", server_url=cp.url, env=env)
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)["items"]
    assert [e["reason"] for e in events if e["action"].startswith("site-")] == [
        *said, "réparé", "disk swap, 50%20 done", "one two"], listed.stdout


def test_during_a_hold_a_cordon_is_stored_and_takes_effect_when_it_ends(cp: support.ServerThread) -> None:
    """A stored object this version does not read (here a maintenance mode it does not know,
    as a later release might store) puts every change on hold: a cordon is stored, says so,
    and the pass that ends the hold applies it."""
    assert cp.cp is not None
    store = cp.cp.store
    store.apply([store_mod.ObjectWrite(maintenance.KIND, "edge-zurich", {}, {"mode": "hibernate"})])
    _held(cp)
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        held = c.get("/v1/controlplane").json()["hold"]
        # no manifest names it and the API deletes no such object: the way out it names is uncordon
        assert held == ("changes on hold: SiteMaintenance 'edge-zurich' cannot be read (unknown maintenance mode 'hibernate'): "
                        "`edgeplane uncordon site edge-zurich` removes it"), held
        r = c.post("/v1/sites/edge-lyon/cordon")
        assert r.json()["action"] == "cordoned" and r.json()["note"].startswith("stored; it takes effect when the hold ends"), r.json()
        _a_pass_started_after(cp, cp.cp.reconciler.passes)
        assert "maintenance" not in c.get("/v1/sites/edge-lyon").json().get("status", {})  # nothing planned on hold
        assert c.post("/v1/sites/edge-zurich/uncordon").json()["action"] == "uncordoned"
        _maintenance_once_passed(c, "edge-lyon", "Cordoned")
        assert c.post("/v1/sites/edge-lyon/uncordon").json()["action"] == "uncordoned"


def test_a_change_that_was_stored_is_answered_as_made_when_the_hold_cannot_be_read(
        cp: support.ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether changes are on hold is read after the change is committed: a store that fails
    that read (as one that drops its connection would) leaves out the note, never answering
    503 for a change that was made, which a client would retry or report as not done."""
    assert cp.cp is not None
    store = cp.cp.store
    published = store.published

    def failing(key: str, *args: Any) -> Any:
        if key == hold.PUBLISHED_KEY:
            raise store_mod.StoreError("the database went away")
        return published(key, *args)

    monkeypatch.setattr(store, "published", failing)
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        for action, done in (("cordon", "cordoned"), ("drain", "draining"), ("uncordon", "uncordoned")):
            r = c.post(f"/v1/sites/edge-lyon/{action}")
            assert r.status_code == 200 and r.json()["action"] == done and "note" not in r.json(), (action, r.text)
            stored = store.get(maintenance.KIND, "edge-lyon")
            assert (stored is None) == (action == "uncordon"), action


@pytest.mark.parametrize("change", ["cordon", "drain", "uncordon"])
def test_a_maintenance_change_whose_event_cannot_be_logged_is_not_applied(tmp_path: pathlib.Path, change: str) -> None:
    """The event is part of the change: a store that refuses to log it (here SQLite, told
    to abort the insert, as a full disk would) leaves the site as it was, not taken out or
    brought back with nothing in the log to say who or why."""
    path = tmp_path / "state.db"
    store = open_store(path)
    try:
        store.apply([store_mod.ObjectWrite("Site", "edge-lyon", {}, {})])
        if change == "uncordon":
            maintenance.take_out(store, "edge-lyon", maintenance.Mode.CORDON, actor="ops", reason="disk swap", now=1.0)
        with sqlite3.connect(path) as db:
            db.execute("CREATE TRIGGER refuse_site_events BEFORE INSERT ON events WHEN NEW.action LIKE 'site-%' "
                       "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        before, logged = store.get(maintenance.KIND, "edge-lyon"), store.events(limit=1000)
        with pytest.raises(store_mod.StoreError, match="disk full"):
            if change == "uncordon":
                maintenance.bring_back(store, "edge-lyon", actor="ops", reason="done")
            else:
                maintenance.take_out(store, "edge-lyon", maintenance.Mode(change), actor="ops", reason="disk swap", now=2.0)
        assert store.get(maintenance.KIND, "edge-lyon") == before
        assert store.events(limit=1000) == logged
    finally:
        store.close()


def test_each_cordon_drain_and_uncordon_logs_one_event(tmp_path: pathlib.Path) -> None:
    """The log says what the operator did, once: no second line for the maintenance object it keeps."""
    store = open_store(tmp_path / "state.db")
    try:
        store.apply([store_mod.ObjectWrite("Site", "edge-lyon", {}, {})])
        logged = len(store.events(limit=1000))
        maintenance.take_out(store, "edge-lyon", maintenance.Mode.CORDON, actor="ops", reason="disk swap", now=1.0)
        maintenance.take_out(store, "edge-lyon", maintenance.Mode.DRAIN, actor="ops", reason="moving out", now=2.0)
        maintenance.bring_back(store, "edge-lyon", actor="ops", reason="done")
        maintenance.bring_back(store, "edge-lyon", actor="ops", reason="again")  # nothing to bring back: nothing logged
        events = store.events(limit=1000)[logged:]
        assert [(e.action, e.kind, e.name, e.reason) for e in events] == [
            ("site-cordoned", "Site", "edge-lyon", "disk swap"), ("site-drained", "Site", "edge-lyon", "moving out"),
            ("site-uncordoned", "Site", "edge-lyon", "done")]
    finally:
        store.close()


def test_drain_wait_prints_its_progress_on_stderr(cp: support.ServerThread, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``apply --wait`` does: stdout keeps what the command answers (the drain's action, or
    with ``-o json`` one document), progress lines go to stderr, so a script capturing stdout
    reads no progress. The drain --wait printed its progress on stdout."""
    from orchestrator.cli import main as cli_main
    monkeypatch.setenv("EDGEPLANE_TOKEN", cp.cp.admin_token)  # type: ignore[union-attr,arg-type]
    for output, site in (([], "edge-lisbon"), (["-o", "json"], "edge-porto")):
        with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
            assert c.post("/v1/apply", content=manifests.edge_site(site, "PT", 41.0, -8.6)).status_code == 200
        capsys.readouterr()
        code = cli_main.main(["drain", "site", site, "--wait", "--timeout", "30s", "--interval", "0.2", "--server", cp.url,
                              *output])
        out, err = capsys.readouterr()
        assert code == 0, (out, err)
        if output:
            assert json.loads(out)["drained"] is True, out
        else:
            assert out == f"site {site} draining\n", out
        assert err.splitlines()[-1] == f"site {site}: Drained", err
        assert cli_main.main(["uncordon", "site", site, "--server", cp.url]) == 0


def test_drain_wait_says_the_fleet_is_on_hold(cp: support.ServerThread, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored object this version cannot read puts every change on hold, the drain's
    included: drain --wait waited to its --timeout saying only 'Pending'. It says the hold
    once, as apply --wait does, again when it gives up, and with -o json as ``hold``."""
    from orchestrator.cli import main as cli_main
    assert cp.cp is not None
    monkeypatch.setenv("EDGEPLANE_TOKEN", cp.cp.admin_token)  # type: ignore[arg-type]
    with httpx.Client(base_url=cp.url, headers=_admin(cp), timeout=30) as c:
        assert c.post("/v1/apply", content=manifests.edge_site("edge-faro", "PT", 37.0, -7.9)).status_code == 200
        try:
            cp.cp.store.apply([store_mod.ObjectWrite(maintenance.KIND, "edge-zurich", {}, {"mode": "hibernate"})])
            _held(cp)
            assert c.get("/v1/controlplane").json().get("hold"), "the unreadable object put nothing on hold"
            capsys.readouterr()
            code = cli_main.main(["drain", "site", "edge-faro", "--wait", "--timeout", "2s", "--interval", "0.2",
                                  "--server", cp.url, "-o", "json"])
            out, err = capsys.readouterr()
            assert code == 1, (out, err)
            said = [x for x in err.splitlines() if "changes on hold: SiteMaintenance 'edge-zurich' cannot be read" in x]
            assert len(said) == 2, err
            assert said[0].startswith("warning: changes on hold") and "uncordon site edge-zurich" in said[0], err
            assert said[1].startswith("error: site edge-faro not drained within 2 s: Pending"), err
            answer = json.loads(out)
            assert answer["drained"] is False and answer["hold"].startswith("changes on hold"), out
        finally:
            assert c.post("/v1/sites/edge-zurich/uncordon").status_code == 200
            assert c.post("/v1/sites/edge-faro/uncordon").status_code == 200
