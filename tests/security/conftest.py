"""Shared pieces of the security tests: a one-model fleet manifest and its ONNX file."""

from __future__ import annotations

import pathlib

import pytest

from orchestrator.testing import onnx_models

SITE = """
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {{name: {name}}}
spec: {{tier: edge, location: {{country: FR, region: fr, lat: {lat}, lon: 2.35}}}}
"""

MODEL = """
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: intent}
spec:
  variants:
    - name: distilled
      runtime: onnx
      artifact: {uri: intent.onnx, sha256: "SHA"}
      resources: {cpu: 0.1, memoryMiB: 64}
"""

DEPLOYMENT = """
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: intent-fr}
spec:
  model: intent
  replicas: {min: REPLICAS, max: REPLICAS}
  placement: {residency: [FR], tiers: [edge], spread: {by: site, maxSkew: 1}}
"""


def fleet_yaml(sites: list[str], sha: str, replicas: int = 1) -> str:
    docs = [SITE.format(name=s, lat=48.0 + i * 0.1) for i, s in enumerate(sites)]
    docs += [MODEL.replace("SHA", sha), DEPLOYMENT.replace("REPLICAS", str(replicas))]
    return "\n---\n".join(docs)


@pytest.fixture(scope="module")
def built_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, onnx_models.BuiltModel]:
    root = tmp_path_factory.mktemp("sec")
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=5)
    return root, built
