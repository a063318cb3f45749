"""Manifest text for tests and benchmarks: sites, one-variant ONNX models, deployments.

Each builder returns one YAML document; :func:`bundle` joins them into an apply body.
Only what a test varies is a parameter; everything else is the usual small edge setup
(0.1 CPU and 64 MiB per replica). :func:`reading` is what the loader says of a text,
through libyaml or PyYAML's Python parser.
"""

from __future__ import annotations

import contextlib
from typing import Any

import yaml

from orchestrator.manifests import loader, parsing

API_VERSION = "edgeplane.io/v1alpha1"


def doc(kind: str, name: str, spec: Any, labels: dict[str, str] | None = None, **metadata: Any) -> str:
    """One manifest document as block-style YAML (one key per line, so lines are predictable)."""
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    meta.update(metadata)
    return yaml.safe_dump({"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}, sort_keys=False)


def bundle(*docs: str) -> str:
    return "---\n".join(docs)


def edge_site(name: str, country: str, lat: float, lon: float, region: str | None = None) -> str:
    location: dict[str, Any] = {"country": country, "lat": lat, "lon": lon}
    if region is not None:
        location["region"] = region
    return doc("Site", name, {"tier": "edge", "location": location})


def onnx_model(name: str, uri: str, sha256: str, variant: str = "distilled", *,
               inputs: list[dict[str, Any]] | None = None, outputs: list[dict[str, Any]] | None = None) -> str:
    """A one-variant ONNX Model; ``inputs``/``outputs``: the tensors its variant declares."""
    artifact = {"uri": uri, "sha256": sha256}
    spec: dict[str, Any] = {"name": variant, "runtime": "onnx", "artifact": artifact, "resources": {"cpu": 0.1, "memoryMiB": 64}}
    if inputs is not None:
        spec["inputs"] = inputs
    if outputs is not None:
        spec["outputs"] = outputs
    return doc("Model", name, {"variants": [spec]})


def deployment(name: str, model: str, replicas: int, placement: dict[str, Any]) -> str:
    """A deployment of exactly ``replicas`` replicas."""
    return doc("ModelDeployment", name, {"model": model, "replicas": {"min": replicas, "max": replicas}, "placement": placement})


def spread_by_site(**placement: Any) -> dict[str, Any]:
    """A placement that spreads replicas one per site (``maxSkew: 1``)."""
    return {**placement, "spread": {"by": "site", "maxSkew": 1}}


def reading(text: str | bytes, *, libyaml: bool = True, file: str = "m.yaml") -> tuple[Any, list[dict[Any, int]]]:
    """Everything the manifest loader says of ``text`` (the reading and each document's field
    lines); with ``libyaml`` False, read by PyYAML's Python parser alone."""
    with contextlib.nullcontext() if libyaml else parsing.python_parser_only():
        read = loader.read_text(text, file)
    return read, [dict(d.lines) for d in read.documents]
