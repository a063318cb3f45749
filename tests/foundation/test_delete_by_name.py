"""A bundle delete (``POST /v1/delete``, ``edgeplane delete -f``) needs of each document only
its kind and ``metadata.name`` (and, to be conditional, ``metadata.resourceVersion``), over
real HTTP against a real control plane: a document without its spec was refused 422
"spec: required field is missing", so deleting meant keeping the whole manifest at hand."""

from __future__ import annotations


import httpx
import pytest

from . import support
from .support import doc


def _apply_site(api: httpx.Client, name: str) -> str:
    assert api.post("/v1/apply", content=doc("Site", name, support.edge_site_spec())).status_code == 200
    return str(api.get(f"/v1/sites/{name}").json()["metadata"]["resourceVersion"])


def test_documents_naming_only_kind_and_name_are_deleted(api: httpx.Client) -> None:
    _apply_site(api, "named-a")
    _apply_site(api, "named-b")
    body = ("kind: Site\nmetadata: {name: named-a}\n---\n"
            "apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata:\n  name: named-b\n")
    r = api.post("/v1/delete", content=body)
    assert r.status_code == 200, r.text
    assert {(x["name"], x["action"]) for x in r.json()["results"]} == {("named-a", "deleted"), ("named-b", "deleted")}
    assert api.get("/v1/sites/named-a").status_code == 404 and api.get("/v1/sites/named-b").status_code == 404


def test_a_whole_manifest_and_a_name_only_document_delete_together(api: httpx.Client) -> None:
    _apply_site(api, "named-whole")
    _apply_site(api, "named-only")
    body = doc("Site", "named-whole", support.edge_site_spec()) + "---\nkind: Site\nmetadata: {name: named-only}\n"
    r = api.post("/v1/delete", content=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 2


def test_a_name_only_delete_at_a_stale_version_is_refused(api: httpx.Client) -> None:
    stale = _apply_site(api, "named-cond")
    changed = {**support.edge_site_spec(), "energy": {"carbonGramsPerKWh": 5}}
    assert api.post("/v1/apply", content=doc("Site", "named-cond", changed)).status_code == 200
    r = api.post("/v1/delete", content=f"kind: Site\nmetadata: {{name: named-cond, resourceVersion: '{stale}'}}\n")
    assert r.status_code == 409, r.text
    assert f"changed since resourceVersion {stale}" in r.json()["error"]
    current = api.get("/v1/sites/named-cond").json()["metadata"]["resourceVersion"]
    r = api.post("/v1/delete", content=f"kind: Site\nmetadata: {{name: named-cond, resourceVersion: '{current}'}}\n")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("body", "field", "says"), [
    ("kind: Site\nmetadata: {name: Bad_Name}\n", "metadata.name", ""),
    ("kind: Sight\nmetadata: {name: named-kind}\n", "kind", "unknown kind 'Sight'"),
    ("metadata: {name: named-kind}\n", "kind", "kind is missing"),
    ("kind: Site\nmetadata: {}\n", "metadata.name", "required"),
    ("kind: Site\n", "metadata", "required"),
    ("apiVersion: edgeplane.io/v1\nkind: Site\nmetadata: {name: named-kind}\n", "apiVersion", "must be"),
    ("kind: Site\nmetadata: {name: named-kind, resourceVersion: v7}\n", "metadata.resourceVersion", "number"),
    ("kind: Site\nmetadata: {name: named-kind}\nspce: {}\n", "spce", "unknown field"),
])
def test_a_name_only_document_is_still_checked_and_deletes_nothing(api: httpx.Client, body: str, field: str, says: str) -> None:
    _apply_site(api, "named-kind")
    r = api.post("/v1/delete", content=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].endswith("nothing was deleted")
    assert [i["field"] for i in r.json()["issues"]] == [field], r.text
    assert says in r.json()["issues"][0]["message"]
    assert api.get("/v1/sites/named-kind").status_code == 200


def test_an_apply_still_needs_the_spec(api: httpx.Client) -> None:
    r = api.post("/v1/apply", content="apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata: {name: named-apply}\n")
    assert r.status_code == 422, r.text
    assert [i["field"] for i in r.json()["issues"]] == ["spec"]
