"""This release's CLI against a control plane of an earlier release (the operator's laptop
upgraded first): a request whose meaning the earlier release would change by ignoring
part of it must be one it refuses, and the CLI says so, having changed nothing."""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator

import pytest

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
