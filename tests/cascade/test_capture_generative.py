"""``spec.cascade.capture`` on a cascade of a generative model: the OpenAI routes that run it
keep no record, so a plan or apply that brings one is refused, naming the field; a deployment
an earlier release stored with it still loads and is routed (its cascade runs, capturing
nothing). Run as the API runs it, on a real SQLite store."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from orchestrator import catalog
from orchestrator.gateway import cascade_rules
from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestError
from orchestrator.store import sqlite as store_mod
from orchestrator.store.values import Event, ObjectWrite

from .test_cascade_manifest import deployment, genai_model, model, stages

CAPTURE = {"sampleRate": 0.5, "zones": ["EU"]}
GENERATIVE_RULE = {"meanLogprobBelow": -1.2}
TENSOR_RULE = {"confidence": {"output": "probabilities", "below": 0.8}}
LOAD_RULE = {"maxInflight": 4}  # fits either kind of model


def capturing(rule: dict[str, Any]) -> dict[str, Any]:
    return deployment({**stages(rule), "capture": CAPTURE})


def text(*docs: dict[str, Any]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def apply(store: store_mod.Store, *docs: dict[str, Any], dry_run: bool = False) -> catalog.ApplyResult:
    return catalog.apply_reading(store, loader.read_text(text(*docs), "cascade.yaml"), actor="t", dry_run=dry_run)


@pytest.fixture
def store(tmp_path: pathlib.Path) -> store_mod.Store:
    return store_mod.Store(tmp_path / "s.db")


@pytest.mark.parametrize("dry_run", [True, False], ids=["plan", "apply"])
def test_capture_on_a_generative_cascade_is_refused_naming_the_field(store: store_mod.Store, dry_run: bool) -> None:
    written = text(genai_model(), capturing(GENERATIVE_RULE))
    with pytest.raises(ManifestError) as refused:
        apply(store, genai_model(), capturing(GENERATIVE_RULE), dry_run=dry_run)
    [issue] = refused.value.issues
    assert (issue.file, issue.document, issue.field) == ("cascade.yaml", 1, "spec.cascade.capture")
    assert issue.line == next(n for n, line in enumerate(written.splitlines(), 1) if "capture:" in line)
    assert "generative" in issue.message and "onnx-genai" in issue.message and "captures nothing" in issue.message
    assert store.get("ModelDeployment", "task") is None


def test_capture_on_a_tensor_cascade_is_applied(store: store_mod.Store) -> None:
    assert [o.action for o in apply(store, model(), capturing(TENSOR_RULE)).outcomes] == ["created", "created"]


def test_a_model_turned_generative_under_a_capturing_deployment_is_refused_at_the_model(store: store_mod.Store) -> None:
    apply(store, model(), capturing(LOAD_RULE))
    with pytest.raises(ManifestError) as refused:
        apply(store, genai_model())
    assert any("ModelDeployment 'task' uses this Model: spec.cascade.capture:" in i.message for i in refused.value.issues), \
        refused.value.issues


def test_a_deployment_stored_with_it_still_loads_and_runs(store: store_mod.Store) -> None:
    """As an earlier release, which accepted it, stored it."""
    apply(store, genai_model())
    spec = capturing(GENERATIVE_RULE)["spec"]
    store.apply([ObjectWrite("ModelDeployment", "task", {}, spec)], Event("t", "apply", "ModelDeployment", "task", "apply"))
    read = catalog.read_stored(store.get("ModelDeployment", "task"), catalog.parse_deployment)
    route = cascade_rules.route_of("task", read, {}, {})
    assert route is not None and [s.variant for s in route.stages] == ["small", "large"]
    # the Model it uses is not refused for what the deployment already had
    assert [o.action for o in apply(store, genai_model()).outcomes] == ["unchanged"]
    # ... and the deployment, applied again as it is stored, is told
    with pytest.raises(ManifestError) as refused:
        apply(store, capturing(GENERATIVE_RULE))
    assert [i.field for i in refused.value.issues] == ["spec.cascade.capture"]
