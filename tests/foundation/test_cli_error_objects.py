"""``edgeplane … -o json`` (and ``-o yaml``) says a failure as one object on stderr, in the
control API's error shape (``error``, ``reason``, and the ``parameter``, ``field`` or
``issues`` a refusal names), so that a script reads why without parsing English; the exit
code is the one the text form has, and ``-o table`` keeps the one line. Through the CLI's
entry function against a real control plane (SQLite, loopback)."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import pytest
import yaml

from orchestrator.cli import main as cli_main

from . import support


@pytest.fixture(autouse=True)
def no_edgeplane_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("EDGEPLANE_")]:
        monkeypatch.delenv(key)


def _failed(capsys: pytest.CaptureFixture[str], code: int, *argv: str) -> dict[str, Any]:
    """The object ``edgeplane *argv`` printed on stderr, having exited ``code`` and printed nothing on stdout."""
    capsys.readouterr()
    assert cli_main.main(list(argv)) == code
    out, err = capsys.readouterr()
    assert out == "", out
    doc = json.loads(err) if "json" in argv else yaml.safe_load(err)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], err
    return doc


BAD_SITE = "apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata: {name: bad-site}\nspec: {tier: moon}\n"


@pytest.mark.parametrize("output", ["json", "yaml"])
@pytest.mark.parametrize(("argv", "code", "reason", "named"), [
    (["get", "widgets"], 1, "NotFound", {}),
    (["get", "sites", "no-such-site"], 1, "NotFound", {}),
    (["describe", "modeldeployment", "no-such-deployment"], 1, "NotFound", {}),
    (["delete", "model", "no-such-model"], 1, "NotFound", {}),
    (["events", "--after", "yesterday"], 1, "InvalidParameter", {"parameter": "after"}),
    (["revoke", "token", "no-such-token"], 1, "NotFound", {}),
    (["token", "create", "--ttl", "soon"], 2, "BadRequest", {}),
    (["delete", "site"], 2, "BadRequest", {}),
])
def test_a_refusal_is_one_object_with_its_reason(control_plane: support.ServerThread, capsys: pytest.CaptureFixture[str],
                                                 output: str, argv: list[str], code: int, reason: str, named: dict[str, str]) -> None:
    doc = _failed(capsys, code, "--server", control_plane.url, *argv, "-o", output)
    assert doc["reason"] == reason, doc
    assert {k: doc.get(k) for k in named} == named, doc


@pytest.mark.parametrize("command", ["apply", "simulate"])  # refused by the control plane; read here, for a what-if
def test_manifests_refused_name_each_issue(control_plane: support.ServerThread, capsys: pytest.CaptureFixture[str],
                                           tmp_path: pathlib.Path, command: str) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_SITE)
    doc = _failed(capsys, 1, "--server", control_plane.url, command, "-f", str(tmp_path / "bad.yaml"), "-o", "json")
    assert doc["reason"] == "Invalid" and "spec.tier" in [i["field"] for i in doc["issues"]], doc
    assert doc["issues"][0]["file"].endswith("bad.yaml") and doc["issues"][0]["message"], doc


def test_a_control_plane_not_reached_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{support.closed_port()}"
    doc = _failed(capsys, 3, "--server", dead, "get", "sites", "-o", "json")
    assert doc["reason"] == "Unreachable" and doc["error"].startswith(f"cannot reach the control plane at {dead}"), doc


def test_a_caller_without_a_token_is_unauthorized(secured: support.ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _failed(capsys, 1, "--server", secured.url, "token", "list", "-o", "yaml")
    assert doc["reason"] == "Unauthorized", doc


def test_the_table_form_keeps_its_line(control_plane: support.ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli_main.main(["--server", control_plane.url, "get", "widgets"]) == 1
    assert capsys.readouterr().err == (
        "error: unknown kind 'widgets'; use one of: sites, models, modeldeployments, placements, events, cascades\n")


def _exit_code(argv: list[str]) -> int | str | None:
    """``edgeplane *argv``'s exit code, returned or exited with (as argparse does)."""
    try:
        return cli_main.main(argv)
    except SystemExit as exited:
        return exited.code


@pytest.mark.parametrize("output", ["json", "yaml"])
@pytest.mark.parametrize(("argv", "said"), [
    (["get", "sites", "--bogus"], "unrecognized arguments: --bogus"),
    (["describe", "site"], "the following arguments are required: name"),
    (["revoke", "token"], "the following arguments are required: name"),
    (["events", "--limit", "many"], "argument --limit"),
])
def test_a_usage_error_is_one_object_too(capsys: pytest.CaptureFixture[str], output: str, argv: list[str], said: str) -> None:
    """A command's usage refused by its arguments' parser was argparse's usage and line however
    -o asked; with -o json|yaml it is the one object too, BadRequest, exit code 2."""
    capsys.readouterr()
    assert _exit_code([*argv, "-o", output]) == 2
    out, err = capsys.readouterr()
    assert out == "", out
    doc = json.loads(err) if output == "json" else yaml.safe_load(err)
    assert isinstance(doc, dict) and doc["reason"] == "BadRequest" and said in doc["error"], err


def test_a_usage_error_in_the_table_form_keeps_argparse_lines(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _exit_code(["describe", "site"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: edgeplane describe") and err.endswith("edgeplane describe: error: the following arguments are required: name\n")
