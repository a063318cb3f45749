"""Bad input to the control plane's HTTP API, over real HTTP: a known path asked with the
wrong method is a 405 that says what it takes, and the endpoint list refuses a position or
region it cannot place the caller at, naming the query parameter; a token request JSON Python
cannot read is a 400."""

from __future__ import annotations

import json
import pathlib

import httpx
import pytest

from orchestrator.manifests import loader



@pytest.fixture(scope="module")
def regions(api: httpx.Client, offline_fleet: pathlib.Path) -> set[str]:
    """The example fleet applied, once its sites' regions are in the gateway's table (read
    from the table's watch, event by event)."""
    body = loader.bundle([(p.name, p.read_text()) for p in sorted(offline_fleet.glob("*.yaml"))])
    assert api.post("/v1/apply", content=body).status_code == 200
    expected = {"eu-west", "eu-central"}
    with api.stream("GET", "/v1/endpoints", params={"watch": "1"}) as resp:
        known: set[str] = set()
        for line in resp.iter_lines():
            event = json.loads(line)
            table = event.get("table", event)
            if "regions" in table:
                known = set(table["regions"])
            if expected <= known:
                return known
    raise AssertionError(f"the watch ended before the table held regions {expected}")


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v1/apply", "POST"),
    ("DELETE", "/v1/apply", "POST"),
    ("GET", "/v1/delete", "POST"),
    ("GET", "/v1/simulate", "POST"),
    ("PUT", "/v1/tokens", "GET, HEAD, POST"),  # two routes on one path: both methods are listed
    ("POST", "/v1/sites", "GET, HEAD"),
    ("PUT", "/v1/sites/edge-lyon", "DELETE, GET, HEAD"),
    ("DELETE", "/v1/cascades/x", "GET, HEAD"),
    ("GET", "/v1/revoke/tokens/x", "POST"),
    ("GET", "/v2/models/m/infer", "POST"),
    ("POST", "/v2/models/m", "GET, HEAD"),
    ("DELETE", "/healthz", "GET, HEAD"),
])  # the OpenAI routes (/v1/chat/completions...) answer with OpenAI's error object: tests/gateway/test_openai_bad_input_gateway.py
def test_a_known_path_with_a_wrong_method_is_405_with_allow(api: httpx.Client, method: str, path: str, allow: str) -> None:
    r = api.request(method, path)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allow
    assert r.json() == {"error": f"{method} is not allowed on {path}; it takes {allow}", "reason": "MethodNotAllowed"}


def test_the_catch_all_routes_still_read_kinds(api: httpx.Client, regions: set[str]) -> None:
    assert api.get("/v1/sites").status_code == 200
    assert api.get("/v1/sites/edge-lyon").status_code == 200
    unknown = api.get("/v1/nonsense")
    assert unknown.status_code == 404 and "unknown kind 'nonsense'" in unknown.json()["error"]


def test_an_unknown_path_is_a_json_404(api: httpx.Client) -> None:
    r = api.get("/nowhere/at/all")
    assert r.status_code == 404
    assert r.json() == {"error": "no route for GET /nowhere/at/all", "reason": "NoRoute"}


@pytest.mark.parametrize(("params", "message"), [
    ({"lat": "999", "lon": "0"}, "query parameter lat must be a number in [-90, 90], not '999'"),
    ({"lat": "0", "lon": "-181"}, "query parameter lon must be a number in [-180, 180], not '-181'"),
    ({"lat": "north", "lon": "2.35"}, "query parameter lat must be a number in [-90, 90], not 'north'"),
    ({"lat": "nan", "lon": "2.35"}, "query parameter lat must be a number in [-90, 90], not 'nan'"),
    ({"lat": "48.85", "lon": "inf"}, "query parameter lon must be a number in [-180, 180], not 'inf'"),
    ({"lat": "48.85"}, "query parameter lat is given without lon"),
    ({"lon": "2.35"}, "query parameter lon is given without lat"),
    ({"residency": "Narnia"}, "query parameter residency:"),
])
def test_the_endpoint_list_refuses_a_position_it_cannot_read(api: httpx.Client, params: dict[str, str], message: str) -> None:
    r = api.get("/v1/endpoints/intent", params=params)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_the_endpoint_list_refuses_an_unknown_region(api: httpx.Client, regions: set[str]) -> None:
    r = api.get("/v1/endpoints/intent", params={"region": "eu-wets"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.startswith("query parameter region: unknown region 'eu-wets' (known regions: ")
    assert ", ".join(sorted(regions)) in error and "give lat and lon instead" in error


def test_the_endpoint_list_takes_a_good_position_or_region(api: httpx.Client, regions: set[str]) -> None:
    for params in ({"lat": "48.85", "lon": "2.35"}, {"lat": "-90", "lon": "180"}, {"region": "eu-west"}, {}):
        r = api.get("/v1/endpoints/intent", params=params)
        assert r.status_code == 200, (params, r.text)
        assert r.json()["model"] == "intent"


@pytest.mark.parametrize("limit", ["²", "٣", "1" * 5000, "0", "-1", "10001"])
def test_a_list_limit_that_is_not_a_whole_number_in_range_is_400_naming_it(api: httpx.Client, limit: str) -> None:
    for path in ("/v1/sites", "/v1/placements", "/v1/events"):
        r = api.get(path, params={"limit": limit})
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"].startswith("limit must be a whole number from 1 to 10,000"), path


@pytest.mark.parametrize(("params", "says"), [({"last": "٣"}, "last must be a whole number from 0 to 10,000"),
                                              ({"last": "10001"}, "last must be a whole number from 0 to 10,000"),
                                              ({"since": "٣"}, "since must be an event id")])
def test_an_event_page_read_from_digits_other_than_ascii_is_400_naming_it(api: httpx.Client, params: dict[str, str], says: str) -> None:
    r = api.get("/v1/events", params=params)
    assert r.status_code == 400 and r.json()["error"].startswith(says), r.text[:300]


@pytest.mark.parametrize(("path", "params", "says"), [
    ("/v1/tokens", {"limit": "10"}, "unknown query parameter 'limit': this list takes none"),
    ("/v1/events", {"nme": "edge-lyon"}, "unknown query parameter 'nme': this list takes since, limit, last, kind, name, site, after, before"),
    ("/v1/cascades", {"name": "x"}, "unknown query parameter 'name': this route takes none"),
    ("/v1/cascades/x", {"verbose": "1"}, "unknown query parameter 'verbose': this route takes none"),
    ("/v1/controlplane", {"role": "leader"}, "unknown query parameter 'role': this route takes none"),
    ("/v1/sites/edge-lyon", {"describ": "1"}, "unknown query parameter 'describ': this route takes describe"),
    ("/v1/endpoints", {"wacth": "1"}, "unknown query parameter 'wacth': this route takes watch"),
    ("/v1/endpoints/intent", {"regoin": "eu-west"}, "unknown query parameter 'regoin': this list takes lat, lon, region, residency"),
])
def test_a_get_route_refuses_a_query_parameter_it_does_not_read(api: httpx.Client, regions: set[str], path: str,
                                                                params: dict[str, str], says: str) -> None:
    r = api.get(path, params=params)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"] == says


def test_the_lists_take_the_parameters_they_read(api: httpx.Client, regions: set[str]) -> None:
    for path, params in [("/v1/events", {"kind": "Site", "name": "edge-lyon", "since": "0", "limit": "5"}),
                         ("/v1/events", {"last": "3"}), ("/v1/sites/edge-lyon", {"describe": "1"}), ("/v1/tokens", {}),
                         ("/v1/cascades", {}), ("/v1/controlplane", {}), ("/v1/endpoints", {"watch": "0"})]:
        assert api.get(path, params=params).status_code == 200, (path, params)


@pytest.mark.parametrize("body", [
    b'{"purpose": "api", "role": "read", "ttlSeconds": 1' + b"0" * 5000 + b"}",  # past the digits int() reads
    b"[" * 30_000 + b"]" * 30_000,  # nested past the parser
], ids=["5000-digit-integer", "nested-30000"])
def test_a_token_request_json_cannot_read_is_400(api: httpx.Client, body: bytes) -> None:
    before = len(api.get("/v1/tokens").json()["items"])
    r = api.post("/v1/tokens", content=body)
    assert r.status_code == 400 and r.json()["error"].startswith("body must be JSON"), r.text[:300]
    assert len(api.get("/v1/tokens").json()["items"]) == before
