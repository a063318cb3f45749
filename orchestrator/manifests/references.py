"""Checks that need more than one document: references between kinds.

An apply is judged against the union of what is stored and what the request brings, so
a file may define a Model and the deployment that uses it together, and a deployment may
name a Model applied earlier. A Model the request brings but refused for errors of its
own still exists as far as names go: a deployment naming it is not judged (its variants
are unknown) rather than told the Model does not exist. A Model the request changes is
judged against the stored deployments that use it too (those the request does not bring
with it): dropping or changing the variant one names would leave it naming nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping

from orchestrator.manifests import cascade as cascade_schema
from orchestrator.manifests import schema
from orchestrator.manifests.errors import ManifestIssue
from orchestrator.manifests.loader import LoadedDocument, Path, format_path


def check_references(
    incoming: Iterable[LoadedDocument],
    stored_models: Mapping[str, schema.ModelSpec],
    refused: Collection[tuple[str, str]] = (),
    stored_deployments: Mapping[str, schema.ModelDeploymentSpec] | None = None,
) -> list[ManifestIssue]:
    """``refused``: (kind, name) of the request's documents refused for their own errors;
    ``stored_deployments``: by name, at least those using a Model the request brings."""
    incoming = list(incoming)
    models = dict(stored_models)
    for d in incoming:
        if isinstance(d.doc, schema.ModelDoc):
            models[d.name] = d.doc.spec
    unread = {name for kind, name in refused if kind == "Model"}
    # listed once, however many deployments name a missing Model
    known = functools.cache(lambda: ", ".join(sorted({*models, *unread})) or "none")
    issues: list[ManifestIssue] = []
    for d in incoming:
        if isinstance(d.doc, schema.ModelDeploymentDoc) and d.doc.spec.model not in unread:
            issues.extend(_check_deployment(_at(d), d.doc.spec, models, known))
    brought = {d.name for d in incoming if isinstance(d.doc, schema.ModelDeploymentDoc)}
    brought |= {name for kind, name in refused if kind == "ModelDeployment"}
    users: dict[str, list[tuple[str, schema.ModelDeploymentSpec]]] = {}  # the stored deployments that stay, by model
    for name, spec in sorted((stored_deployments or {}).items()):
        if name not in brought:
            users.setdefault(spec.model, []).append((name, spec))
    for d in incoming:
        if isinstance(d.doc, schema.ModelDoc):
            issues.extend(_check_users(d, users.get(d.name, ()), stored_models, models, known))
    return issues


def _at(d: LoadedDocument) -> Callable[[Path, str], ManifestIssue]:
    """An issue at a field of ``d``."""
    def issue(path: Path, message: str) -> ManifestIssue:
        return ManifestIssue(d.file, d.index, format_path(path), d.line_of(path), message)

    return issue


def _check_users(d: LoadedDocument, users: Iterable[tuple[str, schema.ModelDeploymentSpec]],
                 before: Mapping[str, schema.ModelSpec], after: Mapping[str, schema.ModelSpec],
                 known: Callable[[], str]) -> list[ManifestIssue]:
    """What Model ``d`` breaks in the stored deployments that use it (``users``, by name),
    reported at ``d``: each problem a deployment has with the new Model and had not with the
    stored one (one it had already is not this Model's to answer for, nor should it block
    fixing others)."""
    out: list[ManifestIssue] = []
    for name, spec in users:
        found = _for_user(d, name)
        had = {i.message for i in _check_deployment(found, spec, before, known)} if d.name in before else set()
        out.extend(i for i in _check_deployment(found, spec, after, known) if i.message not in had)
    return out


def _for_user(d: LoadedDocument, deployment: str) -> Callable[[Path, str], ManifestIssue]:
    """An issue of the stored ``deployment`` (at its field path), reported at Model ``d``."""
    def issue(path: Path, message: str) -> ManifestIssue:
        return ManifestIssue(d.file, d.index, "spec.variants", d.line_of(("spec", "variants")),
                             f"ModelDeployment {deployment!r} uses this Model: {format_path(path)}: {message}; "
                             "apply that deployment changed along with it, or change it first")

    return issue


def _check_deployment(issue: Callable[[Path, str], ManifestIssue], spec: schema.ModelDeploymentSpec,
                      models: Mapping[str, schema.ModelSpec], known: Callable[[], str]) -> list[ManifestIssue]:
    model = models.get(spec.model)
    if model is None:
        return [issue(("spec", "model"), f"Model {spec.model!r} does not exist (known models: {known()})")]
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
    if spec.cascade is not None:
        out.extend(_check_cascade(issue, spec, spec.cascade, spec.model, by_name))
    return out


def _check_cascade(issue: Callable[[Path, str], ManifestIssue], spec: schema.ModelDeploymentSpec, cascade: cascade_schema.Cascade,
                   model: str, variants: Mapping[str, schema.Variant]) -> list[ManifestIssue]:
    """Stages are variants this deployment places on distinct tiers, each rule fits its
    stage's runtime, and every stage accepts what the first one does; capture only where it
    keeps something: a generative cascade is answered on the OpenAI routes, which capture
    nothing. Only here, where an apply is judged: a deployment an earlier release stored with
    it still reads, and runs, capturing nothing."""
    if not isinstance(spec.variant, dict):
        return [issue(("spec", "cascade"), "a cascade needs one variant per tier in spec.variant "
                                           "(e.g. {edge: distilled, datacenter: full}): its stages are those variants")]
    placed = {name: sorted(t for t, v in spec.variant.items() if v == name) for name in set(spec.variant.values())}
    out: list[ManifestIssue] = []
    first: tuple[int, schema.Variant] | None = None
    for i, stage in enumerate(cascade.stages):
        at: Path = ("spec", "cascade", "stages", i)
        variant = variants.get(stage.variant)
        if variant is None:
            out.append(issue((*at, "variant"), f"Model {model!r} has no variant {stage.variant!r} (has: {', '.join(variants)})"))
            continue
        if stage.variant not in placed:
            out.append(issue((*at, "variant"), f"variant {stage.variant!r} is on no tier of spec.variant "
                                               f"({', '.join(f'{t}: {v}' for t, v in spec.variant.items())})"))
        rule = stage.escalate
        if rule is not None and rule.confidence is not None and variant.runtime in cascade_schema.GENERATIVE_RUNTIMES:
            out.append(issue((*at, "escalate", "confidence"), f"variant {stage.variant!r} is generative ({variant.runtime}): "
                                                              "use meanLogprobBelow, truncated or refusal"))
        if rule is not None and rule.generative and variant.runtime in cascade_schema.TENSOR_RUNTIMES:
            out.append(issue((*at, "escalate"), f"variant {stage.variant!r} is a tensor model ({variant.runtime}): "
                                                "use confidence (meanLogprobBelow, truncated and refusal are for generative models)"))
        if rule is not None and rule.confidence is not None and variant.outputs:
            names = [o.name for o in variant.outputs]
            if rule.confidence.output not in names:
                out.append(issue((*at, "escalate", "confidence", "output"),
                                 f"variant {stage.variant!r} has no output {rule.confidence.output!r} (declares: {', '.join(names)})"))
        if first is None:
            first = (i, variant)
        else:
            out.extend(issue((*at, "variant"), m) for m in _incompatible(first[1], variant))
    generative = [(s.variant, variants[s.variant].runtime) for s in cascade.stages
                  if s.variant in variants and variants[s.variant].runtime in cascade_schema.GENERATIVE_RUNTIMES]
    if cascade.capture is not None and generative:
        name, runtime = generative[0]
        out.append(issue(("spec", "cascade", "capture"),
                         f"variant {name!r} is generative ({runtime}): its cascade runs on the OpenAI routes, which keep no "
                         "record, so capture captures nothing; only tensor cascades are captured and distilled "
                         "(docs/distillation.md): remove capture"))
    return out


def _incompatible(first: schema.Variant, later: schema.Variant) -> list[str]:
    """Why ``later`` cannot take a request written for ``first`` (only what both declare)."""
    if not first.inputs or not later.inputs:
        return []
    theirs = {t.name: t for t in later.inputs}
    out = []
    for mine in first.inputs:
        other = theirs.get(mine.name)
        if other is None:
            out.append(f"variant {later.name!r} has no input {mine.name!r}, which stage {first.name!r} takes "
                       f"(declares: {', '.join(theirs)})")
        elif other.datatype != mine.datatype:
            out.append(f"input {mine.name!r} is {other.datatype} in variant {later.name!r} but {mine.datatype} in {first.name!r}")
        elif not _shapes_agree(mine.shape, other.shape):
            out.append(f"input {mine.name!r} has shape {other.shape} in variant {later.name!r} but {mine.shape} in {first.name!r}")
    return out


def _shapes_agree(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))
