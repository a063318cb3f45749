"""Shared pieces of the security tests: a one-model fleet manifest and its ONNX file."""

from __future__ import annotations

import pathlib

import pytest

from orchestrator.testing import manifests, onnx_models

def fleet_yaml(sites: list[str], sha: str, replicas: int = 1) -> str:
    """FR edge sites 0.1° apart and one intent model spread over them."""
    return manifests.bundle(
        *(manifests.edge_site(s, "FR", 48.0 + i * 0.1, 2.35, region="fr") for i, s in enumerate(sites)),
        manifests.onnx_model("intent", "intent.onnx", sha),
        manifests.deployment("intent-fr", "intent", replicas, manifests.spread_by_site(residency=["FR"], tiers=["edge"])),
    )


@pytest.fixture(scope="module")
def built_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, onnx_models.BuiltModel]:
    root = tmp_path_factory.mktemp("sec")
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=5)
    return root, built
