"""A web page the operator opens cannot act through the operator's browser on a control plane
that trusts loopback (``--auth none``): a page's write (a CORS "simple request" goes out
without a preflight) is refused by its ``Origin``, and a DNS-rebinding page, same-origin with
the server under its own name, by its ``Host``. The CLI, the console and agents keep working.
With token auth neither check applies: a page cannot send the bearer token every write needs."""

from __future__ import annotations

import argparse
import pathlib

import httpx
import pytest

from orchestrator import argtypes
from orchestrator.api import origins
from orchestrator.testing import harness, manifests

#: What a browser sends for ``fetch(url, {method: "POST", mode: "no-cors"})`` from a page of https://evil.example.
CROSS_SITE = {"origin": "https://evil.example", "sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors",
              "content-type": "text/plain;charset=UTF-8"}

OPEN = origins.guard_for(True, ("ops.example",), "http://edgeplane.internal:9000")
TOKENS = origins.guard_for(False, (), None)


@pytest.mark.parametrize(("guard", "method", "host", "origin", "refused"), [
    (OPEN, "POST", "127.0.0.1:8080", None, False),  # the CLI, the Python client, agents
    (OPEN, "POST", "127.0.0.1:8080", "http://127.0.0.1:8080", False),  # the console
    (OPEN, "DELETE", "[::1]:8080", "http://[::1]:8080", False),
    (OPEN, "POST", "127.0.0.1:8080", "https://evil.example", True),
    (OPEN, "POST", "127.0.0.1:8080", "http://localhost:3000", True),  # another server on this host is another site
    (OPEN, "POST", "127.0.0.1:8080", "null", True),  # a sandboxed frame, a file:// page
    (OPEN, "PATCH", "localhost:8080", "http://localhost:8080.evil.example", True),
    (OPEN, "GET", "127.0.0.1:8080", "https://evil.example", False),  # reads of loopback names: the browser hides the answer
    (OPEN, "GET", "rebind.evil.example:8080", None, True),  # DNS rebinding
    (OPEN, "GET", "evil@127.0.0.1:8080", None, True),
    (OPEN, "GET", "127.0.0.1:abc", None, True),
    (OPEN, "GET", "localhost", None, False),
    (OPEN, "GET", "LOCALHOST.:8080", None, False),
    (OPEN, "GET", "127.0.0.2:8080", None, False),
    (OPEN, "GET", "ops.example:443", None, False),  # --allowed-host, any port
    (OPEN, "POST", "127.0.0.1:8080", "https://ops.example", False),  # a reverse proxy that rewrites Host
    (OPEN, "POST", "edgeplane.internal:9000", "http://edgeplane.internal:9000", False),  # --public-url
    (OPEN, "GET", None, None, False),  # HTTP/1.0, no Host: no browser
    (TOKENS, "GET", "ops.example.com", None, False),  # with tokens: any name (proxies, load balancers)
    (TOKENS, "POST", "ops.example.com", "https://ops.example.com", False),
    (TOKENS, "POST", "127.0.0.1:8080", "https://ops.example.com", False),  # the console behind a proxy that rewrites Host
    (TOKENS, "POST", "ops.example.com", "https://evil.example", False),  # refused for want of a bearer token (below)
])
def test_which_browser_requests_are_refused(guard: origins.Guard, method: str, host: str | None, origin: str | None,
                                            refused: bool) -> None:
    assert (origins.refusal(guard, method, host, origin) is not None) == refused


async def test_a_page_of_another_site_cannot_drain_a_site_or_apply_manifests(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane()  # --auth none: the loopback default
    try:
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=manifests.edge_site("edge-a", "FR", 48.0, 2.35))).status_code == 200

            refused = await http.post("/v1/sites/edge-a/drain?force=true", headers=CROSS_SITE)
            assert refused.status_code == 403 and "evil.example" in refused.json()["error"], refused.text
            applied = await http.post("/v1/apply", content=manifests.edge_site("edge-b", "FR", 48.1, 2.35), headers=CROSS_SITE)
            assert applied.status_code == 403, applied.text
            assert "maintenance" not in (await http.get("/v1/sites/edge-a")).json().get("status", {})
            assert (await http.get("/v1/sites/edge-b")).status_code == 404

            console = await http.post("/v1/sites/edge-a/cordon", headers={"origin": cp.http_url})  # same-origin, as the console's
            assert console.status_code == 200, console.text
            drained = await http.post("/v1/sites/edge-a/drain?force=true")  # no Origin: the CLI
            assert drained.status_code == 200 and drained.json()["maintenance"]["mode"] == "drain", drained.text
    finally:
        await fleet.stop()


async def test_without_token_auth_only_requests_naming_the_server_by_its_own_names_are_answered(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane(allowed_hosts=("ops.example",))
    try:
        port = cp.http_url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            for path in ("/v1/sites", "/v1/captures", "/healthz", "/v2/models/intent/ready", "/ui/"):
                answer = await http.get(path, headers={"host": f"rebind.evil.example:{port}"})
                assert answer.status_code == 403, (path, answer.status_code, answer.text[:200])
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "ops.example"):
                assert (await http.get("/v1/sites", headers={"host": host})).status_code == 200, host
    finally:
        await fleet.stop()


async def test_with_token_auth_any_host_and_origin_is_answered_and_a_cross_site_write_has_no_token(tmp_path: pathlib.Path) -> None:
    """A page of another site cannot make the browser send the bearer token, so its write is
    refused for want of one (401); the console behind a reverse proxy that rewrites ``Host``
    (its requests name the proxy's origin) writes with its token."""
    fleet = harness.Fleet(tmp_path)
    cp = await fleet.start_control_plane(auth="token")
    try:
        bearer = {"authorization": f"Bearer {cp.admin_token}"}
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.get("/v1/sites", headers={**bearer, "host": "edgeplane.ops.example"})).status_code == 200
            site = manifests.edge_site("edge-a", "FR", 48.0, 2.35)
            assert (await http.post("/v1/apply", content=site, headers=CROSS_SITE)).status_code == 401
            assert (await http.get("/v1/sites/edge-a", headers=bearer)).status_code == 404
            proxied = {**bearer, "origin": "https://edgeplane.ops.example", "sec-fetch-site": "same-origin"}
            applied = await http.post("/v1/apply", content=site, headers=proxied)
            assert applied.status_code == 200, applied.text
    finally:
        await fleet.stop()


@pytest.mark.parametrize(("given", "taken"), [("OPS.Example.", "ops.example"), ("[::1]", "::1"), ("10.0.0.7", "10.0.0.7"),
                                              ("ops.example:443", None), ("https://ops.example", None), ("", None)])
def test_an_allowed_host_is_a_name_or_address_without_a_port(given: str, taken: str | None) -> None:
    if taken is None:
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.host_name(given)
    else:
        assert argtypes.host_name(given) == taken
