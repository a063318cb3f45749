"""Control-API fuzzing on SQLite and on PostgreSQL: any method on any route's path, with
path segments and query values of any text (NUL, slashes, 64-bit overflows) and any body.
Every answer is below 500 and, from the API's own routes, a JSON error object when it
refuses; both stores answer alike."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.testing import manifests

from .conftest import FUZZ, TRIED, FleetThread, text

#: Every route of the control API, ``{}`` for a segment (apply and simulate take bodies the
#: manifest and scenario fuzzers cover; here they get what the others get).
ROUTES = ["/v1/apply", "/v1/delete", "/v1/placements", "/v1/cascades", "/v1/cascades/{}", "/v1/events", "/v1/endpoints",
          "/v1/endpoints/{}", "/v1/tokens", "/v1/simulate", "/v1/revoke/{}/{}", "/v1/controlplane", "/v1/captures/{}",
          "/v1/captures/{}/{}", "/v1/distill/{}", "/v1/whoami", "/v1/wake/{}", "/v1/{}", "/v1/{}/{}", "/healthz"]
NAMES = ["sites", "site", "models", "modeldeployments", "tokens", "agents", "edge-fuzz", "intent", "chat", "intent-fr", "eu", "FR"]
KEYS = ["since", "limit", "last", "kind", "name", "describe", "watch", "lat", "lon", "region", "residency", "file", "dryRun",
        "top", "each", "deployment", "payload", "x"]
texts = st.one_of(st.sampled_from(NAMES), text(max_size=12), st.sampled_from(["\x00", "a\x00b", "9" * 25, "-" + "9" * 25, "..", ""]))
numbers = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(["1e3", "nan", "0x10", " 1"]))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes | None]:
    path = draw(st.sampled_from(ROUTES))
    while "{}" in path:
        path = path.replace("{}", urllib.parse.quote(draw(texts), safe="", errors="surrogatepass") or "x", 1)
    query = draw(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), text(max_size=4)), st.one_of(texts, numbers.map(str))),
                          max_size=3))
    if query:
        path += "?" + urllib.parse.urlencode(query, errors="surrogatepass")  # a surrogate: bytes that are not UTF-8
    method = draw(st.sampled_from(["GET", "GET", "POST", "POST", "DELETE", "PUT", "HEAD"]))
    body = None
    if method in ("POST", "PUT", "DELETE"):
        body = draw(st.one_of(st.binary(max_size=64), st.dictionaries(st.sampled_from(["purpose", "role", "ttlSeconds", "description",
                                                                                        "epochs", "zone", "x"]),
                                                                      st.one_of(texts, numbers, st.booleans(), st.none()),
                                                                      max_size=4).map(lambda d: json.dumps(d).encode())))
    return method, path, body


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def plane(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[FleetThread]:
    """A control plane of its own (the fuzzer deletes and revokes), holding one site."""
    store = {} if request.param == "sqlite" else {"store": request.getfixturevalue("postgres").create_database()}
    ft = FleetThread(tmp_path_factory.mktemp(f"fuzz-{request.param}"))
    try:
        cp = ft.run(ft.fleet.start_control_plane(**store))
        resp = httpx.post(f"{cp.http_url}/v1/apply", content=manifests.edge_site("edge-fuzz", "FR", 48.85, 2.35).encode())
        assert resp.status_code == 200, resp.text
        yield ft
    finally:
        ft.close()


def test_control_api_requests_never_5xx(plane: FleetThread, request: pytest.FixtureRequest) -> None:
    store = request.node.callspec.params["plane"]
    assert plane.fleet.cp is not None
    codes: dict[int, int] = {}
    with httpx.Client(base_url=plane.fleet.cp.http_url, timeout=30) as http:

        @FUZZ
        @given(requests())
        def fuzz(call: tuple[str, str, bytes | None]) -> None:
            TRIED[f"control API -> {store}"] += 1
            method, path, body = call
            resp = http.request(method, path, content=body)
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (method, path, body, resp.status_code, resp.text[:300])
            if resp.status_code >= 400 and method != "HEAD":
                assert isinstance(resp.json().get("error"), str), (method, path, resp.text[:300])

        fuzz()
        assert http.get("/v1/events", params={"last": "1"}).status_code == 200  # still answering
    print(f"{store}: status codes {sorted(codes.items())}")
