"""The control API reads a body as manifests (or a scenario) only when it is declared as
YAML or JSON text in UTF-8, or declared as nothing, over real HTTP against a real control
plane: a gzip file or an HTML page was read as manifests (a gzip body refused as "not
UTF-8"), and a text in another charset read as UTF-8. Each is 415 naming what is accepted,
and nothing is applied or deleted."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest
import yaml

from . import support


def _site(name: str) -> bytes:
    return support.doc("Site", name, support.edge_site_spec()).encode()


REFUSED = [
    ({"content-type": "text/html"}, "'text/html' is not accepted"),
    ({"content-type": "application/gzip"}, "'application/gzip' is not accepted"),
    ({"content-type": "application/yaml; charset=latin-1"}, "bodies are UTF-8"),
    ({"content-type": "application/yaml", "content-encoding": "gzip"}, "Content-Encoding 'gzip' is not accepted"),
    ({"content-type": "nonsense"}, "is not a media type"),
]


@pytest.mark.parametrize(("headers", "says"), REFUSED)
@pytest.mark.parametrize("path", ["/v1/apply", "/v1/apply?dryRun=true", "/v1/delete"])
def test_a_body_declared_as_neither_yaml_nor_json_is_refused_and_changes_nothing(
        api: httpx.Client, path: str, headers: dict[str, str], says: str) -> None:
    assert api.post("/v1/apply", content=_site("media-kept")).status_code == 200
    last = api.get("/v1/events", params={"last": 1}).json()["lastId"]
    body = _site("media-new") if "dryRun" in path or path == "/v1/apply" else _site("media-kept")
    if headers.get("content-encoding") == "gzip" or headers.get("content-type") == "application/gzip":
        body = gzip.compress(body)
    r = api.post(path, content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert says in r.json()["error"]
    assert "send Content-Type: application/yaml or application/json" in r.json()["error"]
    assert "application/yaml" in r.json()["accepted"] and "application/yaml" in r.headers["accept-post"]
    assert api.get("/v1/sites/media-new").status_code == 404
    assert api.get("/v1/sites/media-kept").status_code == 200
    assert api.get("/v1/events", params={"last": 1}).json()["lastId"] == last


def test_a_scenario_declared_as_html_is_refused(api: httpx.Client) -> None:
    r = api.post("/v1/simulate", content=b'{"scenario": []}', headers={"content-type": "text/html"})
    assert r.status_code == 415, r.text
    assert "'text/html' is not accepted" in r.json()["error"]


@pytest.mark.parametrize("content_type", [
    None,  # the CLI and the Python client send none
    "application/x-www-form-urlencoded",  # curl --data-binary @file without -H
    "text/plain; charset=UTF-8", "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
    "Application/YAML; charset=utf-8", "application/json", "application/vnd.edgeplane+json",
])
def test_yaml_json_plain_or_undeclared_bodies_are_read(api: httpx.Client, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    body = _site("media-read")
    if content_type is not None and "json" in content_type:
        body = json.dumps(yaml.safe_load(body)).encode()
    r = api.post("/v1/apply", content=body, headers=headers)
    assert r.status_code == 200, r.text
    r = api.post("/v1/delete", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [{"kind": "Site", "name": "media-read", "action": "deleted"}]
