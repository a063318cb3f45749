"""A 401 of the control API says how to authenticate (RFC 9110 §11.6.1: a 401 carries
``WWW-Authenticate``), over real HTTP against a real control plane with ``--auth token``:
HTTP clients and proxies that an integrator automates with read the scheme from it, and
RFC 6750 tells a token that was refused from one that was not given."""

from __future__ import annotations


import httpx
import pytest

from . import support


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/sites"), ("POST", "/v1/apply"), ("DELETE", "/v1/sites/x"),
                                              ("GET", "/v1/whoami"), ("GET", "/v1/endpoints")])
def test_a_request_without_a_token_is_told_the_bearer_scheme(secured: support.ServerThread, method: str, path: str) -> None:
    r = httpx.request(method, secured.url + path, timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers.get("www-authenticate") == 'Bearer realm="edgeplane"'
    assert "Bearer" in r.json()["error"]


@pytest.mark.parametrize("path", ["/v1/sites", "/v1/whoami"])
def test_a_refused_token_is_told_invalid_token(secured: support.ServerThread, path: str) -> None:
    r = httpx.get(secured.url + path, headers={"authorization": "Bearer nonsense"}, timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers.get("www-authenticate") == 'Bearer realm="edgeplane", error="invalid_token"'


def test_a_read_token_refused_a_write_is_a_403_without_a_challenge(secured: support.ServerThread) -> None:
    assert secured.cp is not None
    admin = {"authorization": f"Bearer {secured.cp.admin_token}"}
    made = httpx.post(secured.url + "/v1/tokens", json={"purpose": "api", "role": "read"}, headers=admin, timeout=30)
    assert made.status_code == 201, made.text
    r = httpx.post(secured.url + "/v1/apply", content=b"", headers={"authorization": f"Bearer {made.json()['token']}"}, timeout=30)
    assert r.status_code == 403 and "www-authenticate" not in r.headers


def test_a_scoped_token_made_where_the_gateway_checks_no_token_comes_with_a_warning(secured: support.ServerThread) -> None:
    """A scope binds only gateways run with --gateway-auth token: on a control plane whose own
    gateway reads no token (the default), the token is made and the answer says the scope binds
    nothing there; an unscoped token's answer has no such warning."""
    assert secured.cp is not None
    admin = {"authorization": f"Bearer {secured.cp.admin_token}"}
    scoped = httpx.post(secured.url + "/v1/tokens", json={"purpose": "api", "role": "read", "models": ["intent"]},
                        headers=admin, timeout=30)
    assert scoped.status_code == 201, scoped.text
    assert "--gateway-auth none" in scoped.json()["warning"], scoped.json()
    plain = httpx.post(secured.url + "/v1/tokens", json={"purpose": "api", "role": "read"}, headers=admin, timeout=30)
    assert "warning" not in plain.json()
