"""Deleting a bundle (``edgeplane delete -f``, ``POST /v1/delete``) and applying one judge
each Model it names against the stored deployments that use it. A bundle may name hundreds
of Models and the store hold thousands of deployments: the deployments are read and walked
once for the whole bundle, not once per Model, while every other apply waits on the write
lock. Run on a real SQLite store."""

from __future__ import annotations

import pathlib

import pytest

from orchestrator import catalog
from orchestrator.manifests import loader, references, schema
from orchestrator.store import sqlite as store_mod

from . import support
from .support import doc, join


class CountingReads(store_mod.Store):
    """A store that counts how often the stored deployments are listed."""

    deployment_reads = 0

    def list(self, kind: str | None = None) -> list[store_mod.StoredObject]:
        self.deployment_reads += kind in (None, "ModelDeployment")
        return super().list(kind)


def _models(n: int) -> list[str]:
    return [doc("Model", f"m{i:03d}", support.model_spec()) for i in range(n)]


def test_deleting_a_bundle_of_many_models_reads_the_stored_deployments_once(tmp_path: pathlib.Path) -> None:
    store = CountingReads(tmp_path / "state.db")
    try:
        models = _models(40)
        deployments = [doc("ModelDeployment", f"d{i:03d}", support.deployment_spec(f"m{i:03d}")) for i in range(40)]
        catalog.apply_documents(store, loader.load_text(join(*models, *deployments)), actor="test")
        store.deployment_reads = 0
        with pytest.raises(catalog.InUse, match=r"Model 'm007' is used by ModelDeployment d007, which the bundle does not delete"):
            catalog.delete_documents(store, loader.load_text(join(*models, *deployments[:7], *deployments[8:])), actor="test")
        outcomes = catalog.delete_documents(store, loader.load_text(join(*models, *deployments)), actor="test")
        assert len(outcomes) == 80 and store.list() == []
        assert store.deployment_reads == 2 + 1  # once per delete, and the check above
    finally:
        store.close()


def _lines_run_checking(models: int) -> int:
    """The lines of :mod:`orchestrator.manifests.references` run to judge a bundle of
    ``models`` Models against as many stored deployments, one of each."""
    documents = loader.load_text(join(*_models(models)))
    stored = {f"d{i:03d}": schema.ModelDeploymentSpec.model_validate(support.deployment_spec(f"m{i:03d}")) for i in range(models)}
    brought = {d.name: d.doc.spec for d in documents if isinstance(d.doc, schema.ModelDoc)}

    def check() -> None:
        assert references.check_references(documents, brought, (), stored) == []

    return support.lines_run(references, check)


def test_an_apply_of_many_models_walks_the_stored_deployments_once_not_once_per_model() -> None:
    few, many = _lines_run_checking(10), _lines_run_checking(100)
    assert many <= 12 * few  # ten times the Models and deployments: about ten times the work, not a hundred
