"""The same model on CUDAExecutionProvider and on CPU gives the same answers.

Runs where the agent would load models with CUDA: onnxruntime-gpu and a GPU this process
may use. Elsewhere it skips and says which of the two is missing (onnxruntime-gpu lists
CUDA on a machine without a GPU too, where the test failed instead of skipping).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from edge_agent import capacity
from edge_agent.runtime import onnx
from orchestrator.testing import onnx_models

pytestmark = pytest.mark.gpu


def _why_not_here() -> str | None:
    offered = onnx.available_providers()
    if "CUDAExecutionProvider" not in offered:
        return f"onnxruntime has no CUDAExecutionProvider here (it offers {', '.join(offered)}): install edgeplane[gpu]"
    if "CUDAExecutionProvider" not in capacity.usable_providers(offered, capacity.probe_gpus()):
        return f"onnxruntime-gpu is installed, but this process has no GPU: {capacity.why_no_gpu()}"
    return None


WHY_NOT_HERE = _why_not_here()


@pytest.mark.skipif(WHY_NOT_HERE is not None, reason=str(WHY_NOT_HERE))
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
