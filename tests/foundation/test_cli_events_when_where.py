"""``edgeplane events`` and ``describe`` tell an operator when each event happened and at
which site: "why did intent move at 03:12?" is read off the table, not out of ``-o json``'s
``ts`` and ``details``. A move shows where from and where to; a placement or removal its
site; an event of no site (an apply, a token) leaves the column empty."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.testing import loopback

MOVED = {"id": 41, "ts": "2026-12-07T03:12:04.512Z", "actor": "scheduler", "action": "replica-moved", "kind": "ModelDeployment",
         "name": "intent", "reason": "site edge-lyon-1 lost its agent; now on edge-paris-2: nearest replica for eu-west; 1.2 gCO2/h",
         "details": {"from": "edge-lyon-1", "to": "edge-paris-2", "variant": "int8"}}
PLACED = {"id": 42, "ts": "2026-12-07T03:12:05Z", "actor": "scheduler", "action": "replica-placed", "kind": "ModelDeployment",
          "name": "intent", "reason": "new; nearest replica for eu-west; 1.2 gCO2/h", "details": {"site": "edge-paris-3", "variant": "int8"}}
APPLIED = {"id": 43, "ts": "2026-12-07T03:14:00Z", "actor": "token:ab12", "action": "apply", "kind": "ModelDeployment",
           "name": "intent", "reason": "scale for the match", "details": {}}


class _Handler(loopback.CannedHandler):
    body: bytes = b""
    asked: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.asked.append(self.path)
        self.reply(200, self.body)


@pytest.fixture
def serving() -> Iterator[Any]:
    with loopback.http_server(_Handler) as url:

        def serve(body: dict[str, Any]) -> str:
            _Handler.body = json.dumps(body).encode()
            return url

        yield serve


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def test_events_show_when_and_where(serving: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["--server", serving({"items": [MOVED, PLACED, APPLIED]}), "events"]) == 0
    head, moved, placed, applied = capsys.readouterr().out.splitlines()
    assert head.split() == ["ID", "TIME", "ACTOR", "ACTION", "KIND", "NAME", "SITE", "REASON"]
    assert moved.split()[:7] == ["41", "2026-12-07T03:12:04.512Z", "scheduler", "replica-moved", "ModelDeployment", "intent",
                                 "edge-lyon-1->edge-paris-2"]
    assert placed.split()[:7] == ["42", "2026-12-07T03:12:05Z", "scheduler", "replica-placed", "ModelDeployment", "intent", "edge-paris-3"]
    assert applied.split()[:6] == ["43", "2026-12-07T03:14:00Z", "token:ab12", "apply", "ModelDeployment", "intent"]
    assert applied.split()[6:] == "scale for the match".split()


def test_describe_shows_when_and_where_of_its_events(serving: Any, capsys: pytest.CaptureFixture[str]) -> None:
    described = {"kind": "ModelDeployment", "metadata": {"name": "intent"}, "spec": {}, "events": [MOVED, APPLIED]}
    assert cli_main.main(["--server", serving(described), "describe", "modeldeployment", "intent"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Events:"):].splitlines()[1:]
    assert table[0].split() == ["ID", "TIME", "ACTOR", "ACTION", "SITE", "REASON"]
    assert table[1].split()[:5] == ["41", "2026-12-07T03:12:04.512Z", "scheduler", "replica-moved", "edge-lyon-1->edge-paris-2"]
    assert table[2].split()[:4] == ["43", "2026-12-07T03:14:00Z", "token:ab12", "apply"]


def test_events_of_one_site_are_asked_for_by_its_name(serving: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = serving({"items": [MOVED]})
    _Handler.asked.clear()
    assert cli_main.main(["--server", url, "events", "--site", "edge-lyon-1", "--kind", "modeldeployments"]) == 0
    [asked] = _Handler.asked
    assert asked.startswith("/v1/events?") and "site=edge-lyon-1" in asked and "kind=modeldeployments" in asked, asked
    assert "edge-lyon-1->edge-paris-2" in capsys.readouterr().out


def test_events_of_a_time_window_are_asked_for_as_given(serving: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = serving({"items": [MOVED]})
    _Handler.asked.clear()
    argv = ["--server", url, "events", "--after", "2026-12-07T03:00:00Z", "--before", "2026-12-07T04:00:00+01:00"]
    assert cli_main.main(argv) == 0
    [asked] = _Handler.asked
    assert "after=2026-12-07T03%3A00%3A00Z" in asked and "before=2026-12-07T04%3A00%3A00%2B01%3A00" in asked, asked


def test_a_sites_describe_names_the_deployment_each_of_its_replicas_events_is_of(
        serving: Any, capsys: pytest.CaptureFixture[str]) -> None:
    lost = {"id": 40, "ts": "2026-12-07T03:12:00Z", "actor": "reconciler", "action": "agent-lost", "kind": "Site",
            "name": "edge-lyon-1", "reason": "no heartbeat for 30s", "details": {}}
    described = {"kind": "Site", "metadata": {"name": "edge-lyon-1"}, "spec": {}, "events": [lost, MOVED]}
    assert cli_main.main(["--server", serving(described), "describe", "site", "edge-lyon-1"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Events:"):].splitlines()[1:]
    assert table[0].split() == ["ID", "TIME", "ACTOR", "ACTION", "KIND", "NAME", "SITE", "REASON"]
    assert table[1].split()[:6] == ["40", "2026-12-07T03:12:00Z", "reconciler", "agent-lost", "Site", "edge-lyon-1"]
    assert table[2].split()[:7] == ["41", "2026-12-07T03:12:04.512Z", "scheduler", "replica-moved", "ModelDeployment", "intent",
                                    "edge-lyon-1->edge-paris-2"]
