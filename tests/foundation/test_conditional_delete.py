"""Deletes made conditional on the version the caller read, over real HTTP against a real
in-process control plane: a job that read an object, decided to delete it, and meanwhile
had it changed by someone else is refused (409) rather than deleting that change unseen,
as a conditional apply is."""

from __future__ import annotations


import httpx
import pytest
import yaml

from . import support
from .support import doc


def _site(api: httpx.Client, name: str) -> str:
    """Site ``name`` applied, then changed by someone else: the version read before the change."""
    assert api.post("/v1/apply", content=doc("Site", name, support.edge_site_spec())).status_code == 200
    read = api.get(f"/v1/sites/{name}").json()["metadata"]["resourceVersion"]
    changed = {**support.edge_site_spec(), "energy": {"carbonGramsPerKWh": 99}}
    assert api.post("/v1/apply", content=doc("Site", name, changed)).status_code == 200
    return read


def test_a_delete_at_a_version_that_changed_since_is_refused_and_deletes_nothing(api: httpx.Client) -> None:
    stale = _site(api, "cond-one")
    r = api.delete("/v1/sites/cond-one", params={"resourceVersion": stale})
    assert r.status_code == 409, r.text
    assert f"changed since resourceVersion {stale}" in r.json()["error"]
    current = api.get("/v1/sites/cond-one").json()
    assert current["spec"]["energy"]["carbonGramsPerKWh"] == 99

    r = api.delete("/v1/sites/cond-one", params={"resourceVersion": current["metadata"]["resourceVersion"]})
    assert r.status_code == 200, r.text
    assert api.get("/v1/sites/cond-one").status_code == 404


@pytest.mark.parametrize("bad", ["", "abc", "-1", "²", "1" * 20])
def test_a_delete_at_a_version_that_is_no_number_is_a_400_naming_it(api: httpx.Client, bad: str) -> None:
    assert api.post("/v1/apply", content=doc("Site", "cond-bad", support.edge_site_spec())).status_code == 200
    r = api.delete("/v1/sites/cond-bad", params={"resourceVersion": bad})
    assert r.status_code == 400 and "resourceVersion" in r.json()["error"], r.text
    assert api.get("/v1/sites/cond-bad").status_code == 200


def test_a_bundle_delete_of_what_get_printed_is_refused_when_an_object_changed_since(api: httpx.Client) -> None:
    """``edgeplane get site X -o yaml`` printed with its resourceVersion, then deleted from that
    file (``edgeplane delete -f``): the delete is conditional, as the apply of that file is."""
    stale = _site(api, "cond-bundle")
    assert api.post("/v1/apply", content=doc("Site", "cond-other", support.edge_site_spec())).status_code == 200
    other = api.get("/v1/sites/cond-other").json()
    printed = api.get("/v1/sites/cond-bundle").json()
    printed["metadata"]["resourceVersion"] = stale  # as read before the change
    body = yaml.safe_dump_all([other, printed])
    r = api.post("/v1/delete", content=body)
    assert r.status_code == 409, r.text
    assert "cond-bundle" in r.json()["error"] and f"changed since resourceVersion {stale}" in r.json()["error"]
    assert api.get("/v1/sites/cond-other").status_code == 200  # all or nothing
    assert api.get("/v1/sites/cond-bundle").status_code == 200

    printed = api.get("/v1/sites/cond-bundle").json()
    r = api.post("/v1/delete", content=yaml.safe_dump_all([other, printed]))
    assert r.status_code == 200, r.text
    assert {(x["name"], x["action"]) for x in r.json()["results"]} == {("cond-other", "deleted"), ("cond-bundle", "deleted")}


def test_a_bundle_delete_at_a_version_that_is_no_number_is_a_manifest_error_and_deletes_nothing(api: httpx.Client) -> None:
    assert api.post("/v1/apply", content=doc("Site", "cond-bad-bundle", support.edge_site_spec())).status_code == 200
    r = api.post("/v1/delete", content=doc("Site", "cond-bad-bundle", support.edge_site_spec(), resourceVersion="v7"))
    assert r.status_code == 422, r.text
    assert [i["field"] for i in r.json()["issues"]] == ["metadata.resourceVersion"]
    assert api.get("/v1/sites/cond-bad-bundle").status_code == 200


def test_a_bundle_delete_refused_for_its_manifests_says_nothing_was_deleted(api: httpx.Client) -> None:
    r = api.post("/v1/delete", content=b"apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata: {name: x}\nspec: {tier: moon}\n")
    assert r.status_code == 422, r.text
    assert r.json()["error"].endswith(" problem(s) in the manifests; nothing was deleted") and r.json()["issues"]
