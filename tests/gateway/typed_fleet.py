"""A control plane and a real agent in Lyon serving a model of FP32, FP16, INT32, UINT8
and BOOL inputs (``typed``: each output is its input) and a one-input FP32 model, for the
tests of what the CLI and the Python client send for plain lists."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

from onnx import TensorProto

from orchestrator.testing import harness, manifests, onnx_models

SITE = {"edge-lyon": dict(country="FR", region="fr", lat=45.76, lon=4.83)}
TYPED = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "i32": TensorProto.INT32, "u8": TensorProto.UINT8,
         "flag": TensorProto.BOOL}


@contextlib.asynccontextmanager
async def serving(root: pathlib.Path, fp32_model: str) -> AsyncIterator[str]:
    """The control plane's URL once ``typed`` and ``fp32_model`` (three FP32 inputs in a row)
    both answer in Lyon."""
    typed = onnx_models.build_identity(root / "artifacts" / "typed.onnx", TYPED)
    mlp = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=3, hidden=8, out_dim=2, seed=1)
    body = manifests.bundle(
        manifests.edge_site("edge-lyon", **SITE["edge-lyon"]),
        manifests.onnx_model("typed", "typed.onnx", typed.sha256),
        manifests.onnx_model(fp32_model, "intent.onnx", mlp.sha256),
        manifests.deployment("typed-fr", "typed", 1, {"residency": ["FR"], "tiers": ["edge"]}),
        manifests.deployment("intent-fr", fp32_model, 1, {"residency": ["FR"], "tiers": ["edge"]}),
    )

    def ready(cp: Any) -> bool:
        return all(any(e.healthy for e in cp.table.endpoints(m)) for m in ("typed", fp32_model))

    async with harness.serving_fleet(root, body, SITE, ready=ready, what=f"typed and {fp32_model} in Lyon") as fleet:
        assert fleet.cp is not None
        yield fleet.cp.http_url
