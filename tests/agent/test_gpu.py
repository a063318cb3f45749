"""The same model on CUDAExecutionProvider and on CPU gives the same answers."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from edge_agent.runtime import onnx
from orchestrator.testing import onnx_models

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnx.available_providers(),
    reason="onnxruntime has no CUDAExecutionProvider here (needs onnxruntime-gpu and a GPU)",
)
def test_cuda_matches_cpu(tmp_path: pathlib.Path) -> None:
    built = onnx_models.build_mlp(tmp_path / "wide.onnx", in_dim=256, hidden=1024, out_dim=16, layers=3, seed=3)
    data = built.path.read_bytes()
    gpu = onnx.OnnxModel.load(data, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu = onnx.OnnxModel.load(data, providers=["CPUExecutionProvider"])
    assert gpu.provider == "CUDAExecutionProvider"
    x = np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32)
    feeds = {"input": x}
    np.testing.assert_allclose(
        gpu.run(feeds, ["output"])[0], cpu.run(feeds, ["output"])[0], rtol=1e-3, atol=1e-5
    )
