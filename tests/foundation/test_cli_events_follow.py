"""``edgeplane events -w`` following a real control plane: each new event as it is logged,
and across what a long follow meets: a restart, another store, a restore from an older
backup, answers that say to retry later. What it asks next after each answer is
table-tested in test_events_follow.py."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import pathlib
import queue
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import yaml

from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import loopback

from . import support
from .support import doc, ok


def test_events_follow_prints_each_new_event_until_interrupted(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    follower = support.follow_events(serve.url, "--kind", "models", "--limit", "1")
    try:
        first = json.loads(follower.stdout.readline())  # type: ignore[union-attr]
        assert first["kind"] == "Model"  # the newest model event, as one JSON object a line
        ok("apply", "-f", "-", server=serve, stdin=doc("Model", "cli-follow", support.model_spec()))
        lines: list[dict] = []
        deadline = time.monotonic() + 30
        while not any(e["name"] == "cli-follow" for e in lines) and time.monotonic() < deadline:
            line = follower.stdout.readline()  # type: ignore[union-attr]
            assert line, follower.stderr.read()  # type: ignore[union-attr]
            lines.append(json.loads(line))
        assert [(e["action"], e["kind"], e["name"]) for e in lines][-1] == ("created", "Model", "cli-follow")
        assert all(e["id"] > first["id"] for e in lines) and {e["kind"] for e in lines} == {"Model"}
    finally:
        err = support.interrupt(follower)
    assert follower.returncode == 130 and "Traceback" not in err, err



def test_a_follow_refused_prints_nothing_on_stdout(tmp_path: pathlib.Path, offline_fleet: pathlib.Path) -> None:
    """events -w with a token the control plane refuses printed its table's header on stdout
    before the error: a script reading stdout got a line of a table that never came. Nothing
    reaches stdout before the first answer; the waiting commands say their error alone (one line, or with -o json|yaml one object)."""
    secured = support.ServeProcess(tmp_path / "data", "--auth", "token", artifact_root=offline_fleet).wait_ready()
    try:
        for argv in (["events", "-w"], ["events", "-w", "-o", "json"], ["events", "-w", "-o", "yaml"],
                     ["drain", "site", "edge-lyon", "--wait"], ["drain", "site", "edge-lyon", "--wait", "-o", "json"]):
            proc = support.cli("--token", "wrong", *argv, server_url=secured.url)
            assert proc.returncode == 1 and proc.stdout == "", proc
            if argv[-2:] == ["-o", "json"]:
                assert json.loads(proc.stderr)["reason"] == "Unauthorized", proc
            elif argv[-2:] == ["-o", "yaml"]:
                assert yaml.safe_load(proc.stderr)["reason"] == "Unauthorized", proc
            else:
                assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc
    finally:
        secured.stop()

@dataclasses.dataclass
class _Following:
    """``events -w --kind models --limit 1`` following a control plane (``first``) that the
    test stops and starts ``again`` on the same ports."""

    first: support.ServeProcess
    follower: subprocess.Popen[str]
    again: support.ServeProcess | None = None
    err: str = ""  # what the follower wrote on stderr, once interrupted

    def start_again(self, data_dir: pathlib.Path) -> support.ServeProcess:
        """A control plane on ``data_dir`` (the first one's, or another store) on the first one's
        ports, once the first one has stopped."""
        self.first.stop()
        self.again = support.ServeProcess(data_dir, ports=(self.first.port, self.first.agent_port, self.first.join_port)).wait_ready()
        return self.again

    def next_name(self) -> str:
        """The name of the next event the follower prints."""
        return json.loads(self.follower.stdout.readline())["name"]  # type: ignore[union-attr]


@contextlib.contextmanager
def _following_a_restart(data_dir: pathlib.Path) -> Iterator[_Following]:
    """A control plane on ``data_dir`` followed by ``events -w``, which must exit 130 on Ctrl-C
    without a traceback once the test is done with it; every control plane started is stopped."""
    first = support.ServeProcess(data_dir).wait_ready()
    following = _Following(first, support.follow_events(first.url, "--kind", "models", "--limit", "1"))
    try:
        yield following
    finally:
        following.err = support.interrupt(following.follower)
        if following.again is not None:
            following.again.stop()
        first.stop()
    assert following.follower.returncode == 130 and "Traceback" not in following.err, following.err


def test_events_follow_waits_out_a_control_plane_restart(tmp_path: pathlib.Path) -> None:
    """``events -w`` exited (code 3) when the control plane went away for a restart. It says
    so once on stderr, asks again, and goes on with what was logged meanwhile, nothing twice."""
    with _following_a_restart(tmp_path / "cp") as following:
        ok("apply", "-f", "-", server=following.first, stdin=doc("Model", "before-restart", support.model_spec()))
        seen = [following.next_name()]
        assert seen == ["before-restart"], seen
        again = following.start_again(tmp_path / "cp")
        ok("apply", "-f", "-", server=again, stdin=doc("Model", "after-restart", support.model_spec()))
        deadline = time.monotonic() + 30
        while seen[-1] != "after-restart" and time.monotonic() < deadline:
            line = following.follower.stdout.readline()  # type: ignore[union-attr]
            assert line, following.follower.stderr.read()  # type: ignore[union-attr]
            seen.append(json.loads(line)["name"])
        assert seen == ["before-restart", "after-restart"], seen
        assert following.follower.poll() is None  # still following
    assert following.err.count("warning: cannot reach") == 1 and "the control plane answers again; following" in following.err, following.err


def test_events_follow_starts_again_from_the_newest_events_of_another_store(tmp_path: pathlib.Path) -> None:
    """A control plane back on another store (a fresh one, a restored backup) numbers its
    events from that store's own start: ``events -w`` went on after an id of the first store
    and printed the other's events past it as if they followed. It says so on stderr and
    follows the other store from its newest events."""
    other = open_store(tmp_path / "other" / "state.db")
    other.record(*[store_mod.Event("admin", "created", "Model", f"other-{i}", "") for i in range(50)])
    other.close()
    with _following_a_restart(tmp_path / "cp") as following:
        ok("apply", "-f", "-", server=following.first, stdin=doc("Model", "first-store", support.model_spec()))
        assert following.next_name() == "first-store"
        again = following.start_again(tmp_path / "other")
        assert following.next_name() == "other-49"
        ok("apply", "-f", "-", server=again, stdin=doc("Model", "after-restart", support.model_spec()))
        assert following.next_name() == "after-restart"
    assert len([line for line in following.err.splitlines() if "now reads another store" in line]) == 1, following.err


def test_events_follow_across_a_restore_from_an_older_backup_prints_what_is_logged_after_it(tmp_path: pathlib.Path) -> None:
    """A store restored from an older backup keeps its id and numbers new events from the
    backup's last: ``events -w``, asking after an id of the lost events, printed nothing logged
    after the restore until the new ids passed the old. It says the store went back, and
    prints what is logged from then on."""
    with _following_a_restart(tmp_path / "cp") as following:
        first = following.first
        ok("apply", "-f", "-", server=first, stdin=doc("Model", "before-backup", support.model_spec()))
        assert following.next_name() == "before-backup"
        backup = tmp_path / "backup.db"
        with sqlite3.connect(tmp_path / "cp" / "state.db") as src, sqlite3.connect(backup) as dst:
            src.backup(dst)
        for i in range(3):
            ok("apply", "-f", "-", server=first, stdin=doc("Model", f"lost-{i}", support.model_spec()))
            assert following.next_name() == f"lost-{i}"
        first.stop()
        for suffix in ("", "-wal", "-shm"):
            pathlib.Path(f"{tmp_path / 'cp' / 'state.db'}{suffix}").unlink(missing_ok=True)
        backup.rename(tmp_path / "cp" / "state.db")
        again = following.start_again(tmp_path / "cp")
        ok("apply", "-f", "-", server=again, stdin=doc("Model", "after-restore", support.model_spec()))
        names: list[str] = []
        while "after-restore" not in names and len(names) < 2:
            names.append(following.next_name())
        # (the backup's last one, logged within the same second as the last printed, may come again first)
        assert names in (["after-restore"], ["before-backup", "after-restore"]), names
    assert len([line for line in following.err.splitlines() if "store went back (restored from a backup?)" in line]) == 1, following.err


class _Outage(http.server.ThreadingHTTPServer):
    """A control plane seen through a reverse proxy across an outage: the event log, then
    what each says while it cannot answer (the store down: 503; the proxy while the control
    plane restarts: 502, 504; busy: 429), then the log again with one event more. With
    ``pruned_through``, its answers name their store and say retention deleted the events
    up to that id (the fleet's own, newer than the audit event it shows first), and the
    event logged during the outage comes after them."""

    EVENT = {"actor": "admin", "action": "created", "kind": "Model", "name": "m", "reason": ""}

    def __init__(self, pruned_through: int = 0) -> None:
        self.answers: list[tuple[int, dict[str, str], bytes]] = [
            (503, {"content-type": "application/json"}, b'{"error": "the store does not answer: connection refused"}'),
            (502, {"content-type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>"),
            (504, {"content-type": "text/html"}, b"<html><body>504 Gateway Time-out</body></html>"),
            (429, {"content-type": "application/json", "retry-after": "1"}, b'{"error": "too many requests"}'),
        ]
        self.asked: list[str] = []
        outage = self
        said = {"store": "s1", "prunedThrough": pruned_through} if pruned_through else {}
        later = {**outage.EVENT, "id": max(2, pruned_through + 1), "name": "m2"}

        class Handler(loopback.CannedHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outage.asked.append(self.path)
                if len(outage.asked) == 1:
                    answer = (200, {}, json.dumps({"items": [{**outage.EVENT, "id": 1}], **said}).encode())
                elif outage.answers:
                    answer = outage.answers.pop(0)
                else:
                    items = [later] if "since=1&" in self.path else []
                    answer = (200, {}, json.dumps({"items": items, **said}).encode())
                status, headers, body = answer
                self.reply(status, body, headers)

        super().__init__(("127.0.0.1", 0), Handler)


def follow_across(outage: _Outage, *args: str) -> tuple[list[int], str]:
    """The ids of the first 2 events ``events -w *args`` prints across ``outage``, and its stderr."""
    with loopback.in_thread(outage):
        follower = support.follow_events(f"http://127.0.0.1:{outage.server_port}", *args)
        printed: queue.Queue[str] = queue.Queue()
        # read in a thread so that a follower which prints nothing fails the test instead of hanging it
        reader = threading.Thread(target=lambda: [printed.put(follower.stdout.readline()) for _ in range(2)],  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        try:
            try:
                lines = [printed.get(timeout=60) for _ in range(2)]
            except queue.Empty:
                pytest.fail("events --follow printed fewer than 2 events in 60 s")
            assert all(lines), follower.stderr.read()  # type: ignore[union-attr]
            assert follower.poll() is None  # still following
        finally:
            follower.send_signal(signal.SIGINT)
            reader.join(timeout=30)  # its readline ends as the follower exits
            _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130 and "Traceback" not in err, err
    return [json.loads(line)["id"] for line in lines], err


def test_events_follow_waits_out_answers_that_say_retry_later() -> None:
    """``events -w`` exited (code 1) at the first 503, which the control plane answers while
    its store does not, and a reverse proxy while the control plane restarts."""
    ids, err = follow_across(_Outage())
    assert ids == [1, 2]
    assert err.splitlines() == ["warning: the store does not answer: connection refused (HTTP 503); asking again every 1s",
                                "the control plane answers again; following"], err


def test_events_follow_back_from_an_outage_is_not_warned_of_events_pruned_before_it_began() -> None:
    """``events -w`` starts from the newest events, so events retention deleted before its
    first answer are none it follows; back from an outage it said they "may be missing"."""
    ids, err = follow_across(_Outage(pruned_through=6), "--kind", "models")
    assert ids == [1, 7]
    assert err.splitlines() == ["warning: the store does not answer: connection refused (HTTP 503); asking again every 1s",
                                "the control plane answers again; following"], err
