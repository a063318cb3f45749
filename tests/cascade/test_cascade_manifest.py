"""``spec.cascade`` validation, table-tested: every error names the file, document, field and line."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from orchestrator.manifests import loader, references
from orchestrator.manifests.errors import ManifestError

SHA = "0" * 64
IO = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}],
      "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}]}


def model(**variant_changes: Any) -> dict[str, Any]:
    small = {"name": "small", "runtime": "onnx", "artifact": {"uri": "small.onnx", "sha256": SHA}, "powerWatts": 5, **IO}
    large = {"name": "large", "runtime": "onnx", "artifact": {"uri": "large.onnx", "sha256": SHA}, "powerWatts": 300, **IO}
    for key, value in variant_changes.items():
        large[key] = value
    return {"apiVersion": "edgeplane.io/v1alpha1", "kind": "Model", "metadata": {"name": "task"},
            "spec": {"variants": [small, large]}}


def deployment(cascade: Any = None, **spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": "task", "variant": {"edge": "small", "datacenter": "large"},
        "cascade": cascade if cascade is not None else {"stages": [
            {"variant": "small", "escalate": {"confidence": {"output": "probabilities", "below": 0.8}}},
            {"variant": "large"},
        ]},
    }
    spec.update(spec_changes)
    return {"apiVersion": "edgeplane.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "task"}, "spec": spec}


def check(*docs: dict[str, Any]) -> list[str]:
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
    try:
        loaded = loader.load_text(text, "cascade.yaml")
    except ManifestError as exc:
        return [str(i) for i in exc.issues]
    return [str(i) for i in references.check_references(loaded, {})]


def stages(first_escalate: Any, *, second: str = "large") -> dict[str, Any]:
    return {"stages": [{"variant": "small", "escalate": first_escalate}, {"variant": second}]}


def test_a_valid_cascade_has_no_issue() -> None:
    assert check(model(), deployment()) == []


def test_logits_margin_and_load_rules_are_valid() -> None:
    rule = {"confidence": {"output": "probabilities", "scores": "logits", "measure": "margin", "below": 0.2}, "maxInflight": 8}
    assert check(model(), deployment(stages(rule))) == []


BAD: list[tuple[str, Any, Any, str, str]] = [
    # (case, model changes, deployment, field, message part)
    ("threshold above 1", {}, deployment(stages({"confidence": {"output": "probabilities", "below": 1.5}})),
     "spec.cascade.stages[0].escalate.confidence.below", "less than or equal to 1"),
    ("threshold zero", {}, deployment(stages({"confidence": {"output": "probabilities", "below": 0}})),
     "spec.cascade.stages[0].escalate.confidence.below", "greater than 0"),
    ("unknown scores", {}, deployment(stages({"confidence": {"output": "probabilities", "scores": "odds", "below": 0.5}})),
     "spec.cascade.stages[0].escalate.confidence.scores", "probabilities"),
    ("independent top below 0.5 never escalates", {},
     deployment(stages({"confidence": {"output": "probabilities", "scores": "independent", "below": 0.5}})),
     "spec.cascade.stages[0].escalate.confidence", "would escalate nothing; give a threshold above 0.5"),
    ("positive logprob", {}, deployment(stages({"meanLogprobBelow": 0.5})),
     "spec.cascade.stages[0].escalate.meanLogprobBelow", "less than 0"),
    ("bad refusal pattern", {}, deployment(stages({"refusal": ["(unclosed"]})),
     "spec.cascade.stages[0].escalate.refusal", "not a regular expression"),
    ("empty rule", {}, deployment(stages({})), "spec.cascade.stages[0].escalate", "say when to escalate"),
    ("mixed families", {}, deployment(stages({"confidence": {"output": "probabilities", "below": 0.5}, "truncated": True})),
     "spec.cascade.stages[0].escalate", "a stage serves one kind"),
    ("first stage without rule", {}, deployment({"stages": [{"variant": "small"}, {"variant": "large"}]}),
     "spec.cascade", "needs 'escalate'"),
    ("last stage with rule", {}, deployment({"stages": [
        {"variant": "small", "escalate": {"maxInflight": 2}}, {"variant": "large", "escalate": {"maxInflight": 2}}]}),
     "spec.cascade", "takes no 'escalate'"),
    ("one stage", {}, deployment({"stages": [{"variant": "small", "escalate": {"maxInflight": 2}}]}),
     "spec.cascade.stages", "at least 2"),
    ("three stages, one more than tiers", {}, deployment({"stages": [
        {"variant": "small", "escalate": {"maxInflight": 2}}, {"variant": "large", "escalate": {"maxInflight": 2}},
        {"variant": "huge"}]}),
     "spec.cascade.stages", "at most 2 stages, one per tier"),
    ("repeated stage", {}, deployment({"stages": [{"variant": "small", "escalate": {"maxInflight": 2}}, {"variant": "small"}]}),
     "spec.cascade", "repeated: small"),
    ("unknown field", {}, deployment(stages({"confidence": {"output": "probabilities", "below": 0.5, "above": 1}})),
     "spec.cascade.stages[0].escalate.confidence.above", "unknown field"),
    ("one variant everywhere", {}, deployment(variant="small"), "spec.cascade", "one variant per tier"),
    ("unknown variant", {}, deployment(stages({"maxInflight": 2}, second="huge")),
     "spec.cascade.stages[1].variant", "no variant 'huge'"),
    ("variant not placed", {}, deployment(variant={"edge": "small"}), "spec.cascade.stages[1].variant", "on no tier"),
    ("missing output", {}, deployment(stages({"confidence": {"output": "logits", "below": 0.5}})),
     "spec.cascade.stages[0].escalate.confidence.output", "no output 'logits'"),
    ("generative rule on onnx", {}, deployment(stages({"truncated": True})), "spec.cascade.stages[0].escalate", "tensor model"),
    ("other input name", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]}, deployment(),
     "spec.cascade.stages[1].variant", "no input 'input'"),
    ("other dtype", {"inputs": [{"name": "input", "datatype": "FP16", "shape": [-1, 16]}]}, deployment(),
     "spec.cascade.stages[1].variant", "FP16"),
    ("other shape", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}]}, deployment(),
     "spec.cascade.stages[1].variant", "shape [-1, 32]"),
]


@pytest.mark.parametrize(("changes", "dep", "field", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_cascade_names_field_and_line(changes: dict[str, Any], dep: dict[str, Any], field: str, message: str) -> None:
    issues = check(model(**changes), copy.deepcopy(dep))
    assert issues, "expected an error"
    hit = [i for i in issues if f" {field}:" in i]
    assert hit, issues
    assert any(message in i for i in hit), issues
    assert all(i.startswith("cascade.yaml:") and "(document 1)" in i for i in hit), issues


@pytest.mark.parametrize("scores", ["independent", "independent-logits"])
@pytest.mark.parametrize(("measure", "below"), [("top", 0.9), ("margin", 0.5)])
def test_multi_label_rules_are_valid(scores: str, measure: str, below: float) -> None:
    rule = {"confidence": {"output": "probabilities", "scores": scores, "measure": measure, "below": below}}
    assert check(model(), deployment(stages(rule))) == []


def test_undeclared_inputs_are_not_compared() -> None:
    assert check(model(inputs=[]), deployment()) == []


def test_a_ray_serve_stage_may_take_generative_rules() -> None:
    """ray-serve applications may be generative (onnx-genai and vllm stages take only these rules)."""
    m = model()
    small = m["spec"]["variants"][0]
    del small["artifact"]
    small.update(runtime="ray-serve", importPath="apps.chat:app")
    rule = {"meanLogprobBelow": -1.2, "truncated": True, "refusal": ["(?i)^I cannot"]}
    assert check(m, deployment(stages(rule), variant={"datacenter": "small", "edge": "large"})) == []


def genai_model() -> dict[str, Any]:
    """Both stages ``runtime: onnx-genai`` (edge small, data-centre large), as the OpenAI routes serve them."""
    def variant(name: str, parameters: int, watts: float) -> dict[str, Any]:
        return {"name": name, "runtime": "onnx-genai", "artifact": {"uri": f"{name}.tar", "sha256": SHA}, "powerWatts": watts,
                "generative": {"parameters": parameters, "weightBytes": parameters * 4, "contextLength": 256,
                               "kvBytesPerToken": 64}}
    return {"apiVersion": "edgeplane.io/v1alpha1", "kind": "Model", "metadata": {"name": "task"},
            "spec": {"variants": [variant("small", 1_000, 5), variant("large", 100_000, 300)]}}


def test_onnx_genai_stages_take_generative_rules() -> None:
    rule = {"meanLogprobBelow": -1.2, "truncated": True, "refusal": ["(?i)^I cannot"], "maxInflight": 4}
    assert check(genai_model(), deployment(stages(rule))) == []


@pytest.mark.parametrize(("rule", "field", "message"), [
    ({"confidence": {"output": "probabilities", "below": 0.8}}, "spec.cascade.stages[0].escalate.confidence", "is generative (onnx-genai)"),
    ({"meanLogprobBelow": 0.5}, "spec.cascade.stages[0].escalate.meanLogprobBelow", "less than 0"),
    ({"refusal": ["("]}, "spec.cascade.stages[0].escalate.refusal", "not a regular expression"),
])
def test_bad_rules_on_onnx_genai_stages_are_named(rule: dict[str, Any], field: str, message: str) -> None:
    issues = check(genai_model(), deployment(stages(rule)))
    hit = [i for i in issues if f" {field}:" in i or f" {field}[" in i]
    assert hit and any(message in i for i in hit), issues
