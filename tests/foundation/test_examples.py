"""The committed examples: artifacts match their generator and the manifests, and the
manifests validate together."""

from __future__ import annotations

import hashlib
import pathlib

import pytest

from orchestrator.manifests import loader, references, schema
from orchestrator.testing import examples

from .support import EXAMPLES, example_names


def sha256_of(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def declared_artifacts() -> dict[str, str]:
    """artifact uri -> sha256, as models.yaml declares them."""
    out = {}
    for d in loader.load_text((EXAMPLES / "models.yaml").read_text(), "models.yaml"):
        assert isinstance(d.doc, schema.ModelDoc)
        for v in d.doc.spec.variants:
            if v.artifact is not None:
                out[v.artifact.uri] = v.artifact.sha256
    return out


def test_committed_artifacts_are_what_the_generator_builds(tmp_path: pathlib.Path) -> None:
    regenerated = examples.write(tmp_path)
    committed = {p.name: sha256_of(p) for p in (EXAMPLES / "artifacts").iterdir() if p.is_file()}
    assert set(committed) == set(examples.ARTIFACTS) | set(examples.GENAI_PACKAGES) == set(regenerated)
    for name, digest in regenerated.items():
        assert sha256_of(tmp_path / name) == digest  # the generator reports the file it wrote
        assert committed[name] == digest, f"{name}: committed file differs; run python -m orchestrator.testing.examples"


def test_models_yaml_names_the_committed_artifacts() -> None:
    declared = declared_artifacts()
    assert declared, "the examples declare no onnx artifact"
    for uri, digest in declared.items():
        path = (EXAMPLES / uri).resolve()
        assert path.is_relative_to(EXAMPLES.resolve()) and path.is_file(), uri
        assert sha256_of(path) == digest, f"{uri}: models.yaml says {digest}, the file is {sha256_of(path)}"
    assert {pathlib.PurePosixPath(u).name for u in declared} == set(examples.ARTIFACTS) | set(examples.GENAI_PACKAGES)


def test_generative_figures_in_models_yaml_are_the_packages_own(tmp_path: pathlib.Path) -> None:
    docs = loader.load_text((EXAMPLES / "models.yaml").read_text(), "models.yaml")
    variants = [v for d in docs if isinstance(d.doc, schema.ModelDoc) for v in d.doc.spec.variants if v.runtime == "onnx-genai"]
    assert len(variants) == 2
    for v in variants:
        built = examples.write_genai(tmp_path, pathlib.PurePosixPath(v.artifact.uri).name)
        g = v.generative
        assert (g.parameters, g.weightBytes, g.contextLength, g.kvBytesPerToken) == (
            built.parameters, built.weight_bytes, built.context_length, built.kv_bytes_per_token), v.name


def test_all_examples_validate_together() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    docs = loader.load_text(loader.bundle([(p.name, p.read_text()) for p in files]))
    assert references.check_references(docs, {}) == []
    got: dict[str, set[str]] = {}
    for d in docs:
        got.setdefault(d.kind, set()).add(d.name)
        assert (EXAMPLES / d.file).read_text().splitlines()[d.line - 1].startswith("apiVersion:"), (d.file, d.line)
    assert got == example_names()
    assert set(got) == set(schema.KINDS)  # the examples show every kind


@pytest.mark.parametrize("name", ["sites.yaml", "models.yaml"])
def test_example_files_validate_alone(name: str) -> None:
    docs = loader.load_text((EXAMPLES / name).read_text(), name)
    assert docs and references.check_references(docs, {}) == []


def test_deployments_need_the_models() -> None:
    deployments = loader.load_text((EXAMPLES / "deployments.yaml").read_text(), "deployments.yaml")
    missing = references.check_references(deployments, {})
    assert {i.field for i in missing} == {"spec.model"} and len(missing) == len(deployments)
    models = {d.name: d.doc.spec for d in loader.load_text((EXAMPLES / "models.yaml").read_text())}
    assert references.check_references(deployments, models) == []  # type: ignore[arg-type]
