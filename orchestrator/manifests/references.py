"""Checks that need more than one document: references between kinds.

An apply is judged against the union of what is stored and what the request brings, so
a file may define a Model and the deployment that uses it together, and a deployment may
name a Model applied earlier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from orchestrator.manifests import schema
from orchestrator.manifests.errors import ManifestIssue
from orchestrator.manifests.loader import LoadedDocument, Path, format_path


def check_references(
    incoming: Iterable[LoadedDocument],
    stored_models: Mapping[str, schema.ModelSpec],
) -> list[ManifestIssue]:
    incoming = list(incoming)
    models = dict(stored_models)
    for d in incoming:
        if isinstance(d.doc, schema.ModelDoc):
            models[d.name] = d.doc.spec
    issues: list[ManifestIssue] = []
    for d in incoming:
        if isinstance(d.doc, schema.ModelDeploymentDoc):
            issues.extend(_check_deployment(d, d.doc.spec, models))
    return issues


def _check_deployment(d: LoadedDocument, spec: schema.ModelDeploymentSpec, models: Mapping[str, schema.ModelSpec]) -> list[ManifestIssue]:
    def issue(path: Path, message: str) -> ManifestIssue:
        return ManifestIssue(d.file, d.index, format_path(path), d.line_of(path), message)

    model = models.get(spec.model)
    if model is None:
        known = ", ".join(sorted(models)) or "none"
        return [issue(("spec", "model"), f"Model {spec.model!r} does not exist (known models: {known})")]
    by_name = {v.name: v for v in model.variants}
    tiers = set(spec.placement.tiers)
    out: list[ManifestIssue] = []
    if isinstance(spec.variant, dict):
        for tier, name in spec.variant.items():
            if tier not in tiers:
                out.append(issue(("spec", "variant", tier), f"tier {tier!r} is not in spec.placement.tiers {sorted(tiers)}"))
            variant = by_name.get(name)
            if variant is None:
                out.append(issue(("spec", "variant", tier), f"Model {spec.model!r} has no variant {name!r} (has: {', '.join(by_name)})"))
            elif tier == "edge" and variant.runtime not in schema.EDGE_RUNTIMES:
                out.append(issue(("spec", "variant", tier), f"variant {name!r} is {variant.runtime}: only onnx and onnx-genai variants run at the edge"))
    elif spec.variant is not None:
        variant = by_name.get(spec.variant)
        if variant is None:
            out.append(issue(("spec", "variant"), f"Model {spec.model!r} has no variant {spec.variant!r} (has: {', '.join(by_name)})"))
        elif variant.runtime not in schema.EDGE_RUNTIMES and tiers == {"edge"}:
            out.append(issue(("spec", "variant"), f"variant {spec.variant!r} is {variant.runtime}, which runs only in data centres, but tiers are [edge]"))
    else:
        usable = [t for t in tiers if schema.variant_for_tier(spec, model, t) is not None]
        if not usable:
            out.append(issue(("spec", "variant"), f"no variant of Model {spec.model!r} can run on tiers {sorted(tiers)}"))
    for i, tier in enumerate(spec.routing.fallback):
        if tier not in tiers:
            out.append(issue(("spec", "routing", "fallback", i), f"tier {tier!r} is not in spec.placement.tiers"))
    return out
