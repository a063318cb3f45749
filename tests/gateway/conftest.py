"""One control plane and three edge agents (FR, DE, ES), shared by the gateway tests, and a
loopback server that never answers (``silent``) for the client's."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from orchestrator.testing import harness, manifests, onnx_models

from .loopback import hanging

AGENTS = {
    "edge-paris": dict(country="FR", region="fr", lat=48.8566, lon=2.3522),
    "edge-berlin": dict(country="DE", region="de", lat=52.52, lon=13.405),
    "edge-madrid": dict(country="ES", region="es", lat=40.4168, lon=-3.7038),
}


def fleet_yaml(sha256: str) -> str:
    """Three edge sites, two models on the same file, intent over the EU and fields in FR."""
    return manifests.bundle(
        *(manifests.edge_site(name, **where) for name, where in AGENTS.items()),
        manifests.onnx_model("intent", "intent.onnx", sha256),
        manifests.onnx_model("fields", "intent.onnx", sha256),
        manifests.deployment("intent-eu", "intent", 3, manifests.spread_by_site(residency=["EU"], tiers=["edge"])),
        manifests.deployment("fields-fr", "fields", 1, {"residency": ["FR"], "tiers": ["edge"]}),
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, onnx_models.BuiltModel]:
    root = tmp_path_factory.mktemp("gw")
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    return root, built


def intent_and_fields_ready(cp: Any) -> bool:
    return len([e for e in cp.table.endpoints("intent") if e.healthy]) == 3 and len(cp.table.endpoints("fields")) == 1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(model_file: tuple[pathlib.Path, onnx_models.BuiltModel]):
    root, built = model_file
    async with harness.serving_fleet(root, fleet_yaml(built.sha256), AGENTS, ready=intent_and_fields_ready, timeout=120,
                                     what="3 intent endpoints and the fields endpoint") as f:
        yield f


@pytest_asyncio.fixture
async def silent() -> AsyncIterator[str]:
    """Accepts connections, reads, never answers."""
    async with hanging() as url:
        yield url
