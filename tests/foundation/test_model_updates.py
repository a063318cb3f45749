"""A new version of a Model is judged against the stored deployments that use it: one that
drops or changes the variant a deployment names would leave that deployment naming nothing
(its replicas would go), a state no apply of the deployment itself could make. Run as the
API runs it, on a real SQLite store."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from orchestrator import catalog
from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestError
from orchestrator.store import sqlite as store_mod

from . import support
from .support import doc, join, line_of

SMALL, BIG = support.model_spec()["variants"]


def model(*variants: dict[str, Any]) -> str:
    return doc("Model", "m", {"variants": list(variants)})


def deployment(name: str = "d", **spec: Any) -> str:
    return doc("ModelDeployment", name, {**support.deployment_spec("m"), **spec})


@pytest.fixture
def store(tmp_path: pathlib.Path) -> store_mod.Store:
    """Model m (small, big) and deployment d of its variant small, stored."""
    store = store_mod.Store(tmp_path / "s.db")
    catalog.apply_reading(store, loader.read_text(join(model(SMALL, BIG), deployment())), actor="t")
    return store


def apply(store: store_mod.Store, text: str, dry_run: bool = False) -> catalog.ApplyResult:
    return catalog.apply_reading(store, loader.read_text(text, "m.yaml"), actor="t", dry_run=dry_run)


@pytest.mark.parametrize("dry_run", [False, True])
def test_dropping_the_variant_a_stored_deployment_names_is_refused_at_the_model(store: store_mod.Store, dry_run: bool) -> None:
    text = model(BIG)
    with pytest.raises(ManifestError) as refused:
        apply(store, text, dry_run)
    [issue] = refused.value.issues
    assert (issue.file, issue.document, issue.field, issue.line) == ("m.yaml", 0, "spec.variants", line_of(text, "variants:"))
    assert issue.message.startswith("ModelDeployment 'd' uses this Model: spec.variant: Model 'm' has no variant 'small' (has: big)")
    assert [v["name"] for v in store.get("Model", "m").spec["variants"]] == ["small", "big"]


def test_a_variant_that_can_no_longer_run_where_the_deployment_runs_is_refused(store: store_mod.Store) -> None:
    edge_only = deployment("edge-only", placement={"tiers": ["edge"]})
    apply(store, edge_only)
    with pytest.raises(ManifestError) as refused:
        apply(store, model({**BIG, "name": "small"}, {**BIG, "name": "big"}))
    assert [i.message.split(";")[0] for i in refused.value.issues] == [
        "ModelDeployment 'edge-only' uses this Model: spec.variant: variant 'small' is ray-serve, which runs only in data "
        "centres, but tiers are [edge]"]


def test_the_model_and_its_deployment_changed_together_apply(store: store_mod.Store) -> None:
    result = apply(store, join(model(BIG), deployment(variant="big")))
    assert [o.action for o in result.outcomes] == ["configured", "configured"]
    assert store.get("ModelDeployment", "d").spec["variant"] == "big"


def test_a_change_the_deployments_do_not_notice_applies(store: store_mod.Store) -> None:
    result = apply(store, model(SMALL, BIG, {**BIG, "name": "bigger"}))
    assert [o.action for o in result.outcomes] == ["configured"]
