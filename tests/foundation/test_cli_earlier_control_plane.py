"""This release's CLI against a control plane of an earlier release (the operator's laptop
upgraded first): a request whose meaning the earlier release would change by ignoring
part of it must be one it refuses, and the CLI says so, having changed nothing."""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.testing import loopback

from .support import cli


class _EarlierControlPlane(http.server.ThreadingHTTPServer):
    """Object routes as a release before POST .../abandon-applications answered them: a
    DELETE deletes the object whatever its query says, and a path it has no route for is
    answered 404 "no route for ...", as every release's API does."""

    def __init__(self) -> None:
        self.deleted: list[str] = []
        earlier = self

        class Handler(loopback.CannedHandler):
            def do_DELETE(self) -> None:  # noqa: N802 (http.server's name)
                earlier.deleted.append(self.path)
                _, _, kind, name = self.path.split("?")[0].split("/")
                self.reply(200, json.dumps({"kind": kind.rstrip("s").capitalize(), "name": name, "action": "deleted"}).encode())

            def do_POST(self) -> None:  # noqa: N802
                self.reply(404, json.dumps({"error": f"no route for POST {self.path.split('?')[0]}"}).encode())

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def earlier() -> Iterator[_EarlierControlPlane]:
    with loopback.in_thread(_EarlierControlPlane()) as server:
        yield server


def test_keep_site_against_an_earlier_control_plane_deletes_nothing_and_says_why(earlier: _EarlierControlPlane) -> None:
    url = f"http://127.0.0.1:{earlier.server_port}"
    kept = cli("delete", "site", "edge-kept", "--abandon-applications", "--keep-site", server_url=url)
    assert kept.returncode == 1, kept
    assert "earlier release than this CLI" in kept.stderr and "nothing was deleted" in kept.stderr, kept.stderr
    assert earlier.deleted == []
    # the plain abandon is still the DELETE every release since it takes
    assert cli("delete", "site", "edge-gone", "--abandon-applications", server_url=url).returncode == 0
    assert earlier.deleted == ["/v1/site/edge-gone?abandonApplications=true"]


class _EarlierTokens(http.server.ThreadingHTTPServer):
    """POST /v1/tokens as a release before tokens were scoped answered it: the body's
    ``models`` and ``residency`` unread, an unscoped token made (no scope in the answer), and
    the revocation every release takes."""

    def __init__(self) -> None:
        self.revoked: list[str] = []
        earlier = self

        class Handler(loopback.CannedHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/v1/tokens":
                    self.reply(201, json.dumps({"token": "epa_0badcafe_secret", "id": "0badcafe", "purpose": "api", "role": "read",
                                                "expiresAt": None}).encode())
                else:
                    earlier.revoked.append(self.path)
                    self.reply(200, json.dumps({"revoked": "tokens", "name": self.path.rsplit("/", 1)[1]}).encode())

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.parametrize("scope", [["--model", "intent"], ["--residency", "FR"]])
def test_a_scoped_token_made_by_an_earlier_control_plane_is_revoked_and_not_printed(
        scope: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPLANE_TOKEN", "epa_admin_secret")
    with loopback.in_thread(_EarlierTokens()) as earlier:
        code = cli_main.main(["--server", f"http://127.0.0.1:{earlier.server_port}", "token", "create", "--role", "read", *scope])
    out, err = capsys.readouterr()
    assert code == 1 and "epa_0badcafe_secret" not in out + err
    assert "earlier release than this CLI" in err and "revoked" in err, err
    assert earlier.revoked == ["/v1/revoke/tokens/0badcafe"]
