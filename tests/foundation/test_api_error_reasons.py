"""Every error of the control API names its ``reason`` (a stable CamelCase word, as a
Kubernetes Status does) and, where one query parameter or body field is at fault, which one:
an integrator's script tells a stale ``resourceVersion`` from a Model still in use (both
409), or a misspelt parameter from a bad value (both 400), without reading the English
``error``, which stays as it was. Over real HTTP against a real control plane (SQLite)."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import httpx
import numpy as np
import pytest

from orchestrator import client as client_mod
from orchestrator.api import paging, problems
from orchestrator.cli import failures
from orchestrator.manifests import loader

from . import support
from .support import doc


def _refusal(r: httpx.Response, status: int, reason: str, **where: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body  # the message stays
    assert body.get("reason") == reason, body
    for key, value in where.items():
        assert body.get(key) == value, body
    for key in {"field", "parameter"} - set(where):
        assert key not in body, body
    return body


@pytest.fixture(scope="module")
def fleet(api: httpx.Client, offline_fleet: pathlib.Path) -> None:
    body = loader.bundle([(p.name, p.read_text()) for p in sorted(offline_fleet.glob("*.yaml"))])
    assert api.post("/v1/apply", content=body).status_code == 200


def test_a_stale_resource_version_and_a_model_in_use_are_two_conflicts(api: httpx.Client, fleet: None) -> None:
    made = api.post("/v1/apply", content=doc("Site", "reason-a", support.edge_site_spec())).json()["results"][0]
    stale = str(int(made["resourceVersion"]) - 1)
    _refusal(api.delete("/v1/sites/reason-a", params={"resourceVersion": stale}), 409, "Conflict")
    used = api.get("/v1/modeldeployments").json()["items"][0]["spec"]["model"]
    _refusal(api.delete(f"/v1/models/{used}"), 409, "InUse")


@pytest.mark.parametrize(("path", "params", "reason", "parameter"), [
    ("/v1/sites", {"limt": "5"}, "UnknownParameter", "limt"),
    ("/v1/sites", {"limit": "0"}, "InvalidParameter", "limit"),
    ("/v1/sites", [("limit", "1"), ("limit", "2")], "RepeatedParameter", "limit"),
    ("/v1/events", {"since": "yesterday"}, "InvalidParameter", "since"),
    ("/v1/sites", {"limit": "1", "continue": paging.continue_token("Site", ("a", "b"))}, "InvalidParameter", "continue"),
    ("/v1/placements", {"limit": "1", "continue": paging.continue_token("placements", ("a",))}, "InvalidParameter", "continue"),
    ("/v1/endpoints/m", {"lat": "north", "lon": "2"}, "InvalidParameter", "lat"),
])
def test_a_query_parameter_refused_is_named_and_why(api: httpx.Client, path: str, params: Any, reason: str, parameter: str) -> None:
    _refusal(api.get(path, params=params), 400, reason, parameter=parameter)


def test_a_flag_refused_on_a_write_is_named(api: httpx.Client) -> None:
    site = doc("Site", "reason-b", support.edge_site_spec())
    _refusal(api.post("/v1/apply", params={"dryRun": "maybe"}, content=site), 400, "InvalidParameter", parameter="dryRun")
    _refusal(api.post("/v1/apply", params={"dryrun": "true"}, content=site), 400, "UnknownParameter", parameter="dryrun")
    _refusal(api.post("/v1/sites/reason-b/drain", params={"force": "perhaps"}), 400, "InvalidParameter", parameter="force")
    assert api.get("/v1/sites/reason-b").status_code == 404  # nothing applied


def test_what_is_not_there_and_what_is_not_taken(api: httpx.Client) -> None:
    _refusal(api.get("/v1/sites/no-such-site"), 404, "NotFound")
    _refusal(api.get("/v1/gizmos"), 404, "NotFound")
    _refusal(api.get("/v1/no/route/here"), 404, "NoRoute")
    _refusal(api.post("/v1/revoke/widgets/x"), 404, "NoRoute")  # no such route, not a widget 'x' missing
    _refusal(api.post("/v1/revoke/tokens/no-such-id"), 404, "NotFound")
    _refusal(api.put("/v1/apply", content=b""), 405, "MethodNotAllowed")


def test_a_body_refused_says_why(api: httpx.Client) -> None:
    site = doc("Site", "reason-c", support.edge_site_spec())
    _refusal(api.post("/v1/apply", content=site, headers={"content-type": "application/gzip"}), 415, "UnsupportedMediaType")
    _refusal(api.post("/v1/apply", content=b"#" * (4 * 1024 * 1024 + 1)), 413, "RequestEntityTooLarge")
    bad = doc("Site", "reason-c", {**support.edge_site_spec(), "tier": "orbit"})
    body = _refusal(api.post("/v1/apply", content=bad), 422, "Invalid", field="spec.tier")
    assert body["issues"][0]["field"] == "spec.tier"
    _refusal(api.post("/v1/tokens", json={"purpose": "root"}), 400, "BadRequest", field="purpose")
    _refusal(api.post("/v1/tokens", json={"purpose": "api", "role": "read", "ttlSeconds": -1}), 400, "BadRequest", field="ttlSeconds")


def test_who_may_not(secured: support.ServerThread) -> None:
    assert secured.cp is not None
    admin = {"authorization": f"Bearer {secured.cp.admin_token}"}
    with httpx.Client(base_url=secured.url, timeout=30) as c:
        _refusal(c.get("/v1/sites"), 401, "Unauthorized")
        _refusal(c.get("/v1/whoami", headers={"authorization": "Bearer nonsense"}), 401, "Unauthorized")
        read = {"authorization": f"Bearer {c.post('/v1/tokens', json={'purpose': 'api', 'role': 'read'}, headers=admin).json()['token']}"}
        _refusal(c.delete("/v1/sites/x", headers=read), 403, "Forbidden")
        _refusal(c.get("/v1/captures/EU", headers=read), 403, "Forbidden")


def test_every_reason_the_server_can_give_is_documented() -> None:
    """docs/api.md's table of reasons lists each :class:`problems.Reason` with its status, and no other."""
    text = (support.REPO / "docs" / "api.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Za-z]+)` \| (\d{3}) \|", text, re.M))
    assert rows == {r.value: str(r.status) for r in problems.Reason}


def test_the_python_client_gives_the_reason_of_what_refused_it(control_plane: support.ServerThread) -> None:
    """A server URL where no gateway answers (a path too many) and a model not deployed are
    both a NoEndpoint on a 404; the first's reason says the URL is wrong."""
    inputs = {"x": np.zeros((1, 2), dtype=np.float32)}
    with client_mod.Client(control_plane.url + "/elsewhere", timeout=30) as c, pytest.raises(client_mod.NoEndpoint) as wrong_url:
        c.infer("m", inputs)
    assert wrong_url.value.reason == "NoRoute", wrong_url.value
    with client_mod.Client(control_plane.url, timeout=30) as c, pytest.raises(client_mod.NoEndpoint) as not_deployed:
        c.infer("not-deployed", inputs)
    assert not_deployed.value.reason is None, not_deployed.value  # the v2 error's shape: no reason


def test_every_reason_the_gateway_names_for_the_endpoint_list_is_one() -> None:
    """The endpoint list's refusals name their reason in the gateway's code (which imports no
    API module): each is a :class:`problems.Reason`, or the answer would fail."""
    named = set()
    for path in (support.REPO / "orchestrator" / "gateway").glob("*.py"):
        named |= set(re.findall(r'problem="(\w+)"', path.read_text()))
    assert named and named <= {r.value for r in problems.Reason}


def test_a_control_plane_not_ready_answers_its_health_as_an_error(control_plane: support.ServerThread) -> None:
    """``/healthz``'s 503 (starting, or stopping) is an error answer like every other, and keeps
    ``status``, which a probe or script read before there was a ``reason``."""
    assert control_plane.cp is not None
    control_plane.cp._started = False  # as from the HTTP server's start until the last step of the control plane's
    try:
        r = httpx.get(f"{control_plane.url}/healthz", timeout=10)
    finally:
        control_plane.cp._started = True
    body = _refusal(r, 503, "ServiceUnavailable")
    assert body["status"] == "starting" and r.headers["retry-after"] == "1", body
    assert httpx.get(f"{control_plane.url}/healthz", timeout=10).json() == {"status": "ok"}


def test_a_request_head_over_64_kib_is_refused_as_an_error(api: httpx.Client) -> None:
    """The 431 that the HTTP server answers itself, before any route, is in the same shape."""
    r = api.get("/v1/sites", headers={"x-filler": "a" * 70_000})
    body = _refusal(r, 431, "RequestHeaderFieldsTooLarge")
    assert "64 KiB" in body["error"], body


def test_every_reason_of_the_cli_s_own_is_documented() -> None:
    """docs/api.md's table of the CLI's own reasons lists each with its exit code, and no other;
    none is a reason the control API gives."""
    text = (support.REPO / "docs" / "api.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Za-z]+)` \| (\d) \|", text, re.M))
    assert rows == {failures.UNREACHABLE: "3", failures.NOT_DONE: "1"}
    assert not set(rows) & {r.value for r in problems.Reason}
