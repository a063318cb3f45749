"""``-o json|yaml`` print an operator's own text as text: annotations, descriptions, regions,
reasons and chat answers in any script ("北京", "Île-de-France", "الرياض", 👩‍💻) are read
by people as well as by scripts. Only where standard output cannot hold them (a terminal
with a latin-1 locale) do they print as the escapes JSON and YAML define, which read back
the same; a lone surrogate (a half of an emoji a server cut) always prints escaped."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import pytest
import yaml

from orchestrator.cli import main as cli_main
from orchestrator.cli import render
from orchestrator.testing import loopback

TEXT = {"description": "北京边缘站点 — 机房 👩‍💻 café", "note.ar": "موقع الرياض", "region": "Île-de-France"}


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_text_in_any_script_prints_as_itself(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    render.dump({"annotations": TEXT}, output)
    text = capsys.readouterr().out
    assert all(value in text for value in TEXT.values()), text
    assert (json.loads(text) if output == "json" else yaml.safe_load(text)) == {"annotations": TEXT}


def test_one_line_json_prints_text_as_itself_unless_told() -> None:
    """What ``events -w -o json`` prints a line for each event (ascii_only where standard
    output cannot hold the text)."""
    assert render.json_text({"reason": TEXT["description"]}, ascii_only=False) == json.dumps({"reason": TEXT["description"]}, ensure_ascii=False)
    assert render.json_text({"reason": "北京"}) == '{"reason": "\\u5317\\u4eac"}'
    assert render.json_text({"reason": "\ud83d"}, ascii_only=False) == '{"reason": "\\ud83d"}'
    assert render.holds_text(io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    assert not render.holds_text(io.TextIOWrapper(io.BytesIO(), encoding="latin-1"))


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_a_lone_surrogate_prints_escaped(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    data = {"text": "cut emoji \ud83d", "whole": "北京"}
    render.dump(data, output)
    text = capsys.readouterr().out
    text.encode("utf-8")  # standard output can write it
    assert (json.loads(text) if output == "json" else yaml.safe_load(text)) == data


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_an_output_that_cannot_hold_the_text_gets_escapes_that_read_back(output: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="latin-1"))
    render.dump({"annotations": TEXT}, output)
    sys.stdout.flush()
    text = raw.getvalue().decode("latin-1")
    back: Any = json.loads(text) if output == "json" else yaml.safe_load(text)
    assert back == {"annotations": TEXT}


class _Canned(loopback.CannedHandler):
    body: bytes = b""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.reply(200, self.body)


SITE = {"apiVersion": "edgeplane.io/v1alpha1", "kind": "Site",
        "metadata": {"name": "beijing", "annotations": {"description": TEXT["description"]}},
        "spec": {"tier": "edge", "location": {"country": "CN", "region": "北京", "lat": 39.9, "lon": 116.4},
                 "capacity": {"cpu": 4, "memoryGiB": 8}}}
EVENT = {"id": 7, "ts": "2026-01-01T00:00:00Z", "actor": "anonymous", "action": "apply", "kind": "Site", "name": "beijing",
         "reason": "maintenance électrique 北京", "details": {}}


@pytest.mark.parametrize(("argv", "body", "shown"), [
    (["get", "sites"], {"kind": "Site", "items": [SITE]}, "\\u5317\\u4eac"),
    (["describe", "site", "beijing"], SITE, "region: \"\\u5317\\u4EAC\""),  # the YAML escape
    (["events"], {"items": [EVENT]}, "maintenance électrique \\u5317\\u4eac"),
])
def test_a_table_on_an_output_that_cannot_hold_the_text_prints_escapes(argv: list[str], body: dict[str, Any], shown: str,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A terminal with a latin-1 locale (LANG=de_DE.ISO-8859-1): get, describe and events
    failed 'unexpectedly ... this is a bug' part way through their output."""
    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="latin-1"))
    _Canned.body = json.dumps(body).encode()
    with loopback.http_server(_Canned) as url:
        code = cli_main.main(["--server", url, *argv])
    sys.stdout.flush()
    assert code == 0, capsys.readouterr().err
    assert shown in raw.getvalue().decode("latin-1")


def test_a_table_of_escaped_cells_keeps_its_columns_aligned(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """On a latin-1 locale "北京" prints as its 12 characters of escape, not the 4 cells it
    takes where it prints as itself: the columns after it are as far right on every row."""
    paris = {**SITE, "metadata": {"name": "paris"},
             "spec": {**SITE["spec"], "location": {"country": "FR", "region": "Île-de-France", "lat": 48.8, "lon": 2.3}}}
    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="latin-1"))
    _Canned.body = json.dumps({"kind": "Site", "items": [SITE, paris]}).encode()
    with loopback.http_server(_Canned) as url:
        code = cli_main.main(["--server", url, "get", "sites"])
    sys.stdout.flush()
    assert code == 0, capsys.readouterr().err
    head, *rows = raw.getvalue().decode("latin-1").splitlines()
    after_region = head.index("REGION") + max(len("\\u5317\\u4eac"), len("Île-de-France")) + 2
    assert [row[after_region - 2:after_region] for row in rows] == ["  ", "  "], rows
    assert all(row[after_region] != " " for row in [head, *rows]), [head, *rows]


def test_a_cut_cell_on_a_terminal_that_cannot_hold_the_ellipsis_keeps_its_columns_aligned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A narrow latin-1 terminal: a cell cut to fit ends in "...", not in "…" printed as its
    6 characters of escape, which pushed the rest of its row right."""
    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="latin-1", errors="backslashreplace"))
    monkeypatch.setattr(render, "_stdout_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "60")
    render.table(None, ["NAME", "REASON", "AGE"], [["a", "maintenance électrique " * 4, "1m"], ["b", "short", "2m"]])
    sys.stdout.flush()
    head, *rows = raw.getvalue().decode("latin-1").splitlines()
    assert "..." in rows[0] and "\\u2026" not in rows[0], rows
    assert {row.rstrip().rindex(" ") for row in [head, *rows]} == {head.index("AGE") - 1}, [head, *rows]
    assert all(len(row.rstrip()) <= 60 for row in [head, *rows]), [head, *rows]


def test_a_cut_header_on_a_terminal_that_cannot_hold_the_ellipsis_keeps_its_columns_aligned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A header wider than its column's cap was cut by the table with "…", printed as its 6
    characters of escape: the header row's columns after it stood right of the rows'."""
    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="latin-1", errors="backslashreplace"))
    monkeypatch.setattr(render, "_stdout_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "40")
    render.table(None, ["NAME", "DESCRIPTION", "LAST-TRANSITION-TIME", "AGE"],
                 [["a", "maintenance électrique " * 4, "x", "1m"], ["b", "short", "y", "2m"]])
    sys.stdout.flush()
    head, *rows = raw.getvalue().decode("latin-1").splitlines()
    assert "\\u2026" not in head and "..." in head, head
    assert {row.rstrip().rindex(" ") for row in [head, *rows]} == {head.index("AGE") - 1}, [head, *rows]
